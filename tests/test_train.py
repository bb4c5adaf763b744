"""The training loop end to end: resume, non-finite guard, the real entry point."""

import json
import os
from pathlib import Path
import subprocess
import sys

import chex
from etils import epath
import jax
import numpy as np
import pytest
import synthetic_data
import xla_flags

from cco_jax import cams
from cco_jax import checkpointing
from cco_jax import configuration
from cco_jax import train
from cco_jax import train_guards
from cco_jax import train_setup
from cco_jax import train_step as step_lib
from experiments.configs import pets as pets_config

REPO = Path(__file__).resolve().parents[1]


def tiny_config(pets_dir, cvd_dir, data_dir, **overrides):
  """The `cpu` variant shrunk to seconds: 32 px, width 4, 4x4 maps."""
  config = pets_config.get_config('cpu')
  with config.unlocked():
    config.data.manual_dir = str(pets_dir)
    config.data.ood_manual_dir = str(cvd_dir)
    config.data.tfds_data_dir = str(data_dir)
    config.data.image_size = 32
    config.model.num_filters = 4
    config.batch_size = 8
    config.eval_batch_size = 16
    config.log_every_steps = 2
    config.eval_every_steps = 2
    config.num_figure_examples = 2
  return configuration.apply_overrides(config, overrides)


def _restore_params(workdir, config, step=None):
  setup = train_setup.build(config)
  manager = checkpointing.create_manager(str(workdir), config.keep_checkpoints)
  template = step_lib.create_train_state(
    jax.random.key(0, impl=config.rng_impl or None),
    setup.model,
    config.data.image_size,
    setup.tx,
  )
  state, _, _, restored_step = checkpointing.restore(manager, template, step)
  return state, restored_step


def test_resumed_run_equals_uninterrupted_run(
  tmp_path, synthetic_pets_dir, synthetic_cvd_dir, synthetic_data_dir
):
  dirs = (synthetic_pets_dir, synthetic_cvd_dir, synthetic_data_dir)
  straight = tmp_path / 'straight'
  train.train_and_evaluate(tiny_config(*dirs, num_train_steps=6), str(straight))

  resumed = tmp_path / 'resumed'
  train.train_and_evaluate(tiny_config(*dirs, num_train_steps=3), str(resumed))
  # The resume through an epath.Path (what an object-store workdir is).
  train.train_and_evaluate(
    tiny_config(*dirs, num_train_steps=6), epath.Path(resumed)
  )

  config = tiny_config(*dirs, num_train_steps=6)
  a, step_a = _restore_params(straight, config)
  b, step_b = _restore_params(resumed, config)
  assert step_a == step_b == 6
  chex.assert_trees_all_equal(a.params, b.params)
  chex.assert_trees_all_equal(a.batch_stats, b.batch_stats)
  chex.assert_trees_all_equal(a.opt_state, b.opt_state)

  records = [json.loads(line) for line in open(resumed / 'metrics.jsonl')]
  train_steps = [r['step'] for r in records if 'train_loss' in r]
  assert train_steps == sorted(set(train_steps)), 'a step was logged twice'
  assert (resumed / 'final_metrics.json').exists()
  assert list((resumed / 'figures').glob('cams_step_*.png'))


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(
  tmp_path, synthetic_pets_dir, synthetic_cvd_dir, synthetic_data_dir
):
  dirs = (synthetic_pets_dir, synthetic_cvd_dir, synthetic_data_dir)
  workdir = tmp_path / 'run'
  train.train_and_evaluate(tiny_config(*dirs, num_train_steps=2), str(workdir))
  config = tiny_config(*dirs, num_train_steps=6)
  with config.unlocked():
    config.optimizer.learning_rate = float('inf')
  with pytest.raises(
    train_guards.NonFiniteLoss,
    match=r'at step 3 .*last good checkpoint is step 2 in',
  ):
    train.train_and_evaluate(config, str(workdir))
  manager = checkpointing.create_manager(str(workdir))
  assert manager.latest_step() == 2


@pytest.mark.skipif(
  not synthetic_data.REAL_PETS.exists(),
  reason='shared/data is absent (a fresh clone)',
)
def test_entry_point_on_shared_sample_writes_and_resumes(
  tmp_path, compilation_cache, real_data_dir
):
  """`python -m experiments.pets` on the real sample, 2 devices, then resumed.

  Both runs share the test session's compilation cache and the real samples'
  TFDS dir, so the resumed run compiles and prepares nothing again.
  """
  workdir = tmp_path / 'pets_cpu'
  env = dict(
    os.environ,
    XLA_FLAGS=xla_flags.for_devices(2),
    JAX_PLATFORMS='cpu',
  )
  if compilation_cache is not None:
    env['CCO_COMPILATION_CACHE'] = str(compilation_cache)

  def run(steps):
    command = [
      sys.executable,
      '-m',
      'experiments.pets',
      '--config=experiments/configs/pets.py:cpu',
      f'--workdir={workdir}',
      f'--config.data.manual_dir={synthetic_data.REAL_PETS}',
      f'--config.data.ood_manual_dir={synthetic_data.REAL_CATS_VS_DOGS}',
      f'--config.data.tfds_data_dir={real_data_dir}',
      '--config.data.image_size=32',
      '--config.model.num_filters=8',
      f'--config.num_train_steps={steps}',
      '--config.log_every_steps=2',
      '--config.eval_every_steps=2',
      '--config.num_figure_examples=2',
    ]
    result = subprocess.run(
      command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stderr

  run(2)
  log = run(4)
  assert 'Resumed from step 2' in log
  records = [json.loads(line) for line in open(workdir / 'metrics.jsonl')]
  assert [r['step'] for r in records if 'train_loss' in r] == [2, 4]
  assert all(np.isfinite(r['train_loss']) for r in records if 'train_loss' in r)
  final = json.loads((workdir / 'final_metrics.json').read_text())
  assert final['test_count'] == 391 and final['ood_count'] == 2000
  assert 0.0 <= final['ood_accuracy'] <= 1.0
  steps = sorted(
    int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit()
  )
  assert steps[-1] == 4
  assert (workdir / 'figures' / 'learning_curves.png').stat().st_size > 0
  assert list((workdir / 'figures').glob('cams_step_*.png'))
  assert list((workdir / 'tensorboard').iterdir())
  config = json.loads((workdir / 'config.json').read_text())
  assert config['num_train_steps'] == 4


@pytest.mark.parametrize(
  'flag, message',
  [
    (
      '--config.data.manul_dir=x',
      """no config field 'manul_dir'. Did you mean "manual_dir" """,
    ),
    ('--config=experiments/configs/petz.py:cpu', 'petz.py does not exist'),
    ('--config.num_train_steps=0', 'config.num_train_steps=0: give a'),
    ('--config.batch_size=0', 'config.batch_size=0: must be a positive'),
    ('--config.data.validation_fraction=0', 'validation_fraction=0.0: must'),
  ],
)
def test_config_mistake_ends_with_one_clear_line(tmp_path, flag, message):
  result = subprocess.run(
    [
      sys.executable,
      '-m',
      'experiments.pets',
      '--config=experiments/configs/pets.py:cpu',
      f'--workdir={tmp_path / "unused"}',
      flag,
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode != 0
  assert 'Traceback' not in result.stderr, result.stderr[-2000:]
  last = result.stderr.strip().splitlines()[-1]
  assert message.strip() in last and '\\' not in last, last
  assert not (tmp_path / 'unused').exists()


@pytest.mark.parametrize('unset', [None, 0.0, -1.0])
def test_unset_identity_tolerance_takes_the_float32_head_bound(unset):
  """Unset means `cams.identity_tolerance(float32)`; explicit values stay."""
  bound = cams.identity_tolerance(np.float32)
  config = pets_config.get_config('cpu')
  with config.unlocked():
    config.identity_tolerance = unset
  assert train_guards.identity_tolerance(config) == bound
  ok = {'ce': 0.5, 'identity_error': 0.5 * bound}
  train_guards.check_evaluation(config, ok, 3)
  with pytest.raises(train_guards.IdentityViolation, match='at step 3'):
    train_guards.check_evaluation(
      config, {'ce': 0.5, 'identity_error': 2 * bound}, 3
    )
  with config.unlocked():
    config.identity_tolerance = 20 * bound
  train_guards.check_evaluation(
    config, {'ce': 0.5, 'identity_error': 2 * bound}, 3
  )
  with pytest.raises(train_guards.IdentityViolation):
    train_guards.check_identity_error(float('nan'), 20 * bound, 'at start')


def test_unreplicate_returns_each_leafs_first_row_on_the_host():
  """Equals per-leaf `x[0]` for replicated, sharded and host leaves."""
  n = jax.local_device_count()
  rng = np.random.default_rng(0)
  host = {
    'a': rng.normal(size=(3, 5)).astype(np.float32),
    'b': {'c': rng.integers(0, 9, size=(2,)).astype(np.int32)},
  }
  sharded = {
    'rows': rng.normal(size=(n, 4, 3)).astype(np.float32),
    'scalars': np.arange(n, dtype=np.float32) + 7,
  }
  for tree in (
    step_lib.replicate(host),
    step_lib.shard(sharded),
    sharded,
    {'s': jax.numpy.ones((2, 3)) * 5},
  ):
    got = step_lib.unreplicate(tree)
    want = jax.tree.map(lambda x: np.asarray(x)[0], tree)
    jax.tree.map(
      lambda g, w: (
        np.testing.assert_array_equal(g, w),
        isinstance(g, np.ndarray) or pytest.fail(type(g)),
      ),
      got,
      want,
    )
  assert step_lib.unreplicate(step_lib.shard(sharded))['scalars'] == 7


def test_figures_due_every_nth_evaluation_and_checked():
  config = pets_config.get_config('cpu')
  assert config.figure_every_evals == 0
  assert not any(train_setup.figures_due(config, i) for i in range(1, 10))
  with config.unlocked():
    config.figure_every_evals = 3
  assert [i for i in range(1, 10) if train_setup.figures_due(config, i)] == [
    3,
    6,
    9,
  ]
  for bad in (-1, -4):
    with config.unlocked():
      config.figure_every_evals = bad
    with pytest.raises(ValueError, match='figure_every_evals'):
      train_setup.figures_due(config, 1)
