"""Evaluating a checkpoint: the configured evaluators over one split.

`evaluate_checkpoint(workdir, config, step='best')` restores the trained model
(`cco_jax.restore`: the run record and the variables, not the training loop),
resolves where its data lives
(`cco_jax.data.preparation.resolve_data_dir`: a data dir already holding another
copy of a dataset is left alone, a scratch dir under `workdir/evaluation` is
used instead), opens the split once, runs every evaluator named in
`config.evaluators` on it (`evaluators.EVALUATORS`) and, for species models,
classification on Cats-vs-Dogs. Class and group names, image size and
normalisation come from the run record, not from the data. `write_report`
saves `workdir/evaluation/report_<step>.json`, one file per checkpoint step.
"""

from __future__ import annotations

from collections.abc import Iterator
import dataclasses
import json
import math
import os

from absl import logging
import jax
import ml_collections
import numpy as np

from cco_jax import head_features
from cco_jax import metric_writers
from cco_jax import models
from cco_jax import restore
from cco_jax.data import eval_pipeline
from cco_jax.data import preparation
from cco_jax.data import sources
from cco_jax.evaluation import auc
from cco_jax.evaluation import classwise
from cco_jax.evaluation import evaluators
from cco_jax.evaluation import interventions

EVALUATION_DIR = 'evaluation'
ARRAY_KEYS = ('influence_map', 'mean_mask', 'examples')


def default_config() -> ml_collections.ConfigDict:
  """The evaluation settings (override fields as needed).

  split: 'test', 'validation' or 'train' (unaugmented).
  num_examples: evaluate this many evenly spaced examples (0 = all).
  evaluators: names from `evaluators.EVALUATORS`, in order.
  batch_size: images per forward pass.
  seed, noise_std: of the interventions.
  iou_fraction: top fraction of map cells for the IoU.
  deletion_steps, deletion_examples: of the deletion / insertion curves.
  ood: also Cats-vs-Dogs accuracy (species models).
  keep_examples: examples kept for figures.
  """
  return ml_collections.ConfigDict(
    dict(
      split='test',
      num_examples=0,
      evaluators=(
        'classification',
        'interventions',
        'localisation',
        'deletion_insertion',
        'auc',
      ),
      batch_size=32,
      seed=interventions.DEFAULT_SEED,
      noise_std=interventions.DEFAULT_NOISE_STD,
      iou_fraction=0.2,
      deletion_steps=8,
      deletion_examples=32,
      ood=True,
      keep_examples=0,
    )
  )


def subset_positions(total: int, num_examples: int) -> np.ndarray | None:
  """`num_examples` evenly spaced positions of a split of `total` (sorted
  int64), or None (= all) when `num_examples` is 0 or >= total.

  Evenly spaced, not the first ones: splits are stored in list order (Pets by
  breed, Cats-vs-Dogs all cats first), so a prefix would hold one class.
  """
  if num_examples < 0:
    raise ValueError(f'num_examples must be >= 0; got {num_examples}.')
  if not num_examples or num_examples >= total:
    return None
  return np.floor(np.arange(num_examples) * (total / num_examples)).astype(
    np.int64
  )


def split_batches(
  data_config: ml_collections.ConfigDict,
  source: sources.SplitSource,
  *,
  cam_size: tuple[int, int],
  batch_size: int,
  positions: np.ndarray | None = None,
) -> Iterator[dict]:
  """Flat evaluation batches `(B, ...)` of an open split, with `pixel_mask`;
  the weight of examples outside `positions` is 0 (batches without any are
  skipped)."""
  batches = eval_pipeline.create_eval_iterator(
    data_config,
    source.name,
    source=source,
    cam_size=cam_size,
    global_batch_size=batch_size,
    num_devices=1,
    with_pixel_mask=True,
  )
  for batch in batches:
    flat = {k: np.asarray(v)[0] for k, v in batch.items()}
    if positions is not None:
      flat['weight'] = flat['weight'] * np.isin(flat['index'], positions)
      if not flat['weight'].any():
        continue
    yield flat


def resolved_data(
  config: ml_collections.ConfigDict, overrides: dict | None, scratch: str
) -> ml_collections.ConfigDict:
  """`config.data` with `overrides` (None values ignored), its data dir
  resolved for its manual dir."""
  data = ml_collections.ConfigDict(config.data.to_dict())
  data.update({k: v for k, v in (overrides or {}).items() if v is not None})
  data.manual_dir, data.tfds_data_dir = preparation.resolve_data_dir(
    data.name, data.manual_dir, data.tfds_data_dir, scratch
  )
  return data


def run_evaluators(
  trained: restore.TrainedModel,
  data: ml_collections.ConfigDict,
  config: ml_collections.ConfigDict,
  source: sources.SplitSource,
  names,
) -> dict:
  """`{name: value}` of the evaluators `names` on the open split `source` of
  `data`."""
  evaluators.check_names(names)
  predict = trained.predict_fn()
  bias = models.head_bias(trained.variables)
  positions = subset_positions(len(source), config.num_examples)
  context = interventions.Context(
    normalize=trained.record.normalize,
    seed=config.seed,
    noise_std=config.noise_std,
  )
  if 'interventions' in names:
    reader = interventions.SplitReader(data, source, cam_size=trained.cam_size)
    context = dataclasses.replace(
      context, donors=lambda where: reader.donors(where, seed=config.seed)
    )
  groups = trained.record.group_names
  gradcam = jax.jit(
    lambda x, c: head_features.gradcam(trained.model, trained.variables, x, c)
  )
  settings = {
    'classification': dict(
      bias=bias,
      group_names=groups if len(groups) > 1 else None,
      keep_examples=config.keep_examples,
    ),
    'interventions': dict(context=context, keep_examples=config.keep_examples),
    'localisation': dict(fraction=config.iou_fraction),
    'deletion_insertion': dict(
      gradcam_fn=gradcam,
      steps=config.deletion_steps,
      max_examples=config.deletion_examples,
      normalize=trained.record.normalize,
    ),
    'per_example': {},
    'auc': auc.settings_of(
      trained.config, trained.record.class_names, seed=config.seed
    ),
  }
  results = {}
  for name in names:
    batches = split_batches(
      data,
      source,
      cam_size=trained.cam_size,
      batch_size=config.batch_size,
      positions=positions,
    )
    evaluator = evaluators.EVALUATORS[name](predict, **settings[name])
    for key, value in evaluator.run(batches):
      if key == 'examples':
        results.setdefault('examples', {}).update(value)
      else:
        results[key] = value
  return results


@dataclasses.dataclass
class Result:
  """`report` (JSON-able) and `arrays` (`influence_map`, `mean_mask`,
  `examples`) of one evaluation, and the run's class names."""

  report: dict
  arrays: dict
  class_names: tuple[str, ...]
  normalize: bool


def evaluate_checkpoint(
  workdir: str,
  config: ml_collections.ConfigDict | None = None,
  *,
  step='best',
  data_overrides: dict | None = None,
  ood_overrides: dict | None = None,
  trained: restore.TrainedModel | None = None,
) -> Result:
  """Evaluates one checkpoint of a training run.

  Args:
    workdir: a training run's directory.
    config: `default_config()` with changes (None = the defaults).
    step: 'best', 'last' or a step number (`restore.restore_model`).
    data_overrides: `config.data` fields to change (e.g. `manual_dir`,
      `tfds_data_dir`); None values are ignored.
    ood_overrides: the same for the Cats-vs-Dogs evaluation (`ood_manual_dir`,
      `tfds_data_dir`).
    trained: a model of `workdir` already restored and changed (e.g. its head
      refit by `cco_jax.dfr`); None restores `step`.

  Returns:
    A `Result` whose report holds `workdir`, `step`, `checkpoint`, `split`,
    the settings, every evaluator's named values and `ood` (or None).
  """
  if jax.process_count() > 1:
    raise ValueError('Evaluation runs as a single process.')
  config = config or default_config()
  if trained is None:
    trained = restore.restore_model(workdir, step=step)
  scratch = os.path.join(workdir, EVALUATION_DIR)
  data = resolved_data(trained.config, data_overrides, scratch)
  logging.info(
    'Evaluating %s at step %d (%s) on %r.',
    workdir,
    trained.step,
    trained.checkpoint,
    config.split,
  )
  source = sources.load_split_sources(data, [config.split])[config.split]
  results = run_evaluators(
    trained, data, config, source, list(config.evaluators)
  )
  arrays = {k: results.pop(k) for k in ARRAY_KEYS if k in results}
  record = trained.record
  if 'classification' in config.evaluators:  # Every dataset, per class.
    results['per_class'] = classwise.split_summary(
      trained.predict_fn(),
      record.class_names,
      split_batches(
        data,
        source,
        cam_size=trained.cam_size,
        batch_size=config.batch_size,
        positions=subset_positions(len(source), config.num_examples),
      ),
    )
  report = {
    'workdir': os.path.abspath(workdir),
    'step': trained.step,
    'checkpoint': trained.checkpoint,
    'checkpoint_metrics': _checkpoint_metrics(workdir, trained.step),
    'split': config.split,
    'settings': config.to_dict(),
    'task': record.task,
    'class_names': list(record.class_names),
    'model': {
      'name': trained.config.model.name,
      'cam_faithful': trained.config.model.cam_faithful,
      'image_size': record.image_size,
      'cam_size': list(record.cam_size),
    },
    'data': {
      'manual_dir': data.manual_dir,
      'tfds_data_dir': data.tfds_data_dir,
    },
    **results,
    'ood': None,
  }
  if arrays.get('influence_map') is not None:
    report['influence_map'] = np.round(arrays['influence_map'], 6).tolist()
  if config.ood and record.task == 'species':
    report['ood'] = _ood(trained, data, config, ood_overrides, scratch)
  elif config.ood:  # Settings say what ran: Cats-vs-Dogs needs species.
    report['settings']['ood'] = False
    report['ood_note'] = (
      f'Cats-vs-Dogs is evaluated for species models only; task is '
      f'{record.task!r}.'
    )
  return Result(
    report=json_safe(report),
    arrays=arrays,
    class_names=record.class_names,
    normalize=record.normalize,
  )


def _ood(trained, data, config, overrides, scratch) -> dict:
  """Classification on Cats-vs-Dogs, its data dir resolved on its own."""
  ood = ml_collections.ConfigDict(data.to_dict())
  ood.update({k: v for k, v in (overrides or {}).items() if v is not None})
  ood.ood_manual_dir, ood.tfds_data_dir = preparation.resolve_data_dir(
    sources.OOD_DATASET, ood.ood_manual_dir, ood.tfds_data_dir, scratch
  )
  quick = ml_collections.ConfigDict(config.to_dict())
  quick.keep_examples = 0
  source = sources.load_split_sources(ood, ['ood'])['ood']
  results = run_evaluators(trained, ood, quick, source, ['classification'])
  return {
    'accuracy': results['accuracy'],
    'ce': results['ce'],
    'count': results['count'],
    'manual_dir': ood.ood_manual_dir,
    'tfds_data_dir': ood.tfds_data_dir,
  }


def _checkpoint_metrics(workdir: str, step: int) -> dict:
  """`eval_*` metrics logged at `step` in metrics.jsonl (empty if none)."""
  found = {}
  for record in metric_writers.read_metrics(workdir):
    if record['step'] == step:
      found.update({k: v for k, v in record.items() if k.startswith('eval_')})
  return found


def json_safe(value):
  """Dicts, lists, NumPy scalars and arrays -> JSON values; NaN/inf -> None."""
  if isinstance(value, dict):
    return {k: json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [json_safe(v) for v in value]
  if isinstance(value, np.ndarray):
    return json_safe(value.tolist())
  if isinstance(value, (np.floating, float)):
    return None if not math.isfinite(float(value)) else float(value)
  if isinstance(value, np.integer):
    return int(value)
  return value


def report_path(workdir: str, step: int) -> str:
  """`workdir/evaluation/report_<step>.json`."""
  return os.path.join(workdir, EVALUATION_DIR, f'report_{step}.json')


def write_report(workdir: str, report: dict) -> str:
  """Writes `report` to `report_path(workdir, report['step'])`."""
  path = report_path(workdir, report['step'])
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    json.dump(report, f, indent=2)
  return path
