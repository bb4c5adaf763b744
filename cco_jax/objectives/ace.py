"""ACE and its regularisers: `ace`, `ace_kld`, `ce_kld`, `ace_swd`.

The terms (docs/method.md §3-4): `ace` the ablated cross-entropy
(`losses.ablated_cross_entropy`; on a contrastive-CutMix batch
`cutmix.cutmix_ablated_cross_entropy`), `kld` the divergence of the
contrastive maps from the mask (`losses.cam_divergence`), `swd` the
sliced-Wasserstein divergence (`baseline_losses.sliced_wasserstein`).
Contrastive CutMix (`cutmix_alpha > 0`) is an option of the objectives with
the ACE term.
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
from typing import ClassVar

import jax

from cco_jax import baseline_losses
from cco_jax import cutmix
from cco_jax import losses
from cco_jax.objectives import core
from cco_jax.objectives import cross_entropy

Array = jax.Array


@dataclasses.dataclass(frozen=True, kw_only=True)
class AceTerm:
  """The term `ace`, with contrastive CutMix as an option.

  Fields: `ace_weight` its coefficient; `cutmix_alpha` > 0 mixes each batch
  on device (`cutmix.contrastive_cutmix`, Beta(alpha, alpha) areas) and
  scores it with `cutmix.cutmix_ablated_cross_entropy`.
  """

  exclusive_options: ClassVar[Mapping[str, str]] = {'cutmix_alpha': 'ACE'}

  ace_weight: float = 1.0
  cutmix_alpha: float = 0.0

  def ablated_cross_entropy(self, x: core.StepInputs) -> Array:
    """`(b,)` per-example ACE (on the mixed batch when it is one)."""
    if 'other_label' in x.batch:  # A contrastive-CutMix batch.
      others = (x.batch[k] for k in cutmix.OTHER_KEYS)
      return cutmix.cutmix_ablated_cross_entropy(
        x.cams, x.labels, x.mask, *others
      )
    return losses.ablated_cross_entropy(x.cams, x.labels, x.mask)

  @property
  def needs_rng(self) -> bool:
    return self.cutmix_alpha > 0

  def augment(self, rng: Array | None, batch: Mapping[str, Array]) -> dict:
    """The batch with contrastive CutMix applied (when `cutmix_alpha > 0`)."""
    if self.cutmix_alpha <= 0:
      return dict(batch)
    inputs = (batch[key] for key in ('image', 'label', 'mask'))
    alpha = self.cutmix_alpha
    return {**batch, **cutmix.contrastive_cutmix(rng, *inputs, alpha=alpha)}


@dataclasses.dataclass(frozen=True, kw_only=True)
class DivergenceTerm:
  """The term `kld` (`losses.cam_divergence`).

  Fields: `kld_weight` its coefficient; `cam_scale`, `mask_scale` the
  temperatures of maps and mask; `divergence_form` 'talk' or 'paper'.
  """

  kld_weight: float = 1e-3
  cam_scale: float = 10.0
  mask_scale: float = 50.0
  divergence_form: str = 'talk'

  def divergence(self, x: core.StepInputs) -> Array:
    """`(b,)` per-example divergence."""
    return losses.cam_divergence(
      x.cams,
      x.labels,
      x.mask,
      self.cam_scale,
      self.mask_scale,
      form=self.divergence_form,
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class Ace(AceTerm, core.Objective):
  """`ace`: `ace_weight * mean ACE`."""

  name = 'ace'
  supervision = ('mask',)

  def per_example_losses(self, x):
    return {'ace': self.ablated_cross_entropy(x)}

  @property
  def coefficients(self):
    return {'ace': self.ace_weight}


@dataclasses.dataclass(frozen=True, kw_only=True)
class AceDivergence(AceTerm, DivergenceTerm, core.Objective):
  """`ace_kld`: `ace_weight * mean ACE + kld_weight * mean divergence`, the
  method's default (docs/method.md §4)."""

  name = 'ace_kld'
  supervision = ('mask',)

  def per_example_losses(self, x):
    return {'ace': self.ablated_cross_entropy(x), 'kld': self.divergence(x)}

  @property
  def coefficients(self):
    return {'ace': self.ace_weight, 'kld': self.kld_weight}


@dataclasses.dataclass(frozen=True, kw_only=True)
class CrossEntropyDivergence(
  cross_entropy.CrossEntropyTerm, DivergenceTerm, core.Objective
):
  """`ce_kld`: `ce_weight * mean CE + kld_weight * mean divergence`."""

  name = 'ce_kld'
  supervision = ('mask',)

  def per_example_losses(self, x):
    return {'ce': self.cross_entropy(x), 'kld': self.divergence(x)}

  @property
  def coefficients(self):
    return {'ce': self.ce_weight, 'kld': self.kld_weight}


@dataclasses.dataclass(frozen=True, kw_only=True)
class AceSlicedWasserstein(AceTerm, core.Objective):
  """`ace_swd`: `ace_weight * mean ACE + swd_weight * mean SWD`.

  Fields: `swd_weight`; `swd_target_scale`, `swd_spatial_scale` the SWD's
  `t` and `s`; `swd_directions` the random directions per step (0 = the
  number of classes), drawn from the step's key.
  """

  name = 'ace_swd'
  supervision = ('mask',)

  swd_weight: float = 5.0
  swd_target_scale: float = 5.0
  swd_spatial_scale: float = 10.0
  swd_directions: int = 0

  @property
  def needs_rng(self) -> bool:
    return True

  def per_example_losses(self, x):
    # ACE first: the order in which terms use the maps is the order in which
    # their gradients are summed, so it is kept fixed (bit-identical runs).
    ace = self.ablated_cross_entropy(x)
    num_classes = x.cams.shape[-1]
    directions = baseline_losses.random_directions(
      x.rng, self.swd_directions or num_classes, num_classes - 1
    )
    scales = self.swd_target_scale, self.swd_spatial_scale
    swd = baseline_losses.sliced_wasserstein(
      x.cams, x.labels, x.mask, directions, *scales
    )
    return {'ace': ace, 'swd': swd}

  @property
  def coefficients(self):
    return {'ace': self.ace_weight, 'swd': self.swd_weight}
