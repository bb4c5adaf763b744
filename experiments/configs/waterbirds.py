r"""Waterbirds with CUB-200-2011 masks (docs/data.md): landbird vs waterbird.

Same protocol as `pets.py` (ResNet-50 @224 with the method's three changes,
ACE + divergence, Adam 1e-3, batch 80; docs/method.md §7), trained from
scratch; the literature's Waterbirds numbers use ImageNet-pretrained
ResNet-50s, so compare worst-group accuracy with that in mind. Groups (bird
type x place) are in every batch for per-group and worst-group accuracy.

  python -m experiments.prepare --dataset=waterbirds --manual_dir=DIR
  python -m experiments.pets --config=experiments/configs/waterbirds.py:cpu \
      --workdir=/tmp/waterbirds_cpu --config.data.manual_dir=DIR

Variants: `default`, `cpu` (the small ResNet-18 at 64 px of `pets.py:cpu`),
`default_ce` and `cpu_ce` (cross-entropy controls).
"""

import ml_collections

from experiments import configs
from experiments.configs import protocols


def _waterbirds(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  config.data.name = 'waterbirds'
  config.data.task = 'label'  # 0 = landbird, 1 = waterbird.
  config.eval_ood = False  # Cats-vs-Dogs is a Pets-only test.
  return config


VARIANTS = {
  'default': lambda: _waterbirds(protocols.paper()),
  'default_ce': lambda: _waterbirds(
    protocols.as_ce_control(protocols.accelerated(protocols.paper()))
  ),
  'cpu': lambda: _waterbirds(protocols.small_cpu()),
  'cpu_ce': lambda: _waterbirds(protocols.as_ce_control(protocols.small_cpu())),
}


def get_config(variant: str = 'default') -> ml_collections.ConfigDict:
  """Returns the locked config of a variant (see the module docstring)."""
  return configs.locked_variant(VARIANTS, variant)
