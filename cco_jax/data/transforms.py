"""Per-example transforms: decode, crop, squash, masks on the CAM grid.

One example travels as follows (NumPy and Pillow):

    record (JPEG image, PNG trimap, labels, group)
      -> `decode` with Pillow               image RGB (H, W), fg 'L' {0, 1}
      -> [random resized crop, flip]        the same box and flip for both
      -> squash to (S, S)                   bilinear; no aspect-preserving crop
      -> image float32 (S, S, 3) in [0, 1]  [ImageNet mean/std when `normalize`]
                                          (training with device_preprocessing:
                                          uint8, finished and flipped on the
                                          device, `device_transforms`)
         mask  float32 (h, w) in [0, 1]     fg resized to the CAM grid

Masks are stored in the Pets trimap convention (1 = object, 2 = background,
3 = boundary; builders of binary masks store 1 / 2). The foreground is
`trimap == 1`, or `trimap != 2` when `boundary_is_foreground`. The CAM mask is
the foreground resized to (h, w) by 'nearest' (binary) or 'area' (soft: the
fraction of foreground pixels in each cell). `training_masks` is the one
function that makes training masks, in the cached and the uncached path alike:
an empty CAM mask becomes all ones (ablated CE then equals CE). Examples
without a mask (Cats-vs-Dogs) get all-ones masks.
"""

from __future__ import annotations

from collections.abc import Mapping
import io
import math
import os
import types
from typing import Any

import numpy as np
from PIL import Image

from cco_jax import errors
from cco_jax.data.config import CROP_AREA_RANGE
from cco_jax.data.config import CROP_ASPECT_RANGE
from cco_jax.data.config import IMAGENET_MEAN
from cco_jax.data.config import IMAGENET_STD
from cco_jax.data.datasets import common as datasets_common
from cco_jax.data.datasets import oxford_iiit_pet
from cco_jax.data.sources import as_str

Example = dict[str, Any]
# task -> the feature that holds its label.
TASKS = types.MappingProxyType(
  {'species': 'species', 'breed': 'label', 'label': 'label'}
)
MASK_RESAMPLING = types.MappingProxyType(
  {'nearest': Image.Resampling.NEAREST, 'area': Image.Resampling.BOX}
)
# A box is (left, top, right, bottom) as fractions of the image's width/height.
Box = tuple[float, float, float, float]
FULL_BOX: Box = (0.0, 0.0, 1.0, 1.0)


# Trimap value -> foreground (0/1): `trimap == 1`, or `trimap != 2`.
_FOREGROUND_LUT = np.array(
  [int(v == oxford_iiit_pet.TRIMAP_PET) for v in range(256)], np.uint8
)
_FOREGROUND_OR_BOUNDARY_LUT = np.array(
  [int(v != oxford_iiit_pet.TRIMAP_BACKGROUND) for v in range(256)], np.uint8
)


def foreground(
  trimap: Image.Image | np.ndarray, *, boundary_is_foreground: bool
) -> Image.Image:
  """Mode 'L' image: 1 where `trimap == 1` (or `trimap != 2`), else 0.

  `trimap` is a Pillow image ('L' or 'P' values) or uint8 (H, W[, 1]).
  """
  lut = (
    _FOREGROUND_OR_BOUNDARY_LUT if boundary_is_foreground else (_FOREGROUND_LUT)
  )
  values = np.asarray(trimap)
  if values.ndim == 3:
    values = values[..., 0]
  return Image.fromarray(lut[values.astype(np.uint8, copy=False)])


def open_stored(value: bytes | np.ndarray) -> Image.Image:
  """An encoded image (bytes) or stored uint8 pixels (H, W[, C]) as Pillow.

  Encoded images are opened lazily (decoded on first use); raw pixels
  (`config.data.store_format='raw'`) need no decoding.
  """
  if isinstance(value, np.ndarray):
    return Image.fromarray(value[..., 0] if value.shape[-1] == 1 else value)
  return Image.open(io.BytesIO(value))


def decode_foreground(
  record: Mapping[str, Any], *, boundary_is_foreground: bool
) -> Image.Image | None:
  """The foreground ('L', {0, 1}) of a record's trimap; None without one."""
  if 'segmentation_mask' not in record:
    return None
  mask = record['segmentation_mask']
  return foreground(
    mask if isinstance(mask, np.ndarray) else open_stored(mask),
    boundary_is_foreground=boundary_is_foreground,
  )


def decode(
  record: Mapping[str, Any],
  *,
  task: str,
  boundary_is_foreground: bool,
  draft_size: int | None = None,
) -> Example:
  """Opens a record's image (and trimap) with Pillow.

  Args:
    record: a `SplitSource` item (encoded 'image', optional
      'segmentation_mask', labels, 'index', 'group', 'file_name').
    task: a key of `TASKS`: which label to keep.
    boundary_is_foreground: count trimap value 3 as foreground.
    draft_size: when given, JPEG decoding may downscale by 2, 4 or 8 in the DCT
      (much faster) as long as both sides stay >= draft_size.

  Returns:
    {'image': RGB Image, 'fg': 'L' Image in {0, 1} over the same field of view
    (None without a trimap), 'label': int, 'index': int, 'group': int,
    'file_name': str}.
  """
  image = open_stored(record['image'])
  if draft_size and image.format == 'JPEG':
    image.draft('RGB', (draft_size, draft_size))
  if image.mode != 'RGB':
    image = image.convert('RGB')
  out = {
    'image': image,
    'fg': decode_foreground(
      record, boundary_is_foreground=boundary_is_foreground
    ),
    'label': int(record[TASKS[task]]),
    'index': int(record['index']),
    'group': int(record.get('group', 0)),
    'file_name': as_str(record['file_name']),
  }
  return with_targets(out, record)


def with_targets(out: Example, example: Mapping[str, Any]) -> Example:
  """`out` with the example's multi-hot 'targets' float32 `(C,)`, if any."""
  if example.get('targets') is not None:
    out['targets'] = np.asarray(example['targets'], np.float32)
  return out


def resize(
  image: Image.Image,
  size: tuple[int, int],
  resample: Image.Resampling,
  box: Box = FULL_BOX,
) -> np.ndarray:
  """Crops the relative `box` of `image` and resizes it to `size` = (h, w).

  Returns:
    An array (h, w) or (h, w, C) of the image's dtype.
  """
  width, height = image.size
  left, top, right, bottom = box
  if box == FULL_BOX and image.size == (size[1], size[0]):
    return np.asarray(image)
  return np.asarray(
    image.resize(
      (size[1], size[0]),
      resample,
      box=(left * width, top * height, right * width, bottom * height),
    )
  )


def random_crop_box(width: int, height: int, rng: np.random.Generator) -> Box:
  """A random resized-crop box (relative) for an image of this size.

  Its area is a uniform fraction in `CROP_AREA_RANGE` of the image's and its
  aspect ratio (in pixels) log-uniform in `CROP_ASPECT_RANGE`, clipped to fit.
  """
  area = rng.uniform(*CROP_AREA_RANGE) * width * height
  aspect = math.exp(rng.uniform(*np.log(CROP_ASPECT_RANGE)))
  crop_w = min(width, max(1, round(math.sqrt(area * aspect))))
  crop_h = min(height, max(1, round(math.sqrt(area / aspect))))
  left = int(rng.integers(0, width - crop_w + 1))
  top = int(rng.integers(0, height - crop_h + 1))
  return (
    left / width,
    top / height,
    (left + crop_w) / width,
    (top + crop_h) / height,
  )


def cam_mask(
  fg: Image.Image | None,
  cam_size: tuple[int, int],
  method: str,
  box: Box = FULL_BOX,
) -> np.ndarray:
  """Foreground ('L', {0, 1}) -> float32 (h, w) mask on the CAM grid.

  'nearest' samples the foreground at each cell's centre (binary); 'area'
  averages it over each cell (the fraction of foreground pixels). Without a
  foreground (no trimap) the mask is all ones.
  """
  if fg is None:
    return np.ones(cam_size, np.float32)
  if method == 'area':
    return resize(fg.convert('F'), cam_size, MASK_RESAMPLING['area'], box)
  return resize(fg, cam_size, MASK_RESAMPLING['nearest'], box).astype(
    np.float32
  )


def pixel_mask(
  fg: Image.Image | None, image_size: int, box: Box = FULL_BOX
) -> np.ndarray:
  """Foreground -> float32 (S, S) in {0, 1} at image resolution (nearest);
  all ones without a foreground."""
  size = (image_size, image_size)
  if fg is None:
    return np.ones(size, np.float32)
  return resize(fg, size, Image.Resampling.NEAREST, box).astype(np.float32)


def is_empty(mask: np.ndarray) -> bool:
  """Whether a mask has no foreground at all."""
  return not mask.any()


def training_masks(
  fg: Image.Image | None,
  *,
  cam_size: tuple[int, int],
  mask_resize: str,
  image_size: int | None = None,
  box: Box = FULL_BOX,
) -> dict[str, np.ndarray]:
  """The masks of one training example, empty ones made all ones.

  The single place of the empty-mask rule: used by `to_model_input` and by the
  RAM cache, so both paths give identical masks. Whether an example is left
  out under `empty_mask_policy='drop'` is decided with `is_empty` on the
  uncropped CAM mask of its full-resolution foreground
  (`pipeline.empty_mask_positions`), in both paths.

  Returns:
    {'mask': float32 (h, w)} and, when `image_size` is given, 'pixel_mask'
    float32 (S, S); each all ones where it would be empty.
  """
  out = {'mask': cam_mask(fg, cam_size, mask_resize, box)}
  if image_size is not None:
    out['pixel_mask'] = pixel_mask(fg, image_size, box)
  return {
    key: np.ones_like(mask) if is_empty(mask) else mask
    for key, mask in out.items()
  }


def finish_image(image: np.ndarray, *, normalize: bool) -> np.ndarray:
  """uint8 (..., 3) -> float32 in [0, 1], or ImageNet-normalised.

  The host's version of `device_transforms.finish_on_device` (same
  arithmetic): evaluation batches, and training batches without
  `config.data.device_preprocessing`.
  """
  image = image.astype(np.float32) * np.float32(1 / 255)
  if normalize:
    image = (image - IMAGENET_MEAN) / IMAGENET_STD
  return image


def to_model_input(
  example: Example,
  *,
  image_size: int,
  cam_size: tuple[int, int],
  mask_resize: str,
  normalize: bool,
  with_pixel_mask: bool,
  box: Box = FULL_BOX,
  flip: bool = False,
  pixel_mask_empty_as_ones: bool = False,
  finish: bool = True,
) -> Example:
  """Crops `box`, squashes to (S, S), flips, and converts to float arrays.

  With `finish=False` the image stays uint8 (S, S, 3) and `normalize` is not
  applied: the train step finishes it on the device
  (`cco_jax.data.device_transforms`).

  Returns:
    {'image': float32 (S, S, 3) in [0, 1] (or normalised), 'mask': float32
    (h, w), 'label': int32 (), 'index': int32 (), 'group': int32 (),
    'file_name': str} and, with `with_pixel_mask`, 'pixel_mask': float32
    (S, S) (nearest). An empty CAM mask becomes all ones; with
    `pixel_mask_empty_as_ones` (training, `training_masks`) an empty pixel
    mask too, otherwise (evaluation) the pixel mask is the foreground as is.
  """
  size = (image_size, image_size)
  image = resize(example['image'], size, Image.Resampling.BILINEAR, box)
  masks = training_masks(
    example['fg'],
    cam_size=cam_size,
    mask_resize=mask_resize,
    image_size=image_size
    if with_pixel_mask and pixel_mask_empty_as_ones
    else None,
    box=box,
  )
  if with_pixel_mask and not pixel_mask_empty_as_ones:
    masks['pixel_mask'] = pixel_mask(example['fg'], image_size, box)
  if flip:
    image = image[:, ::-1]
    masks = {key: mask[:, ::-1] for key, mask in masks.items()}
  out = {
    'image': finish_image(image, normalize=normalize)
    if finish
    else np.ascontiguousarray(image),
    **{key: np.ascontiguousarray(mask) for key, mask in masks.items()},
    'label': np.int32(example['label']),
    'index': np.int32(example['index']),
    'group': np.int32(example.get('group', 0)),
    'file_name': example['file_name'],
  }
  return with_targets(out, example)


def read_image_file(
  path: str | os.PathLike, *, image_size: int, normalize: bool
) -> np.ndarray:
  """An image file -> float32 `(S, S, 3)`, preprocessed as for evaluation
  (RGB, squashed bilinearly to `S x S`, `finish_image`).

  Raises:
    ValueError: no such file, or not a readable image (names the file).
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise errors.UserError(f'{path}: no such file.')
  try:
    with Image.open(path) as image:
      image.draft('RGB', (image_size, image_size))
      pixels = resize(
        datasets_common.to_rgb(image),
        (image_size, image_size),
        Image.Resampling.BILINEAR,
      )
  except (OSError, ValueError, Image.DecompressionBombError) as e:
    raise errors.UserError(
      f'{path}: not a readable image ({type(e).__name__}: {e}). Pass a JPEG '
      'or PNG file.'
    ) from None
  return finish_image(pixels, normalize=normalize)


def read_mask_file(
  path: str | os.PathLike, *, image_size: int, boundary_is_foreground: bool
) -> np.ndarray:
  """An object-mask file -> float32 `(S, S)` in {0, 1} (1 = object), squashed
  with 'nearest'.

  A mask in the trimap convention (values in {1, 2, 3} with some 2) gets
  `foreground` as in training; any other 8-bit mask is read as the 'folder'
  layout reads it: 0 = background, > 0 = object.

  Raises:
    ValueError: the file cannot be read as an 8-bit mask (names the file).
  """
  path = os.fspath(path)
  try:
    with open(path, 'rb') as f:
      values = datasets_common.decode_mask_png(f.read())
  except (OSError, ValueError) as e:
    raise errors.UserError(f'{path}: not a readable mask ({e}).') from None
  present = set(np.unique(values).tolist())
  if not (
    present <= {1, 2, 3} and oxford_iiit_pet.TRIMAP_BACKGROUND in present
  ):
    values = np.where(
      values > 0, oxford_iiit_pet.TRIMAP_PET, oxford_iiit_pet.TRIMAP_BACKGROUND
    )
  fg = foreground(values, boundary_is_foreground=boundary_is_foreground)
  return resize(fg, (image_size, image_size), Image.Resampling.NEAREST).astype(
    np.float32
  )
