"""TFDS builders of the project's datasets, prepared without TensorFlow.

Importing this package registers the TFDS builders, named so that they do not
clash with TFDS's own datasets:

  oxford_iiit_pet_masks  Oxford-IIIT Pet: image, trimap, breed, species.
  cats_vs_dogs_ood       Microsoft Cats-vs-Dogs: image, species (OOD test set).
  folder_dataset         your own images, masks, labels and groups (labels.csv).
  waterbirds             Waterbirds with CUB masks; groups bird type x place.

`DATASETS` maps the project's dataset names (the values of `config.data.name`
and of `experiments.prepare --dataset`) to a `DatasetEntry`; it is the one
place where a new dataset is registered. Helpers the builders share are in
`common`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import dataclasses
import types

from etils import epath
import tensorflow_datasets as tfds

from cco_jax.data.datasets import cats_vs_dogs
from cco_jax.data.datasets import common
from cco_jax.data.datasets import folder
from cco_jax.data.datasets import oxford_iiit_pet
from cco_jax.data.datasets import waterbirds
from cco_jax.data.datasets.cats_vs_dogs import CatsVsDogsOod
from cco_jax.data.datasets.common import PrepareOptions
from cco_jax.data.datasets.folder import FolderDataset
from cco_jax.data.datasets.oxford_iiit_pet import OxfordIiitPetMasks
from cco_jax.data.datasets.waterbirds import Waterbirds


@dataclasses.dataclass(frozen=True)
class DatasetEntry:
  """How the project builds and checks one dataset.

  Attributes:
    builder_cls: the TFDS builder class (takes `options=PrepareOptions`).
    check_manual_dir: raises ValueError unless a directory has the layout.
    has_masks: whether examples carry a 'segmentation_mask', a trimap in the
      Pets convention (1 = object, 2 = background, 3 = boundary): builders of
      binary masks store 1 / 2.
    splits: the TFDS splits the builder writes.
    tasks: {task (`config.data.task`): the feature holding its label}.
    needs_manual_dir: the data cannot be downloaded.
  """

  builder_cls: type[tfds.core.GeneratorBasedBuilder]
  check_manual_dir: Callable[[str], epath.Path]
  has_masks: bool
  splits: tuple[str, ...]
  tasks: Mapping[str, str]
  needs_manual_dir: bool = False


DATASETS = types.MappingProxyType(
  {
    'oxford_iiit_pet': DatasetEntry(
      builder_cls=OxfordIiitPetMasks,
      check_manual_dir=oxford_iiit_pet.check_manual_dir,
      has_masks=True,
      splits=('train', 'test'),
      tasks={'species': 'species', 'breed': 'label'},
    ),
    'cats_vs_dogs': DatasetEntry(
      builder_cls=CatsVsDogsOod,
      check_manual_dir=cats_vs_dogs.check_manual_dir,
      has_masks=False,
      splits=('train',),
      tasks={'species': 'species'},
    ),
    'folder': DatasetEntry(
      builder_cls=FolderDataset,
      check_manual_dir=folder.check_manual_dir,
      has_masks=True,
      splits=('train', 'validation', 'test'),
      tasks={'label': 'label'},
      needs_manual_dir=True,
    ),
    'waterbirds': DatasetEntry(
      builder_cls=Waterbirds,
      check_manual_dir=waterbirds.check_manual_dir,
      has_masks=True,
      splits=('train', 'validation', 'test'),
      tasks={'label': 'label'},
    ),
  }
)

__all__ = [
  'DATASETS',
  'DatasetEntry',
  'CatsVsDogsOod',
  'FolderDataset',
  'OxfordIiitPetMasks',
  'Waterbirds',
  'PrepareOptions',
  'cats_vs_dogs',
  'common',
  'folder',
  'oxford_iiit_pet',
  'waterbirds',
]
