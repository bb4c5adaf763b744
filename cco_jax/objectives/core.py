"""The interface every training objective implements (docs/method.md §5).

An objective is a frozen dataclass whose fields are its `config.loss` keys
(with their defaults), built once per run by `cco_jax.objectives.create`. The
train step hands it a `StepInputs` and receives `(loss, metrics, state)`;
it never asks which objective it runs. An objective declares:

  name                   its `config.loss.name`.
  supervision            the batch entries it reads beyond `image` and `label`:
                         'mask' (foreground at map resolution), 'pixel_mask'
                         (at image resolution), 'group' (group ids).
  per_example_losses(x)  each term's per-example value `(b,)`, by term name.
  coefficients           each term's weight in the loss.
  needs_input_gradients  True to receive `x.input_grads`, the gradient of
                         `input_score(logits)` with respect to the images
                         (the step differentiates it again: double backward).
  needs_rng              True to receive `x.rng`, a key per step and replica.
  augment(rng, batch)    a batch augmentation on device (default: none).
  init_state()           optional state carried in the train state (Group
                         DRO's weights), updated by `reduce`.

The loss is `sum_term coefficient_term * batch_mean(term)` (`reduce` may
replace the batch mean, as Group DRO's robust mean does). Every objective
also reads `class_weights`: 'inverse_frequency' multiplies each example's
terms by its class's weight `w_c = n / (C' n_c)` (`class_counts`, the
training examples per class, filled from the data by
`train_setup.with_data_fields`), so the batch mean estimates the
class-balanced loss; 'none' (the default) leaves them unweighted. Metrics hold each
term's batch value and `loss`, plus, without gradient, the terms of the
`monitors` (the classic terms `ce`, `ace`, `kld` that a run logs whatever it
trains, `config.loss.log_all_terms`).
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from cco_jax import errors

Array = jax.Array

CLASS_WEIGHTS = ('none', 'inverse_frequency')

# How to provide each kind of supervision, for `Objective.check_batch`.
SUPERVISION_FIXES = {
  'mask': 'use data with foreground masks',
  'pixel_mask': 'set data.pixel_masks=True',
  'group': 'train on data with groups (a `group` column)',
}


@dataclasses.dataclass(frozen=True)
class StepInputs:
  """What the train step hands an objective (one device's shard).

  `logits` `(b, C)`, `cams` `(b, H, W, C)` HiResCAMs, `labels` `(b,)`, `mask`
  `(b, H, W)` the foreground at map resolution; `batch` the whole (augmented)
  batch; `input_grads` `(b, S, S, 3)` the gradient of the objective's
  `input_score` summed over the batch (objectives with
  `needs_input_gradients`); `state` the objective's state (`init_state`); a
  PRNG key (`needs_rng`); the mapped axis, or None on one device.
  """

  logits: Array
  cams: Array
  labels: Array
  mask: Array
  batch: Mapping[str, Array] = dataclasses.field(default_factory=dict)
  input_grads: Array | None = None
  state: Any = None
  rng: Array | None = None
  axis_name: str | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class Objective:
  """Base class of the objectives: see the module docstring.

  Subclasses set the class attributes `name` and `supervision`, declare their
  `config.loss` keys as dataclass fields, and implement `per_example_losses`
  and `coefficients`. `seed` (the run's `config.seed`) seeds the per-step keys
  of objectives with `needs_rng`; `monitors` are objectives whose terms are
  logged without gradient (set by `create`).
  """

  name: ClassVar[str]
  supervision: ClassVar[tuple[str, ...]] = ()
  needs_input_gradients: ClassVar[bool] = False
  # How the loss, and hence evaluation, reads the logits: 'softmax' (one
  # class per image) or 'sigmoid' (independent heads, `binary.py`).
  head: ClassVar[str] = 'softmax'
  # Options that switch a feature on when > 0, with the family they belong to;
  # `create` rejects them for objectives that lack them (e.g. CutMix for CE).
  exclusive_options: ClassVar[Mapping[str, str]] = {}

  seed: int = 0
  monitors: tuple[Objective, ...] = dataclasses.field(default=(), repr=False)
  class_weights: str = 'none'
  class_counts: tuple[int, ...] = ()

  def __post_init__(self):
    object.__setattr__(
      self, 'class_counts', tuple(int(n) for n in self.class_counts)
    )
    if self.class_weights not in CLASS_WEIGHTS:
      raise errors.UserError(
        f'config.loss.class_weights={self.class_weights!r}: choose one of '
        f'{list(CLASS_WEIGHTS)}.'
      )
    counts = np.asarray(self.class_counts)
    if self.class_weights != 'none' and (
      counts.size == 0 or (counts < 0).any() or counts.sum() == 0
    ):
      raise errors.UserError(
        f'config.loss.class_counts={list(self.class_counts)} must hold the '
        'training examples of each class (leave it empty: training fills it).'
      )

  @classmethod
  def config_keys(cls) -> tuple[str, ...]:
    """The `config.loss` keys this objective reads (its own fields and the
    shared `class_weights`, `class_counts`)."""
    base = {'seed', 'monitors'}
    return tuple(f.name for f in dataclasses.fields(cls) if f.name not in base)

  def example_weights(self, labels: Array) -> Array | None:
    """`(b,)` the class weight of each example, None when unweighted."""
    if self.class_weights == 'none':
      return None
    counts = np.asarray(self.class_counts, np.float64)
    present = counts > 0
    weights = np.where(
      present, counts.sum() / (present.sum() * np.maximum(counts, 1)), 0.0
    )
    return jnp.asarray(weights, jnp.float32)[labels]

  @classmethod
  def from_config(cls, loss: Mapping[str, Any], **kwargs) -> Objective:
    """The objective with the values of its keys in `loss` (others ignored)."""
    values = {key: loss[key] for key in cls.config_keys() if key in loss}
    return cls(**values, **kwargs)

  def per_example_losses(self, x: StepInputs) -> dict[str, Array]:
    """Each term's per-example value `(b,)`, in the order they are summed.

    The order in which the terms are computed is the order in which their
    gradients are added up: changing it changes the last bits of a run.
    """
    raise NotImplementedError(f'{type(self).__name__}.per_example_losses')

  @property
  def coefficients(self) -> Mapping[str, float]:
    """Each term's weight in the loss."""
    raise NotImplementedError(f'{type(self).__name__}.coefficients')

  @property
  def needs_rng(self) -> bool:
    return False

  def input_score(self, logits: Array) -> Array:
    """`(b, C) -> (b,)`: the score whose input gradient `x.input_grads` is."""
    raise NotImplementedError(f'{type(self).__name__} reads no input gradient.')

  def augment(self, rng: Array | None, batch: Mapping[str, Array]) -> dict:
    """The batch as the objective trains on it (default: unchanged)."""
    del rng
    return dict(batch)

  def init_state(self) -> Any:
    """The state the train state carries for this objective (None: none)."""
    return None

  def reduce(
    self, losses: Mapping[str, Array], x: StepInputs
  ) -> tuple[dict[str, Array], dict[str, Array], Any]:
    """Batch values of the terms, extra metrics and the new state.

    Default: the batch mean of each term, no metrics, the state unchanged.
    """
    return {term: value.mean() for term, value in losses.items()}, {}, x.state

  def check_batch(self, batch: Mapping[str, Array]) -> None:
    """Raises if the batch lacks the supervision this objective reads."""
    for key in self.supervision:
      if key not in batch:
        raise ValueError(
          f'Objective {self.name!r} needs batch[{key!r}], which the batch '
          f'lacks (it has {sorted(batch)}); {SUPERVISION_FIXES[key]}.'
        )

  def __call__(self, x: StepInputs) -> tuple[Array, dict[str, Array], Any]:
    """`(loss, metrics, new_state)` of one shard."""
    per_example = self.per_example_losses(x)
    weights = self.example_weights(x.labels)
    if weights is not None:
      per_example = {
        term: weights.astype(value.dtype) * value
        for term, value in per_example.items()
      }
    values, metrics, state = self.reduce(per_example, x)
    coefficients = self.coefficients
    loss = sum(coefficients[term] * value for term, value in values.items())
    metrics.update(values)
    for monitor in self.monitors:
      for term, value in monitor.per_example_losses(x).items():
        if term not in metrics:
          metrics[term] = jax.lax.stop_gradient(value.mean())
    metrics['loss'] = loss
    return loss, metrics, state
