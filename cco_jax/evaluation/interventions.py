"""Interventions: pure functions of a batch that change only one region.

Everything acts on the foreground mask of each image at image resolution
(`pixel_mask`, `(..., S, S)`, 1 = the object, as the evaluation pipeline reads
it). Registered in `PERTURBATIONS` (`register` adds one):

  background_noise  every background pixel is replaced by Gaussian noise around
                    mid-grey, `clip(0.5 + noise_std * N(0, 1), 0, 1)` per pixel
                    and channel in [0, 1] pixel space; the noise of an example
                    depends only on `(seed, its position in the split)`.
  foreground_noise  the same noise on the object pixels (the background kept);
                    with `background_noise`, the two accuracies of RFS
                    (`cco_jax.metrics.relative_foreground_sensitivity`).
  background_gray   every background pixel becomes flat grey 0.5.
  background_swap   the background comes from another image of the same split:
                    example p gets the pixels of donor q = `donor_positions`
                    (a fixed single cycle through the split, so q != p) at the
                    same coordinates wherever BOTH p's and q's masks are
                    background; where p is background but q shows its own
                    object, the pixel is flat grey (no second animal is pasted).
  foreground_gray   every object pixel becomes flat grey 0.5; the background is
                    untouched (a model that uses only the object falls to chance).

Grey and noise are defined in [0, 1] pixel space and mapped like the images
when `config.data.normalize` is set. Pixels on the untouched side are copied
exactly (`np.where`, no blending), so each intervention changes only its region.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses

import ml_collections
import numpy as np

from cco_jax.data import pipeline
from cco_jax.data import sources
from cco_jax.data import transforms
from cco_jax.explain import to_model_space
from cco_jax.explain import to_pixel_space

__all__ = ['to_model_space', 'to_pixel_space']

GRAY = 0.5
DEFAULT_NOISE_STD = 0.25
DEFAULT_SEED = 0
# Salt of the donor cycle of `background_swap`; fixed so results are comparable.
_DONOR_SALT = 0x5EED

Batch = dict[str, np.ndarray]


def _check_images_and_mask(images: np.ndarray, pixel_mask: np.ndarray) -> None:
  if np.ndim(images) < 3 or np.shape(images)[-1] != 3:
    raise ValueError(
      f'images must be (..., S, S, 3); got shape {np.shape(images)}.'
    )
  if np.shape(pixel_mask) != np.shape(images)[:-1]:
    raise ValueError(
      f'pixel_mask must be (..., S, S) matching images {np.shape(images)}; got '
      f'{np.shape(pixel_mask)}. Use the `pixel_mask` of create_eval_iterator('
      '..., with_pixel_mask=True), not the CAM-resolution `mask`.'
    )


def replace_background(
  images: np.ndarray, pixel_mask: np.ndarray, fill: np.ndarray | float
) -> np.ndarray:
  """Object pixels of `images` `(..., S, S, 3)` (mask `(..., S, S)` > 0.5),
  `fill` (broadcastable to `images`) elsewhere; float32."""
  _check_images_and_mask(images, pixel_mask)
  keep = np.asarray(pixel_mask)[..., None] > 0.5
  return np.where(keep, images, fill).astype(np.float32)


def replace_foreground(
  images: np.ndarray, pixel_mask: np.ndarray, fill: np.ndarray | float
) -> np.ndarray:
  """Background pixels of `images`, `fill` on the object (shapes as
  `replace_background`); background pixels are bit-identical."""
  _check_images_and_mask(images, pixel_mask)
  keep = np.asarray(pixel_mask)[..., None] <= 0.5
  return np.where(keep, images, fill).astype(np.float32)


def gray_fill(*, normalize: bool) -> np.ndarray:
  """`(3,)`: grey 0.5 in the model's input space."""
  return to_model_space(np.full(3, GRAY, np.float32), normalize=normalize)


def noise_fill(
  indices: np.ndarray,
  image_size: int,
  *,
  seed: int,
  std: float,
  normalize: bool,
) -> np.ndarray:
  """Gaussian noise images `(..., S, S, 3)`, one per split position in
  `indices` `(...)`, mean 0.5 and `std` in [0, 1] pixel space (clipped)."""
  indices = np.asarray(indices)
  flat = [
    np.random.default_rng([seed % 2**32, int(i) % 2**32]).standard_normal(
      (image_size, image_size, 3), np.float32
    )
    for i in indices.reshape(-1)
  ]
  noise = np.stack(flat).reshape(indices.shape + (image_size, image_size, 3))
  return to_model_space(
    np.clip(GRAY + std * noise, 0.0, 1.0), normalize=normalize
  )


def donor_positions(
  positions: np.ndarray, num_examples: int, *, seed: int
) -> np.ndarray:
  """The donor of each split position for `background_swap`.

  A seeded permutation `order` of `range(num_examples)` is read as one cycle:
  the donor of `order[k]` is `order[(k + 1) % num_examples]`: no fixed point
  (for `num_examples >= 2`), independent of the batch size. Negative
  positions (padding) count as 0. Returns int64 of `positions`' shape.
  """
  if num_examples < 1:
    raise ValueError(f'num_examples must be >= 1; got {num_examples}.')
  order = np.random.default_rng([seed % 2**32, _DONOR_SALT]).permutation(
    num_examples
  )
  donor_of = np.empty(num_examples, np.int64)
  donor_of[order] = np.roll(order, -1)
  return donor_of[np.clip(np.asarray(positions), 0, num_examples - 1)]


def swap_background(
  images: np.ndarray,
  pixel_mask: np.ndarray,
  donor_images: np.ndarray,
  donor_pixel_masks: np.ndarray,
  *,
  normalize: bool,
) -> np.ndarray:
  """The object of `images` on the background of `donor_images`: own pixels
  where its mask is 1, the donor's where both masks are 0, grey where only the
  donor's mask is 1. Shapes as `replace_background`."""
  _check_images_and_mask(donor_images, donor_pixel_masks)
  if np.shape(donor_images) != np.shape(images):
    raise ValueError(
      f'donor_images {np.shape(donor_images)} must match images '
      f'{np.shape(images)}.'
    )
  donor_bg = replace_foreground(
    donor_images, donor_pixel_masks, gray_fill(normalize=normalize)
  )
  return replace_background(images, pixel_mask, donor_bg)


@dataclasses.dataclass(frozen=True)
class Context:
  """What the interventions need besides the batch.

  Attributes:
    normalize: images are ImageNet-normalised (`config.data.normalize`).
    seed: seeds the noise and the donor cycle.
    noise_std: standard deviation of the noise in pixel space.
    donors: `positions (...) -> (images (..., S, S, 3), pixel_masks (..., S, S))`
      of the donors of those split positions; None disables `background_swap`.
  """

  normalize: bool = False
  seed: int = DEFAULT_SEED
  noise_std: float = DEFAULT_NOISE_STD
  donors: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None


@dataclasses.dataclass(frozen=True)
class Perturbation:
  """An intervention: `apply(batch, context) -> images` on `region`."""

  region: str  # 'background' or 'foreground': the pixels it changes.
  apply: Callable[[Batch, Context], np.ndarray]


# The one place where interventions are registered (`register`).
PERTURBATIONS: dict[str, Perturbation] = {}


def register(name: str, region: str):
  """Decorator: registers `fn(batch, context) -> images` as `name`."""

  def wrap(fn):
    PERTURBATIONS[name] = Perturbation(region, fn)
    return fn

  return wrap


def _noise(batch: Batch, context: Context) -> np.ndarray:
  return noise_fill(
    batch['index'],
    batch['image'].shape[-2],
    seed=context.seed,
    std=context.noise_std,
    normalize=context.normalize,
  )


@register('background_noise', 'background')
def _background_noise(batch: Batch, context: Context) -> np.ndarray:
  return replace_background(
    batch['image'], batch['pixel_mask'], _noise(batch, context)
  )


@register('foreground_noise', 'foreground')
def _foreground_noise(batch: Batch, context: Context) -> np.ndarray:
  return replace_foreground(
    batch['image'], batch['pixel_mask'], _noise(batch, context)
  )


@register('background_gray', 'background')
def _background_gray(batch: Batch, context: Context) -> np.ndarray:
  return replace_background(
    batch['image'], batch['pixel_mask'], gray_fill(normalize=context.normalize)
  )


@register('background_swap', 'background')
def _background_swap(batch: Batch, context: Context) -> np.ndarray:
  if context.donors is None:
    raise ValueError(
      'background_swap needs Context.donors (a reader of the split by '
      'position); see `SplitReader`.'
    )
  donor_images, donor_masks = context.donors(batch['index'])
  return swap_background(
    batch['image'],
    batch['pixel_mask'],
    donor_images,
    donor_masks,
    normalize=context.normalize,
  )


@register('foreground_gray', 'foreground')
def _foreground_gray(batch: Batch, context: Context) -> np.ndarray:
  return replace_foreground(
    batch['image'], batch['pixel_mask'], gray_fill(normalize=context.normalize)
  )


class SplitReader:
  """Random access to a split's examples by position, as the eval pipeline
  renders them (`image` `(S, S, 3)`, `pixel_mask` `(S, S)`): the donors of
  `background_swap`. `source`: the split, already open."""

  def __init__(
    self,
    data_config: ml_collections.ConfigDict,
    source: sources.SplitSource,
    *,
    cam_size: tuple[int, int],
  ):
    self._config = data_config
    self._cam_size = tuple(cam_size)
    self._source = source
    self._draft = pipeline.draft_size(data_config, training=False)

  def __len__(self) -> int:
    return len(self._source)

  def example(self, position: int) -> dict:
    config = self._config
    decoded = transforms.decode(
      self._source[int(position)],
      task=config.task,
      boundary_is_foreground=config.boundary_is_foreground,
      draft_size=self._draft,
    )
    return transforms.to_model_input(
      decoded,
      image_size=config.image_size,
      cam_size=self._cam_size,
      mask_resize=config.mask_resize,
      normalize=config.normalize,
      with_pixel_mask=True,
    )

  def donors(
    self, positions: np.ndarray, *, seed: int
  ) -> tuple[np.ndarray, np.ndarray]:
    """Donor images `(..., S, S, 3)` and pixel masks `(..., S, S)` of
    `positions` (`donor_positions`)."""
    positions = np.asarray(positions)
    donors = donor_positions(positions, len(self), seed=seed).reshape(-1)
    examples = [self.example(p) for p in donors]
    size = self._config.image_size
    images = np.stack([e['image'] for e in examples]).reshape(
      positions.shape + (size, size, 3)
    )
    masks = np.stack([e['pixel_mask'] for e in examples]).reshape(
      positions.shape + (size, size)
    )
    return images, masks
