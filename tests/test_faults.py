"""Runs that meet faults: divergence, a busy workdir, bad or silently corrupt
checkpoints, a full disk, torn records, a changed config on resume. Each must
stop with the true cause, or recover, and never lose or mix up work.

The fault tables (fault -> expected outcome) are the dicts `CORRUPTIONS` and
`BYTE_FLIPS` (checkpoints set aside, the run falls back); preemption and a
dead peer, with real processes, are in `test_preemption.py`. docs/faults.md
states the guarantees these tests check.
"""

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
from cco_jax import event_files
from cco_jax import integrity
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


# -- Silent corruption: checksums ----------------------------------------------
#
# Fault table: bytes inverted (XOR 0xFF, up to 4 KiB) at an offset of a file
# of the newest checkpoint (step 4) -> the expected outcome:
#   SET_ASIDE: step 4 does not restore (a decoding error or a checksum
#     mismatch); the run falls back to step 2 and sets step 4 aside;
#   SET_ASIDE_OR_EXACT: either that, or step 4 restores bit-identical to what
#     was saved (the bytes belong to a file the checkpoint no longer reads:
#     Orbax merges the per-process OCDBT trees into the root one after a save,
#     so some per-process files are left unreferenced).
# Never: a corrupt checkpoint restored with other values.

SET_ASIDE = 'set aside, fall back to step 2'
SET_ASIDE_OR_EXACT = 'set aside, or restores exactly the saved values'


def _state_data_files(step_dir: Path, item: str = 'state') -> list[Path]:
  """An item's OCDBT data files, largest first."""
  files = (step_dir / item).glob('ocdbt.process_0/d/*')
  return sorted(files, key=lambda p: -p.stat().st_size)


LAST_4_KIB = -1.0


def _flip(path: Path, fraction: float, length: int = 4096) -> None:
  """Inverts `length` bytes (clipped to the file) from `fraction` of `path`
  (`LAST_4_KIB`: its last `length` bytes)."""
  size = path.stat().st_size
  offset = min(int(size * fraction), size - 1)
  if fraction == LAST_4_KIB:
    offset = max(size - length, 0)
  with open(path, 'r+b') as f:
    f.seek(offset)
    data = f.read(min(length, size - offset))
    f.seek(offset)
    f.write(bytes(b ^ 0xFF for b in data))


_largest = lambda d: _state_data_files(d)[0]  # Holds the arrays' chunks.
_root = lambda item: lambda d: next((d / item / 'd').iterdir())

BYTE_FLIPS = {
  # fault: (file of checkpoints/4, offset as a fraction of its size, outcome)
  'largest state data file, first byte': (_largest, 0.0, SET_ASIDE),
  'largest state data file, at 10%': (_largest, 0.1, SET_ASIDE),
  'largest state data file, at 50%': (_largest, 0.5, SET_ASIDE),
  # Its last part may hold the per-process B-tree nodes, unread after the
  # merge (where they start depends on the checkpoint's items): a flip there
  # restores, and then restores exactly the saved values.
  'largest state data file, at 90%': (_largest, 0.9, SET_ASIDE_OR_EXACT),
  'largest state data file, last 4 KiB': (
    _largest,
    LAST_4_KIB,
    SET_ASIDE_OR_EXACT,
  ),
  'state root data file (B-tree), at 50%': (_root('state'), 0.5, SET_ASIDE),
  'state _METADATA (tree structure)': (
    lambda d: d / 'state' / '_METADATA',
    0.5,
    SET_ASIDE,
  ),
  'rng root data file, at 50%': (_root('rng'), 0.5, SET_ASIDE),
  'iterator state (JSON)': (lambda d: d / 'data' / 'metadata', 0.5, SET_ASIDE),
  'checksums (JSON)': (
    lambda d: d / 'integrity' / 'metadata',
    0.5,
    SET_ASIDE,
  ),
  'second state data file, at 50%': (
    lambda d: _state_data_files(d)[1],
    0.5,
    SET_ASIDE_OR_EXACT,
  ),
  'smallest state data file, at 50%': (
    lambda d: _state_data_files(d)[-1],
    0.5,
    SET_ASIDE_OR_EXACT,
  ),
  'per-process state OCDBT manifest': (
    lambda d: d / 'state' / 'ocdbt.process_0' / 'manifest.ocdbt',
    0.5,
    SET_ASIDE_OR_EXACT,
  ),
  'per-process rng data file': (
    lambda d: _state_data_files(d, 'rng')[0],
    0.5,
    SET_ASIDE_OR_EXACT,
  ),
}


@pytest.fixture(scope='module')
def saved_step_4(trained_run, template):
  """The trained run's step 4, restored from the intact files."""
  manager = checkpointing.create_manager(str(trained_run), 4)
  state, *_ = checkpointing.restore(manager, template, 4)
  manager.close()
  return state


@pytest.mark.parametrize('fault', list(BYTE_FLIPS))
def test_byte_flip_in_a_checkpoint_is_never_restored_silently(
  tmp_path, trained_run, template, saved_step_4, fault
):
  workdir = _copy(trained_run, tmp_path)
  choose, fraction, outcome = BYTE_FLIPS[fault]
  _flip(choose(workdir / 'checkpoints' / '4'), fraction)
  manager = checkpointing.create_manager(str(workdir), 4)
  restored = checkpointing.restore_newest(manager, template)
  if restored.step == 4:
    assert outcome == SET_ASIDE_OR_EXACT, f'{fault}: step 4 restored'
    chex.assert_trees_all_equal(restored.state, saved_step_4)
    return
  assert restored.step == 2
  assert list(restored.unrestorable) == [4]
  checkpointing.set_aside(manager, restored.unrestorable)
  assert manager.all_steps() == [2]
  assert (workdir / checkpointing.UNRESTORABLE_DIR / '4').is_dir()


def test_checksum_mismatch_names_the_arrays(tmp_path):
  """Valid files of other values (step 1's state under step 2) decode without
  any error: only the checksums tell, and the reason names what differs."""
  state = {'w': np.arange(12.0).reshape(3, 4), 'b': np.zeros(3, np.float32)}
  manager = checkpointing.create_manager(str(tmp_path), 3)
  checkpointing.save(manager, 1, state, jax.random.key(0), {'p': 1})
  checkpointing.save(
    manager, 2, {**state, 'w': state['w'] + 1}, jax.random.key(0), {'p': 2}
  )
  manager.close()
  step_2 = tmp_path / 'checkpoints' / '2' / 'state'
  shutil.rmtree(step_2)
  shutil.copytree(tmp_path / 'checkpoints' / '1' / 'state', step_2)
  manager = checkpointing.create_manager(str(tmp_path), 3)
  restored = checkpointing.restore_newest(manager, state)
  assert restored.step == 1
  assert restored.unrestorable[2] == (
    'ChecksumMismatch: checksum mismatch: 1 of 4 checksums differ from what '
    'was saved (state/w); the files are corrupt'
  )


def test_checksums_detect_any_changed_leaf():
  """float64 reference: every dtype, 0-d arrays, and a change of one bit, of
  the dtype or of the shape is a mismatch; equal values verify."""
  rng = np.random.default_rng(0)
  tree = {
    'w': rng.normal(size=(3, 5)),
    'b': np.float32(2.5),
    'n': np.arange(6, dtype=np.int32),
    'flag': np.array([True, False]),
  }
  expected = integrity.checksums({'state': tree, 'data_json': {'a': [1, 2]}})
  integrity.verify({'state': tree, 'data_json': {'a': [1, 2]}}, expected)
  flipped = tree['w'].copy()
  flipped.view(np.uint64)[1, 2] ^= 1  # The lowest mantissa bit.
  changes = {
    'one bit': {**tree, 'w': flipped},
    'dtype': {**tree, 'n': tree['n'].astype(np.int64)},
    'shape': {**tree, 'n': tree['n'].reshape(2, 3)},
    'missing leaf': {k: v for k, v in tree.items() if k != 'flag'},
  }
  for change, changed in changes.items():
    with pytest.raises(
      integrity.ChecksumMismatch, match='1 of 5 checksums differ'
    ):
      integrity.verify({'state': changed, 'data_json': {'a': [1, 2]}}, expected)
      pytest.fail(change)
  with pytest.raises(integrity.ChecksumMismatch, match='data_json'):
    integrity.verify({'state': tree, 'data_json': {'a': [1, 3]}}, expected)


def test_checkpoint_without_checksums_restores_with_a_warning(
  tmp_path, trained_run, template, caplog
):
  """Checkpoints written before checksums existed still restore (unverified,
  and the log says so)."""
  workdir = _copy(trained_run, tmp_path)
  shutil.rmtree(workdir / 'checkpoints' / '4' / 'integrity')
  manager = checkpointing.create_manager(str(workdir), 4)
  with caplog.at_level('WARNING'):
    restored = checkpointing.restore_newest(manager, template)
  assert restored.step == 4 and not restored.unrestorable
  assert 'checkpoints/4 has no checksums' in caplog.text


def test_last_good_checkpoint_names_only_a_verified_one(
  tmp_path, trained_run, template
):
  """The non-finite message's "last good checkpoint" skips a corrupt one."""
  workdir = _copy(trained_run, tmp_path)
  _flip(_state_data_files(workdir / 'checkpoints' / '4')[0], 0.5)
  manager = checkpointing.create_manager(str(workdir), 4)
  message = train_guards.last_good_checkpoint(manager, template)
  assert message.startswith('The last good checkpoint is step 2 in ')
  assert 'its checksums verify' in message
  assert 'Newer steps [4] do not restore' in message


# -- Torn and duplicated records -----------------------------------------------


def test_torn_last_metrics_line_is_dropped_with_a_warning(tmp_path, caplog):
  writer = metric_writers.MetricWriter(str(tmp_path))
  for step in (1, 2, 3):
    writer.write(step, {'train_loss': float(step)})
  writer.close()
  with open(tmp_path / 'metrics.jsonl', 'a') as f:
    f.write('{"step": 4, "train_lo')  # Killed in the middle of a write.
  with caplog.at_level('WARNING'):
    assert [r['step'] for r in metric_writers.read_metrics(tmp_path)] == [
      1,
      2,
      3,
    ]
  assert 'Dropped the torn last line 4 of' in caplog.text
  assert len(caplog.records) == 1
  resumed = metric_writers.MetricWriter(str(tmp_path))
  resumed.discard_after(3)  # A resume removes the torn line from the file.
  resumed.write(4, {'train_loss': 4.0})
  resumed.close()
  assert [r['step'] for r in metric_writers.read_metrics(tmp_path)] == [
    1,
    2,
    3,
    4,
  ]


def test_corrupt_metrics_line_before_the_last_is_named(tmp_path):
  (tmp_path / 'metrics.jsonl').write_text(
    '{"step": 1}\n{"step": 2, oops}\n{"step": 3}\n'
  )
  with pytest.raises(ValueError, match=r'metrics.jsonl, line 2, is not JSON'):
    metric_writers.read_metrics(tmp_path)


def _tensorboard_points(workdir: Path) -> list[tuple[str, int]]:
  files = sorted((workdir / 'tensorboard').glob(event_files.PATTERN))
  return [
    (value.tag, event.step)
    for f in files
    for event in event_files.read_events(f.read_bytes())
    if event.HasField('summary')
    for value in event.summary.value
  ]


def test_tensorboard_shows_each_step_once_after_resumes(tmp_path):
  """Three interruptions, resumed at steps 4, 4 and 6 (records after the
  resumed step written again): every (tag, step) once, as in metrics.jsonl."""

  def run(start, stop):
    writer = metric_writers.MetricWriter(str(tmp_path))
    writer.discard_after(start, rewritten=lambda r: 'identity_error' in r)
    writer.write(start, {'identity_error': 1e-7})
    for step in range(start + 1, stop + 1):
      writer.write(step, {'train_loss': step / 10, 'eval_accuracy': 0.5})
    writer.close()

  run(0, 8)
  run(4, 7)
  run(4, 8)
  run(6, 8)
  points = _tensorboard_points(tmp_path)
  assert len(points) == len(set(points))
  records = metric_writers.read_metrics(tmp_path)
  assert sorted(points) == sorted(
    (k, r['step']) for r in records for k in r if k != 'step'
  )
  assert sorted(s for t, s in points if t == 'train_loss') == list(range(1, 9))


def test_tensorboard_rewrite_interrupted_by_a_crash_recovers(tmp_path):
  """A crash between the two renames of the swap loses and doubles nothing."""
  writer = metric_writers.MetricWriter(str(tmp_path))
  for step in (1, 2, 3):
    writer.write(step, {'train_loss': float(step)})
  writer.close()
  board = tmp_path / 'tensorboard'
  board.rename(tmp_path / 'tensorboard.old')  # The crash: after the first.
  (tmp_path / 'tensorboard.rewrite').mkdir()
  resumed = metric_writers.MetricWriter(str(tmp_path))
  resumed.discard_after(2)
  resumed.close()
  assert sorted(_tensorboard_points(tmp_path)) == [
    ('train_loss', 1),
    ('train_loss', 2),
  ]
  assert sorted(p.name for p in tmp_path.iterdir()) == [
    'metrics.jsonl',
    'tensorboard',
  ]


# -- Quiet logs ----------------------------------------------------------------


def test_only_the_closed_event_loop_noise_is_dropped():
  """The unraisable "Event loop is closed" of a closed asyncio loop (what
  TensorStore's late writes hit after a failed save) is dropped; any other
  unraisable exception still reaches the previous hook."""
  import asyncio  # pylint: disable=g-import-not-at-top
  import types  # pylint: disable=g-import-not-at-top

  from cco_jax import closed_loop_noise  # pylint: disable=g-import-not-at-top

  loop = asyncio.new_event_loop()
  loop.close()
  try:
    loop.call_soon_threadsafe(print)
  except RuntimeError as e:
    noise = e
  try:
    raise RuntimeError('Event loop is closed')  # Not asyncio's check.
  except RuntimeError as e:
    lookalike = e
  seen = []
  hook = closed_loop_noise._Hook(seen.append)  # pylint: disable=protected-access
  for error in (noise, lookalike, ValueError('x')):
    hook(
      types.SimpleNamespace(
        exc_type=type(error),
        exc_value=error,
        exc_traceback=error.__traceback__,
      )
    )
  assert [u.exc_value for u in seen] == [lookalike, seen[1].exc_value]
  assert isinstance(seen[1].exc_value, ValueError)
