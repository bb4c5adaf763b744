"""The loop's host side: prefetch thread, evaluation batches read once, the
default evaluation cadence, per-device batch sizes, per-device BatchNorm."""

import threading

import chex
from etils import epath
import jax
import numpy as np
import optax
import pytest

from cco_jax import configuration
from cco_jax import metric_writers
from cco_jax import model_config
from cco_jax import models
from cco_jax import objectives
from cco_jax import train_evaluation
from cco_jax import train_input
from cco_jax import train_setup
from cco_jax import train_step as step_lib
from experiments.configs import pets as pets_config


class FakeIterator:
  """Batches of random shapes with a checkpointable position; raises
  `error` instead of the batch at `fail_at`."""

  def __init__(self, n, seed=0, fail_at=None, error=None):
    self.rng = np.random.default_rng(seed)
    self.n, self.position = n, 0
    self.fail_at, self.error = fail_at, error
    self.threads = set()

  def __iter__(self):
    return self

  def __next__(self):
    self.threads.add(threading.current_thread().name)
    if self.position == self.fail_at:
      raise self.error
    if self.position >= self.n:
      raise StopIteration
    self.position += 1
    d, b = jax.local_device_count(), int(self.rng.integers(1, 4))
    return {
      'image': self.rng.normal(size=(d, b, 3)).astype(np.float32),
      'label': np.full((d, b), self.position, np.int32),
      'name': np.array([['x'] * b] * d),  # Host-only: dropped.
    }

  def get_state(self):
    return {'position': self.position}


def _synchronous(iterator):
  """The reference: read and pair in the caller's thread."""
  out = []
  for batch in iterator:
    out.append((train_input.device_batch(batch), iterator.get_state()))
  return out


@pytest.mark.parametrize('n,size', [(0, 2), (1, 2), (7, 2), (9, 1), (5, 8)])
def test_prefetch_yields_the_synchronous_order_and_states(n, size):
  expected = _synchronous(FakeIterator(n, seed=n))
  source = FakeIterator(n, seed=n)
  prefetch = train_input.Prefetch(source, size, place=lambda b: b)
  got = list(prefetch)
  assert len(got) == len(expected) == n
  for (batch, state), (want, want_state) in zip(got, expected):
    assert state == want_state
    assert set(batch) == {'image', 'label'}
    chex.assert_trees_all_equal(batch, want)
  assert source.threads == {'cco_jax-prefetch'}
  prefetch.close()


def test_prefetch_places_batches_on_the_devices():
  prefetch = train_input.Prefetch(FakeIterator(3), 2)
  batch, state = next(prefetch)
  assert isinstance(batch['image'], jax.Array)
  assert state == {'position': 1}
  prefetch.close()


def test_prefetch_raises_the_workers_error_after_the_batches_before_it():
  error = OSError(5, 'disk gone')
  prefetch = train_input.Prefetch(
    FakeIterator(10, fail_at=3, error=error), 2, place=lambda b: b
  )
  states = [next(prefetch)[1]['position'] for _ in range(3)]
  assert states == [1, 2, 3]
  with pytest.raises(OSError, match='disk gone') as info:
    next(prefetch)
  assert info.value is error
  with pytest.raises(StopIteration):
    next(prefetch)
  prefetch.close()


def test_prefetch_close_stops_a_thread_blocked_on_a_full_queue():
  source = FakeIterator(1000)
  prefetch = train_input.Prefetch(source, 2, place=lambda b: b)
  next(prefetch)
  prefetch.close(timeout=10)
  assert not prefetch._thread.is_alive()
  assert source.position <= 1 + 2 + 1  # Never more than `size + 1` ahead.
  prefetch.close()  # Twice is harmless.
  with pytest.raises(StopIteration):
    next(prefetch)


# -- Evaluation batches read once -----------------------------------------------


def _fake_eval_step(state, batch):
  """Sums a reader can check: count and sum of labels, max of images."""
  del state
  n = batch['label'].shape[0]
  return {
    'count': np.full(n, batch['label'].size, np.float32),
    'correct': np.full(n, np.sum(batch['label']), np.float32),
    'ce': np.full(n, np.sum(np.asarray(batch['image'])), np.float32),
    'net': np.ones(n, np.float32),
    'fg': np.ones(n, np.float32),
    'bg': np.zeros(n, np.float32),
    'identity_error': np.full(n, np.max(batch['image']), np.float32),
  }


@pytest.mark.parametrize('budget_batches', [100, 0, 2])
def test_eval_split_reads_once_within_budget_and_equals_the_iterator(
  budget_batches,
):
  """Within the budget: one read, then the same batches from the devices;
  over it: a fresh read at every pass, with the same results."""
  made = []

  def make():
    made.append(FakeIterator(5, seed=3))
    return made[-1]

  devices = jax.local_device_count()
  batch_bytes = train_input.nbytes_per_device(
    train_input.device_batch(next(FakeIterator(5, seed=3))), devices
  )
  split = train_input.EvalSplit(make, budget_batches * batch_bytes, devices)
  reference = train_evaluation.evaluate(
    _fake_eval_step, None, FakeIterator(5, seed=3)
  )
  first = split.first()
  assert first['name'].shape == first['label'].shape  # Host batch, whole.
  for _ in range(3):
    assert train_evaluation.evaluate(_fake_eval_step, None, split) == reference
  if budget_batches == 100:
    assert split.on_devices and len(made) == 1
    assert all(isinstance(b['image'], jax.Array) for b in split)
  else:
    assert not split.on_devices and len(made) == 4  # The load, 3 passes.
    assert budget_batches or made[0].position == 1  # Stopped at once.
  chex.assert_trees_all_equal(first, next(FakeIterator(5, seed=3)))


def test_eval_split_of_an_empty_split_says_which():
  split = train_input.EvalSplit(lambda: FakeIterator(0), 10, 1, name='test')
  with pytest.raises(ValueError, match='test split yielded no batch'):
    split.first()


# -- Cadence and batch sizes -----------------------------------------------------


def _config(**overrides):
  return configuration.apply_overrides(pets_config.get_config('cpu'), overrides)


def test_default_eval_every_keeps_evaluation_within_five_percent():
  rng = np.random.default_rng(0)
  for _ in range(200):
    micro = int(rng.integers(1, 700))
    eval_batch = int(rng.integers(1, 700))
    n_val = int(rng.integers(1, 20000))
    spe = int(rng.integers(1, 300))
    every = train_setup.default_eval_every(spe, micro, n_val, eval_batch)
    cost = lambda k, n=n_val, e=eval_batch, m=micro: (-(-n // e) * e / 3) / (
      k * m
    )
    assert every >= spe
    assert cost(every) <= 0.05 + 1e-12
    if every > spe:  # The budget decided: one step fewer would exceed it.
      assert cost(every - 1) > 0.05
  # Pets at batch 80, and on 8 devices at 80 each (docstring's example).
  assert train_setup.default_eval_every(41, 80, 368, 80) == 41
  assert train_setup.default_eval_every(5, 640, 368, 640) == 7
  assert train_setup.default_eval_every(12, 32, 0, 64) == 12


def test_resolve_schedule_defaults_and_overrides():
  config = _config(batch_size=32, eval_batch_size=64)
  schedule = train_setup.resolve_schedule(config, 3200, 2000)
  assert schedule.steps_per_epoch == 100
  # 2000 -> 32 batches of 64 = 2048 examples: 2048 / 3 / (0.05 * 32) = 427.
  assert schedule.eval_every == 427 == schedule.checkpoint_every
  assert schedule.eval_batch_size == 64
  assert train_setup.resolve_schedule(config, 3200).eval_every == 100
  fixed = _config(eval_every_steps=7, checkpoint_every_steps=14)
  schedule = train_setup.resolve_schedule(fixed, 3200, 2000)
  assert (schedule.eval_every, schedule.checkpoint_every) == (7, 14)


@pytest.mark.parametrize('devices', [1, 4, 8])
def test_per_device_batch_size_scales_with_the_devices(monkeypatch, devices):
  monkeypatch.setattr(train_setup.jax, 'device_count', lambda: devices)
  config = _config(
    batch_size=999, per_device_batch_size=6, accumulation_steps=2
  )
  schedule = train_setup.resolve_schedule(config, 10_000)
  assert schedule.micro_batch_size == 6 * devices
  assert schedule.steps_per_epoch == 10_000 // (6 * devices)
  assert schedule.eval_batch_size == 6 * devices
  config = _config(per_device_batch_size=6, per_device_eval_batch_size=10)
  assert train_setup.resolve_schedule(config, 100).eval_batch_size == (
    10 * devices
  )
  config = _config(batch_size=32, eval_batch_size=64)
  schedule = train_setup.resolve_schedule(config, 3200)
  assert (schedule.micro_batch_size, schedule.eval_batch_size) == (32, 64)


def test_bad_per_device_batch_size_is_named():
  with pytest.raises(ValueError, match='per_device_batch_size = -2'):
    train_setup.resolve_schedule(_config(per_device_batch_size=-2), 100)


# -- Per-device BatchNorm --------------------------------------------------------


def _per_device_stats(sync):
  """Batch statistics on each device after one step on different data."""
  devices = jax.local_device_count()
  config = _config(
    **{
      'model.sync_batch_norm': sync,
      'model.num_filters': 4,
      'model.stage_sizes': (1,),  # One stage: compiles in seconds.
    }
  )
  model = model_config.create_model(config, 3, bn_axis_name=step_lib.AXIS_NAME)
  state = step_lib.create_train_state(
    jax.random.key(0, impl='rbg'), model, 16, optax.sgd(0.1)
  )
  cam_hw = models.cam_size(model, 16)
  rng = np.random.default_rng(0)
  per = 2
  # Device d sees images around d: different statistics per device.
  images = rng.normal(size=(devices, per, 16, 16, 3)).astype(np.float32)
  images += np.arange(devices, dtype=np.float32)[:, None, None, None, None]
  batch = {
    'image': images,
    'label': rng.integers(0, 3, (devices, per)).astype(np.int32),
    'mask': np.ones((devices, per) + cam_hw, np.float32),
  }
  p_step = step_lib.pmapped_train_step(objectives.create({'name': 'ce'}))
  state, _ = p_step(step_lib.replicate(state), step_lib.shard(batch))
  return state, batch


def _replicas_equal(tree):
  leaves = jax.tree.leaves(jax.device_get(tree))
  return all(np.array_equal(x[0], x[d]) for x in leaves for d in range(1, 4))


def test_sync_batch_norm_off_keeps_statistics_per_device_until_averaged():
  assert jax.local_device_count() == 4, 'tests/conftest.py sets 4 CPU devices'
  synced, _ = _per_device_stats(sync=True)
  assert _replicas_equal(synced.batch_stats)
  assert train_setup.batch_stats_averager(_config()) is None

  separate, _ = _per_device_stats(sync=False)
  assert not _replicas_equal(separate.batch_stats)
  average = train_setup.batch_stats_averager(
    _config(**{'model.sync_batch_norm': False})
  )
  averaged = average(separate.batch_stats)
  assert _replicas_equal(averaged)
  host = jax.device_get(separate.batch_stats)
  chex.assert_trees_all_close(
    jax.tree.map(lambda x: x[0], jax.device_get(averaged)),
    jax.tree.map(lambda x: x.mean(0), host),
    rtol=1e-5,
    atol=1e-6,
  )


# -- Records without append (object stores) -----------------------------------


@pytest.mark.parametrize('appendable', [True, False])
def test_metric_writer_without_append_writes_the_same_records(
  tmp_path, appendable
):
  """Object stores cannot append: the records are rewritten whole, with the
  same result as appending, resumes included."""
  workdir = epath.Path(tmp_path) / 'run'
  rng = np.random.default_rng(4)
  writer = metric_writers.MetricWriter(workdir)
  writer._appendable = appendable  # What a gs:// workdir gets.
  expected = []
  for step in range(1, 8):
    record = {'loss': float(rng.normal()), 'acc': [float(rng.uniform())] * 2}
    writer.write(step, record)
    expected.append({'step': step, **record})
  writer.close()
  assert metric_writers.read_metrics(workdir) == expected
  resumed = metric_writers.MetricWriter(workdir)
  resumed._appendable = appendable
  assert resumed.discard_after(4) == 3
  resumed.write(5, {'loss': 0.5})
  resumed.close()
  assert metric_writers.read_metrics(str(workdir)) == expected[:4] + [
    {'step': 5, 'loss': 0.5}
  ]
  assert sorted(p.name for p in workdir.iterdir()) == [
    'metrics.jsonl',
    'tensorboard',
  ]
