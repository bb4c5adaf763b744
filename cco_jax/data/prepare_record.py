"""What `experiments.prepare` was given, recorded with the prepared data and
used by training: one source of truth for the data options.

`python -m experiments.prepare --dataset=folder --manual_dir=ROOT
--missing_masks=all_ones` writes

    <data dir>/prepare_records/<dataset>-<hash of realpath(ROOT)>.json
    {"dataset": ..., "manual_dir": <realpath>, "options": {field: value}}

(`<data dir>`: `--data_dir`, '' = the TFDS default), with every option of
`RECORDED` that prepare was given. Training, evaluation and `split_sizes`
call `adopt(config.data)` before they open the data: each recorded option the
config leaves at its default is taken from the record (logged once per
field), so the train command of the README needs no flag repeated. An option
the config sets to another value than the record wins (the user asked for it;
logged too), and the data is then prepared with it.
"""

from __future__ import annotations

import hashlib
import json
import os

from absl import logging
import ml_collections
import tensorflow_datasets as tfds

from cco_jax.data import config as config_lib

RECORD_DIR = 'prepare_records'
# The config.data fields that experiments.prepare takes as flags.
RECORDED = (
  'validation_fraction',
  'store_size',
  'store_format',
  'missing_masks',
  'resize_masks',
  'skip_bad_images',
  'download_mirror',
)


def record_path(data_config: ml_collections.ConfigDict) -> str:
  """Where the record of `data_config`'s dataset and manual_dir lives."""
  root = data_config.tfds_data_dir or tfds.core.constants.DATA_DIR
  source = data_config.manual_dir or ''
  if source:
    source = os.path.realpath(os.path.expanduser(source))
  digest = hashlib.sha256(source.encode()).hexdigest()[:12]
  return os.path.join(
    os.path.expanduser(root), RECORD_DIR, f'{data_config.name}-{digest}.json'
  )


def write(data_config: ml_collections.ConfigDict) -> str:
  """Records the `RECORDED` fields of `data_config`; returns the path."""
  path = record_path(data_config)
  manual_dir = data_config.manual_dir or ''
  record = {
    'dataset': data_config.name,
    'manual_dir': os.path.realpath(os.path.expanduser(manual_dir))
    if manual_dir
    else '',
    'options': {key: data_config[key] for key in RECORDED},
  }
  os.makedirs(os.path.dirname(path), exist_ok=True)
  partial = f'{path}.partial'
  with open(partial, 'w') as f:
    json.dump(record, f, indent=1)
  os.replace(partial, path)
  return path


def read(data_config: ml_collections.ConfigDict) -> dict | None:
  """The recorded options of `data_config`'s dataset and manual_dir, or None
  (no record, or one that cannot be read: then it is ignored with a log
  line)."""
  path = record_path(data_config)
  if not os.path.isfile(path):
    return None
  try:
    with open(path) as f:
      return dict(json.load(f)['options'])
  except (OSError, ValueError, KeyError, TypeError) as e:
    logging.warning('Ignoring the unreadable prepare record %s (%s).', path, e)
    return None


def adopt(data_config: ml_collections.ConfigDict) -> list[str]:
  """Takes the options `experiments.prepare` was given (module doc) into
  `data_config`, in place; returns the adopted fields as 'key=value'."""
  recorded = read(data_config)
  if not recorded:
    return []
  defaults = config_lib.default_config()
  adopted = []
  for key, value in recorded.items():
    if key not in RECORDED or key not in data_config:
      continue
    current = data_config[key]
    if current == value:
      continue
    if current == defaults[key]:
      with data_config.unlocked():
        data_config[key] = value
      adopted.append(f'{key}={value!r}')
    else:
      logging.info(
        'config.data.%s=%r differs from the %r given to experiments.prepare '
        '(%s); using %r.',
        key,
        current,
        value,
        record_path(data_config),
        current,
      )
  if adopted:
    logging.info(
      'Data options as given to experiments.prepare (%s): config.data.%s.',
      record_path(data_config),
      ', config.data.'.join(adopted),
    )
  return adopted
