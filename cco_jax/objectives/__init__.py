"""Training objectives as plug-ins: one interface, one registry.

`core.Objective` is the interface the train step calls, `registry` the one
place that lists them; each family lives in its own module:

  cross_entropy   ce
  ace             ace, ace_kld, ce_kld, ace_swd (contrastive CutMix option)
  mask_penalties  rrr, ce_bg_cam
  groups          group_dro, ce_reweighted
  energy          energy (Rao, Böhle et al. 2023)
  binary          bce, ace_bce (multi-label sigmoid heads)

The pure loss functions they wrap stay in `cco_jax.losses`,
`cco_jax.baseline_losses` and `cco_jax.cutmix`. To add an objective: one new
module here and one line in `registry.OBJECTIVES` (docs/architecture.md).
"""

from cco_jax.objectives.core import Objective
from cco_jax.objectives.core import StepInputs
from cco_jax.objectives.registry import REGISTRY
from cco_jax.objectives.registry import create
from cco_jax.objectives.registry import default_config
from cco_jax.objectives.registry import get
from cco_jax.objectives.registry import head
from cco_jax.objectives.registry import names
from cco_jax.objectives.registry import supervision

__all__ = [
  'Objective',
  'REGISTRY',
  'StepInputs',
  'create',
  'default_config',
  'get',
  'head',
  'names',
  'supervision',
]
