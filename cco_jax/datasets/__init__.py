"""TFDS builders of the project's datasets, prepared without TensorFlow.

Importing this package registers two TFDS builders, named so that they do not
clash with TFDS's own `oxford_iiit_pet` and `cats_vs_dogs`:

  oxford_iiit_pet_masks  Oxford-IIIT Pet: image, trimap, breed, species.
  cats_vs_dogs_ood       Microsoft Cats-vs-Dogs: image, species (OOD test set).

`DATASETS` maps the project's dataset names (the values of `config.data.name`
and of `experiments.prepare --dataset`) to a `DatasetInfo` entry; it is the one
place where a new dataset is registered.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import types

from etils import epath
import tensorflow_datasets as tfds

from cco_jax.datasets import cats_vs_dogs
from cco_jax.datasets import oxford_iiit_pet
from cco_jax.datasets.cats_vs_dogs import CatsVsDogsOod
from cco_jax.datasets.oxford_iiit_pet import OxfordIiitPetMasks


@dataclasses.dataclass(frozen=True)
class DatasetEntry:
  """How the project builds and checks one dataset.

  Attributes:
    builder_cls: the TFDS builder class.
    check_manual_dir: raises ValueError unless a directory has the layout.
    has_masks: whether examples carry a 'segmentation_mask' trimap.
    splits: the TFDS splits the builder writes.
  """

  builder_cls: type[tfds.core.GeneratorBasedBuilder]
  check_manual_dir: Callable[[str], epath.Path]
  has_masks: bool
  splits: tuple[str, ...]


DATASETS = types.MappingProxyType(
  {
    'oxford_iiit_pet': DatasetEntry(
      builder_cls=OxfordIiitPetMasks,
      check_manual_dir=oxford_iiit_pet.check_manual_dir,
      has_masks=True,
      splits=('train', 'test'),
    ),
    'cats_vs_dogs': DatasetEntry(
      builder_cls=CatsVsDogsOod,
      check_manual_dir=cats_vs_dogs.check_manual_dir,
      has_masks=False,
      splits=('train',),
    ),
  }
)

__all__ = [
  'DATASETS',
  'DatasetEntry',
  'CatsVsDogsOod',
  'OxfordIiitPetMasks',
  'cats_vs_dogs',
  'oxford_iiit_pet',
]
