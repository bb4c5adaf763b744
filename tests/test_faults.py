"""Runs that meet faults: divergence, a busy workdir, bad checkpoints, a full
disk, a changed config on resume. Each must stop with the true cause, or
recover, and never lose or mix up work."""

import errno
import json
import os
from pathlib import Path
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import pytest
from test_train import tiny_config

from cco_jax import checkpointing
from cco_jax import metric_writers
from cco_jax import train
from cco_jax import train_evaluation
from cco_jax import train_guards
from cco_jax import train_setup
from cco_jax import train_step as step_lib
from cco_jax.runtime import workdir_lock

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def dirs(synthetic_pets_dir, synthetic_cvd_dir, synthetic_data_dir):
  return synthetic_pets_dir, synthetic_cvd_dir, synthetic_data_dir


def _config(dirs, **overrides):
  defaults = {
    'num_train_steps': 4,
    'checkpoint_every_steps': 2,
    'keep_checkpoints': 4,
    'num_figure_examples': 0,
  }
  return tiny_config(*dirs, **{**defaults, **overrides})


@pytest.fixture(scope='module')
def trained_run(tmp_path_factory, dirs):
  """A 4-step run with checkpoints (and evaluations) at steps 2 and 4."""
  workdir = tmp_path_factory.mktemp('faults') / 'trained'
  train.train_and_evaluate(_config(dirs), str(workdir))
  return workdir


@pytest.fixture(scope='module')
def template(dirs):
  """An unreplicated train state of the trained run's structure."""
  return _template(_config(dirs))


def _copy(run: Path, tmp_path: Path) -> Path:
  target = tmp_path / 'run'
  shutil.copytree(run, target)
  return target


def _template(config):
  """An unreplicated train state of `config`'s structure."""
  setup = train_setup.build(config)
  state = step_lib.create_train_state(
    jax.random.key(0, impl=config.rng_impl or None),
    setup.model,
    config.data.image_size,
    setup.tx,
  )
  setup.train_iter.close()
  return state


def _records(workdir: Path, key: str) -> list[int]:
  return [r['step'] for r in metric_writers.read_metrics(workdir) if key in r]


# -- The non-finite guard ------------------------------------------------------


def test_nan_identity_error_propagates_through_evaluate():
  """A NaN identity error in any batch must not read as 0 (max(0, nan) = 0)."""
  n = jax.local_device_count()
  errors = [1e-9, float('nan'), 1e-8]

  def fake_eval_step(state, batch):
    del state
    i = int(np.asarray(batch['index'])[0, 0])
    sums = {
      k: np.ones(n, np.float32)
      for k in ('count', 'correct', 'ce', 'net', 'fg', 'bg')
    }
    return {**sums, 'identity_error': np.full(n, errors[i], np.float32)}

  batches = [{'index': np.full((n, 1), i, np.int32)} for i in range(3)]
  results = train_evaluation.evaluate(fake_eval_step, None, iter(batches))
  assert np.isnan(results['identity_error'])
  config = tiny_config('.', '.', '.')
  with pytest.raises(
    train_guards.NonFiniteLoss, match='identity_error at step 7'
  ):
    train_guards.check_evaluation(config, results, 7)


def test_diverged_run_from_scratch_saves_nothing_and_says_so(tmp_path, dirs):
  """lr 1e9 with an evaluation per epoch (3 steps) and log every 10 steps."""
  config = _config(
    dirs,
    num_train_steps=6,
    log_every_steps=10,
    eval_every_steps=-1,
    checkpoint_every_steps=-1,
  )
  with config.unlocked():
    config.optimizer.learning_rate = 1e9
  workdir = tmp_path / 'run'
  with pytest.raises(train_guards.NonFiniteLoss) as info:
    train.train_and_evaluate(config, str(workdir))
  message = str(info.value)
  assert 'at step' in message and 'no good state' in message, message
  assert not [p for p in (workdir / 'checkpoints').iterdir()]
  assert _records(workdir, 'eval_accuracy') == []


# -- One run per workdir -------------------------------------------------------


def test_second_run_on_a_workdir_is_refused_at_once(tmp_path, dirs):
  workdir = tmp_path / 'run'
  holder = subprocess.Popen(
    [
      sys.executable,
      '-c',
      'import sys, time\n'
      'from cco_jax.runtime import workdir_lock\n'
      'workdir_lock.WorkdirLock(sys.argv[1]).acquire()\n'
      'print("locked", flush=True)\n'
      'time.sleep(600)\n',
      str(workdir),
    ],
    cwd=REPO,
    stdout=subprocess.PIPE,
    text=True,
  )
  try:
    assert holder.stdout.readline().strip() == 'locked'
    before = sorted(p.name for p in workdir.iterdir())
    started = time.perf_counter()
    with pytest.raises(
      workdir_lock.WorkdirInUse,
      match=rf'workdir in use by PID {holder.pid} on host '
      rf'{socket.gethostname()}',
    ):
      train.train_and_evaluate(_config(dirs), str(workdir))
    assert time.perf_counter() - started < 10  # Refused before building.
    assert sorted(p.name for p in workdir.iterdir()) == before
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  # The kernel dropped the lock with the killed process: no stale lock.
  workdir_lock.WorkdirLock(str(workdir)).acquire().release()


def test_object_store_workdir_is_not_locked_but_warned(caplog, tmp_path):
  """fcntl needs a local file: a gs:// workdir gets a warning, no lock file."""
  with caplog.at_level('WARNING'):
    lock = workdir_lock.WorkdirLock('gs://bucket/run', 1).acquire()
  lock.release()
  assert 'gs://bucket/run/run.lock.1 is not locked' in caplog.text
  assert not (tmp_path / 'gs:').exists()


def test_figures_and_resume_check_accept_epath_workdirs(tmp_path):
  from etils import epath  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top

  from cco_jax import configuration  # pylint: disable=g-import-not-at-top
  from cco_jax import figures  # pylint: disable=g-import-not-at-top

  workdir = epath.Path(tmp_path) / 'run'
  path = figures.save_learning_curves(
    str(workdir / 'figures' / 'curves.png'),
    [{'step': 1, 'train_loss': 1.0}, {'step': 2, 'train_loss': 0.5}],
  )
  assert epath.Path(path).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  config = ml_collections.ConfigDict({'model': {'depth': 18}, 'data': {}})
  (workdir / 'checkpoints' / '4').mkdir(parents=True)
  (workdir / 'config.json').write_text('{"model": {"depth": 50}, "data": {}}')
  with pytest.raises(ValueError, match='model.depth: 50 -> 18'):
    configuration.check_resumable(config, workdir)


# -- Resume: config changes, fewer steps, records ------------------------------


def test_resume_with_another_model_is_refused_before_any_change(
  tmp_path, dirs, trained_run
):
  workdir = _copy(trained_run, tmp_path)
  config_json = (workdir / 'config.json').read_bytes()
  records = (workdir / 'metrics.jsonl').read_bytes()
  changed = _config(dirs, **{'model.num_filters': 8, 'data.image_size': 64})
  with pytest.raises(ValueError) as info:
    train.train_and_evaluate(changed, str(workdir))
  message = str(info.value)
  assert 'data.image_size: 32 -> 64' in message
  assert 'model.num_filters: 4 -> 8' in message
  assert (workdir / 'config.json').read_bytes() == config_json
  assert (workdir / 'metrics.jsonl').read_bytes() == records

  with pytest.raises(ValueError, match='already trained 4 steps, more than'):
    train.train_and_evaluate(_config(dirs, num_train_steps=2), str(workdir))
  assert (workdir / 'config.json').read_bytes() == config_json
  assert (workdir / 'metrics.jsonl').read_bytes() == records


def test_discard_after_keeps_each_step_once(tmp_path):
  writer = metric_writers.MetricWriter(str(tmp_path))
  for step in (0, 2, 4, 6):
    writer.write(step, {'train_loss': step})
  writer.write(4, {'identity_error': 0.0})
  writer.close()
  resumed = metric_writers.MetricWriter(str(tmp_path))
  dropped = resumed.discard_after(
    4, rewritten=lambda r: set(r) == {'step', 'identity_error'}
  )
  assert dropped == 2
  assert [
    (r['step'], sorted(r)) for r in metric_writers.read_metrics(tmp_path)
  ] == [(s, ['step', 'train_loss']) for s in (0, 2, 4)]


# -- Bad checkpoints -----------------------------------------------------------


def _truncate_largest_file(step_dir: Path) -> None:
  largest = max(
    (p for p in step_dir.rglob('*') if p.is_file()),
    key=lambda p: p.stat().st_size,
  )
  with open(largest, 'r+b') as f:
    f.truncate(largest.stat().st_size // 3)


CORRUPTIONS = {
  'truncated file': (_truncate_largest_file, 'OUT_OF_RANGE'),
  'missing _METADATA': (
    lambda d: (d / 'state' / '_METADATA').unlink(),
    '_METADATA',
  ),
  'missing item': (lambda d: shutil.rmtree(d / 'data'), '"data" was not found'),
}


@pytest.mark.parametrize('corruption', sorted(CORRUPTIONS))
def test_restore_falls_back_past_an_unreadable_checkpoint(
  tmp_path, trained_run, template, corruption
):
  workdir = _copy(trained_run, tmp_path)
  corrupt, reason = CORRUPTIONS[corruption]
  corrupt(workdir / 'checkpoints' / '4')
  manager = checkpointing.create_manager(str(workdir), 4)
  restored = checkpointing.restore_newest(manager, template)
  assert restored.step == 2
  assert list(restored.unrestorable) == [4]
  assert reason in restored.unrestorable[4]
  assert manager.all_steps() == [2, 4]  # Nothing moved or deleted here.


def test_resume_after_truncated_checkpoint_retrains_the_same_steps(
  tmp_path, dirs, trained_run, template, caplog
):
  """The newest checkpoint truncated: the run resumes from the previous one,
  sets the bad one aside (kept), and recomputes the same parameters."""
  workdir = _copy(trained_run, tmp_path)
  config = _config(dirs)
  manager = checkpointing.create_manager(str(workdir), 4)
  original, *_ = checkpointing.restore(manager, template, 4)
  manager.close()
  _truncate_largest_file(workdir / 'checkpoints' / '4')

  with caplog.at_level('INFO'):
    train.train_and_evaluate(config, str(workdir))
  log = caplog.text
  assert 'checkpoints/4 cannot be restored (ValueError: OUT_OF_RANGE' in log
  assert 'Resumed from step 2' in log
  assert (workdir / checkpointing.UNRESTORABLE_DIR / '4' / 'state').is_dir()

  manager = checkpointing.create_manager(str(workdir), 4)
  again, *_ = checkpointing.restore(manager, template, 4)
  chex.assert_trees_all_equal(original.params, again.params)
  assert _records(workdir, 'train_loss') == [2, 4]
  assert _records(workdir, 'eval_accuracy') == [2, 4]
  assert _records(workdir, 'test_accuracy') == [4]


# -- A failing save ------------------------------------------------------------


@pytest.mark.parametrize(
  'mode', ['synchronous', 'async, at wait', 'async, at the next save']
)
def test_failing_save_raises_oserror_and_keeps_earlier_checkpoints(
  tmp_path, mode
):
  """A real write failure: files may not grow past 256 kB (RLIMIT_FSIZE).

  A background (async) save's failure surfaces at `wait` or at the next
  `save`, with the same error naming the failed step."""
  rng = np.random.default_rng(0)
  state = {'w': rng.normal(size=(256, 1024)).astype(np.float32)}  # 1 MiB.
  key = jax.random.key(0)
  async_save = mode != 'synchronous'
  manager = checkpointing.create_manager(
    str(tmp_path), 3, async_save=async_save
  )
  checkpointing.save(manager, 1, state, key, {'position': 1})
  checkpointing.wait(manager)

  limit = 256 * 1024
  soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
  previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
  resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
  try:
    with pytest.raises(OSError) as info:
      checkpointing.save(manager, 2, {'w': state['w'] + 1}, key, {'p': 2})
      if mode == 'async, at wait':
        checkpointing.wait(manager)
      elif mode == 'async, at the next save':  # Small: would fit.
        checkpointing.save(manager, 3, {'w': np.zeros(4)}, key, {'p': 3})
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    signal.signal(signal.SIGXFSZ, previous)
  error = info.value
  assert error.errno == errno.EFBIG, error
  assert error.filename == os.path.join(str(manager.directory), '2')
  assert 'step 2 failed' in str(error)
  assert 'MiB free' in str(error) and 'steps [1]' in str(error)
  checkpointing.wait(manager)  # Raised once: nothing pending now.
  manager.close()

  manager = checkpointing.create_manager(str(tmp_path), 3)
  assert manager.all_steps() == [1]
  assert not [p for p in Path(manager.directory).iterdir() if 'tmp' in p.name]
  restored, _, data_state, step = checkpointing.restore(manager, state)
  assert step == 1 and data_state == {'position': 1}
  np.testing.assert_array_equal(restored['w'], state['w'])
  json.dumps(data_state)


def test_async_saves_restore_exactly_after_wait(tmp_path):
  """Saves return before the files exist; after `wait` every step restores
  to exactly what was saved (the arrays are copied before the return)."""
  rng = np.random.default_rng(1)
  manager = checkpointing.create_manager(str(tmp_path), 5, async_save=True)
  saved = {}
  for step in (1, 2, 3):
    state = {'w': rng.normal(size=(64, 33)).astype(np.float32)}
    saved[step] = state['w'].copy()
    checkpointing.save(manager, step, state, jax.random.key(step), [step])
    state['w'] += 1  # The caller reuses its buffer: must not reach the file.
  checkpointing.wait(manager)
  assert manager.all_steps() == [1, 2, 3]
  for step, w in saved.items():
    restored, key, data_state, _ = checkpointing.restore(
      manager, {'w': w}, step
    )
    np.testing.assert_array_equal(restored['w'], w)
    assert data_state == [step]
    np.testing.assert_array_equal(
      jax.random.key_data(key), jax.random.key_data(jax.random.key(step))
    )
  manager.close()
