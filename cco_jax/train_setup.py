"""Phase 1 of training: the model, objective, schedule and data of a config.

`build(config)` turns one ml_collections config into a `Setup`: the Linen
ResNet, the resolved `Schedule` (steps per epoch, total steps, cadences of
logging, evaluation and checkpoints, all in train-step calls), the optax
optimizer, the train iterator and the pmapped train, eval and predict steps.
`eval_iterator` builds the iterator of an evaluation split for that setup.
Nothing here touches the workdir; `train.train_and_evaluate` runs the loop.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
import copy
import dataclasses
from typing import Any

from absl import logging
import jax
import ml_collections
import numpy as np

from cco_jax import checkpointing
from cco_jax import configuration
from cco_jax import data
from cco_jax import errors
from cco_jax import model_config
from cco_jax import models
from cco_jax import objectives
from cco_jax import optimizers
from cco_jax import run_record
from cco_jax import train_step as step_lib

GROUP_METRICS = ('worst_group_accuracy', 'average_group_accuracy')
BEST_METRICS = ('accuracy', 'mean_auc') + GROUP_METRICS


def with_data_fields(
  config: ml_collections.ConfigDict,
  splits: data.OpenSplits | None = None,
) -> ml_collections.ConfigDict:
  """A copy of `config` with the fields its objective takes from the data.

  An objective that reads image-resolution masks (`objectives.supervision`, e.g.
  'rrr') gets `data.pixel_masks=True`; one that reads groups ('group_dro',
  'ce_reweighted') gets `loss.group_counts`, the training examples of each
  group, unless the config sets them; `loss.class_weights='inverse_frequency'`
  gets `loss.class_counts`, the training examples of each class, likewise.
  The copy is what `config.json` records.
  `splits`: the run's open splits (None: opened here when needed).
  """
  needs = objectives.supervision(config.loss.name)
  updates = {}
  if 'pixel_mask' in needs and not config.data.pixel_masks:
    updates['data.pixel_masks'] = True
  if 'group' in needs and not tuple(config.loss.group_counts):
    train = (splits or data.OpenSplits(config.data))['train']
    counts = data.group_counts_of(
      train, len(data.group_names_of(train.builder))
    )
    if len(counts) < 2:
      raise errors.UserError(
        f'config.loss.name={config.loss.name!r} reweights groups, but '
        f'{config.data.name!r} has one group; train it on data with a group '
        'column (docs/data.md) or choose another objective.'
      )
    updates['loss.group_counts'] = counts
    logging.info('Training examples per group: %s.', counts)
  weighted = config.loss.get('class_weights', 'none') != 'none'
  if weighted and not tuple(config.loss.class_counts):
    train = (splits or data.OpenSplits(config.data))['train']
    counts = tuple(int(n) for n in data.class_counts_of(train, config.data))
    updates['loss.class_counts'] = counts
    logging.info('Training examples per class: %s.', counts)
  if not updates:
    return config
  return configuration.apply_overrides(copy.deepcopy(config), updates)


def best_metric(
  config: ml_collections.ConfigDict, group_names: tuple[str, ...]
) -> str:
  """The saved metric that picks the best checkpoint: `eval_<best_metric>`."""
  name = config.best_metric
  if name not in BEST_METRICS:
    raise errors.UserError(
      f'config.best_metric={name!r}: choose one of {list(BEST_METRICS)}.'
    )
  if name in GROUP_METRICS and len(group_names) < 2:
    raise errors.UserError(
      f'config.best_metric={name!r} needs groups, but '
      f'{config.data.name!r} has one ({group_names[0]!r}); use '
      "best_metric='accuracy'."
    )
  return f'eval_{name}'


def create_manager(
  config: ml_collections.ConfigDict,
  workdir: str,
  group_names: tuple[str, ...],
):
  """The checkpoint manager of a run: keeps the last k and the best; saves in
  the background unless `config.async_checkpoints` is False."""
  return checkpointing.create_manager(
    workdir,
    config.keep_checkpoints,
    best_metric(config, group_names),
    async_save=config.async_checkpoints,
  )


def create_objective(config: ml_collections.ConfigDict) -> objectives.Objective:
  """The objective of `config.loss` (built once per run, in `build`)."""
  return objectives.create(config.loss, seed=config.seed)


@dataclasses.dataclass(frozen=True)
class Schedule:
  """Durations in steps (train-step calls), resolved from the config."""

  micro_batch_size: int
  steps_per_epoch: int
  num_train_steps: int
  log_every: int
  eval_every: int
  checkpoint_every: int
  eval_batch_size: int = 0  # Global (all devices); 0 = config.eval_batch_size.


# An evaluated example costs about a third of a trained one (a forward pass
# against forward + backward); the default cadence keeps evaluation within
# EVAL_BUDGET of the training time.
EVAL_COST_PER_EXAMPLE = 1 / 3
EVAL_BUDGET = 0.05


def default_eval_every(
  steps_per_epoch: int,
  micro_batch_size: int,
  num_eval_examples: int,
  eval_batch_size: int,
) -> int:
  """Steps between evaluations when `config.eval_every_steps` is -1.

  The larger of one epoch and the fewest steps for which an evaluation of
  the split (padded to whole eval batches) costs at most `EVAL_BUDGET` (5 %)
  of the training between two evaluations, an evaluated example costing
  `EVAL_COST_PER_EXAMPLE` (1/3) of a trained one:
    max(steps_per_epoch,
        ceil(padded_eval_examples / (3 * 0.05 * micro_batch_size)))
  E.g. Pets (~3,310 train, ~370 validation images) at micro-batch and eval
  batch 80: max(41, 34) = 41, once per epoch; on 8 devices at 80 each
  (micro-batch and eval batch 640): max(5, 7) = 7 steps.
  """
  if num_eval_examples <= 0:
    return steps_per_epoch
  batches = -(-num_eval_examples // eval_batch_size)
  cost = batches * eval_batch_size * EVAL_COST_PER_EXAMPLE
  return max(
    steps_per_epoch, int(np.ceil(cost / (EVAL_BUDGET * micro_batch_size)))
  )


# A checkpoint stalls the loop for the device-to-host copy of the state (a
# ResNet-50 with Adam: ~290 MB) and Orbax's synchronous part, up to ~1 s, and
# a save waits for the previous write if that still runs. A ResNet-50 step
# on an H100/H200 takes ~0.1 s: CHECKPOINT_MIN_STEPS steps (~50 s) between
# saves keep checkpointing within CHECKPOINT_BUDGET of the training time
# (estimates: not yet measured on a GPU). On the CPU steps are slow next to a
# save: every evaluation, as before.
CHECKPOINT_BUDGET = 0.02
CHECKPOINT_MIN_STEPS = 500


def default_checkpoint_every(eval_every: int, backend: str) -> int:
  """Steps between checkpoints when `config.checkpoint_every_steps` is -1.

  On the CPU backend, every evaluation (`eval_every`); on accelerators the
  smallest multiple of `eval_every` of at least `CHECKPOINT_MIN_STEPS`
  (500), so that checkpointing stays within `CHECKPOINT_BUDGET` (2 %) of the
  training time. Always a multiple of `eval_every`: a checkpoint lands on an
  evaluation step, where the per-device BatchNorm statistics are averaged
  anyway, so the cadence never changes the training's numbers. E.g.
  eval_every 41 on a GPU: 533; on the CPU: 41.
  """
  if backend == 'cpu':
    return eval_every
  return eval_every * -(-CHECKPOINT_MIN_STEPS // eval_every)


def _batch_sizes(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """(global batch per optimizer step, global eval batch) of the config.

  `config.per_device_batch_size` > 0 makes the micro-batch that many
  examples per device (global batch = per_device x devices x
  accumulation_steps; `config.batch_size` is then not read), and the eval
  batch `config.per_device_eval_batch_size` (or, when 0, the same
  per-device size) per device; 0 keeps the global `batch_size` and
  `eval_batch_size`.
  """
  per_device = config.per_device_batch_size
  per_device_eval = config.per_device_eval_batch_size
  for name, value in (
    ('per_device_batch_size', per_device),
    ('per_device_eval_batch_size', per_device_eval),
  ):
    if not isinstance(value, int) or value < 0:
      raise errors.UserError(
        f'config.{name} = {value!r} must be an integer >= 0 (0 = use the '
        'global batch_size / eval_batch_size).'
      )
  devices = jax.device_count()
  batch_size = (
    per_device * devices * config.accumulation_steps
    if per_device
    else config.batch_size
  )
  per_device_eval = per_device_eval or per_device
  eval_batch_size = (
    per_device_eval * devices if per_device_eval else config.eval_batch_size
  )
  return batch_size, eval_batch_size


def resolve_schedule(
  config: ml_collections.ConfigDict,
  num_train_examples: int,
  num_eval_examples: int = 0,
) -> Schedule:
  """Turns epochs / steps / cadences of the config into step counts.

  Batch sizes: see `_batch_sizes` (`per_device_batch_size` scales the
  global batch with `jax.device_count()`). `eval_every_steps` = -1 resolves
  to `default_eval_every` (at least an epoch, and evaluation <= 5 % of the
  training time by the example count of the validation split,
  `num_eval_examples`; 0 = once per epoch); `checkpoint_every_steps` = -1
  to `default_checkpoint_every` (every evaluation on the CPU, at least every
  500 steps on accelerators: checkpointing <= 2 % of the training time).
  """
  configuration.check_training_config(config)
  batch_size, eval_batch_size = _batch_sizes(config)
  if batch_size % config.accumulation_steps:
    raise errors.UserError(
      f'config.batch_size={batch_size} is not divisible by '
      f'config.accumulation_steps={config.accumulation_steps}; set '
      '--config.batch_size to a multiple of it (or change accumulation_steps).'
    )
  micro = batch_size // config.accumulation_steps
  devices = jax.device_count()
  if micro % devices:
    raise errors.UserError(
      f'The micro-batch batch_size/accumulation_steps = {micro} must be divisible '
      f'by the number of devices ({devices}); change config.batch_size or '
      'config.accumulation_steps (or set config.per_device_batch_size).'
    )
  steps_per_epoch = max(1, num_train_examples // micro)
  total = (
    config.num_train_steps
    if config.num_train_steps > 0
    else int(round(config.num_epochs * steps_per_epoch))
  )
  eval_every = (
    config.eval_every_steps
    if config.eval_every_steps > 0
    else default_eval_every(
      steps_per_epoch, micro, num_eval_examples, eval_batch_size
    )
  )
  ckpt_every = (
    config.checkpoint_every_steps
    if config.checkpoint_every_steps > 0
    else default_checkpoint_every(eval_every, jax.default_backend())
  )
  return Schedule(
    micro,
    steps_per_epoch,
    total,
    max(1, config.log_every_steps),
    eval_every,
    ckpt_every,
    eval_batch_size,
  )


def figures_due(config: ml_collections.ConfigDict, evaluation: int) -> bool:
  """Whether the `evaluation`-th periodic evaluation draws the figures.

  `config.figure_every_evals`: 0 (the default) draws them only at the end of
  training, N > 0 at every N-th evaluation too (drawing them stalls the
  steps).
  """
  every = config.figure_every_evals
  if not isinstance(every, int) or every < 0:
    raise errors.UserError(
      f'config.figure_every_evals = {every!r} must be an integer >= 0 '
      '(0 = figures only at the end of training, N = every N-th evaluation).'
    )
  return every > 0 and evaluation % every == 0


@dataclasses.dataclass
class Setup:
  """What phase 1 builds."""

  model: models.ResNet
  objective: objectives.Objective
  record: run_record.RunRecord
  splits: data.OpenSplits
  schedule: Schedule
  tx: Any
  train_iter: Any
  p_train_step: Callable
  p_eval_step: Callable
  p_predict: Callable


def build(
  config: ml_collections.ConfigDict,
  splits: data.OpenSplits | None = None,
) -> Setup:
  """Phase 1: model, objective, optimizer, compiled steps, the train data and
  the run record (`run_record.RunRecord`), from the splits opened once
  (`splits`; None: opened here)."""
  splits = splits or data.OpenSplits(config.data)
  primary = splits.primary()
  train = primary['train']
  num_classes = len(
    data.class_names_of(train.builder, config.data.name, config.data.task)
  )
  model = model_config.create_model(
    config, num_classes, bn_axis_name=step_lib.AXIS_NAME
  )
  objective = create_objective(config)
  cam_size = models.cam_size(model, config.data.image_size)
  record = run_record.RunRecord.from_data(
    config.data,
    primary,
    cam_size=cam_size,
    head=objectives.head(config.loss.name),
  )
  group_names = record.group_names
  schedule = resolve_schedule(config, len(train), len(primary['validation']))
  tx = optimizers.create_optimizer(
    config.optimizer,
    max(1, schedule.steps_per_epoch // config.accumulation_steps),
    max(1, schedule.num_train_steps // config.accumulation_steps),
    config.accumulation_steps,
  )
  train_iter = data.create_train_iterator(
    config.data,
    cam_size=cam_size,
    global_batch_size=schedule.micro_batch_size,
    num_devices=jax.local_device_count(),
    seed=config.seed,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    source=train,
  )
  return Setup(
    model=model,
    objective=objective,
    record=record,
    splits=splits,
    schedule=schedule,
    tx=tx,
    train_iter=train_iter,
    p_train_step=step_lib.pmapped_train_step(
      objective, normalize=config.data.normalize
    ),
    p_eval_step=step_lib.pmapped_eval_step(
      len(group_names) if len(group_names) > 1 else 0
    ),
    p_predict=jax.pmap(step_lib.predict_step),
  )


def batch_stats_averager(config) -> Callable | None:
  """With per-device BatchNorm (`config.model.sync_batch_norm` False): a
  pmapped function giving every device the mean of the devices' replicated
  batch statistics; None when they are synchronised (already equal)."""
  if config.model.sync_batch_norm:
    return None
  return jax.pmap(
    lambda stats: jax.lax.pmean(stats, step_lib.AXIS_NAME),
    axis_name=step_lib.AXIS_NAME,
  )


def eval_iterator(
  config: ml_collections.ConfigDict, setup: Setup, split: str, **kwargs
) -> Iterator[dict]:
  """Batches `(local devices, per-device batch, ...)` of one split, in order
  (the split opened once per run, `setup.splits`)."""
  return data.create_eval_iterator(
    config.data,
    split,
    source=setup.splits[split],
    cam_size=setup.record.cam_size,
    global_batch_size=setup.schedule.eval_batch_size or config.eval_batch_size,
    num_devices=jax.local_device_count(),
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    **kwargs,
  )
