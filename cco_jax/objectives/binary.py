"""Multi-label sigmoid heads: `bce` (control) and `ace_bce` (ablated).

The model is unchanged (maps and logits, the logit-sum identity exact); these
objectives read each of its C logits as an independent sigmoid (`head =
'sigmoid'`, which evaluation reads too: `evaluation/auc.py`). The targets
`(b, C)` are the batch's `targets` (the folder dataset's `labels` column,
docs/data.md) or, on single-label data, `one_hot(label)`: class c vs rest.

  bce      `losses.binary_cross_entropy(logits, targets)`;
  ace_bce  `losses.ablated_binary_cross_entropy` (docs/method.md §4), per
           class `t softplus(-z_ab) + (1 - t) softplus(z)` with
           `z_ab = sum m M_c - sum |(1 - m) M_c|`, `z = sum M_c`, the image's
           object mask `m` shared by every class.

Bias: like ACE, `ace_bce` reads the maps only. The faithful model has no
head bias, so `z` is the logit and, with an all-ones mask, `ace_bce == bce`;
a biased head (the control architecture) keeps its bias out of the maps,
untrained (its gradient under this loss is zero).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from cco_jax import losses
from cco_jax.objectives import core

Array = jax.Array


def targets_of(x: core.StepInputs) -> Array:
  """`(b, C)` float targets: `batch['targets']`, else `one_hot(labels)`."""
  num_classes = x.logits.shape[-1]
  if 'targets' in x.batch:
    return jnp.asarray(x.batch['targets'], x.logits.dtype)
  return jax.nn.one_hot(x.labels, num_classes, dtype=x.logits.dtype)


@dataclasses.dataclass(frozen=True, kw_only=True)
class BinaryCrossEntropy(core.Objective):
  """`bce`: `bce_weight * mean BCE` of the logits as independent sigmoids."""

  name = 'bce'
  head = 'sigmoid'

  bce_weight: float = 1.0

  def per_example_losses(self, x):
    return {'bce': losses.binary_cross_entropy(x.logits, targets_of(x))}

  @property
  def coefficients(self):
    return {'bce': self.bce_weight}


@dataclasses.dataclass(frozen=True, kw_only=True)
class AblatedBinaryCrossEntropy(core.Objective):
  """`ace_bce`: `bce_weight * mean ablated BCE` (module docstring)."""

  name = 'ace_bce'
  head = 'sigmoid'
  supervision = ('mask',)

  bce_weight: float = 1.0

  def per_example_losses(self, x):
    masks = jnp.broadcast_to(x.mask[..., None], x.cams.shape)
    return {
      'ace_bce': losses.ablated_binary_cross_entropy(
        x.cams, targets_of(x), masks
      )
    }

  @property
  def coefficients(self):
    return {'ace_bce': self.bce_weight}
