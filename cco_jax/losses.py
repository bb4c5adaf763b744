"""Loss functions on logits and on per-pixel logit maps (docs/method.md §2-4).

Each loss is a small pure function in the style of `optax.losses`: arrays in,
per-example values `(B,)` out (callers reduce), keyword options, shapes in the
docstring. The training objectives built from them (weights, terms, the
config's loss name) are in `cco_jax.objectives`.

Notation: `cams` are HiResCAMs `M` `(B, H, W, C)` (see `cco_jax.cams`),
`K = M[..., y] - M[..., c]` the contrastive maps, `m` a foreground mask
`(B, H, W)` in [0, 1] at the maps' resolution (1 = object).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from cco_jax import cams as cams_lib
from cco_jax import checks

Array = jax.Array


def cross_entropy(
  logits: Array, labels: Array, label_smoothing: float = 0.0
) -> Array:
  """Softmax cross-entropy with integer labels and optional label smoothing.

  `CE = -sum_c t_c log softmax(logits)_c` with
  `t = (1 - label_smoothing) onehot(y) + label_smoothing / C`.

  Args:
    logits: `(B, C)` unnormalised scores.
    labels: `(B,)` integer targets in `[0, C)`.
    label_smoothing: in [0, 1).

  Returns:
    `(B,)` per-example losses.

  Example:
    >>> cross_entropy(jnp.zeros((1, 4)), jnp.array([2]))   # log 4
    Array([1.3862944], dtype=float32)
  """
  checks.check_logits_and_labels(logits, labels)
  if not 0.0 <= label_smoothing < 1.0:
    raise ValueError(
      f'label_smoothing must lie in [0, 1); got {label_smoothing}.'
    )
  num_classes = logits.shape[-1]
  targets = jax.nn.one_hot(labels, num_classes, dtype=logits.dtype)
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  return -(targets * jax.nn.log_softmax(logits, axis=-1)).sum(-1)


def ablated_margins(cams: Array, labels: Array, fg_mask: Array) -> Array:
  """Ablated contrast of the target against each class (docs/method.md §3).

  `d_c = sum_{h,w} m K_c - sum_{h,w} (1 - m) |K_c|`, so `d_y = 0`. Foreground
  contrast may favour either class; background contrast of either sign only
  lowers `d_c`.

  Args:
    cams: `(B, H, W, C)` HiResCAMs.
    labels: `(B,)` integer targets.
    fg_mask: `(B, H, W)` foreground mask in [0, 1].

  Returns:
    `(B, C)` margins `d`.
  """
  checks.check_cams_and_mask(cams, fg_mask)
  contrastive = cams_lib.contrastive_cams(cams, labels)
  mask = fg_mask.astype(contrastive.dtype)[..., None]
  foreground = (mask * contrastive).sum((1, 2))
  background = ((1 - mask) * jnp.abs(contrastive)).sum((1, 2))
  return foreground - background


def ablated_cross_entropy(cams: Array, labels: Array, fg_mask: Array) -> Array:
  """Ablated cross-entropy, ACE (docs/method.md §3; equation 6 of Setpal 2024).

  `ACE = log sum_c exp(-d_c)` with `d` from `ablated_margins`, i.e. the
  cross-entropy of logits `-d` at label `y`. With an all-ones mask and a
  bias-free head it equals `cross_entropy(logits, labels)`; for any mask it is
  `>=` that, with equality iff no background pixel has positive contrast.

  Args:
    cams: `(B, H, W, C)` HiResCAMs.
    labels: `(B,)` integer targets in `[0, C)`.
    fg_mask: `(B, H, W)` foreground mask in [0, 1] (soft masks allowed).

  Returns:
    `(B,)` per-example losses.
  """
  margins = ablated_margins(cams, labels, fg_mask)
  return jax.nn.logsumexp(-margins, axis=-1)


def cam_divergence(
  cams: Array,
  labels: Array,
  fg_mask: Array,
  cam_scale: float = 10.0,
  mask_scale: float = 50.0,
  *,
  form: str = 'talk',
) -> Array:
  """Pushes each contrastive map's mass onto the foreground (docs/method.md §4).

  `P[b] = softmax_{h,w}(mask_scale m[b])`,
  `Q[b,c] = softmax_{h,w}(cam_scale K[b,:,:,c])`, then per example

    form='talk':  sum_{c,h,w} m P (-log Q_c)              (the default)
    form='paper': (1/C) sum_{c,h,w} m P (log P - log Q_c)  (modified KL)

  The target class's map is identically zero (Q uniform): its term is the
  constant `sum m P log(HW)` (talk) and carries no gradient; it is kept so the
  value matches the equation as written.

  Args:
    cams: `(B, H, W, C)` HiResCAMs.
    labels: `(B,)` integer targets in `[0, C)`.
    fg_mask: `(B, H, W)` foreground mask in [0, 1].
    cam_scale: temperature multiplier of the contrastive maps.
    mask_scale: temperature multiplier of the mask.
    form: 'talk' or 'paper'.

  Returns:
    `(B,)` per-example divergences.
  """
  if form not in ('talk', 'paper'):
    raise ValueError(f"form must be 'talk' or 'paper'; got {form!r}.")
  checks.check_cams_and_mask(cams, fg_mask)
  contrastive = cams_lib.contrastive_cams(cams, labels)
  batch, height, width, num_classes = contrastive.shape
  mask = fg_mask.astype(contrastive.dtype).reshape(batch, height * width)
  log_p = jax.nn.log_softmax(mask_scale * mask, axis=1)
  flat = contrastive.reshape(batch, height * width, num_classes)
  log_q = jax.nn.log_softmax(cam_scale * flat, axis=1)
  weight = (mask * jnp.exp(log_p))[..., None]
  if form == 'talk':
    return (weight * -log_q).sum((1, 2))
  return (weight * (log_p[..., None] - log_q)).sum((1, 2)) / num_classes


def binary_cross_entropy(logits: Array, targets: Array) -> Array:
  """Sigmoid binary cross-entropy of independent heads, averaged over them.

  `loss = (1/C) sum_c -t_c log sig(s_c) - (1 - t_c) log(1 - sig(s_c))`,
  each logit read as its own sigmoid (multi-label heads).

  Args:
    logits: `(B, C)` unnormalised scores.
    targets: `(B, C)` binary (or soft) targets in [0, 1].

  Returns:
    `(B,)` per-example losses.

  Example:
    >>> binary_cross_entropy(jnp.zeros((1, 2)), jnp.array([[1.0, 0.0]]))
    Array([0.6931472], dtype=float32)
  """
  checks.check_rank(logits, 2, 'logits', '(B, C)')
  checks.check_same_shape(targets, logits, 'targets', 'logits')
  targets = targets.astype(logits.dtype)
  # -log sig(x) = softplus(-x); -log(1 - sig(x)) = softplus(x).
  per_class = targets * jax.nn.softplus(-logits) + (
    1 - targets
  ) * jax.nn.softplus(logits)
  return per_class.mean(-1)


def ablated_binary_cross_entropy(
  cams: Array, targets: Array, fg_masks: Array
) -> Array:
  """Ablated binary cross-entropy for multi-label sigmoid heads (docs/method.md §4).

  Per class: `z_ab = sum m M - sum |(1 - m) M|`, `z = sum M`, and
  `loss_c = -t log sig(z_ab) - (1 - t) log(1 - sig(z))`: a positive class must
  be supported by its object, a negative one is judged on its whole map.

  Args:
    cams: `(B, H, W, C)` HiResCAMs.
    targets: `(B, C)` binary (or soft) targets in [0, 1].
    fg_masks: `(B, H, W, C)` per-class foreground masks in [0, 1].

  Returns:
    `(B,)` per-example losses, averaged over classes.
  """
  checks.check_rank(cams, 4, 'cams', '(B, H, W, C)')
  checks.check_same_shape(fg_masks, cams, 'fg_masks', 'cams')
  checks.check_rank(targets, 2, 'targets', '(B, C)')
  if tuple(targets.shape) != (cams.shape[0], cams.shape[-1]):
    raise ValueError(
      f'targets has shape {tuple(targets.shape)}; expected (B, C) = '
      f'{(cams.shape[0], cams.shape[-1])} to match cams {tuple(cams.shape)}.'
    )
  masks = fg_masks.astype(cams.dtype)
  ablated = (masks * cams).sum((1, 2)) - ((1 - masks) * jnp.abs(cams)).sum(
    (1, 2)
  )
  total = cams.sum((1, 2))
  targets = targets.astype(cams.dtype)
  # -log sig(x) = softplus(-x); -log(1 - sig(x)) = softplus(x).
  per_class = targets * jax.nn.softplus(-ablated) + (
    1 - targets
  ) * jax.nn.softplus(total)
  return per_class.mean(-1)
