"""Objectives that read group ids: `group_dro`, `ce_reweighted`.

Both need `loss.group_counts`, the training examples per group, which
`train_setup.with_data_fields` fills from the data when the config leaves it
empty. Group DRO carries its group weights `q` `(G,)` in the train state.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from cco_jax import baseline_losses
from cco_jax import losses
from cco_jax.objectives import core

Array = jax.Array


@dataclasses.dataclass(frozen=True, kw_only=True)
class GroupTerm:
  """Fields: `ce_weight` the coefficient of the group-aware CE term,
  `group_counts` the training examples of each group id, `(G,)`."""

  ce_weight: float = 1.0
  group_counts: tuple[int, ...] = ()

  def __post_init__(self):
    super().__post_init__()
    object.__setattr__(
      self, 'group_counts', tuple(int(n) for n in self.group_counts)
    )
    baseline_losses.inverse_frequency_weights(self.group_counts)  # Validates.


@dataclasses.dataclass(frozen=True, kw_only=True)
class GroupDro(GroupTerm, core.Objective):
  """`group_dro`: online Group DRO (`baseline_losses.group_dro_loss`).

  The term `group_dro` is the robust mean `sum_g q'_g L_g` of the per-group
  mean CE, with `q' ~ q exp(dro_step_size L)` the weights after one
  exponentiated-gradient step; `q'` becomes the state. Metrics add
  `worst_group_loss` and `max_group_weight`.
  """

  name = 'group_dro'
  supervision = ('group',)

  dro_step_size: float = 0.01

  def __post_init__(self):
    super().__post_init__()
    if self.dro_step_size < 0:
      raise ValueError(
        f'loss.dro_step_size must be >= 0; got {self.dro_step_size}.'
      )

  def init_state(self) -> Array:
    """Uniform weights `(G,)`."""
    num_groups = len(self.group_counts)
    return jnp.full((num_groups,), 1.0 / num_groups, jnp.float32)

  def per_example_losses(self, x):
    return {'group_dro': losses.cross_entropy(x.logits, x.labels)}

  def reduce(self, per_example, x):
    value, weights, group_losses = baseline_losses.group_dro_loss(
      per_example['group_dro'],
      x.batch['group'],
      x.state,
      self.dro_step_size,
      x.axis_name,
    )
    metrics = {
      'worst_group_loss': group_losses.max(),
      'max_group_weight': weights.max(),
    }
    return {'group_dro': value}, metrics, weights

  @property
  def coefficients(self):
    return {'group_dro': self.ce_weight}


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReweightedCrossEntropy(GroupTerm, core.Objective):
  """`ce_reweighted`: CE weighted by inverse group frequency
  (`baseline_losses.reweighted_cross_entropy`)."""

  name = 'ce_reweighted'
  supervision = ('group',)

  def per_example_losses(self, x):
    weights = baseline_losses.inverse_frequency_weights(self.group_counts)
    return {
      'ce_reweighted': baseline_losses.reweighted_cross_entropy(
        x.logits, x.labels, x.batch['group'], weights
      )
    }

  @property
  def coefficients(self):
    return {'ce_reweighted': self.ce_weight}
