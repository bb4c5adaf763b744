"""Helpers on `ml_collections` configs shared by the library, entry points and tests."""

from __future__ import annotations

from collections.abc import Mapping
import json
from typing import Any

from etils import epath
import ml_collections

from cco_jax import config_schema
from cco_jax import errors


def apply_overrides(
  config: ml_collections.ConfigDict, overrides: Mapping[str, Any]
) -> ml_collections.ConfigDict:
  """Sets dotted keys (`'data.image_size': 32`) on `config`, in place; returns it.

  Every key must already exist: a misspelt one raises a `KeyError` that names it
  and lists the fields that do exist at that level.
  """
  with config.unlocked():
    for key, value in overrides.items():
      target = config
      *path, last = key.split('.')
      for part in path:
        target = _field(target, part, key)
      _field(target, last, key)
      target[last] = value
  return config


def _field(node: ml_collections.ConfigDict, name: str, key: str) -> Any:
  if name not in node:
    raise KeyError(
      f'Config override {key!r}: no field {name!r} here; fields: '
      f'{", ".join(sorted(node.keys()))}.'
    )
  return node[name]


def check_training_config(config: ml_collections.ConfigDict) -> None:
  """Refuses settings that would crash later or silently do something else.

  Raises:
    errors.UserError: one line naming the field, its value and what to set
      instead.
  """

  def fail(field: str, problem: str) -> None:
    value = config
    for part in field.split('.'):
      value = value[part]
    raise errors.UserError(f'config.{field}={value!r}: {problem}')

  if config.num_train_steps == 0 or config.num_train_steps < -1:
    fail(
      'num_train_steps',
      'give a positive number of steps, or -1 to train num_epochs epochs.',
    )
  if config.num_train_steps == -1 and not config.num_epochs > 0:
    fail('num_epochs', 'must be positive (or set num_train_steps > 0).')
  for field in ('batch_size', 'eval_batch_size', 'accumulation_steps'):
    if config[field] < 1:
      fail(field, 'must be a positive integer.')
  if config.keep_checkpoints < 1:
    fail('keep_checkpoints', 'must be at least 1.')
  if not config.per_device_batch_size and (
    config.batch_size % config.accumulation_steps
  ):
    fail(
      'batch_size',
      f'not divisible by config.accumulation_steps='
      f'{config.accumulation_steps}; set --config.batch_size to a multiple '
      'of it (or change accumulation_steps).',
    )
  from cco_jax import model_config  # pylint: disable=g-import-not-at-top
  from cco_jax import models  # pylint: disable=g-import-not-at-top
  from cco_jax import optimizers  # pylint: disable=g-import-not-at-top

  for field, names in (
    ('optimizer.name', optimizers.OPTIMIZERS),
    ('optimizer.schedule', optimizers.SCHEDULES),
    ('model.name', models.names()),
    ('model.stem', ['imagenet', *sorted(models.STEM_STRIDES)]),
    ('model.dtype', sorted(model_config.DTYPES)),
  ):
    section, key = field.split('.')
    if key in config[section] and config[section][key] not in names:
      fail(
        field,
        f'unknown; choose one of {list(names)} (--config.{field}=NAME).',
      )
  # Class-balanced sampling already draws every class equally often; a static
  # reweighting on top counts the imbalance twice (ce_reweighted's group
  # weights, from the data's counts, include the class share).
  if config.data.get('sampling', 'natural') == 'class_balanced':
    if config.loss.get('class_weights', 'none') != 'none':
      fail(
        'loss.class_weights',
        'with data.sampling=class_balanced the classes would be balanced '
        'twice; choose one (--config.loss.class_weights=none or '
        '--config.data.sampling=natural).',
      )
    if config.loss.name == 'ce_reweighted':
      fail(
        'data.sampling',
        "loss.name='ce_reweighted' weights groups by their training share, "
        'which class-balanced sampling changes; group weights already '
        'balance the classes: set --config.data.sampling=natural.',
      )
  if not 0 < config.data.validation_fraction < 1:
    fail(
      'data.validation_fraction',
      'must be in (0, 1): evaluation during training, the choice of the '
      'best checkpoint and the identity check need a validation split.',
    )


# Fields a resumed run may change: durations, cadences, where the data lives
# and how fast it is read. Any other difference in these sections means the
# checkpoints do not belong to this config.
RESUMABLE_SECTIONS = ('model', 'data')
RESUMABLE_TOP_LEVEL = (
  'seed',
  'rng_impl',
  'batch_size',
  'accumulation_steps',
)
MAY_CHANGE_ON_RESUME = (
  'data.manual_dir',
  'data.ood_manual_dir',
  'data.tfds_data_dir',
  'data.download_mirror',
  'data.num_workers',
  'data.prefetch',
  'data.cache_decoded',
  'data.device_preprocessing',
)


def resume_differences(saved: Mapping[str, Any], new: Mapping[str, Any]):
  """Fields that differ between a run's saved config and a resuming one.

  Both are JSON-like dicts (`json.loads(config.to_json_best_effort())`).
  Compared: every `model.*` and `data.*` field (except `MAY_CHANGE_ON_RESUME`)
  and `RESUMABLE_TOP_LEVEL`. Fields present on one side only (added to the
  code since) are not compared. Returns ['model.num_filters: 4 -> 8', ...].
  """
  old, cur = config_schema.flatten(saved), config_schema.flatten(new)

  def compared(key: str) -> bool:
    return (
      key.split('.')[0] in RESUMABLE_SECTIONS or key in RESUMABLE_TOP_LEVEL
    ) and key not in MAY_CHANGE_ON_RESUME

  keys = sorted(k for k in set(old) & set(cur) if compared(k))
  return [f'{k}: {old[k]!r} -> {cur[k]!r}' for k in keys if old[k] != cur[k]]


def check_resumable(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Refuses to resume `workdir` with a different model or data config.

  Compares with the run's `config.json` (`resume_differences`)
  when checkpoints exist, before anything in the workdir is changed. Keys the
  saved file lacks (added to the schema since) are logged and not compared.

  Raises:
    errors.UserError: the configs differ (one line listing the fields).
  """
  path = epath.Path(workdir) / 'config.json'
  checkpoints = epath.Path(workdir) / 'checkpoints'
  has_checkpoints = checkpoints.is_dir() and any(
    p.name.isdigit() for p in checkpoints.iterdir()
  )
  if not (has_checkpoints and path.exists()):
    return
  saved = json.loads(path.read_text())
  config_schema.log_missing(saved, str(path))
  differences = resume_differences(
    saved, json.loads(config.to_json_best_effort())
  )
  if differences:
    raise errors.UserError(
      f'{workdir} holds checkpoints of another config; this one differs in '
      f'{"; ".join(differences)}. Use a new --workdir, or the same settings '
      'to resume.'
    )
