"""The RAM cache (`config.data.cache_decoded`): decode and squash once.

Each training example is decoded once, its masks are made from the
full-resolution foreground by `transforms.training_masks` (as the Pillow path
makes them), and the image and foreground are kept squashed to (S, S). An
uncropped batch is then one array gather (`CachedBatches`); a cropped example
is rendered from the (S, S) copies with Pillow, so its masks come from the
squashed foreground.
"""

from __future__ import annotations

import dataclasses
import functools

from absl import logging
import grain
import numpy as np
from PIL import Image

from cco_jax.data import order
from cco_jax.data import transforms

Batch = dict[str, np.ndarray]
Example = transforms.Example
# Length of an endless Grain source (batches are drawn lazily by index).
ENDLESS = 2**62
# Threads that decode masks or fill the cache (Pillow releases the GIL).
SCAN_THREADS = 8


def read_options(prefetch: int) -> grain.ReadOptions:
  return grain.ReadOptions(num_threads=prefetch, prefetch_buffer_size=prefetch)


@dataclasses.dataclass(frozen=True)
class Cached:
  """Examples decoded and squashed once, held as arrays (a Grain source).

  Items carry the arrays ('image_array', 'fg_array') and the training masks of
  the whole image ('mask', 'pixel_mask'), so an uncropped example needs no
  Pillow work at all (`cached_model_input`).
  """

  images: np.ndarray  # uint8 (N, S, S, 3)
  fgs: np.ndarray | None  # uint8 (N, S, S) in {0, 1}; None without masks.
  masks: np.ndarray  # float32 (N, h, w): `training_masks` of the full image.
  pixel_masks: np.ndarray | None  # float32 (N, S, S), or None.
  labels: np.ndarray  # int32 (N,)
  indices: np.ndarray  # int32 (N,): positions in the pipeline split.
  groups: np.ndarray  # int32 (N,)
  file_names: tuple[str, ...]
  targets: np.ndarray | None = None  # float32 (N, C) multi-hot, or None.

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, i: int) -> Example:
    return {
      'image_array': self.images[i],
      'fg_array': None if self.fgs is None else self.fgs[i],
      'mask': self.masks[i],
      'pixel_mask': None if self.pixel_masks is None else self.pixel_masks[i],
      'label': int(self.labels[i]),
      'index': int(self.indices[i]),
      'group': int(self.groups[i]),
      'file_name': self.file_names[i],
      'targets': None if self.targets is None else self.targets[i],
    }


def as_images(example: Example) -> Example:
  """A `Cached` item as `transforms.decode` returns examples (Pillow)."""
  fg = example['fg_array']
  out = {
    'image': Image.fromarray(example['image_array']),
    'fg': None if fg is None else Image.fromarray(fg),
    'label': example['label'],
    'index': example['index'],
    'group': example['group'],
    'file_name': example['file_name'],
  }
  return transforms.with_targets(out, example)


def cached_model_input(
  example: Example, *, normalize: bool, flip: bool, finish: bool = True
) -> Example:
  """`to_model_input` of an uncropped `Cached` item, by array operations.

  Equal, bit for bit, to the Pillow path's training example: the cached image
  is the same squash of the same decoded image, and the masks were made by
  the same function from the same full-resolution foreground. `finish=False`
  keeps the image uint8 (S, S, 3), as `to_model_input(..., finish=False)`.
  """
  masks = {'mask': example['mask']}
  if example['pixel_mask'] is not None:
    masks['pixel_mask'] = example['pixel_mask']
  image = example['image_array']
  if flip:
    image = image[:, ::-1]
    masks = {key: mask[:, ::-1] for key, mask in masks.items()}
  out = {
    'image': transforms.finish_image(image, normalize=normalize)
    if finish
    else np.ascontiguousarray(image),
    **{key: np.ascontiguousarray(mask) for key, mask in masks.items()},
    'label': np.int32(example['label']),
    'index': np.int32(example['index']),
    'group': np.int32(example['group']),
    'file_name': example['file_name'],
  }
  return transforms.with_targets(out, example)


@dataclasses.dataclass(frozen=True)
class CachedBatches:
  """Uncropped training batches from a `Cached` source, one gather each.

  Batch k (a Grain source of endless length) holds stream positions
  k*b .. (k+1)*b - 1 with their flips (`cco_jax.data.order`), exactly as the
  Pillow path; rendering is `cached_model_input`'s arithmetic on the whole
  batch at once, which keeps the input's share of a 2-core CPU small.
  """

  cached: Cached
  batch_size: int  # Examples per host and batch.
  num_devices: int
  shuffle_seed: int
  augment_seed: int
  flip: bool
  normalize: bool
  keys: tuple[str, ...]
  device_preprocessing: bool = False
  balance_labels: bytes | None = None  # Class-balanced (`order`).

  def __len__(self) -> int:
    return ENDLESS

  def positions(self, k: int) -> np.ndarray:
    """Positions in the cache of batch k's examples, int64 (b,)."""
    stream = np.arange(k * self.batch_size, (k + 1) * self.batch_size)
    return order.stream_positions(
      stream, len(self.cached), self.shuffle_seed, self.balance_labels
    )

  def flips(self, k: int) -> np.ndarray:
    """bool (b,): which of batch k's examples are flipped."""
    stream = range(k * self.batch_size, (k + 1) * self.batch_size)
    if not self.flip:
      return np.zeros(self.batch_size, bool)
    return np.array(
      [order.example_rng(self.augment_seed, i).random() < 0.5 for i in stream]
    )

  def __getitem__(self, k: int) -> Batch:
    positions = self.positions(k)
    flips = self.flips(k)
    batch = {
      'image': self.cached.images[positions],
      'mask': self.cached.masks[positions],
      'label': self.cached.labels[positions],
      'index': self.cached.indices[positions],
      'group': self.cached.groups[positions],
    }
    if 'pixel_mask' in self.keys:
      batch['pixel_mask'] = self.cached.pixel_masks[positions]
    if 'targets' in self.keys:
      batch['targets'] = self.cached.targets[positions]
    if self.device_preprocessing:
      batch['flip'] = flips
    else:
      for key in ('image', 'mask', 'pixel_mask'):
        if key in batch:
          batch[key][flips] = batch[key][flips, :, ::-1]
      batch['image'] = transforms.finish_image(
        batch['image'], normalize=self.normalize
      )
    return {
      key: batch[key].reshape(self.num_devices, -1, *batch[key].shape[1:])
      for key in self.keys
    }


def _squash(
  example: Example,
  *,
  size: int,
  cam_size: tuple[int, int],
  mask_resize: str,
  with_pixel_mask: bool,
) -> Example:
  """A decoded example -> its cache entry (masks from the full-res fg)."""
  fg = example['fg']
  masks = transforms.training_masks(
    fg,
    cam_size=cam_size,
    mask_resize=mask_resize,
    image_size=size if with_pixel_mask else None,
  )
  return {
    **example,
    **masks,
    'image': transforms.resize(
      example['image'], (size, size), Image.Resampling.BILINEAR
    ),
    'fg': None
    if fg is None
    else transforms.resize(fg, (size, size), Image.Resampling.NEAREST),
  }


def build_cache(
  decoded,
  image_size: int,
  *,
  cam_size: tuple[int, int],
  mask_resize: str,
  with_pixel_mask: bool,
) -> Cached:
  """Decodes and squashes every example of `decoded` once (with threads).

  Args:
    decoded: a random-access source of `transforms.decode` examples.
    image_size: S.
    cam_size: (h, w) of the CAM grid.
    mask_resize: 'nearest' or 'area'.
    with_pixel_mask: also keep the training pixel masks (S, S).
  """
  squashed = grain.MapDataset.source(decoded).map(
    functools.partial(
      _squash,
      size=image_size,
      cam_size=cam_size,
      mask_resize=mask_resize,
      with_pixel_mask=with_pixel_mask,
    )
  )
  examples = list(squashed.to_iter_dataset(read_options(SCAN_THREADS)))
  logging.info(
    'Cached %d decoded examples (%.0f MB).',
    len(examples),
    len(examples) * image_size**2 * (4 + 4 * with_pixel_mask) / 1e6,
  )
  has_fg = examples[0]['fg'] is not None
  return Cached(
    images=np.stack([e['image'] for e in examples]),
    fgs=np.stack([e['fg'] for e in examples]) if has_fg else None,
    masks=np.stack([e['mask'] for e in examples]),
    pixel_masks=np.stack([e['pixel_mask'] for e in examples])
    if with_pixel_mask
    else None,
    labels=np.array([e['label'] for e in examples], np.int32),
    indices=np.array([e['index'] for e in examples], np.int32),
    groups=np.array([e['group'] for e in examples], np.int32),
    file_names=tuple(e['file_name'] for e in examples),
    targets=np.stack([e['targets'] for e in examples])
    if 'targets' in examples[0]
    else None,
  )
