"""Cross-entropy: the `ce` objective and the CE term other objectives add.

`ce` trains the classifier alone (also the control run on the unfaithful
architecture, `experiments/configs/spurious.py:ce_control`: same objective,
other model).
"""

from __future__ import annotations

import dataclasses

import jax

from cco_jax import losses
from cco_jax.objectives import core

Array = jax.Array


@dataclasses.dataclass(frozen=True, kw_only=True)
class CrossEntropyTerm:
  """The term `ce`: softmax cross-entropy of the logits, `losses.cross_entropy`.

  Fields (`config.loss` keys): `ce_weight` its coefficient, `label_smoothing`
  in [0, 1).
  """

  ce_weight: float = 1.0
  label_smoothing: float = 0.0

  def cross_entropy(self, x: core.StepInputs) -> Array:
    """`(b,)` per-example cross-entropy."""
    return losses.cross_entropy(
      x.logits, x.labels, label_smoothing=self.label_smoothing
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class CrossEntropy(CrossEntropyTerm, core.Objective):
  """`ce`: `ce_weight * mean CE`."""

  name = 'ce'

  def per_example_losses(self, x):
    return {'ce': self.cross_entropy(x)}

  @property
  def coefficients(self):
    return {'ce': self.ce_weight}
