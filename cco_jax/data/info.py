"""Facts about a configured dataset: split sizes, class and group names.

The `*_of` functions read them from what is already open (a builder, a
`SplitSource`); the others open the configured dataset first. Training reads
them once, into the run record (`cco_jax.run_record`).
"""

from __future__ import annotations

import ml_collections
import numpy as np

from cco_jax.data.preparation import dataset_entry
from cco_jax.data.preparation import prepare_from_config
from cco_jax.data.preparation import prepare_options
from cco_jax.data.preparation import prepared_builder
from cco_jax.data.sources import NO_GROUPS
from cco_jax.data.sources import SplitSource
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


def class_names_of(builder, name: str, task: str) -> tuple[str, ...]:
  """Names of the classes of `task` in dataset `name` opened by `builder`, in
  label order (the names the builder recorded, else the label feature's)."""
  metadata = builder.info.metadata or {}
  if 'class_names' in metadata:
    return tuple(metadata['class_names'])
  feature = dataset_entry(name).tasks[task]
  return tuple(builder.info.features[feature].names)


def group_names_of(builder) -> tuple[str, ...]:
  """Names of the groups recorded by `builder`; ('all',) if none."""
  names = (builder.info.metadata or {}).get('group_names')
  return tuple(names) if names else NO_GROUPS


def task_labels(source: SplitSource, feature: str) -> np.ndarray:
  """int64 `(len(source),)`: every example's label `feature` (the task's,
  `DatasetEntry.tasks`).

  From the labels the source was opened with when they are that feature,
  else by reading the records (once).
  """
  if source.labels is not None and source.label_feature == feature:
    return np.asarray(source.labels)[np.asarray(source.indices)]
  return np.asarray(
    [int(source.records[int(i)][feature]) for i in source.indices], np.int64
  )


def class_labels_of(
  source: SplitSource, data_config: ml_collections.ConfigDict
) -> np.ndarray:
  """int64 `(len(source),)`: each example's class of `config.data.task`."""
  feature = dataset_entry(data_config.name).tasks[data_config.task]
  return task_labels(source, feature)


def class_counts_of(
  source: SplitSource, data_config: ml_collections.ConfigDict
) -> tuple[int, ...]:
  """Examples of each class (`class_names_of` order) in `source`."""
  names = class_names_of(source.builder, data_config.name, data_config.task)
  labels = class_labels_of(source, data_config)
  return tuple(int(n) for n in np.bincount(labels, minlength=len(names)))


def group_counts_of(source: SplitSource, num_groups: int) -> tuple[int, ...]:
  """Examples of each of `num_groups` groups in `source`."""
  if source.groups is None:
    return (len(source),) + (0,) * (num_groups - 1)
  groups = np.asarray(source.groups)[np.asarray(source.indices)]
  return tuple(int(n) for n in np.bincount(groups, minlength=num_groups))


def class_names(data_config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """Names of the classes of `config.data.task`, in label order.

  ('cat', 'dog') for Pets 'species', the 37 breeds for 'breed'; for datasets
  whose classes come from the data ('folder'), the sorted class names the
  builder recorded (the data is prepared first if needed).
  """
  return class_names_of(
    _info_builder(data_config), data_config.name, data_config.task
  )


def num_classes(data_config: ml_collections.ConfigDict) -> int:
  """Number of classes of `config.data.task` (2 for Pets 'species')."""
  return len(class_names(data_config))


def group_names(data_config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """Names of the groups that batches' 'group' indexes; ('all',) if none.

  Reads the prepared dataset's metadata (preparing it if needed).
  """
  return group_names_of(prepare_from_config(data_config))


def group_counts(
  data_config: ml_collections.ConfigDict, split: str = 'train'
) -> tuple[int, ...]:
  """Examples of each group (`group_names` order) in a pipeline split."""
  source = load_split_sources(data_config, [split])[split]
  return group_counts_of(source, len(group_names_of(source.builder)))
