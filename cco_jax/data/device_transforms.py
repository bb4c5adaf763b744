"""The per-pixel image work of a training batch, done on the accelerator.

With `config.data.device_preprocessing` (the default) the host sends training
images as uint8 (a quarter of the bytes of float32, and no float arithmetic
on the host) and, when `augment_flip` is on, one flag per example; the train
step (`cco_jax.train_step.train_step`) calls `finish_batch` first, inside the
jitted/pmapped computation:

    host (`cco_jax.data.pipeline`)           device (`finish_batch`)
    decode, random resized crop, squash  ->  uint8 -> float32 in [0, 1]
    masks on the CAM grid (float32)          [ImageNet mean/std]
    flip bit drawn per example               flip image, 'mask', 'pixel_mask'

The random resized crop stays on the host: it crops the stored
full-resolution image (and foreground) before the squash to (S, S), so a crop
keeps the detail a crop of the squashed (S, S) image would lose, and its masks
are made from the full-resolution foreground; the device only ever sees the
squashed (S, S) result. The flip bits come from the host's seeded draws
(`cco_jax.data.order.example_rng`), so a batch is flipped exactly as the host
path flips it, and resuming needs nothing new.

The arithmetic is `cco_jax.data.transforms.finish_image`'s (the host path),
in the same order, so both give the same float32 values up to rounding.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cco_jax.data.config import IMAGENET_MEAN
from cco_jax.data.config import IMAGENET_STD

# Batch entries flipped with the image: they share its width axis.
FLIPPED_KEYS = ('image', 'mask', 'pixel_mask')


def flip_where(x: jax.Array, flip: jax.Array) -> jax.Array:
  """Mirrors the examples of `x` whose `flip` is set, along their width.

  Args:
    x: `flip.shape + (H, W, ...)`, e.g. images (b, S, S, 3) or masks (b, h, w).
    flip: bool or integer `(b,)` (any leading shape); nonzero = mirror.

  Returns:
    `x` with `x[i][:, ::-1]` where `flip[i]`, of `x`'s shape and dtype.
  """
  flip = jnp.asarray(flip)
  if x.shape[: flip.ndim] != flip.shape or x.ndim < flip.ndim + 2:
    raise ValueError(
      f'flip of shape {flip.shape} does not lead an array of shape '
      f'{x.shape} with two more (height, width) axes.'
    )
  chosen = (flip != 0).reshape(flip.shape + (1,) * (x.ndim - flip.ndim))
  return jnp.where(chosen, jnp.flip(x, axis=flip.ndim + 1), x)


def finish_on_device(
  images: jax.Array, flip: jax.Array | None, *, normalize: bool
) -> jax.Array:
  """uint8 images (..., S, S, 3) -> float32 in [0, 1] (or normalised).

  Args:
    images: uint8 `(b, S, S, 3)` (any leading shape).
    flip: bool `(b,)` (the leading shape of `images`), or None for no flips.
    normalize: subtract the ImageNet mean and divide by its std, as
      `config.data.normalize`.

  Returns:
    float32 `(b, S, S, 3)`: `transforms.finish_image` of the (flipped) images.
  """
  if images.dtype != jnp.uint8:
    raise ValueError(
      f'finish_on_device takes uint8 images; got {images.dtype} (images '
      'finished on the host are float32 already).'
    )
  if flip is not None:
    images = flip_where(images, flip)
  images = images.astype(jnp.float32) * np.float32(1 / 255)
  if normalize:
    images = (images - IMAGENET_MEAN) / IMAGENET_STD
  return images


def finish_batch(
  batch: Mapping[str, Any], *, normalize: bool | None
) -> dict[str, Any]:
  """A training batch as the host sends it -> as the model reads it.

  uint8 'image's are scaled (and normalised); a 'flip' entry mirrors 'image',
  'mask' and 'pixel_mask' of its examples and is dropped. A batch of float
  images without 'flip' (finished on the host) comes back unchanged.

  Args:
    batch: one device's shard, 'image' `(b, S, S, 3)` uint8 or float, 'mask'
      `(b, h, w)`, optional 'pixel_mask' `(b, S, S)` and 'flip' `(b,)`.
    normalize: `config.data.normalize`; needed (not None) for uint8 images.

  Returns:
    A new dict with float32 'image' and flipped masks, without 'flip'.

  Raises:
    ValueError: uint8 images with `normalize=None`.
  """
  batch = dict(batch)
  flip = batch.pop('flip', None)
  image = batch['image']
  if image.dtype == jnp.uint8:
    if normalize is None:
      raise ValueError(
        'The batch holds uint8 images (config.data.device_preprocessing): '
        'the train step must know config.data.normalize; build it with '
        'train_step.pmapped_train_step(objective, '
        'normalize=config.data.normalize).'
      )
    batch['image'] = finish_on_device(image, flip, normalize=normalize)
  elif flip is not None:
    batch['image'] = flip_where(image, flip)
  if flip is not None:
    for key in FLIPPED_KEYS[1:]:
      if key in batch:
        batch[key] = flip_where(batch[key], flip)
  return batch
