"""Loss functions on logits and on per-pixel logit maps (docs/method.md §2-4).

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
from typing import Any

import jax
import jax.numpy as jnp
import optax

from cco_jax import baseline_losses
from cco_jax import cams as cams_lib
from cco_jax import checks
from cco_jax import cutmix

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


# --------------------------------------------------------------------------
# Objectives: one registry from a config's loss name to a training loss.
# --------------------------------------------------------------------------

Objective = Callable[
  [Array, Array, Array, Array], tuple[Array, Mapping[str, Array]]
]


@dataclasses.dataclass(frozen=True)
class LossWeights:
  """Weights, temperatures and options of the objectives (all from the config;
  experiments/configs/pets.py explains each)."""

  ce_weight: float = 1.0
  ace_weight: float = 1.0
  kld_weight: float = 1e-3
  cam_scale: float = 10.0
  mask_scale: float = 50.0
  divergence_form: str = 'talk'
  label_smoothing: float = 0.0
  rrr_weight: float = 1.0
  bg_cam_weight: float = 0.1
  swd_weight: float = 5.0
  swd_target_scale: float = 5.0
  swd_spatial_scale: float = 10.0
  swd_directions: int = 0
  dro_step_size: float = 0.01
  group_counts: tuple[int, ...] = ()
  cutmix_alpha: float = 0.0

  @classmethod
  def from_config(cls, loss: Mapping[str, Any]) -> LossWeights:
    """The fields of a config's `loss` section that are `LossWeights` fields."""
    names = {field.name for field in dataclasses.fields(cls)}
    values = {k: v for k, v in loss.items() if k in names}
    if 'group_counts' in values:
      values['group_counts'] = tuple(int(n) for n in values['group_counts'])
    return cls(**values)


# Which terms each named objective uses; weights come from the config.
OBJECTIVES: Mapping[str, tuple[str, ...]] = {
  'ce': ('ce',),
  'ace': ('ace',),
  'ace_kld': ('ace', 'kld'),
  'ce_kld': ('ce', 'kld'),
  'rrr': ('ce', 'rrr'),
  'ce_bg_cam': ('ce', 'bg_cam'),
  'group_dro': ('group_dro',),
  'ce_reweighted': ('ce_reweighted',),
  'ace_swd': ('ace', 'swd'),
}

# The batch entries (beyond image and label) each term reads: `mask` the
# foreground at map resolution, `pixel_mask` at image resolution, `group` ids.
TERM_SUPERVISION: Mapping[str, tuple[str, ...]] = {
  'ce': (),
  'ace': ('mask',),
  'kld': ('mask',),
  'rrr': ('pixel_mask',),
  'bg_cam': ('mask',),
  'group_dro': ('group',),
  'ce_reweighted': ('group',),
  'swd': ('mask',),
}

_COEFFICIENT = {'group_dro': 'ce_weight', 'ce_reweighted': 'ce_weight'}
_CLASSIC_TERMS = ('ce', 'ace', 'kld')
_CUTMIX_TERMS = frozenset({'ace', 'kld', 'swd'})


def supervision(name: str) -> tuple[str, ...]:
  """The supervision objective `name` uses: () = neither masks nor groups."""
  _check_name(name)
  keys = (k for t in OBJECTIVES[name] for k in TERM_SUPERVISION[t])
  return tuple(dict.fromkeys(keys))


@dataclasses.dataclass(frozen=True)
class StepInputs:
  """What the train step hands a `StepObjective` (one device's shard).

  `logits` `(b, C)`, `cams` `(b, H, W, C)`, `labels` `(b,)`, `mask`
  `(b, H, W)`; `batch` the whole (augmented) batch; `input_grads` `(b, S, S, 3)`
  the gradient of the objective's `input_score` summed over the batch; the
  Group DRO weights `(G,)`; a PRNG key; the mapped axis.
  """

  logits: Array
  cams: Array
  labels: Array
  mask: Array
  batch: Mapping[str, Array] = dataclasses.field(default_factory=dict)
  input_grads: Array | None = None
  group_weights: Array | None = None
  rng: Array | None = None
  axis_name: str | None = None


def _terms(weights: LossWeights) -> Mapping[str, Callable[..., Array]]:
  """Per-example `(b,)` value of each term, from `StepInputs`."""

  def ace(x):
    if 'other_label' in x.batch:  # A contrastive-CutMix batch.
      others = (x.batch[k] for k in cutmix.OTHER_KEYS)
      return cutmix.cutmix_ablated_cross_entropy(
        x.cams, x.labels, x.mask, *others
      )
    return ablated_cross_entropy(x.cams, x.labels, x.mask)

  def swd(x):
    num_classes = x.cams.shape[-1]
    directions = baseline_losses.random_directions(
      x.rng, weights.swd_directions or num_classes, num_classes - 1
    )
    scales = weights.swd_target_scale, weights.swd_spatial_scale
    return baseline_losses.sliced_wasserstein(
      x.cams, x.labels, x.mask, directions, *scales
    )

  def group_weights():
    return baseline_losses.inverse_frequency_weights(weights.group_counts)

  return {
    'ce': lambda x: cross_entropy(
      x.logits, x.labels, label_smoothing=weights.label_smoothing
    ),
    'ace': ace,
    'kld': lambda x: cam_divergence(
      x.cams,
      x.labels,
      x.mask,
      weights.cam_scale,
      weights.mask_scale,
      form=weights.divergence_form,
    ),
    'rrr': lambda x: baseline_losses.input_gradient_penalty(
      x.input_grads, x.batch['pixel_mask']
    ),
    'bg_cam': lambda x: baseline_losses.background_cam_penalty(
      x.cams, x.labels, x.mask
    ),
    'group_dro': lambda x: cross_entropy(x.logits, x.labels),
    'ce_reweighted': lambda x: baseline_losses.reweighted_cross_entropy(
      x.logits, x.labels, x.batch['group'], group_weights()
    ),
    'swd': swd,
  }


@dataclasses.dataclass(frozen=True)
class StepObjective:
  """An objective that needs more of the train step than the model's outputs.

  Calling it on `StepInputs` returns `(loss, metrics, group_weights)`: the
  new Group DRO weights, or None. The train step reads its attributes:
  `input_score` (`(b, C) -> (b,)`: the step then differentiates it with respect
  to the images inside the loss, a double backward), `needs_rng`, `augment`
  (applied to the batch on device before the forward pass), `num_groups`
  (weights carried in the train state) and `check_batch`.
  """

  name: str
  weights: LossWeights
  log_all_terms: bool = True
  seed: int = 0

  @property
  def used(self) -> tuple[str, ...]:
    return OBJECTIVES[self.name]

  @property
  def input_score(self) -> Callable[[Array], Array] | None:
    return baseline_losses.log_probability_sum if 'rrr' in self.used else None

  @property
  def needs_rng(self) -> bool:
    return 'swd' in self.used or self.weights.cutmix_alpha > 0

  @property
  def num_groups(self) -> int:
    return len(self.weights.group_counts) if 'group_dro' in self.used else 0

  def augment(self, rng: Array, batch: Mapping[str, Array]) -> dict:
    """The batch with contrastive CutMix applied (when `cutmix_alpha > 0`)."""
    if self.weights.cutmix_alpha <= 0:
      return dict(batch)
    inputs = (batch[key] for key in ('image', 'label', 'mask'))
    alpha = self.weights.cutmix_alpha
    return {**batch, **cutmix.contrastive_cutmix(rng, *inputs, alpha=alpha)}

  def check_batch(self, batch: Mapping[str, Array]) -> None:
    """Raises if the batch lacks the supervision this objective needs."""
    fixes = {
      'pixel_mask': 'set data.pixel_masks=True',
      'group': 'train on data with groups (a `group` column)',
    }
    for key in supervision(self.name):
      if key not in batch:
        raise ValueError(
          f'Objective {self.name!r} needs batch[{key!r}], which the batch '
          f'lacks (it has {sorted(batch)}); {fixes.get(key, "")}.'
        )

  def __call__(self, x: StepInputs) -> tuple[Array, dict, Array | None]:
    terms, used = _terms(self.weights), self.used
    values, metrics, group_weights = {}, {}, None
    for term in used:
      if term == 'group_dro':
        eta, groups = self.weights.dro_step_size, x.batch['group']
        values[term], group_weights, group_losses = (
          baseline_losses.group_dro_loss(
            terms[term](x), groups, x.group_weights, eta, x.axis_name
          )
        )
        metrics['worst_group_loss'] = group_losses.max()
        metrics['max_group_weight'] = group_weights.max()
      else:
        values[term] = terms[term](x).mean()
    loss = sum(_coefficient(self.weights, t) * values[t] for t in used)
    logged = tuple(
      dict.fromkeys((_CLASSIC_TERMS if self.log_all_terms else ('ce',)) + used)
    )
    for term in logged:
      metrics[term] = (
        values[term]
        if term in values
        else jax.lax.stop_gradient(terms[term](x).mean())
      )
    metrics['loss'] = loss
    return loss, metrics, group_weights


def _coefficient(weights: LossWeights, term: str) -> float:
  return getattr(weights, _COEFFICIENT.get(term, f'{term}_weight'))


def _check_name(name: str) -> None:
  if name not in OBJECTIVES:
    raise ValueError(
      f'Unknown loss {name!r}; choose one of {sorted(OBJECTIVES)}.'
    )


def _check_weights(name: str, weights: LossWeights) -> None:
  used = OBJECTIVES[name]
  if weights.cutmix_alpha > 0 and not (
    'ace' in used and set(used) <= _CUTMIX_TERMS
  ):
    raise ValueError(
      f'loss.cutmix_alpha={weights.cutmix_alpha} is an option of the ACE '
      f'objectives (ace, ace_kld, ace_swd); loss.name is {name!r}. Set '
      'loss.cutmix_alpha=0.'
    )
  if set(used) & {'group_dro', 'ce_reweighted'}:
    baseline_losses.inverse_frequency_weights(weights.group_counts)
  if 'group_dro' in used and weights.dro_step_size < 0:
    raise ValueError(
      f'loss.dro_step_size must be >= 0; got {weights.dro_step_size}.'
    )


def make_objective(
  name: str,
  weights: LossWeights | None = None,
  *,
  log_all_terms: bool = True,
  seed: int = 0,
) -> Objective | StepObjective:
  """The training loss of `name`: a plain `Objective` or a `StepObjective`.

  The loss is `sum_term weight_term * mean_batch(term)` over the objective's
  terms (`OBJECTIVES`; Group DRO's term is its robust mean). Metrics hold the
  batch mean of every classic term (`ce`, `ace`, `kld`) when `log_all_terms`,
  else of `ce`, plus the terms in use and `loss`.

  'ce', 'ace', 'ace_kld' and 'ce_kld' without CutMix need only the model's
  outputs: they come as `objective(logits, cams, labels, fg_mask) -> (loss,
  metrics)` with inputs `(B, C)`, `(B, H, W, C)`, `(B,)`, `(B, H, W)`. The
  others are `StepObjective`s (input gradients, group weights, a PRNG key or
  augmentation); `supervision(name)` says which batch entries each reads.

  Args:
    name: one of `OBJECTIVES`.
    weights: `LossWeights`; the defaults: the talk setting, docs/method.md §4.
    log_all_terms: also compute unused classic terms (no gradient) for logging.
    seed: seeds the per-step keys of SWD directions and CutMix boxes.

  Returns:
    The objective.
  """
  _check_name(name)
  weights = weights or LossWeights()
  _check_weights(name, weights)
  step_objective = StepObjective(name, weights, log_all_terms, seed)
  if set(OBJECTIVES[name]) - set(_CLASSIC_TERMS) or weights.cutmix_alpha > 0:
    return step_objective

  def objective(logits, cams, labels, fg_mask):
    loss, metrics, _ = step_objective(StepInputs(logits, cams, labels, fg_mask))
    return loss, metrics

  return objective
