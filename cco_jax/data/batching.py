"""Batch geometry, stacking for pmap, running Grain, the saveable iterator."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
import json
from typing import Any

from absl import flags
import grain
import numpy as np

from cco_jax import errors
from cco_jax.data import cache as cache_lib

Batch = dict[str, np.ndarray]
Example = dict[str, Any]


def per_device_batch_size(
  global_batch_size: int, num_devices: int, process_count: int
) -> int:
  if num_devices < 1 or process_count < 1 or global_batch_size < 1:
    raise ValueError(
      'global_batch_size, num_devices and process_count must be positive.'
    )
  if global_batch_size % (num_devices * process_count):
    raise errors.UserError(
      f'batch size {global_batch_size} is not divisible by the '
      f'{num_devices * process_count} devices of the run ({num_devices} per '
      f'process x {process_count} processes); set config.batch_size / '
      'config.eval_batch_size to a multiple of it (or '
      'config.per_device_batch_size).'
    )
  return global_batch_size // (num_devices * process_count)


def stack_for_devices(
  examples: Sequence[Example], *, num_devices: int, keys: tuple[str, ...]
) -> Batch:
  """Stacks examples and splits the batch axis: (D * b, ...) -> (D, b, ...)."""
  batch = {}
  for key in keys:
    stacked = np.stack([np.asarray(e[key]) for e in examples])
    batch[key] = stacked.reshape(num_devices, -1, *stacked.shape[1:])
  return batch


def check_cam_size(cam_size: tuple[int, int]) -> tuple[int, int]:
  cam_size = tuple(int(n) for n in cam_size)
  if len(cam_size) != 2 or min(cam_size) < 1:
    raise ValueError(f'cam_size must be (h, w) with h, w >= 1; got {cam_size}.')
  return cam_size


def iterate(
  batches: grain.MapDataset, num_workers: int, prefetch: int
) -> grain.DatasetIterator:
  """Runs a batched MapDataset with threads or worker processes."""
  dataset = batches.to_iter_dataset(cache_lib.read_options(prefetch))
  if num_workers:
    if not flags.FLAGS.is_parsed():
      # Grain's worker processes read absl flags. Outside an absl app (tests,
      # notebooks) nothing parses them; their defaults are what we want.
      flags.FLAGS.mark_as_parsed()
    dataset = dataset.mp_prefetch(
      grain.MultiprocessingOptions(
        num_workers=num_workers, per_worker_buffer_size=max(prefetch, 1)
      )
    )
  return iter(dataset)


class TrainIterator(Iterator[Batch]):
  """Endless iterator over training batches whose position can be saved.

  Each batch is {'image': float32 (D, b, S, S, 3), 'mask': float32 (D, b, h, w),
  'label': int32 (D, b), 'group': int32 (D, b)} (+ 'pixel_mask', 'index' when
  asked for). `get_state()` returns JSON bytes with the number of batches
  consumed and a fingerprint of the pipeline; `set_state()` checks the
  fingerprint and continues from there.
  """

  def __init__(
    self,
    batches: grain.MapDataset,
    *,
    num_workers: int,
    prefetch: int,
    fingerprint: Mapping[str, Any],
  ):
    self._batches = batches
    self._num_workers = num_workers
    self._prefetch = prefetch
    self._fingerprint = dict(fingerprint)
    self._next_batch = 0
    self._iterator: grain.DatasetIterator | None = None

  def __next__(self) -> Batch:
    if self._iterator is None:
      self._iterator = iterate(
        self._batches[self._next_batch :], self._num_workers, self._prefetch
      )
    batch = next(self._iterator)
    self._next_batch += 1
    return batch

  def get_state(self) -> bytes:
    """JSON bytes: {'next_batch': int, 'fingerprint': {...}}."""
    return json.dumps(
      {'next_batch': self._next_batch, 'fingerprint': self._fingerprint},
      sort_keys=True,
    ).encode()

  def set_state(self, state: bytes | str) -> None:
    """Continues after the batches counted in `state` (from `get_state`)."""
    state = json.loads(state)
    if state['fingerprint'] != self._fingerprint:
      raise ValueError(
        'The saved input-pipeline state belongs to another pipeline: saved '
        f'{state["fingerprint"]}, this one {self._fingerprint}.'
      )
    self.close()
    self._next_batch = int(state['next_batch'])

  def close(self) -> None:
    """Stops prefetch threads and worker processes (restarted on demand)."""
    if self._iterator is not None and hasattr(self._iterator, 'close'):
      self._iterator.close()
    self._iterator = None


def eval_positions(
  num: int, *, per_host_batch: int, process_index: int, process_count: int
) -> np.ndarray:
  """This host's split positions, padded with -1 to whole batches.

  Every host gets the same number of batches, ceil(ceil(num / process_count) /
  per_host_batch), so that pmapped evaluation steps stay in lockstep.
  """
  per_host = -(-num // process_count)
  num_batches = -(-per_host // per_host_batch)
  mine = np.arange(num)[process_index::process_count]
  padded = np.full(num_batches * per_host_batch, -1, np.int64)
  padded[: len(mine)] = mine
  return padded
