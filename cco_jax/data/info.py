"""Facts about a configured dataset: split sizes, class and group names."""

from __future__ import annotations

import ml_collections
import numpy as np

from cco_jax.data.preparation import dataset_entry
from cco_jax.data.preparation import prepare_from_config
from cco_jax.data.preparation import prepare_options
from cco_jax.data.preparation import prepared_builder
from cco_jax.data.sources import NO_GROUPS
from cco_jax.data.sources import check_config
from cco_jax.data.sources import load_split_sources


def split_sizes(data_config: ml_collections.ConfigDict) -> dict[str, int]:
  """{'train': N1, 'validation': N2[, 'test': N3]} of the primary dataset."""
  splits = ['train', 'validation']
  if 'test' in prepare_from_config(data_config).info.splits:
    splits.append('test')
  return {
    split: len(source)
    for split, source in load_split_sources(data_config, splits).items()
  }


def num_examples(data_config: ml_collections.ConfigDict, split: str) -> int:
  """Number of examples of a pipeline split (before any 'drop' policy)."""
  return len(load_split_sources(data_config, [split])[split])


def _info_builder(data_config: ml_collections.ConfigDict):
  """A builder whose info is complete: prepared when names come from data."""
  check_config(data_config)
  if dataset_entry(data_config.name).needs_manual_dir:
    return prepare_from_config(data_config)
  return prepared_builder(
    data_config.name,
    data_config.manual_dir,
    data_config.tfds_data_dir,
    prepare_options(data_config),
  )


def class_names(data_config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """Names of the classes of `config.data.task`, in label order.

  ('cat', 'dog') for Pets 'species', the 37 breeds for 'breed'; for datasets
  whose classes come from the data ('folder'), the sorted class names the
  builder recorded (the data is prepared first if needed).
  """
  builder = _info_builder(data_config)
  metadata = builder.info.metadata or {}
  if 'class_names' in metadata:
    return tuple(metadata['class_names'])
  feature = dataset_entry(data_config.name).tasks[data_config.task]
  return tuple(builder.info.features[feature].names)


def num_classes(data_config: ml_collections.ConfigDict) -> int:
  """Number of classes of `config.data.task` (2 for Pets 'species')."""
  return len(class_names(data_config))


def group_names(data_config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """Names of the groups that batches' 'group' indexes; ('all',) if none.

  Reads the prepared dataset's metadata (preparing it if needed).
  """
  builder = prepare_from_config(data_config)
  names = (builder.info.metadata or {}).get('group_names')
  return tuple(names) if names else NO_GROUPS


def group_counts(
  data_config: ml_collections.ConfigDict, split: str = 'train'
) -> tuple[int, ...]:
  """Examples of each group (`group_names` order) in a pipeline split."""
  source = load_split_sources(data_config, [split])[split]
  num_groups = len(group_names(data_config))
  if source.groups is None:
    return (len(source),) + (0,) * (num_groups - 1)
  groups = np.asarray(source.groups)[np.asarray(source.indices)]
  return tuple(int(n) for n in np.bincount(groups, minlength=num_groups))
