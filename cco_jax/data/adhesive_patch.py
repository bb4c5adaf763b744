"""The artifact of the skin-lesion shortcut benchmark: a coloured
adhesive-patch disc, of the kind dermoscopy images carry, placed on the skin
outside a lesion (`place_patch`) and drawn onto an image (`paste_patch`).
`cco_jax.data.isic_shortcut` decides which images get one and seeds the
generator; this module only draws.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy import ndimage

# Adhesive-patch colours seen on dermoscopy images: orange, yellow, blue,
# green, pink (RGB).
PATCH_COLOURS = (
  (236, 140, 60),
  (232, 200, 70),
  (90, 150, 220),
  (110, 190, 110),
  (225, 130, 170),
)
# Radius as a share of the shorter image side; the margin to the lesion.
RADIUS_RANGE = (0.07, 0.10)
MIN_RADIUS = 0.03
MARGIN = 0.015


@dataclasses.dataclass(frozen=True)
class Patch:
  """A disc: centre (x, y) and radius in pixels, RGB colour, shading."""

  x: float
  y: float
  radius: float
  colour: tuple[int, int, int]
  shade: float  # Darkening towards the rim, in [0, 1).
  touches_lesion: bool = False


def place_patch(lesion: np.ndarray, rng: np.random.Generator) -> Patch:
  """A patch on the skin of an image whose lesion mask is `lesion`.

  Args:
    lesion: bool `(H, W)`, True on the lesion.
    rng: the image's generator (`isic_shortcut.image_rng`); draws, in order: the radius,
      the colour, the shade, then the centre.

  Returns:
    A `Patch` lying, with a margin, entirely on skin and in the frame when
    possible (halving the radius down to `MIN_RADIUS` first); otherwise at
    the place farthest from the lesion, with `touches_lesion` set.
  """
  height, width = lesion.shape
  side = min(height, width)
  radius = rng.uniform(*RADIUS_RANGE) * side
  colour = PATCH_COLOURS[int(rng.integers(len(PATCH_COLOURS)))]
  shade = float(rng.uniform(0.1, 0.35))
  distance = ndimage.distance_transform_edt(~lesion)
  margin = MARGIN * side
  while True:
    r = math.ceil(radius)
    inside = np.zeros_like(lesion)
    inside[r : height - r, r : width - r] = True
    valid = np.flatnonzero((inside & (distance > radius + margin)).ravel())
    if len(valid):
      y, x = divmod(int(valid[rng.integers(len(valid))]), width)
      return Patch(float(x), float(y), float(radius), colour, shade)
    if radius / 2 < MIN_RADIUS * side:
      break
    radius /= 2
  far = np.where(inside, distance, -1.0)
  y, x = divmod(int(np.argmax(far)), width)
  return Patch(float(x), float(y), float(radius), colour, shade, True)


def paste_patch(image: np.ndarray, patch: Patch) -> np.ndarray:
  """`image` uint8 `(H, W, 3)` with `patch` drawn on it (anti-aliased edge,
  darker towards the rim, a faint highlight), as uint8."""
  height, width = image.shape[:2]
  y, x = np.mgrid[0:height, 0:width].astype(np.float64)
  r = np.hypot(x - patch.x, y - patch.y) / patch.radius
  cover = np.clip((1.0 - r) * patch.radius + 0.5, 0.0, 1.0)[..., None]
  colour = np.asarray(patch.colour, np.float64)
  shading = 1.0 - patch.shade * np.clip(r, 0.0, 1.0) ** 2
  highlight = 25.0 * np.exp(
    -(
      ((x - patch.x + 0.35 * patch.radius) ** 2)
      + ((y - patch.y + 0.35 * patch.radius) ** 2)
    )
    / (2 * (0.25 * patch.radius) ** 2)
  )
  disc = np.clip(colour * shading[..., None] + highlight[..., None], 0, 255)
  out = image.astype(np.float64) * (1 - cover) + disc * cover
  return np.round(out).astype(np.uint8)
