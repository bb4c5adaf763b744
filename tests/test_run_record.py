"""The run record, the light restore and data opened once per process.

A real tiny training (4 steps) writes `run.json` and saves the record with
every checkpoint; its facts are checked against an independent read of the
data; the light restore (params and batch_stats only) equals a full restore
of the train state; importing and running the restore loads no training
module; each split is opened once per process in training and in evaluation.
"""

import collections
import dataclasses
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import synthetic_data
from test_train import REPO
from test_train import tiny_config
import xla_flags

from cco_jax import checkpointing
from cco_jax import evaluation
from cco_jax import restore
from cco_jax import run_record
from cco_jax import train
from cco_jax import train_setup
from cco_jax import train_step as step_lib
from cco_jax.data import preparation
from cco_jax.data import sources

TRAINING_MODULES = (
  'cco_jax.optimizers',
  'cco_jax.train_step',
  'cco_jax.train',
  'cco_jax.losses',
  'cco_jax.baseline_losses',
  'cco_jax.objectives',
)
STEPS = 4


class OpenCounter:
  """Counts `sources._data_source` calls (the one function that opens a
  TFDS split) by (TFDS builder name, TFDS split), and the datasets prepared
  (checked and their builder read) by name."""

  def __init__(self, monkeypatch):
    self.opens = collections.Counter()
    self.prepared = collections.Counter()
    original = sources._data_source  # pylint: disable=protected-access
    prepare = sources.prepare_dataset

    def counted(builder, split, has_masks):
      self.opens[(builder.name, split)] += 1
      return original(builder, split, has_masks)

    def counted_prepare(name, **kwargs):
      self.prepared[name] += 1
      return prepare(name, **kwargs)

    monkeypatch.setattr(sources, '_data_source', counted)
    monkeypatch.setattr(sources, 'prepare_dataset', counted_prepare)
    monkeypatch.setattr(preparation, 'prepare_dataset', counted_prepare)


@pytest.fixture(scope='module')
def trained_run(
  tmp_path_factory, synthetic_pets_dir, synthetic_cvd_dir, synthetic_data_dir
):
  """A 4-step run, and the opens of every TFDS split during its training."""
  workdir = tmp_path_factory.mktemp('record_run') / 'run'
  config = tiny_config(
    synthetic_pets_dir,
    synthetic_cvd_dir,
    synthetic_data_dir,
    num_train_steps=STEPS,
    checkpoint_every_steps=2,
  )
  with pytest.MonkeyPatch.context() as monkeypatch:
    counter = OpenCounter(monkeypatch)
    train.train_and_evaluate(config, str(workdir))
  return workdir, config, counter


def test_training_opens_each_split_once(trained_run):
  _, _, counter = trained_run
  assert counter.prepared == {'oxford_iiit_pet': 1, 'cats_vs_dogs': 1}
  opens = counter.opens
  # Pets' TFDS 'train' split (carved into train and validation) and 'test',
  # Cats-vs-Dogs' 'train' (the 'ood' split of the final evaluation).
  assert opens == {
    ('oxford_iiit_pet_masks', 'train'): 1,
    ('oxford_iiit_pet_masks', 'test'): 1,
    ('cats_vs_dogs_ood', 'train'): 1,
  }


def test_run_json_holds_what_the_data_says(trained_run):
  workdir, config, _ = trained_run
  saved = json.loads((workdir / 'run.json').read_text())
  record = run_record.RunRecord.load(workdir / 'run.json')
  assert record.to_json() == saved and saved['schema'] == run_record.SCHEMA
  # An independent read of the data: every record of every split.
  splits = sources.load_split_sources(config.data)
  train_labels = [
    int(splits['train'][i]['species']) for i in range(len(splits['train']))
  ]
  assert record.class_names == ('cat', 'dog') and record.num_classes == 2
  assert record.group_names == ('all',)
  assert record.split_sizes == {k: len(v) for k, v in splits.items()}
  assert record.split_sizes['test'] == synthetic_data.NUM_TEST
  assert record.train_class_counts == tuple(np.bincount(train_labels, None, 2))
  assert record.train_group_counts == (len(train_labels),)
  assert (record.dataset, record.task) == ('oxford_iiit_pet', 'species')
  assert record.dataset_version == str(splits['train'].builder.version)
  assert record.prepare_options['store_size'] == config.data.store_size
  assert record.image_size == 32 and record.cam_size == (4, 4)
  assert record.head == 'softmax' and config.loss.name != 'bce'
  assert record.normalize == config.data.normalize
  if record.normalize:
    np.testing.assert_allclose(record.mean, [0.485, 0.456, 0.406])
  else:
    assert (record.mean, record.std) == ((0.0,) * 3, (1.0,) * 3)
  assert record.boundary_is_foreground == config.data.boundary_is_foreground


def test_every_checkpoint_carries_the_record(trained_run):
  workdir, config, _ = trained_run
  expected = json.loads((workdir / 'run.json').read_text())
  manager = checkpointing.create_manager(str(workdir))
  try:
    assert sorted(manager.all_steps()) == [2, 4]
    for step in manager.all_steps():
      item = manager.restore(
        step, args=ocp.args.Composite(run=ocp.args.JsonRestore())
      )['run']
      assert item == expected, step
  finally:
    manager.close()


def test_light_restore_equals_the_full_restore(trained_run):
  workdir, config, _ = trained_run
  trained = restore.restore_model(str(workdir), step='last')
  assert (trained.step, trained.checkpoint) == (STEPS, 'last')
  assert trained.record == run_record.RunRecord.load(workdir / 'run.json')
  setup = train_setup.build(config)
  template = step_lib.create_train_state(
    jax.random.key(0, impl=config.rng_impl or None),
    setup.model,
    config.data.image_size,
    setup.tx,
  )
  manager = checkpointing.create_manager(str(workdir))
  try:
    state = checkpointing.restore(manager, template, STEPS)[0]
  finally:
    manager.close()
  full = {'params': state.params, 'batch_stats': state.batch_stats}
  assert jax.tree.structure(full) == jax.tree.structure(trained.variables)
  for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(trained.variables)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_restore_and_evaluation_open_no_more_than_they_use(
  trained_run, monkeypatch
):
  workdir, _, _ = trained_run
  counter = OpenCounter(monkeypatch)
  restore.restore_model(str(workdir))
  assert not counter.opens  # The record says what the run is.
  settings = evaluation.default_config()
  settings.evaluators = ('classification', 'interventions', 'localisation')
  settings.num_examples = 4
  evaluation.evaluate_checkpoint(str(workdir), settings)
  # The test split once for three evaluators and the donors; Cats-vs-Dogs.
  assert counter.opens == {
    ('oxford_iiit_pet_masks', 'test'): 1,
    ('cats_vs_dogs_ood', 'train'): 1,
  }


def test_restore_loads_no_training_module(trained_run):
  workdir, _, _ = trained_run
  code = (
    'import sys\n'
    'import cco_jax.restore, cco_jax.explain, cco_jax.evaluation\n'
    f'training = {TRAINING_MODULES!r}\n'
    'print(sorted(m for m in training if m in sys.modules))\n'
    f'trained = cco_jax.restore.restore_model({str(workdir)!r})\n'
    'cco_jax.explain.Explainer.from_trained(trained)\n'
    'print(sorted(m for m in training if m in sys.modules))\n'
  )
  env = dict(
    os.environ,
    PYTHONPATH=os.pathsep.join([str(REPO)] + sys.path),
    XLA_FLAGS=xla_flags.for_devices(1),
  )
  result = subprocess.run(
    [sys.executable, '-c', code],
    capture_output=True,
    text=True,
    env=env,
    cwd=REPO,
    timeout=300,
    check=False,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.splitlines()[-2:] == ['[]', '[]']


def test_a_workdir_without_run_json_is_refused_then_converted(
  trained_run, tmp_path
):
  workdir, _, _ = trained_run
  old = tmp_path / 'old'
  shutil.copytree(workdir, old, ignore=shutil.ignore_patterns('run.lock'))
  (old / 'run.json').unlink()
  with pytest.raises(run_record.RecordError) as info:
    restore.restore_model(str(old))
  message = str(info.value)
  assert '\n' not in message and 'experiments.run_record' in message
  assert not (old / 'run.json').exists()  # Restoring writes nothing.
  # The conversion command derives the same record from the config and data.
  from experiments import (
    run_record as convert,  # pylint: disable=g-import-not-at-top
  )

  path = convert.write(str(old))
  assert run_record.RunRecord.load(path) == run_record.RunRecord.load(
    workdir / 'run.json'
  )
  assert restore.restore_model(str(old)).record == run_record.RunRecord.load(
    path
  )


def test_record_round_trip_and_one_line_errors(tmp_path):
  record = run_record.RunRecord(
    dataset='folder',
    dataset_version='1.0.0',
    prepare_options={'store_size': 0},
    task='label',
    class_names=('a', 'b', 'c'),
    group_names=('g0', 'g1'),
    split_sizes={'train': 5, 'validation': 2},
    train_class_counts=(2, 2, 1),
    train_group_counts=(3, 2),
    image_size=16,
    cam_size=(2, 2),
    normalize=True,
    mean=(0.5, 0.5, 0.5),
    std=(0.25, 0.25, 0.25),
    boundary_is_foreground=False,
    head='sigmoid',
  )
  path = tmp_path / 'run.json'
  record.save(path)
  assert run_record.RunRecord.load(path) == record
  assert record.num_classes == 3
  # A record written before `head` was recorded still loads (head None).
  older = record.to_json()
  del older['head']
  path.write_text(json.dumps(older))
  assert run_record.RunRecord.load(path) == dataclasses.replace(
    record, head=None
  )
  record.save(path)

  def error(text):
    if text is None:
      path.unlink(missing_ok=True)
    else:
      path.write_text(text)
    with pytest.raises(run_record.RecordError) as info:
      run_record.RunRecord.load(path)
    message = str(info.value)
    assert '\n' not in message and str(path) in message
    assert 'experiments.run_record' in message
    return message

  assert 'does not exist' in error(None)
  assert 'not JSON' in error('{"schema": 1,')
  values = record.to_json()
  assert 'schema 2' in error(json.dumps({**values, 'schema': 2}))
  del values['class_names']
  assert "missing ['class_names']" in error(json.dumps(values))
  assert dataclasses.replace(record, image_size=8) != record


def test_a_checkpoint_of_another_model_is_refused_in_one_line(
  trained_run, tmp_path
):
  workdir, _, _ = trained_run
  other = tmp_path / 'other'
  shutil.copytree(workdir, other, ignore=shutil.ignore_patterns('run.lock'))
  config = json.loads((other / 'config.json').read_text())
  config['model']['num_filters'] *= 2
  (other / 'config.json').write_text(json.dumps(config))
  with pytest.raises(ValueError, match='does not hold this model') as info:
    restore.restore_model(str(other))
  assert '\n' not in str(info.value) and 'config.json' in str(info.value)
