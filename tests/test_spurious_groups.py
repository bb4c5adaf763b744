"""The grouped spurious-background benchmark and training on groups.

Split and kind assignment (exact counts, determinism), the written folder
layout (masks, composites, byte-identical reruns), the folder builder's
groups, and a real run that fills `loss.group_counts` from the data, selects
its best checkpoint on validation worst-group accuracy and restores it.
"""

import csv
import hashlib
import json
import math
import os
from pathlib import Path
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from cco_jax import configuration
from cco_jax import data as data_lib
from cco_jax import metric_writers
from cco_jax import restore
from cco_jax import train
from cco_jax import train_setup
from cco_jax.data import spurious
from cco_jax.data import spurious_groups
from cco_jax.data.datasets import oxford_iiit_pet
from experiments import compare_grid
from experiments import compare_table
from experiments.configs import pets as pets_configs
from experiments.configs import spurious as spurious_configs

REPO = Path(__file__).resolve().parents[1]
VAL, TEST = 1, 2  # Images per group in validation and test.


def _entries(num_cats, num_dogs):
  return [
    oxford_iiit_pet.ListEntry(f'pet_{s}_{i}', 1, s)
    for s, n in ((0, num_cats), (1, num_dogs))
    for i in range(n)
  ]


@pytest.mark.parametrize(
  'num_cats, num_dogs, correlation, val, test, held_out',
  [
    (40, 17, 0.95, 3, 5, 'split'),
    (23, 30, 1.0, 2, 2, 'split'),
    (61, 12, 0.5, 1, 4, 'split'),
    (40, 17, 0.95, 3, 5, 'paired'),
    (23, 30, 1.0, 2, 9, 'paired'),
  ],
)
def test_assign_counts_are_exact(
  num_cats, num_dogs, correlation, val, test, held_out
):
  entries = _entries(num_cats, num_dogs)
  kwargs = dict(
    correlation=correlation,
    val_per_group=val,
    test_per_group=test,
    held_out=held_out,
  )
  chosen = spurious_groups.assign(entries, seed=3, **kwargs)
  assert set(chosen) == {e.name for e in entries}
  per_kind = 1 if held_out == 'paired' else 2
  for species, total in ((0, num_cats), (1, num_dogs)):
    mine = [chosen[e.name] for e in entries if e.species == species]
    aligned = spurious.ALIGNED_KIND[species]
    for split, per_group in (('test', test), ('validation', val)):
      kinds = [k for s, k in mine if s == split]
      assert len(kinds) == per_kind * per_group
      if held_out == 'paired':  # Each rendered on both kinds.
        assert set(kinds) == {spurious_groups.BOTH}
      else:
        assert kinds.count(aligned) == per_group
    train_kinds = [k for s, k in mine if s == 'train']
    n = total - per_kind * (val + test)
    assert len(train_kinds) == n
    other = math.floor((1 - correlation) * n + 0.5)
    assert train_kinds.count(aligned) == n - other
  assert spurious_groups.assign(entries, seed=3, **kwargs) == chosen
  assert spurious_groups.assign(entries, seed=4, **kwargs) != chosen


def test_assign_refuses_too_few_images():
  with pytest.raises(ValueError, match='dog: 6 images.*test_per_group'):
    spurious_groups.assign(
      _entries(30, 6),
      correlation=0.9,
      val_per_group=1,
      test_per_group=2,
      seed=0,
    )


def _make(pets_dir: Path, out: Path, held_out: str = 'paired') -> dict:
  result = subprocess.run(
    [
      sys.executable,
      '-m',
      'experiments.make_spurious',
      '--grouped',
      f'--pets_dir={pets_dir}',
      f'--out_dir={out}',
      '--correlation=0.9',
      f'--val_per_group={VAL}',
      f'--test_per_group={TEST}',
      f'--held_out={held_out}',
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope='module')
def grouped(tmp_path_factory, synthetic_pets_dir):
  out = tmp_path_factory.mktemp('grouped') / 'bench'
  summary = _make(synthetic_pets_dir, out)
  with open(out / 'labels.csv') as f:
    rows = list(csv.DictReader(f))
  return out, summary, rows


def test_layout_masks_and_composites(grouped, synthetic_pets_dir):
  out, summary, rows = grouped
  listed = [
    e.name
    for split in ('trainval', 'test')
    for e in oxford_iiit_pet.read_split_list(
      synthetic_pets_dir / 'annotations' / f'{split}.txt'
    )
  ]
  held_out = [r['image'][:-4] for r in rows if r['split'] != 'train']
  # Paired: every held-out pet twice, once on each kind, never in train.
  pairs = {}
  for r in rows:
    if r['split'] != 'train':
      name, _, kind = r['image'][:-4].rpartition('-')
      pairs.setdefault(name, []).append((r['split'], kind, r['group']))
  assert all(
    sorted(k for _, k, _ in v) == ['smooth', 'textured']
    and len({s for s, _, _ in v}) == 1
    and all(g.endswith(k) for _, k, g in v)
    for v in pairs.values()
  )
  train = [r['image'][:-4] for r in rows if r['split'] == 'train']
  assert sorted(train + list(pairs)) == sorted(listed)
  assert len(held_out) == 2 * len(pairs)
  for split, per_group in (('test', TEST), ('validation', VAL)):
    assert summary['counts'][split] == dict.fromkeys(
      ('cat_smooth', 'cat_textured', 'dog_smooth', 'dog_textured'), per_group
    )
  for row in rows[:12]:
    stem = row['image'][:-4]
    name = stem if row['split'] == 'train' else stem.rpartition('-')[0]
    trimap = np.asarray(
      Image.open(synthetic_pets_dir / 'annotations' / 'trimaps' / f'{name}.png')
    )
    mask = np.asarray(Image.open(out / 'masks' / f'{stem}.png'))
    pet = trimap != oxford_iiit_pet.TRIMAP_BACKGROUND
    np.testing.assert_array_equal(mask, np.where(pet, 255, 0))
    source = np.asarray(
      Image.open(synthetic_pets_dir / 'images' / f'{name}.jpg').convert('RGB'),
      np.float32,
    )
    written = np.asarray(Image.open(out / 'images' / f'{stem}.jpg'), np.float32)
    padded = np.pad(pet, 4)
    inside = np.logical_and.reduce(
      [
        np.roll(padded, (dy, dx), (0, 1))[4:-4, 4:-4]
        for dy in range(-4, 5)
        for dx in range(-4, 5)
      ]
    )  # The pet eroded by 4 px.
    if inside.any():  # JPEG: away from the edge the pet is unchanged.
      assert np.abs(written - source)[inside].mean() < 8
    species = 'cat' if name[0].isupper() else 'dog'
    assert row['label'] == species and row['group'].startswith(species)


def test_rerun_is_byte_identical(grouped, synthetic_pets_dir, tmp_path):
  out, _, _ = grouped
  again = tmp_path / 'again'
  _make(synthetic_pets_dir, again)

  def hashes(root):
    return {
      str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
      for p in sorted(root.rglob('*'))
      if p.is_file() and p.name != spurious.METADATA_FILE
    }

  assert hashes(again) == hashes(out)


def _config(out: Path, tfds_dir: Path, variant: str, **overrides):
  config = spurious_configs.get_config(variant)
  return configuration.apply_overrides(
    config,
    {
      'data.manual_dir': str(out),
      'data.tfds_data_dir': str(tfds_dir),
      'data.image_size': 32,
      'model.num_filters': 8,
      'batch_size': 8,
      'eval_batch_size': 8,
      'num_train_steps': 6,
      'eval_every_steps': 2,
      'log_every_steps': 2,
      'keep_checkpoints': 1,
      **overrides,
    },
  )


def test_group_counts_and_names_come_from_the_data(grouped, tmp_path):
  out, summary, rows = grouped
  config = _config(out, tmp_path / 'tfds', 'group_dro')
  names = data_lib.group_names(config.data)
  assert names == ('cat_smooth', 'cat_textured', 'dog_smooth', 'dog_textured')
  # Validation comes from labels.csv, so train = the 'train' rows.
  expected = tuple(summary['counts']['train'].get(n, 0) for n in names)
  assert data_lib.group_counts(config.data, 'train') == expected
  filled = train_setup.with_data_fields(config)
  assert tuple(filled.loss.group_counts) == expected
  assert tuple(config.loss.group_counts) == ()  # The input is not changed.
  rrr = train_setup.with_data_fields(_config(out, tmp_path / 'tfds', 'rrr'))
  assert rrr.data.pixel_masks and not rrr.loss.group_counts
  batch = next(
    iter(
      data_lib.create_eval_iterator(
        config.data,
        'test',
        cam_size=(4, 4),
        global_batch_size=8,
        num_devices=1,
        with_file_name=True,
      )
    )
  )
  by_file = {r['image']: r['group'] for r in rows}
  for name, group in zip(batch['file_name'][0], batch['group'][0]):
    if name:
      assert names[group] == by_file[Path(str(name)).name]


def test_best_metric_needs_groups(synthetic_config):
  config = pets_configs.get_config('cpu')
  with config.unlocked():
    config.best_metric = 'worst_group_accuracy'
    config.data = synthetic_config()
  with pytest.raises(ValueError, match='best_metric.*needs groups'):
    train_setup.best_metric(config, data_lib.group_names(config.data))
  config.best_metric = 'acuracy'
  with pytest.raises(ValueError, match="best_metric='acuracy'"):
    train_setup.best_metric(config, ('a', 'b'))


def test_group_dro_run_selects_and_restores_on_worst_group(grouped, tmp_path):
  out, summary, _ = grouped
  workdir = tmp_path / 'run'
  config = _config(out, tmp_path / 'tfds', 'group_dro')
  final = train.train_and_evaluate(config, str(workdir))
  saved = json.loads((workdir / 'config.json').read_text())
  names = sorted(summary['counts']['train'])
  assert saved['loss']['group_counts'] == [
    summary['counts']['train'][n] for n in names
  ]
  evals = [
    r
    for r in metric_writers.read_metrics(str(workdir))
    if 'eval_worst_group_accuracy' in r
  ]
  assert [r['step'] for r in evals] == [2, 4, 6]
  for r in evals:
    groups = [r[f'eval_group_accuracy/{n}'] for n in names]
    assert r['eval_worst_group_accuracy'] == pytest.approx(min(groups))
  best = max(evals, key=lambda r: (r['eval_worst_group_accuracy'], -r['step']))
  run = restore.restore_model(str(workdir), step='best')
  assert run.checkpoint == 'best'
  assert run.step in [
    r['step']
    for r in evals
    if r['eval_worst_group_accuracy'] == best['eval_worst_group_accuracy']
  ]
  assert (
    0 <= final['test_worst_group_accuracy'] <= final['test_accuracy'] + 1e-9
  )


def test_compare_table_measures():
  report = {
    'step': 7,
    'checkpoint_metrics': {
      'eval_worst_group_accuracy': 0.25,
      'eval_accuracy': 0.5,
    },
    'accuracy': 0.6,
    'worst_group_accuracy': 0.2,
    'average_group_accuracy': 0.55,
    'group_accuracy/cat_smooth': 0.9,
    'group_accuracy/cat_textured': 0.4,
    'group_accuracy/dog_smooth': 0.2,
    'group_accuracy/dog_textured': 0.7,
    'bg_share': 0.3,
    'perturbations': {'background_noise': {'flip_rate': 0.1}},
    'per_example': {'label': [0, 1, 1, 0], 'prediction': [0, 0, 1, 1]},
  }
  numbers = compare_table.checkpoint_numbers(report)
  assert numbers['minority_accuracy'] == pytest.approx(0.3)
  assert numbers['validation_worst_group_accuracy'] == 0.25
  assert numbers['validation_accuracy'] == 0.5
  assert numbers['groups']['dog_smooth'] == 0.2
  assert numbers['correct'] == '1010'


@pytest.mark.parametrize('steps', [(20, 40, 60, 80), (10, 30, 100, 200, 310)])
def test_late_fall_is_the_share_of_the_fall_in_the_last_third(steps):
  rng = np.random.default_rng(len(steps))
  first, last = 2.0 + rng.random(), rng.random()
  # Linear from first to last: the last third holds a third of the fall.
  line = [(s, first + (last - first) * (s - steps[0]) / (steps[-1] - steps[0]))
          for s in steps]  # fmt: skip
  assert compare_table.late_fall(line) == pytest.approx(1 / 3)
  # Flat after the first two thirds: no late fall; all at the end: all of it.
  early = [(s, first if s == steps[0] else last) for s in steps]
  assert compare_table.late_fall(early) == pytest.approx(0.0)
  late = [(s, first) for s in steps[:-1]] + [(steps[-1], last)]
  assert 0.9 < compare_table.late_fall(late) <= 1.0
  assert compare_table.late_fall([(s, 1.0) for s in steps]) is None
  assert compare_table.late_fall(line[:2]) is None


def test_grid_markdown_lists_every_value_and_both_choices(tmp_path):
  os.makedirs(tmp_path / 'c095')
  os.makedirs(tmp_path / 'c100')  # No grid there: no table.
  result = {
    'fields': ['loss.rrr_weight'],
    'axes': {'loss.rrr_weight': [0.1, 3.0]},
    'scores': {
      'worst_group': {'0.1': [0.45, 0.7, 0.125], '3': [0.5, 0.6125, 0.2]},
      'accuracy': {'0.1': [0.75, -0.5], '3': [0.7, -0.4]},
    },
    'chosen': {
      'worst_group': (('loss.rrr_weight', 3.0),),
      'accuracy': (('loss.rrr_weight', 0.1),),
    },
    'on_edge': {'worst_group': ['loss.rrr_weight'], 'accuracy': []},
    'widened': [('loss.rrr_weight', 3.0)],
  }
  compare_grid.write(str(tmp_path / 'c095' / 'grid.json'), {'rrr': result})
  text = compare_table.grid_markdown(str(tmp_path))
  assert 'Grid at c095' in text and 'c100' not in text
  assert (
    '| RRR | `loss.rrr_weight` | 0.1: 0.45/0.7 / 0.75, 3: 0.5/0.613 / 0.7 | 3 '
    '| 0.1 | worst_group: loss.rrr_weight | loss.rrr_weight=3 |' in text
  )
