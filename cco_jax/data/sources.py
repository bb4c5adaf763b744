"""The pipeline's splits of a prepared dataset (`preparation` prepares it).

Splits seen by the pipeline:
  'train', 'validation'  a deterministic carve of the dataset's 'train' split
                         (`carve_validation`), independent of the training
                         seed; a dataset whose builder writes a 'validation'
                         split (folder, Waterbirds) uses it instead;
  'test'                 the dataset's test split;
  'ood'                  Microsoft Cats-vs-Dogs (species task only).

Each example read from a `SplitSource` carries 'group': an int index into the
dataset's `group_names` (metadata recorded by the builder); datasets without
groups give every example group 0 (one group, named 'all'). Multi-label data
(the folder dataset's `labels` column) also gives 'targets', uint8 `(C,)`
multi-hot, from the lists the builder recorded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses
import hashlib
import math
from typing import Any

import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from cco_jax import errors
from cco_jax.data import config as config_lib
from cco_jax.data.datasets import DatasetEntry
from cco_jax.data.datasets import PrepareOptions
from cco_jax.data.preparation import dataset_entry
from cco_jax.data.preparation import prepare_dataset
from cco_jax.data.preparation import prepare_from_config

Example = dict[str, Any]
OOD_DATASET = 'cats_vs_dogs'
SPLITS = ('train', 'validation', 'test', 'ood')
# Changing the salt changes every validation carve: keep it fixed.
VALIDATION_SALT = 'cco-jax/validation/v1'
NO_GROUPS = ('all',)
_SKIP_DECODING = tfds.decode.SkipDecoding


def check_config(data_config: ml_collections.ConfigDict) -> None:
  """Raises ValueError on a field value the pipeline does not support."""
  entry = dataset_entry(data_config.name)
  config_lib.check_config(data_config, tuple(entry.tasks))


def carve_validation(
  file_names: Sequence[str], labels: Sequence[int], fraction: float
) -> tuple[np.ndarray, np.ndarray]:
  """Splits trainval into train and validation, deterministically.

  Within each label, examples are ordered by SHA-256 of `VALIDATION_SALT` and
  the file name, and the first `round(fraction * count)` go to validation. The
  carve depends only on the file names, labels and `fraction`: not on record
  order, TFDS version or the training seed.

  Args:
    file_names: (N,) names, unique.
    labels: (N,) ints to stratify by (the breed for Pets).
    fraction: share held out, in [0, 1).

  Returns:
    (train_indices, validation_indices): sorted int64 arrays into the inputs.
  """

  def key(i: int) -> str:
    return hashlib.sha256(
      f'{VALIDATION_SALT}/{file_names[i]}'.encode()
    ).hexdigest()

  validation = []
  labels = np.asarray(labels)
  for label in np.unique(labels):
    members = sorted(np.flatnonzero(labels == label), key=key)
    validation.extend(members[: math.floor(fraction * len(members) + 0.5)])
  is_validation = np.zeros(len(labels), bool)
  is_validation[np.asarray(validation, np.int64)] = True
  return np.flatnonzero(~is_validation), np.flatnonzero(is_validation)


@dataclasses.dataclass(frozen=True)
class SplitSource:
  """Random access to the records of one pipeline split.

  Attributes:
    name: the pipeline split ('train', 'validation', 'test', 'ood').
    records: TFDS data source of the underlying TFDS split; image and mask
      fields are left as encoded bytes.
    indices: (N,) int64 record ids that make up this split.
    has_masks: whether records carry a 'segmentation_mask'.
    positions: (N,) int64 position of each example in the full pipeline split
      (returned as 'index'); None = 0..N-1.
    groups: int64 group of every record (indexed by record id, not by
      position); None = group 0 for all.
    labels: int64 value of `label_feature` of every record (indexed by record
      id), from the builder's metadata or one read of the split; None when
      unknown.
    label_feature: the record field `labels` holds ('label', 'species').
    builder: the TFDS builder the split was opened from (its `info` holds the
      dataset's name, version, classes and groups).
    targets: uint8 `(num records, C)` multi-hot targets (indexed by record
      id), or None for single-label data.
  """

  name: str
  records: Sequence[Mapping[str, Any]]
  indices: np.ndarray
  has_masks: bool
  positions: np.ndarray | None = None
  groups: np.ndarray | None = None
  labels: np.ndarray | None = None
  label_feature: str = ''
  builder: Any = None
  targets: np.ndarray | None = None

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, i: int) -> Example:
    record_id = int(self.indices[i])
    record = dict(self.records[record_id])
    record['index'] = int(i if self.positions is None else self.positions[i])
    record['group'] = 0 if self.groups is None else int(self.groups[record_id])
    if self.targets is not None:
      record['targets'] = self.targets[record_id]
    return record

  def subset(self, which: np.ndarray) -> SplitSource:
    """The examples at `which` (positions in this source), keeping 'index'."""
    positions = (
      np.arange(len(self)) if self.positions is None else self.positions
    )
    return dataclasses.replace(
      self, indices=self.indices[which], positions=positions[which]
    )


def as_str(value: str | bytes) -> str:
  return value.decode() if isinstance(value, bytes) else value


def _data_source(
  builder: tfds.core.DatasetBuilder, split: str, has_masks: bool
):
  # Encoded images stay bytes (decoded by `transforms`); raw ones are arrays.
  keys = ('image', 'segmentation_mask') if has_masks else ('image',)
  decoders = {
    key: _SKIP_DECODING()
    for key in keys
    if isinstance(builder.info.features[key], tfds.features.Image)
  }
  return builder.as_data_source(split, decoders=decoders)


def _stratify_feature(builder: tfds.core.DatasetBuilder) -> str:
  """The record field the validation carve stratifies by."""
  return 'label' if 'label' in builder.info.features else 'species'


def _split_lists(
  builder: tfds.core.DatasetBuilder,
  records: Sequence[Mapping[str, Any]],
  split: str,
) -> tuple[list[str], list[int], np.ndarray | None]:
  """File names, stratification labels (`_stratify_feature`) and groups of
  a TFDS split.

  Uses the lists the builder stores in its metadata when they match the
  records (checked at a few places); otherwise reads every record (groups are
  then None).
  """
  try:
    listed = builder.info.metadata['splits'][split]
  except (KeyError, TypeError):
    listed = None
  if listed is not None and len(listed['file_names']) == len(records):
    probes = sorted({0, len(records) // 2, len(records) - 1})
    if all(
      as_str(records[i]['file_name']) == listed['file_names'][i] for i in probes
    ):
      groups = listed.get('groups')
      return (
        listed['file_names'],
        listed['labels'],
        None if groups is None else np.asarray(groups, np.int64),
      )
  stratify = _stratify_feature(builder)
  names, labels = [], []
  for i in range(len(records)):
    record = records[i]
    names.append(as_str(record['file_name']))
    labels.append(int(record[stratify]))
  return names, labels, None


def _targets(
  builder: tfds.core.DatasetBuilder, split: str, num_records: int
) -> np.ndarray | None:
  """uint8 `(num_records, C)` multi-hot targets the builder recorded for a
  TFDS split, or None (single-label data)."""
  try:
    listed = builder.info.metadata['splits'][split]['targets']
    num_classes = len(builder.info.metadata['class_names'])
  except (KeyError, TypeError):
    return None
  if len(listed) != num_records:
    return None
  targets = np.zeros((num_records, num_classes), np.uint8)
  for row, classes in enumerate(listed):
    targets[row, list(classes)] = 1
  return targets


def _whole_split(
  builder: tfds.core.DatasetBuilder, split: str, entry: DatasetEntry
) -> SplitSource:
  records = _data_source(builder, split, entry.has_masks)
  _, labels, groups = _split_lists(builder, records, split)
  return SplitSource(
    split,
    records,
    np.arange(len(records)),
    entry.has_masks,
    groups=groups,
    labels=np.asarray(labels, np.int64),
    label_feature=_stratify_feature(builder),
    builder=builder,
    targets=_targets(builder, split, len(records)),
  )


def _carved_trainval(
  data_config: ml_collections.ConfigDict,
  builder: tfds.core.DatasetBuilder,
  entry: DatasetEntry,
) -> dict[str, SplitSource]:
  records = _data_source(builder, 'train', entry.has_masks)
  names, labels, groups = _split_lists(builder, records, 'train')
  train, validation = carve_validation(
    names, labels, data_config.validation_fraction
  )
  targets = _targets(builder, 'train', len(records))
  return {
    split: SplitSource(
      split,
      records,
      indices,
      entry.has_masks,
      groups=groups,
      labels=np.asarray(labels, np.int64),
      label_feature=_stratify_feature(builder),
      builder=builder,
      targets=targets,
    )
    for split, indices in (('train', train), ('validation', validation))
  }


def load_split_sources(
  data_config: ml_collections.ConfigDict,
  splits: Sequence[str] = ('train', 'validation', 'test'),
  *,
  builder: tfds.core.DatasetBuilder | None = None,
) -> dict[str, SplitSource]:
  """Opens pipeline splits, preparing the data first if needed.

  Args:
    data_config: `config.data` (`cco_jax.data.config`).
    splits: any of 'train', 'validation', 'test', 'ood'.
    builder: the primary dataset's prepared builder, when already at hand
      (`prepare_from_config`).

  Returns:
    {split: SplitSource}.

  Raises:
    ValueError: an unknown split, a split the dataset lacks, or a bad config.
  """
  check_config(data_config)
  unknown = set(splits) - set(SPLITS)
  if unknown:
    raise errors.UserError(
      f'Unknown splits {sorted(unknown)}; expected {SPLITS}.'
    )
  entry = dataset_entry(data_config.name)
  sources = {}
  if {'train', 'validation', 'test'} & set(splits):
    builder = builder or prepare_from_config(data_config)
    if {'train', 'validation'} & set(splits):
      if 'validation' in builder.info.splits:
        for split in ('train', 'validation'):
          sources[split] = _whole_split(builder, split, entry)
      else:
        sources.update(_carved_trainval(data_config, builder, entry))
    if 'test' in splits:
      if 'test' not in builder.info.splits:
        raise errors.UserError(f'{data_config.name} has no test split.')
      sources['test'] = _whole_split(builder, 'test', entry)
  if 'ood' in splits:
    if data_config.task != 'species':
      raise errors.UserError(
        "The 'ood' split (Cats-vs-Dogs) needs config.data.task='species'."
      )
    builder = prepare_dataset(
      OOD_DATASET,
      manual_dir=data_config.ood_manual_dir,
      data_dir=data_config.tfds_data_dir,
      options=PrepareOptions(
        store_size=data_config['store_size'],
        store_format=data_config['store_format'],
      ),
    )
    sources['ood'] = _whole_split(builder, 'train', dataset_entry(OOD_DATASET))
  return {split: sources[split] for split in splits}


class OpenSplits:
  """The pipeline splits of one `config.data`, each opened once, on first
  use, and then handed on (`splits[name]` is a `SplitSource`).

  'train' and 'validation' open together (they may be carved from one TFDS
  split); the primary dataset is prepared (checked) once.
  """

  def __init__(self, data_config: ml_collections.ConfigDict):
    self.data_config = data_config
    self._builder = None
    self._sources: dict[str, SplitSource] = {}

  @property
  def builder(self) -> tfds.core.DatasetBuilder:
    """The primary dataset's prepared builder."""
    if self._builder is None:
      self._builder = prepare_from_config(self.data_config)
    return self._builder

  def __getitem__(self, split: str) -> SplitSource:
    if split not in self._sources:
      together = ('train', 'validation') if split in SPLITS[:2] else (split,)
      builder = None if split == 'ood' else self.builder
      self._sources.update(
        load_split_sources(self.data_config, together, builder=builder)
      )
    return self._sources[split]

  def primary(self) -> dict[str, SplitSource]:
    """{'train', 'validation'[, 'test']}: the primary dataset's splits (test
    when it has one)."""
    names = list(SPLITS[:2])
    if 'test' in self.builder.info.splits:
      names.append('test')
    return {split: self[split] for split in names}
