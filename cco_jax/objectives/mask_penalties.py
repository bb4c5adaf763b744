"""CE plus a penalty on evidence outside the mask: `rrr`, `ce_bg_cam`.

The field's mask baselines (`cco_jax.baseline_losses`): right for the right
reasons (Ross et al. 2017) penalises the input gradient outside the object,
at image resolution; the background-CAM penalty the target's map outside it.
"""

from __future__ import annotations

import dataclasses

import jax

from cco_jax import baseline_losses
from cco_jax.objectives import core
from cco_jax.objectives import cross_entropy

Array = jax.Array


@dataclasses.dataclass(frozen=True, kw_only=True)
class RightForTheRightReasons(cross_entropy.CrossEntropyTerm, core.Objective):
  """`rrr`: `ce_weight * mean CE + rrr_weight * mean R`.

  `R = baseline_losses.input_gradient_penalty`, the squared gradient of
  `sum_c log p_c` outside the pixel mask; the train step computes that
  gradient in the forward pass and differentiates it again.
  """

  name = 'rrr'
  supervision = ('pixel_mask',)
  needs_input_gradients = True

  rrr_weight: float = 1.0

  def input_score(self, logits: Array) -> Array:
    return baseline_losses.log_probability_sum(logits)

  def per_example_losses(self, x):
    return {
      'ce': self.cross_entropy(x),
      'rrr': baseline_losses.input_gradient_penalty(
        x.input_grads, x.batch['pixel_mask']
      ),
    }

  @property
  def coefficients(self):
    return {'ce': self.ce_weight, 'rrr': self.rrr_weight}


@dataclasses.dataclass(frozen=True, kw_only=True)
class BackgroundCamPenalty(cross_entropy.CrossEntropyTerm, core.Objective):
  """`ce_bg_cam`: `ce_weight * mean CE + bg_cam_weight * mean P`, with
  `P = sum |(1 - m) M_y|` (`baseline_losses.background_cam_penalty`)."""

  name = 'ce_bg_cam'
  supervision = ('mask',)

  bg_cam_weight: float = 0.1

  def per_example_losses(self, x):
    return {
      'ce': self.cross_entropy(x),
      'bg_cam': baseline_losses.background_cam_penalty(
        x.cams, x.labels, x.mask
      ),
    }

  @property
  def coefficients(self):
    return {'ce': self.ce_weight, 'bg_cam': self.bg_cam_weight}
