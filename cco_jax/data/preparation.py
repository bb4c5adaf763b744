"""Preparing datasets once, and where prepared data lives.

Where prepared data lives (`prepared_data_dir`, the one place that decides):
  ``config.data.tfds_data_dir`` ('' = the TFDS default), then
  ``stored_<S>/`` (``stored_<S>_raw/``) below it when ``store_size`` = S > 0,
  then for the 'folder'
  dataset ``folder/<hash of the root, its labels.csv and the preparing
  options>/``, so that every folder (and every option set, and every edit of
  labels.csv) gets its own prepared copy.

Several processes (a multi-host JAX run, `jax.distributed` initialised): only
process 0 prepares a dataset that is not prepared yet (and needs its
manual_dir); the others wait until it appears in the data dir, which every
host must see (`wait_until_prepared`, at most `PREPARE_WAIT_S`), and then
read it. A 'folder' dataset's prepared copy is named after its labels.csv, so
every host needs that file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time

from absl import logging
import jax
import ml_collections
import tensorflow_datasets as tfds

from cco_jax import errors
from cco_jax.data.datasets import DATASETS
from cco_jax.data.datasets import DatasetEntry
from cco_jax.data.datasets import PrepareOptions

# How long a process other than 0 waits for process 0 to prepare a dataset
# (downloading and converting full Pets takes minutes), and how often it looks.
PREPARE_WAIT_S = 3600.0
PREPARE_POLL_S = 2.0


def dataset_entry(name: str) -> DatasetEntry:
  """The `DATASETS` entry of `name`; ValueError naming the choices."""
  if name not in DATASETS:
    raise errors.UserError(
      f'Unknown dataset {name!r} (config.data.name, --dataset); expected '
      f'one of {tuple(DATASETS)}.'
    )
  return DATASETS[name]


def prepare_options(data_config: ml_collections.ConfigDict) -> PrepareOptions:
  """The `PrepareOptions` of `config.data` (defaults for absent fields)."""
  return PrepareOptions(
    **{
      field.name: data_config[field.name]
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
      raise errors.UserError(
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


def process_layout() -> tuple[int, int]:
  """(process index, process count) of this JAX run; (0, 1) unless
  `jax.distributed` is initialised (then no backend is started here)."""
  if not jax.distributed.is_initialized():
    return 0, 1
  return jax.process_index(), jax.process_count()


def wait_until_prepared(
  make_builder,
  *,
  process: tuple[int, int],
  timeout_s: float = PREPARE_WAIT_S,
  poll_s: float = PREPARE_POLL_S,
) -> tfds.core.DatasetBuilder:
  """Waits for another process to prepare a dataset; returns its builder.

  Args:
    make_builder: () -> a fresh `tfds.core.DatasetBuilder` (rebuilt at each
      look, as a builder reads what is prepared when it is made).
    process: (index, count) of this process, for the error message.
    timeout_s: give up after this many seconds.
    poll_s: seconds between looks.

  Raises:
    TimeoutError: naming the dataset, the directory and the fixes.
  """
  start = time.monotonic()
  builder = make_builder()
  logged = False
  while not builder.is_prepared():
    waited = time.monotonic() - start
    if waited > timeout_s:
      raise TimeoutError(
        f'Process {process[0]} of {process[1]} waited {waited:.0f} s for '
        f'process 0 to prepare {builder.name} in {builder.data_dir}. Only '
        'process 0 prepares data; the others read it from the same '
        'config.data.tfds_data_dir, which must be a directory every host '
        "sees (or prepare it on every host first: 'python -m "
        "experiments.prepare'). Check process 0's log for an error.",
      )
    if not logged:
      logging.info(
        'Waiting for process 0 to prepare %s in %s.',
        builder.name,
        builder.data_dir,
      )
      logged = True
    time.sleep(poll_s)
    builder = make_builder()
  return builder


def prepare_dataset(
  name: str,
  *,
  manual_dir: str = '',
  data_dir: str = '',
  options: PrepareOptions | None = None,
  process: tuple[int, int] | None = None,
  wait_s: float = PREPARE_WAIT_S,
) -> tfds.core.DatasetBuilder:
  """Prepares a dataset once (ArrayRecord) and returns its TFDS builder.

  Args:
    name: a key of `cco_jax.data.datasets.DATASETS`.
    manual_dir: local copy in the dataset's layout; '' downloads the official
      archives (or uses TFDS's default manual dir, `DATA_DIR/downloads/manual`,
      when it is not empty).
    data_dir: TFDS data directory; '' = the TFDS default.
    options: what to store (`prepare_options(config.data)`); None = defaults.
    process: (index, count) of this process; None = `process_layout()`.
      Only process 0 prepares (and needs `manual_dir`); the others wait for
      the data to appear in `data_dir` (`wait_until_prepared`).
    wait_s: how long a process other than 0 waits.

  Returns:
    The prepared builder; read it with `builder.as_data_source(split)`.

  Raises:
    ValueError: `manual_dir` is missing or lacks the expected layout, or
      `data_dir` already holds this dataset prepared from another directory.
    TimeoutError: a process other than 0 waited `wait_s` in vain.
  """
  entry = dataset_entry(name)
  options = options or PrepareOptions()
  process = process or process_layout()
  chief = process[0] == 0
  if manual_dir and chief:
    entry.check_manual_dir(manual_dir)
  builder = prepared_builder(name, manual_dir, data_dir, options)
  if not builder.is_prepared() and not chief:
    builder = wait_until_prepared(
      lambda: prepared_builder(name, manual_dir, data_dir, options),
      process=process,
      timeout_s=wait_s,
    )
  if not builder.is_prepared():
    builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(
        manual_dir=manual_dir or None
      )
    )
    return builder
  recorded = _recorded_source(builder)
  if manual_dir and _realpath(recorded) != _realpath(manual_dir):
    raise errors.UserError(
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
