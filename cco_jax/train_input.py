"""The training loop's input side: batches on the devices before they are due.

`Prefetch` reads the train iterator and copies its batches to the devices
(`train_step.shard`) in a daemon thread, `size` batches ahead of the step, each
paired with the iterator's state right after it (what a checkpoint must record
to resume exactly). `EvalSplit` reads, decodes and shards an evaluation split
once per run and keeps its batches on the devices while they fit in a budget;
its first batch (host arrays) serves the identity check and the figures.
Batches are `(local devices, per-device batch, ...)` arrays, as the data
pipeline yields them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
import queue
import threading
from typing import Any

from absl import logging
import numpy as np

from cco_jax import train_step as step_lib


def device_batch(batch: dict) -> dict:
  """Drops host-only entries (strings) before a batch goes to the devices."""
  return {k: v for k, v in batch.items() if _dtype(v).kind in 'biuf'}


def _dtype(value) -> np.dtype:
  dtype = getattr(value, 'dtype', None)  # Never copies a device array.
  return np.dtype(dtype) if dtype is not None else np.asarray(value).dtype


def close_iterator(iterator) -> None:
  """Stops an iterator's workers, if it has any."""
  close = getattr(iterator, 'close', None)
  if close is not None:
    close()


class _End:
  """The worker's last item: the iterator ended, or `error` was raised."""

  def __init__(self, error: BaseException | None = None):
    self.error = error


class Prefetch:
  """Yields `(placed device batch, iterator state after it)` from a thread.

  A daemon thread calls `next(iterator)`, `iterator.get_state()` and `place`
  (default `train_step.shard`: the host-to-device copy) and queues the pair,
  at most `size` pairs ahead; the order and the states are those of reading
  the iterator in the caller's thread. An exception in the thread is raised
  by the `next` that would have returned its batch. `close` stops the thread
  (it may have read up to `size + 1` batches that are never yielded: resume
  from the state paired with the last batch used, never from the iterator's).
  """

  def __init__(
    self,
    iterator: Iterator[dict],
    size: int = 2,
    place: Callable[[dict], Any] = step_lib.shard,
  ):
    if size < 1:
      raise ValueError(f'Prefetch size must be >= 1, got {size}.')
    self._iterator = iterator
    self._place = place
    self._queue: queue.Queue = queue.Queue(maxsize=size)
    self._stop = threading.Event()
    self._done = False
    self._thread = threading.Thread(
      target=self._work, name='cco_jax-prefetch', daemon=True
    )
    self._thread.start()

  def _work(self) -> None:
    try:
      while not self._stop.is_set():
        try:
          batch = next(self._iterator)
        except StopIteration:
          break
        state = self._iterator.get_state()
        if not self._put((self._place(device_batch(batch)), state)):
          return
      self._put(_End())
    except BaseException as e:  # pylint: disable=broad-except
      self._put(_End(e))

  def _put(self, item) -> bool:
    """Queues `item` unless the consumer closed first; False if closed."""
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.05)
        return True
      except queue.Full:
        continue
    return False

  def __iter__(self) -> Prefetch:
    return self

  def __next__(self) -> tuple[Any, Any]:
    if self._done:
      raise StopIteration
    item = self._queue.get()
    if isinstance(item, _End):
      self._done = True
      self._thread.join()
      if item.error is not None:
        raise item.error
      raise StopIteration
    return item

  def close(self, timeout: float = 60.0) -> None:
    """Stops the thread; safe to call twice or after the end."""
    self._done = True
    self._stop.set()
    while True:  # Unblocks a worker waiting on a full queue.
      try:
        self._queue.get_nowait()
      except queue.Empty:
        break
    self._thread.join(timeout)
    if self._thread.is_alive():
      logging.warning(
        'The prefetch thread did not stop within %.0f s (still reading the '
        'train iterator); leaving it (a daemon) behind.',
        timeout,
      )


def nbytes_per_device(batch: dict, num_devices: int) -> int:
  """Bytes a `(num_devices, b, ...)` batch takes on each device."""
  return sum(
    int(np.prod(np.shape(v))) * _dtype(v).itemsize for v in batch.values()
  ) // max(1, num_devices)


class EvalSplit:
  """An evaluation split's batches, read, decoded and sharded once.

  The first use reads the split from `make_iterator()`, keeps its first batch
  on the host (`first`) and places every batch on the devices (`place`) while
  their bytes per device stay within `budget_bytes`. Iterating then yields the
  placed batches, with no host work. A split over the budget (or a budget of
  0) is read again from a fresh iterator at each pass (placed by the caller).
  """

  def __init__(
    self,
    make_iterator: Callable[[], Iterator[dict]],
    budget_bytes: int,
    num_devices: int,
    name: str = 'validation',
    place: Callable[[dict], Any] = step_lib.shard,
  ):
    self._make_iterator = make_iterator
    self._budget = budget_bytes
    self._num_devices = num_devices
    self._name = name
    self._place = place
    self._first: dict | None = None
    self._placed: list | None = None
    self._loaded = False

  @property
  def on_devices(self) -> bool:
    """Whether the whole split is held on the devices (after `first`)."""
    self._load()
    return self._placed is not None

  def first(self) -> dict:
    """The split's first batch, host arrays (strings included)."""
    self._load()
    return self._first

  def _load(self) -> None:
    if self._loaded:
      return
    iterator = self._make_iterator()
    placed, used = [], 0
    try:
      for batch in iterator:
        if self._first is None:
          self._first = batch
        if placed is not None:
          batch = device_batch(batch)
          used += nbytes_per_device(batch, self._num_devices)
          if used > self._budget:
            placed = None
          else:
            placed.append(self._place(batch))
        if placed is None:
          break
    finally:
      close_iterator(iterator)
    if self._first is None:
      raise ValueError(f'The {self._name} split yielded no batch.')
    self._placed, self._loaded = placed, True
    if placed is not None:
      logging.info(
        'The %s split is kept on the devices: %d batches, %.1f MiB per device.',
        self._name,
        len(placed),
        used / 2**20,
      )
    else:
      logging.info(
        'The %s split exceeds the cache budget (%.1f MiB per device, '
        'config.eval_cache_mb): it is read again at every evaluation.',
        self._name,
        self._budget / 2**20,
      )

  def __iter__(self) -> Iterator[dict]:
    self._load()
    if self._placed is not None:
      yield from self._placed
      return
    iterator = self._make_iterator()
    try:
      yield from iterator
    finally:
      close_iterator(iterator)
