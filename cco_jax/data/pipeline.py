"""Training iterators: prepared TFDS data -> NumPy batches (the evaluation
iterator, which shares `Decoded`, is in `eval_pipeline`).

Examples are read (`sources`), decoded and transformed (`transforms`) inside
Grain, optionally from a RAM cache (`cache`), and batched as
(num_devices, per_device_batch, ...) for pmap. No TensorFlow.

Each iterator takes its split already open (`source=`, from one
`sources.load_split_sources` per process) or opens it. Every batch carries
'group' int32 (D, b): the example's group, an index into the run's group
names (`info.group_names_of`; 0 for datasets without groups). With
`config.data.pixel_masks`, training batches also carry 'pixel_mask'.

With `config.data.device_preprocessing` (the default) training images leave
the host as uint8 squashed crops, unflipped, with a 'flip' bit per example
(drawn as before): the train step scales, normalises and flips them
(`cco_jax.data.device_transforms`). Evaluation batches are always finished on
the host (float32).

Empty masks: an example whose uncropped CAM mask (made from its
full-resolution foreground) is empty gets an all-ones mask, for which ablated
CE equals CE; with `empty_mask_policy='drop'` such examples are instead left
out of the training split (evaluation always covers the whole split). The
number of empty masks is counted and logged when a train iterator is built.
The cached and the Pillow path apply this identically.

Determinism: a train iterator is a pure function of (data, data_config, seed,
batch geometry, process_index/count) (`cco_jax.data.order`): the k-th batch
does not depend on the number of workers or threads, and
`TrainIterator.get_state()` records k, so a restored iterator continues with
exactly the remaining batches.

Worker processes (num_workers > 0) are spawned by Grain and read absl flags;
outside an absl app the flags are marked parsed so that defaults apply.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

from absl import logging
import grain
import ml_collections
import numpy as np

from cco_jax import errors
from cco_jax.data import batching
from cco_jax.data import cache as cache_lib
from cco_jax.data import config as config_lib
from cco_jax.data import info
from cco_jax.data import order
from cco_jax.data import transforms
from cco_jax.data.sources import SplitSource
from cco_jax.data.sources import load_split_sources

Batch = batching.Batch
TrainIterator = batching.TrainIterator
Example = transforms.Example


@dataclasses.dataclass(frozen=True)
class Decoded:
  """Decodes the records of a `SplitSource` on access (a Grain source)."""

  source: SplitSource
  task: str
  boundary_is_foreground: bool
  draft_size: int | None = None

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, i: int) -> Example:
    return transforms.decode(
      self.source[i],
      task=self.task,
      boundary_is_foreground=self.boundary_is_foreground,
      draft_size=self.draft_size,
    )


@dataclasses.dataclass(frozen=True)
class _Stream:
  """The endless training stream over `source` (`cco_jax.data.order`)."""

  source: Any  # Decoded or cache.Cached
  shuffle_seed: int
  balance_labels: bytes | None = None  # Class-balanced (`order`).

  def __len__(self) -> int:
    return cache_lib.ENDLESS

  def __getitem__(self, i: int) -> Example:
    position = order.stream_positions(
      [i], len(self.source), self.shuffle_seed, self.balance_labels
    )
    return {**self.source[int(position[0])], 'stream': i}


# ----------------------------------------------------------------------------
# Training.
# ----------------------------------------------------------------------------


def empty_mask_positions(
  source: SplitSource,
  data_config: ml_collections.ConfigDict,
  *,
  cam_size: tuple[int, int],
) -> np.ndarray:
  """Positions in `source` whose uncropped CAM mask is empty.

  Decodes only the masks, at full resolution. Returns a sorted int64 array.
  """
  if not source.has_masks:
    return np.zeros(0, np.int64)

  def empty(record: Example) -> bool:
    fg = transforms.decode_foreground(
      record, boundary_is_foreground=data_config.boundary_is_foreground
    )
    return transforms.is_empty(
      transforms.cam_mask(fg, cam_size, data_config.mask_resize)
    )

  flags_ = (
    grain.MapDataset.source(source)
    .map(empty)
    .to_iter_dataset(cache_lib.read_options(cache_lib.SCAN_THREADS))
  )
  return np.flatnonzero(np.fromiter(flags_, bool, count=len(source)))


def _train_example(
  example: Example,
  *,
  data_config: ml_collections.ConfigDict,
  cam_size: tuple[int, int],
  augment_seed: int,
) -> Example:
  """Draws this example's crop box and flip (`order.example_rng`), renders."""
  rng = order.example_rng(augment_seed, example['stream'])
  cached = 'image_array' in example
  if cached:
    height, width = example['image_array'].shape[:2]
  else:
    width, height = example['image'].size
  box = (
    transforms.random_crop_box(width, height, rng)
    if data_config.augment_crop
    else transforms.FULL_BOX
  )
  flip = bool(data_config.augment_flip and rng.random() < 0.5)
  # With device_preprocessing the device flips and finishes the image
  # (`device_transforms.finish_batch`); the host only says which to flip.
  on_device = data_config['device_preprocessing']
  host_flip, finish = flip and not on_device, not on_device
  if cached and box == transforms.FULL_BOX:
    out = cache_lib.cached_model_input(
      example,
      normalize=data_config.normalize,
      flip=host_flip,
      finish=finish,
    )
  else:
    out = transforms.to_model_input(
      cache_lib.as_images(example) if cached else example,
      image_size=data_config.image_size,
      cam_size=cam_size,
      mask_resize=data_config.mask_resize,
      normalize=data_config.normalize,
      with_pixel_mask=data_config['pixel_masks'],
      pixel_mask_empty_as_ones=True,
      box=box,
      flip=host_flip,
      finish=finish,
    )
  if on_device:
    out['flip'] = np.bool_(flip)
  return out


def draft_size(
  data_config: ml_collections.ConfigDict, *, training: bool
) -> int:
  """Smallest decoded side that still leaves every crop >= image_size."""
  if training and data_config.augment_crop and not data_config['cache_decoded']:
    smallest = config_lib.CROP_AREA_RANGE[0] * config_lib.CROP_ASPECT_RANGE[0]
    return math.ceil(data_config.image_size / math.sqrt(smallest))
  return data_config.image_size


def create_train_iterator(
  data_config: ml_collections.ConfigDict,
  *,
  cam_size: tuple[int, int],
  global_batch_size: int,
  num_devices: int,
  seed: int,
  process_index: int = 0,
  process_count: int = 1,
  with_index: bool = False,
  source: SplitSource | None = None,
) -> batching.TrainIterator:
  """Endless, shuffled, deterministic training batches for this host.

  Args:
    data_config: `config.data` (`cco_jax.data.config`).
    cam_size: (h, w) of the CAM grid, e.g. (14, 14) for 224 px inputs.
    global_batch_size: examples per step over all hosts and devices.
    num_devices: local devices D of this host.
    seed: training seed (shuffle order and augmentations).
    process_index: this host; it reads examples process_index::process_count.
    process_count: number of hosts.
    with_index: also yield 'index' int32 (D, b), each example's position in
      the training split (for debugging and tests).
    source: the training split, already open (`load_split_sources`); None
      opens it.

  Returns:
    A `TrainIterator` of {'image': float32 (D, b, S, S, 3), 'mask': float32
    (D, b, h, w), 'label': int32 (D, b), 'group': int32 (D, b)} and, with
    `config.data.pixel_masks`, 'pixel_mask' float32 (D, b, S, S) in {0, 1}
    (empty ones all ones); b = global_batch_size // (num_devices *
    process_count). With `config.data.device_preprocessing`, 'image' is
    uint8 (D, b, S, S, 3), nothing is flipped, and with `augment_flip`
    'flip' bool (D, b) says which examples the train step mirrors
    (`device_transforms.finish_batch`).

  Raises:
    ValueError: indivisible batch size, a bad config, or a training split
      smaller than one batch.
  """
  cam_size = batching.check_cam_size(cam_size)
  per_device = batching.per_device_batch_size(
    global_batch_size, num_devices, process_count
  )
  if source is None:
    source = load_split_sources(data_config, ['train'])['train']
  empty = empty_mask_positions(source, data_config, cam_size=cam_size)
  logging.info(
    '%d of %d training examples have an empty mask at CAM size %s; '
    'empty_mask_policy=%r.',
    len(empty),
    len(source),
    cam_size,
    data_config.empty_mask_policy,
  )
  if data_config.empty_mask_policy == 'drop':
    source = source.subset(np.setdiff1d(np.arange(len(source)), empty))
  source = source.subset(np.arange(len(source))[process_index::process_count])
  per_host = per_device * num_devices
  if len(source) < per_host:
    raise errors.UserError(
      f'The training split of {data_config.name!r} has {len(source)} '
      f'examples on this host, fewer than one batch ({per_host}); set '
      f'--config.batch_size={max(1, len(source) // num_devices) * num_devices}'
      ' or smaller (or add training images).'
    )
  balance_labels = None
  if data_config.get('sampling', 'natural') == 'class_balanced':
    labels = info.class_labels_of(source, data_config)
    logging.info(
      'Class-balanced sampling over %d classes (training examples per '
      'class: %s).',
      len(np.unique(labels)),
      np.bincount(labels).tolist(),
    )
    balance_labels = order.labels_key(labels)
  pixel_masks = data_config['pixel_masks']
  decoded = Decoded(
    source,
    data_config.task,
    data_config.boundary_is_foreground,
    draft_size=draft_size(data_config, training=True),
  )
  if data_config['cache_decoded']:
    decoded = cache_lib.build_cache(
      decoded,
      data_config.image_size,
      cam_size=cam_size,
      mask_resize=data_config.mask_resize,
      with_pixel_mask=pixel_masks,
    )
  shuffle_seed, augment_seed = order.derived_seeds(
    seed, data_config['shuffle_seed_offset']
  )
  on_device = data_config['device_preprocessing']
  keys = ('image', 'mask', 'label', 'group')
  keys += ('pixel_mask',) * pixel_masks + ('index',) * with_index
  keys += ('flip',) * (on_device and data_config.augment_flip)
  keys += ('targets',) * (source.targets is not None)
  if isinstance(decoded, cache_lib.Cached) and not data_config.augment_crop:
    batches = grain.MapDataset.source(
      cache_lib.CachedBatches(
        decoded,
        batch_size=per_host,
        num_devices=num_devices,
        shuffle_seed=shuffle_seed,
        augment_seed=augment_seed,
        flip=data_config.augment_flip,
        normalize=data_config.normalize,
        keys=keys,
        device_preprocessing=on_device,
        balance_labels=balance_labels,
      )
    )
  else:
    batches = (
      grain.MapDataset.source(_Stream(decoded, shuffle_seed, balance_labels))
      .map(
        functools.partial(
          _train_example,
          data_config=data_config,
          cam_size=cam_size,
          augment_seed=augment_seed,
        )
      )
      .batch(
        per_host,
        drop_remainder=True,
        batch_fn=functools.partial(
          batching.stack_for_devices, num_devices=num_devices, keys=keys
        ),
      )
    )
  fingerprint = {
    'num_examples': len(source),
    # Not num_devices: batch k holds the same examples however many local
    # devices split it, so a checkpoint restores on another device count.
    'global_batch_size': global_batch_size,
    'process_index': process_index,
    'process_count': process_count,
    'seed': seed,
    'cam_size': list(cam_size),
    **config_lib.fingerprint_fields(data_config),
  }
  return batching.TrainIterator(
    batches,
    num_workers=data_config.num_workers,
    prefetch=data_config.prefetch,
    fingerprint=fingerprint,
  )
