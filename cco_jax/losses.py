"""Loss functions on logits and on per-pixel logit maps (METHOD.md §2-4).

Each loss is a small pure function in the style of `optax.losses`: arrays in,
per-example values `(B,)` out (callers reduce), keyword options, shapes in the
docstring. `make_objective` turns a config's loss name and weights into the one
function the train step calls.

Notation: `cams` are HiResCAMs `M` `(B, H, W, C)` (see `cco_jax.cams`),
`K = M[..., y] - M[..., c]` the contrastive maps, `m` a foreground mask
`(B, H, W)` in [0, 1] at the maps' resolution (1 = object).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import dataclasses

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
  """Ablated contrast of the target against each class (METHOD.md §3).

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
  """Ablated cross-entropy, ACE (the seed's equation 6).

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
  """Pushes each contrastive map's mass onto the foreground (METHOD.md §4).

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


def ablated_binary_cross_entropy(
  cams: Array, targets: Array, fg_masks: Array
) -> Array:
  """Ablated binary cross-entropy for multi-label sigmoid heads (METHOD.md §4).

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


# --------------------------------------------------------------------------
# Objectives: one registry from a config's loss name to a training loss.
# --------------------------------------------------------------------------

Objective = Callable[
  [Array, Array, Array, Array], tuple[Array, Mapping[str, Array]]
]


@dataclasses.dataclass(frozen=True)
class LossWeights:
  """Weights and temperatures of the objective's terms (all from the config)."""

  ce_weight: float = 1.0
  ace_weight: float = 1.0
  kld_weight: float = 1e-3
  cam_scale: float = 10.0
  mask_scale: float = 50.0
  divergence_form: str = 'talk'
  label_smoothing: float = 0.0


# Which terms each named objective uses; weights come from the config.
OBJECTIVES: Mapping[str, tuple[str, ...]] = {
  'ce': ('ce',),
  'ace': ('ace',),
  'ace_kld': ('ace', 'kld'),
  'ce_kld': ('ce', 'kld'),
}


def _terms(weights: LossWeights) -> Mapping[str, Callable[..., Array]]:
  return {
    'ce': lambda logits, cams, labels, mask: cross_entropy(
      logits, labels, label_smoothing=weights.label_smoothing
    ),
    'ace': lambda logits, cams, labels, mask: ablated_cross_entropy(
      cams, labels, mask
    ),
    'kld': lambda logits, cams, labels, mask: cam_divergence(
      cams,
      labels,
      mask,
      weights.cam_scale,
      weights.mask_scale,
      form=weights.divergence_form,
    ),
  }


def make_objective(
  name: str, weights: LossWeights | None = None, *, log_all_terms: bool = True
) -> Objective:
  """Builds `objective(logits, cams, labels, fg_mask) -> (loss, metrics)`.

  The loss is `sum_term weight_term * mean_batch(term)` over the objective's
  terms. Metrics hold the batch mean of every term (`ce`, `ace`, `kld`) when
  `log_all_terms`, else of the terms in use (always `ce`), plus `loss`.

  Args:
    name: one of `OBJECTIVES` ('ce', 'ace', 'ace_kld', 'ce_kld').
    weights: `LossWeights`; the defaults are the talk's setting (1, 1e-3, 10, 50).
    log_all_terms: also compute unused terms (without gradient) for logging.

  Returns:
    The objective function; inputs `(B, C)`, `(B, H, W, C)`, `(B,)`, `(B, H, W)`.
  """
  if name not in OBJECTIVES:
    raise ValueError(
      f'Unknown loss {name!r}; choose one of {sorted(OBJECTIVES)}.'
    )
  weights = weights or LossWeights()
  terms = _terms(weights)
  used = OBJECTIVES[name]
  coefficient = {term: getattr(weights, f'{term}_weight') for term in used}
  logged = (
    tuple(terms) if log_all_terms else tuple(dict.fromkeys(('ce',) + used))
  )

  def objective(logits, cams, labels, fg_mask):
    values = {
      term: terms[term](logits, cams, labels, fg_mask).mean() for term in used
    }
    loss = sum(coefficient[term] * values[term] for term in used)
    metrics = {
      term: values[term]
      if term in values
      else jax.lax.stop_gradient(
        terms[term](logits, cams, labels, fg_mask).mean()
      )
      for term in logged
    }
    metrics['loss'] = loss
    return loss, metrics

  return objective
