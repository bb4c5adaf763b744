"""The data layer: datasets, preparation, transforms and input pipelines.

One job per module:
  config      the schema and defaults of `config.data` (`default_config`).
  preparation preparing datasets once (process 0 of several) and where
              prepared data lives.
  sources     opening the pipeline's splits (`OpenSplits`: each once per
              process) and the validation carve.
  device_transforms  the image work of training batches done in the train
              step (uint8 -> float32, normalisation, flips).
  info        split sizes, class names and group names of a configured dataset.
  transforms  decode, crop, squash, masks on the CAM grid.
  order       which example and which augmentation at each stream position.
  cache       the RAM cache of decoded, squashed training examples.
  pipeline    the training iterator.
  eval_pipeline  the evaluation iterator.
  datasets    the TFDS builders (no TensorFlow) and their shared helpers.
  spurious    the spurious-background benchmark built from Pets.
  spurious_groups  the same with groups (species x background), in the
              'folder' layout: train at a correlation, balanced val/test.
  isic_shortcut  ISIC images with an adhesive patch pasted outside the
              lesion, groups diagnosis x patch, in the 'folder' layout.

The names below are the public API the trainer and the experiments use.
"""

from cco_jax.data.config import IMAGENET_MEAN
from cco_jax.data.config import IMAGENET_STD
from cco_jax.data.config import default_config  # noqa: I001
from cco_jax.data.eval_pipeline import create_eval_iterator
from cco_jax.data.info import class_counts_of
from cco_jax.data.info import class_labels_of
from cco_jax.data.info import class_names
from cco_jax.data.info import class_names_of
from cco_jax.data.info import group_counts
from cco_jax.data.info import group_counts_of
from cco_jax.data.info import group_names
from cco_jax.data.info import group_names_of
from cco_jax.data.info import num_classes
from cco_jax.data.info import num_examples
from cco_jax.data.info import split_sizes
from cco_jax.data.pipeline import TrainIterator
from cco_jax.data.pipeline import create_train_iterator
from cco_jax.data.preparation import prepare_dataset
from cco_jax.data.preparation import prepare_from_config
from cco_jax.data.preparation import prepare_options
from cco_jax.data.preparation import prepared_source
from cco_jax.data.preparation import resolve_data_dir
from cco_jax.data.sources import OOD_DATASET
from cco_jax.data.sources import OpenSplits
from cco_jax.data.sources import carve_validation
from cco_jax.data.sources import check_config
from cco_jax.data.sources import load_split_sources
from cco_jax.data.transforms import decode
from cco_jax.data.transforms import to_model_input

__all__ = [
  'IMAGENET_MEAN',
  'IMAGENET_STD',
  'OOD_DATASET',
  'OpenSplits',
  'TrainIterator',
  'carve_validation',
  'check_config',
  'class_counts_of',
  'class_labels_of',
  'class_names',
  'class_names_of',
  'create_eval_iterator',
  'create_train_iterator',
  'decode',
  'default_config',
  'group_counts',
  'group_counts_of',
  'group_names',
  'group_names_of',
  'load_split_sources',
  'num_classes',
  'num_examples',
  'prepare_dataset',
  'prepare_from_config',
  'prepare_options',
  'prepared_source',
  'resolve_data_dir',
  'split_sizes',
  'to_model_input',
]
