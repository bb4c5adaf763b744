r"""Your own masked images (the 'folder' dataset, docs/data.md).

ROOT holds labels.csv (image,label,split[,group]), images/ and masks/; the
classes come from the data. Same protocol as `pets.py` (ResNet-50 @224,
ACE + divergence, Adam 1e-3, batch 80), and a `cpu` variant (the small
ResNet-18 at 64 px of `pets.py:cpu`):

  python -m experiments.prepare --dataset=folder --manual_dir=ROOT
  python -m experiments.pets --config=experiments/configs/folder.py:cpu \
      --workdir=/tmp/folder_cpu --config.data.manual_dir=ROOT

Variants: `default` (the full protocol), `cpu`, `cpu_ce` (its cross-entropy
control). Options that change the prepared data (data.missing_masks,
data.resize_masks, data.skip_bad_images, data.store_size) must match those
given to experiments.prepare (or prepare happens on first use).
"""

import ml_collections

from experiments import configs
from experiments.configs import protocols


def _folder(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  config.data.name = 'folder'
  config.data.task = 'label'  # Classes: sorted unique labels of labels.csv.
  config.eval_ood = False  # Cats-vs-Dogs is a Pets-only test.
  return config


VARIANTS = {
  'default': lambda: _folder(protocols.paper()),
  'cpu': lambda: _folder(protocols.small_cpu()),
  'cpu_ce': lambda: _folder(protocols.as_ce_control(protocols.small_cpu())),
}


def get_config(variant: str = 'default') -> ml_collections.ConfigDict:
  """Returns the locked config of a variant (see the module docstring)."""
  return configs.locked_variant(VARIANTS, variant)
