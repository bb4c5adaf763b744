"""Preparing datasets, where prepared data lives, and the pipeline's splits.

Splits seen by the pipeline:
  'train', 'validation'  a deterministic carve of the dataset's 'train' split
                         (`carve_validation`), independent of the training
                         seed; a dataset whose builder writes a 'validation'
                         split (folder, Waterbirds) uses it instead;
  'test'                 the dataset's test split;
  'ood'                  Microsoft Cats-vs-Dogs (species task only).

Where prepared data lives (`prepared_data_dir`, the one place that decides):
  ``config.data.tfds_data_dir`` ('' = the TFDS default), then
  ``stored_<S>/`` (``stored_<S>_raw/``) below it when ``store_size`` = S > 0,
  then for the 'folder'
  dataset ``folder/<hash of the root, its labels.csv and the preparing
  options>/``, so that every folder (and every option set, and every edit of
  labels.csv) gets its own prepared copy.

Each example read from a `SplitSource` carries 'group': an int index into the
dataset's `group_names` (metadata recorded by the builder); datasets without
groups give every example group 0 (one group, named 'all').
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses
import hashlib
import json
import math
import os
from typing import Any

from absl import logging
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from cco_jax.data import config as config_lib
from cco_jax.data.datasets import DATASETS
from cco_jax.data.datasets import DatasetEntry
from cco_jax.data.datasets import PrepareOptions

Example = dict[str, Any]
OOD_DATASET = 'cats_vs_dogs'
SPLITS = ('train', 'validation', 'test', 'ood')
# Changing the salt changes every validation carve: keep it fixed.
VALIDATION_SALT = 'cco-jax/validation/v1'
NO_GROUPS = ('all',)
_SKIP_DECODING = tfds.decode.SkipDecoding


def dataset_entry(name: str) -> DatasetEntry:
  """The `DATASETS` entry of `name`; ValueError naming the choices."""
  if name not in DATASETS:
    raise ValueError(
      f'Unknown dataset {name!r} (config.data.name, --dataset); expected '
      f'one of {tuple(DATASETS)}.'
    )
  return DATASETS[name]


def check_config(data_config: ml_collections.ConfigDict) -> None:
  """Raises ValueError on a field value the pipeline does not support."""
  entry = dataset_entry(data_config.name)
  config_lib.check_config(data_config, tuple(entry.tasks))


def prepare_options(data_config: ml_collections.ConfigDict) -> PrepareOptions:
  """The `PrepareOptions` of `config.data` (defaults for absent fields)."""
  return PrepareOptions(
    **{
      field.name: config_lib.get(data_config, field.name)
      for field in dataclasses.fields(PrepareOptions)
    }
  )


def _realpath(path: str) -> str:
  return os.path.realpath(os.path.expanduser(path))


def prepared_data_dir(
  name: str, data_dir: str, manual_dir: str, options: PrepareOptions
) -> str:
  """The TFDS data dir that holds dataset `name` prepared with `options`.

  Returns `data_dir` unchanged ('' = TFDS default) for a dataset stored as it
  is; see the module docstring for the other cases.
  """
  entry = dataset_entry(name)
  if not options.store_size and not entry.needs_manual_dir:
    return data_dir
  path = data_dir or tfds.core.constants.DATA_DIR
  if options.store_size:
    raw = '_raw' * (options.store_format == 'raw')
    path = os.path.join(path, f'stored_{options.store_size}{raw}')
  if entry.needs_manual_dir:
    if not manual_dir:
      raise ValueError(
        f'Dataset {name!r} is read from a local directory: set '
        'config.data.manual_dir (or --manual_dir of experiments.prepare).'
      )
    labels = os.path.join(_realpath(manual_dir), 'labels.csv')
    listing = ''
    if os.path.isfile(labels):  # Edited labels get a fresh prepared copy.
      with open(labels, 'rb') as f:
        listing = hashlib.sha256(f.read()).hexdigest()
    key = json.dumps(
      [
        _realpath(manual_dir),
        listing,
        options.missing_masks,
        options.resize_masks,
        options.skip_bad_images,
      ]
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    path = os.path.join(path, name, digest)
  return path


def prepared_builder(
  name: str, manual_dir: str, data_dir: str, options: PrepareOptions
) -> tfds.core.DatasetBuilder:
  """The builder of `name` at `prepared_data_dir` (prepared or not)."""
  entry = dataset_entry(name)
  kwargs = {'root': manual_dir} if entry.needs_manual_dir else {}
  return entry.builder_cls(
    data_dir=prepared_data_dir(name, data_dir, manual_dir, options) or None,
    file_format='array_record',
    options=options,
    **kwargs,
  )


def _recorded_source(builder: tfds.core.DatasetBuilder) -> str:
  try:
    return builder.info.metadata['source']
  except (KeyError, TypeError):
    return 'unknown'


def prepare_dataset(
  name: str,
  *,
  manual_dir: str = '',
  data_dir: str = '',
  options: PrepareOptions | None = None,
) -> tfds.core.DatasetBuilder:
  """Prepares a dataset once (ArrayRecord) and returns its TFDS builder.

  Args:
    name: a key of `cco_jax.data.datasets.DATASETS`.
    manual_dir: local copy in the dataset's layout; '' downloads the official
      archives (or uses TFDS's default manual dir, `DATA_DIR/downloads/manual`,
      when it is not empty).
    data_dir: TFDS data directory; '' = the TFDS default.
    options: what to store (`prepare_options(config.data)`); None = defaults.

  Returns:
    The prepared builder; read it with `builder.as_data_source(split)`.

  Raises:
    ValueError: `manual_dir` is missing or lacks the expected layout, or
      `data_dir` already holds this dataset prepared from another directory.
  """
  entry = dataset_entry(name)
  options = options or PrepareOptions()
  if manual_dir:
    entry.check_manual_dir(manual_dir)
  builder = prepared_builder(name, manual_dir, data_dir, options)
  if not builder.is_prepared():
    builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(
        manual_dir=manual_dir or None
      )
    )
    return builder
  recorded = _recorded_source(builder)
  if manual_dir and _realpath(recorded) != _realpath(manual_dir):
    raise ValueError(
      f'{builder.data_dir} already holds {builder.name} prepared from '
      f'{recorded!r}, not from manual_dir {manual_dir!r}. Use another data '
      'dir (--data_dir / config.data.tfds_data_dir) or delete that one.'
    )
  logging.info(
    'Using %s at %s (prepared from %s).',
    builder.name,
    builder.data_dir,
    recorded,
  )
  return builder


def prepare_from_config(
  data_config: ml_collections.ConfigDict,
) -> tfds.core.DatasetBuilder:
  """`prepare_dataset` of `config.data`'s primary dataset."""
  return prepare_dataset(
    data_config.name,
    manual_dir=data_config.manual_dir,
    data_dir=data_config.tfds_data_dir,
    options=prepare_options(data_config),
  )


def prepared_source(
  name: str,
  data_dir: str,
  manual_dir: str = '',
  options: PrepareOptions | None = None,
) -> str | None:
  """Where `data_dir` prepared dataset `name` from ('download', a resolved
  path, 'unknown'), or None if it is not prepared there. Prepares nothing."""
  builder = prepared_builder(
    name, manual_dir, data_dir, options or PrepareOptions()
  )
  if not builder.is_prepared():
    return None
  return _recorded_source(builder)


def resolve_data_dir(
  name: str, manual_dir: str, data_dir: str, scratch_root: str
) -> tuple[str, str]:
  """`(manual_dir, data_dir)` to open dataset `name` from `manual_dir`.

  A TFDS data dir holds one prepared copy per dataset and refuses another
  source (`prepare_dataset`). So:
    * `data_dir` does not hold `name` yet: prepare it there, unchanged;
    * it holds `name` from `manual_dir` (or `manual_dir` is ''): use it;
    * it holds `name` from elsewhere: use (and prepare on first use)
      `scratch_root/tfds_<first 12 hex digits of SHA-256 of realpath(manual_dir)>`;
    * `manual_dir` does not exist (a relative path written by a run started
      elsewhere) but `data_dir` holds a prepared copy: use that copy
      (`manual_dir` = ''), with a warning.
  """
  if dataset_entry(name).needs_manual_dir:
    return manual_dir, data_dir  # Every folder has its own prepared copy.
  source = prepared_source(name, data_dir)
  if source is None or not manual_dir:
    return manual_dir, data_dir
  wanted = _realpath(manual_dir)
  if source == wanted:
    return manual_dir, data_dir
  if not os.path.isdir(wanted):
    logging.warning(
      '%s: manual dir %r does not exist here; using the copy '
      'prepared in %r from %r.',
      name,
      manual_dir,
      data_dir,
      source,
    )
    return '', data_dir
  digest = hashlib.sha256(wanted.encode()).hexdigest()[:12]
  alternative = os.path.join(scratch_root, f'tfds_{digest}')
  logging.info(
    '%s: %r holds a copy prepared from %r; preparing %r in %r.',
    name,
    data_dir,
    source,
    wanted,
    alternative,
  )
  return manual_dir, alternative


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
  """

  name: str
  records: Sequence[Mapping[str, Any]]
  indices: np.ndarray
  has_masks: bool
  positions: np.ndarray | None = None
  groups: np.ndarray | None = None

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, i: int) -> Example:
    record_id = int(self.indices[i])
    record = dict(self.records[record_id])
    record['index'] = int(i if self.positions is None else self.positions[i])
    record['group'] = 0 if self.groups is None else int(self.groups[record_id])
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


def _split_lists(
  builder: tfds.core.DatasetBuilder,
  records: Sequence[Mapping[str, Any]],
  split: str,
) -> tuple[list[str], list[int], np.ndarray | None]:
  """File names, stratification labels and groups of a TFDS split.

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
  stratify = 'label' if 'label' in builder.info.features else 'species'
  names, labels = [], []
  for i in range(len(records)):
    record = records[i]
    names.append(as_str(record['file_name']))
    labels.append(int(record[stratify]))
  return names, labels, None


def _whole_split(
  builder: tfds.core.DatasetBuilder, split: str, entry: DatasetEntry
) -> SplitSource:
  records = _data_source(builder, split, entry.has_masks)
  _, _, groups = _split_lists(builder, records, split)
  return SplitSource(
    split,
    records,
    np.arange(len(records)),
    entry.has_masks,
    groups=groups,
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
  return {
    split: SplitSource(
      split,
      records,
      indices,
      entry.has_masks,
      groups=groups,
    )
    for split, indices in (('train', train), ('validation', validation))
  }


def load_split_sources(
  data_config: ml_collections.ConfigDict,
  splits: Sequence[str] = ('train', 'validation', 'test'),
) -> dict[str, SplitSource]:
  """Opens pipeline splits, preparing the data first if needed.

  Args:
    data_config: `config.data` (`cco_jax.data.config`).
    splits: any of 'train', 'validation', 'test', 'ood'.

  Returns:
    {split: SplitSource}.

  Raises:
    ValueError: an unknown split, a split the dataset lacks, or a bad config.
  """
  check_config(data_config)
  unknown = set(splits) - set(SPLITS)
  if unknown:
    raise ValueError(f'Unknown splits {sorted(unknown)}; expected {SPLITS}.')
  entry = dataset_entry(data_config.name)
  sources = {}
  if {'train', 'validation', 'test'} & set(splits):
    builder = prepare_from_config(data_config)
    if {'train', 'validation'} & set(splits):
      if 'validation' in builder.info.splits:
        for split in ('train', 'validation'):
          sources[split] = _whole_split(builder, split, entry)
      else:
        sources.update(_carved_trainval(data_config, builder, entry))
    if 'test' in splits:
      if 'test' not in builder.info.splits:
        raise ValueError(f'{data_config.name} has no test split.')
      sources['test'] = _whole_split(builder, 'test', entry)
  if 'ood' in splits:
    if data_config.task != 'species':
      raise ValueError(
        "The 'ood' split (Cats-vs-Dogs) needs config.data.task='species'."
      )
    builder = prepare_dataset(
      OOD_DATASET,
      manual_dir=data_config.ood_manual_dir,
      data_dir=data_config.tfds_data_dir,
      options=PrepareOptions(
        store_size=config_lib.get(data_config, 'store_size'),
        store_format=config_lib.get(data_config, 'store_format'),
      ),
    )
    sources['ood'] = _whole_split(builder, 'train', dataset_entry(OOD_DATASET))
  return {split: sources[split] for split in splits}
