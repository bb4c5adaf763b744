"""Which example, and which augmentation draws, at each place of the stream.

Training reads an endless stream of examples: stream position i is example
`stream_positions([i], n, shuffle_seed)` of the host's n examples, epoch
e = i // n being the permutation `default_rng([shuffle_seed, e])` (a new one
per epoch; epochs follow each other without a gap, so a batch may straddle
two). Its augmentations are drawn from `example_rng(augment_seed, i)`. Batch k
holds stream positions k*b .. (k+1)*b - 1. Both the Pillow path and the RAM
cache use these functions, so they give the same examples in the same order
with the same flips; everything is a pure function of (seeds, i), so resuming
at batch k needs nothing else.

Class-balanced sampling (`config.data.sampling='class_balanced'`): epoch e
is instead `balanced_epoch_order(shuffle_seed, e, labels)`, n draws in which
every class present is drawn n / k times (k classes; the remainder once more
for the first classes), each class's examples taken in permutations of their own (a
minority class repeats its examples, a majority class sees a different
subset each epoch). Still a pure function of (seed, epoch, labels).
"""

from __future__ import annotations

import functools

import numpy as np


def stream_positions(
  stream: np.ndarray,
  n: int,
  shuffle_seed: int,
  balance_labels: bytes | None = None,
) -> np.ndarray:
  """int64 positions in 0..n-1 of the examples at stream positions `stream`.

  `balance_labels`: None for natural sampling; for class-balanced sampling
  the n examples' classes as int64 bytes (`labels_key`).
  """
  stream = np.asarray(stream, np.int64)
  epochs = stream // n
  positions = np.empty(stream.shape, np.int64)
  for epoch in np.unique(epochs):
    chosen = epochs == epoch
    if balance_labels is None:
      order = epoch_order(shuffle_seed, int(epoch), n)
    else:
      order = balanced_epoch_order(shuffle_seed, int(epoch), balance_labels)
    positions[chosen] = order[stream[chosen] % n]
  return positions


def labels_key(labels: np.ndarray) -> bytes:
  """The classes of the n examples as the hashable `balance_labels`."""
  return np.ascontiguousarray(labels, np.int64).tobytes()


@functools.lru_cache(maxsize=4)
def balanced_epoch_order(
  shuffle_seed: int, epoch: int, balance_labels: bytes
) -> np.ndarray:
  """n positions in which every class present is drawn equally often
  (module docstring); memoised: a pure function."""
  labels = np.frombuffer(balance_labels, np.int64)
  n = len(labels)
  rng = np.random.default_rng([shuffle_seed, epoch, 1])
  classes = np.unique(labels)
  slots = rng.permutation(np.resize(np.arange(len(classes)), n))
  order = np.empty(n, np.int64)
  for k, label in enumerate(classes):
    members = np.flatnonzero(labels == label)
    wanted = np.flatnonzero(slots == k)
    cycles = -(-len(wanted) // len(members))
    drawn = np.concatenate([rng.permutation(members) for _ in range(cycles)])
    order[wanted] = drawn[: len(wanted)]
  order.flags.writeable = False
  return order


@functools.lru_cache(maxsize=4)
def epoch_order(shuffle_seed: int, epoch: int, n: int) -> np.ndarray:
  """The permutation of 0..n-1 read in `epoch` (memoised: a pure function)."""
  order = np.random.default_rng([shuffle_seed, epoch]).permutation(n)
  order.flags.writeable = False
  return order


def example_rng(augment_seed: int, stream_index: int) -> np.random.Generator:
  """The generator of the augmentations of stream position `stream_index`.

  Draw order: the crop box (`transforms.random_crop_box`, when cropping),
  then the flip (`rng.random() < 0.5`, when flipping).
  """
  return np.random.default_rng([augment_seed, int(stream_index)])


def derived_seeds(seed: int, offset: int) -> tuple[int, int]:
  """Independent 32-bit seeds for the shuffle and the augmentations."""
  shuffle_seed, augment_seed = np.random.SeedSequence(
    [seed % 2**32, offset % 2**32]
  ).generate_state(2)
  return int(shuffle_seed), int(augment_seed)
