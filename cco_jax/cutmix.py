"""Contrastive CutMix: a batch augmentation whose mask carries class ids.

CutMix (Yun et al. 2019) pastes a box of one image into another and mixes the
labels by area. J. Setpal's contrastive-optimization code pairs it with ACE
through a class-id mask: each pixel says which class's object it shows (or -1
for background), so the pasted class's pixels are no longer plain background:
there the pasted class must win contrast on its own pixels. Written anew here:

- `contrastive_cutmix` mixes a device's batch on device (pure `jnp`): boxes
  are drawn on the map grid `(H, W)` and scaled by the stride to the images,
  so image and mask are mixed exactly alike. Example `i` receives a box of
  example `i - 1` (the batch rolled by one), each with its own box.
- `cutmix_ablated_cross_entropy` is ACE on the mixed batch.

Use: `loss.cutmix_alpha > 0` with an ACE objective (`ace`, `ace_kld`,
`ace_swd`); the train step draws the boxes from the step number.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cco_jax import cams as cams_lib
from cco_jax import checks

Array = jax.Array

# What `cutmix_ablated_cross_entropy` reads of a mixed batch besides the
# reference `label` and `mask`, in its argument order.
OTHER_KEYS = ('other_label', 'other_mask', 'other_weight')


def sample_boxes(
  rng: Array, batch: int, height: int, width: int, alpha: float
) -> tuple[Array, Array]:
  """Boxes on an `(height, width)` grid, as torchvision's CutMix draws them.

  `lam ~ Beta(alpha, alpha)`, a centre `(cy, cx)` uniform on the grid, half
  sides `floor(r H)`, `floor(r W)` with `r = sqrt(1 - lam) / 2`, clipped to the
  grid.

  Args:
    rng: a PRNG key.
    batch: the number of boxes.
    height, width: the grid.
    alpha: the Beta distribution's parameter, `> 0`.

  Returns:
    `in_box` `(batch, height, width)` bool and `lam` `(batch,)`.
  """
  lam_rng, y_rng, x_rng = jax.random.split(rng, 3)
  lam = jax.random.beta(lam_rng, alpha, alpha, (batch,))
  cy = jax.random.randint(y_rng, (batch,), 0, height)
  cx = jax.random.randint(x_rng, (batch,), 0, width)
  r = 0.5 * jnp.sqrt(1.0 - lam)
  half_h = jnp.floor(r * height).astype(jnp.int32)
  half_w = jnp.floor(r * width).astype(jnp.int32)
  rows = jnp.arange(height)[None, :]
  cols = jnp.arange(width)[None, :]
  in_rows = (rows >= (cy - half_h)[:, None]) & (rows < (cy + half_h)[:, None])
  in_cols = (cols >= (cx - half_w)[:, None]) & (cols < (cx + half_w)[:, None])
  return in_rows[:, :, None] & in_cols[:, None, :], lam


def contrastive_cutmix(
  rng: Array,
  images: Array,
  labels: Array,
  fg_mask: Array,
  *,
  alpha: float = 1.0,
  threshold: float = 0.5,
) -> dict[str, Array]:
  """Pastes a box of example `i - 1` into example `i`, with class-id masks.

  With `a` the fraction of map cells pasted (`1 - lam` after clipping), the
  reference class is `r = y_i` if `a <= 1/2`, else the partner's label (the
  larger area; `argmax` of the CutMix label); `o` is the other label.

  Args:
    rng: a PRNG key.
    images: `(b, S, S', 3)` images; `S, S'` multiples of the mask's `H, W`.
    labels: `(b,)` integer labels.
    fg_mask: `(b, H, W)` foreground masks at map resolution in [0, 1]; a cell
      is object when `>= threshold`.
    alpha: the Beta parameter of the pasted area.
    threshold: where a soft mask counts as object.

  Returns:
    A dict with `image` `(b, S, S', 3)` mixed; `class_mask` `(b, H, W)` int32:
    the class id of each cell's object, -1 for background; `label` `(b,)` the
    reference class `r`; `mask` `(b, H, W)` float, `class_mask == r`;
    `other_label` `(b,)` `o`; `other_mask` `(b, H, W)` float, the cells of an
    object of a class other than `r`; `other_weight` `(b,)` the CutMix label's
    weight on `o` (`min(a, 1 - a)`, 0 when `o == r`).
  """
  checks.check_rank(images, 4, 'images', '(b, S, S, 3)')
  checks.check_rank(fg_mask, 3, 'fg_mask', '(b, H, W)')
  batch, height, width = fg_mask.shape
  if (
    images.shape[0] != batch
    or images.shape[1] % height
    or images.shape[2] % width
  ):
    raise ValueError(
      f'images {tuple(images.shape)} and fg_mask {tuple(fg_mask.shape)} do '
      'not match: CutMix needs the same batch and image sides that are '
      'multiples of the mask sides (the map stride).'
    )
  in_box, _ = sample_boxes(rng, batch, height, width, alpha)
  partner = jnp.roll(jnp.arange(batch), 1)
  ids = jnp.where(fg_mask >= threshold, labels[:, None, None], -1)
  class_mask = jnp.where(in_box, ids[partner], ids).astype(jnp.int32)
  stride_h, stride_w = images.shape[1] // height, images.shape[2] // width
  pixel_box = jnp.repeat(jnp.repeat(in_box, stride_h, 1), stride_w, 2)
  mixed = jnp.where(pixel_box[..., None], images[partner], images)

  pasted = in_box.mean((1, 2))
  own_wins = pasted <= 0.5
  reference = jnp.where(own_wins, labels, labels[partner])
  other = jnp.where(own_wins, labels[partner], labels)
  area = jnp.where(own_wins, pasted, 1 - pasted)
  return {
    'image': mixed,
    'label': reference,
    'mask': (class_mask == reference[:, None, None]).astype(fg_mask.dtype),
    'class_mask': class_mask,
    'other_label': other,
    'other_mask': (
      (class_mask >= 0) & (class_mask != reference[:, None, None])
    ).astype(fg_mask.dtype),
    'other_weight': jnp.where(other != reference, area, 0.0).astype(
      fg_mask.dtype
    ),
  }


def cutmix_ablated_cross_entropy(
  cams: Array,
  labels: Array,
  fg_mask: Array,
  other_labels: Array,
  other_mask: Array,
  other_weight: Array,
) -> Array:
  """ACE on a contrastive-CutMix batch.

  With `m` the reference class's cells, `m_o` the other class's cells and
  `[c = o]` the other label's indicator, the margins are

    d_c = sum m K_c - sum (1 - m) |K_c| + [c = o] sum m_o (|K_c| - K_c),

  i.e. on the pasted object's cells the contrast against `o` enters with its
  sign: `o` winning there (`K_o < 0`) raises `d_o` instead of being penalised
  as background. The loss is the cross-entropy of logits `-d` against the
  CutMix label `t = (1 - w) onehot(y) + w onehot(o)`:

    loss = logsumexp_c(-d_c) + w d_o        (d_y = 0).

  With `w = 0` and `m_o = 0` it is `ablated_cross_entropy(cams, labels, m)`.

  Args:
    cams: `(B, H, W, C)` HiResCAMs.
    labels: `(B,)` reference classes `y`.
    fg_mask: `(B, H, W)` the reference class's cells `m`.
    other_labels: `(B,)` the other class `o`.
    other_mask: `(B, H, W)` the other class's cells `m_o`.
    other_weight: `(B,)` the label weight `w` on `o`.

  Returns:
    `(B,)` per-example losses.
  """
  checks.check_cams_and_mask(cams, fg_mask)
  checks.check_same_shape(other_mask, fg_mask, 'other_mask', 'fg_mask')
  contrastive = cams_lib.contrastive_cams(cams, labels)
  num_classes = cams.shape[-1]
  mask = fg_mask.astype(cams.dtype)[..., None]
  onehot = jax.nn.one_hot(other_labels, num_classes, dtype=cams.dtype)
  signed = other_mask.astype(cams.dtype)[..., None] * onehot[:, None, None, :]
  magnitude = jnp.abs(contrastive)
  margins = (
    (mask * contrastive).sum((1, 2))
    - ((1 - mask) * magnitude).sum((1, 2))
    + (signed * (magnitude - contrastive)).sum((1, 2))
  )
  other = jnp.take_along_axis(margins, other_labels[:, None], axis=1)[:, 0]
  return jax.nn.logsumexp(-margins, axis=-1) + other_weight * other
