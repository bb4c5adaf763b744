"""Optimizer and learning-rate schedule from `config.optimizer`.

`create_optimizer(config.optimizer, steps_per_epoch, num_train_steps,
accumulation_steps)` returns an optax transformation; with accumulation it is
wrapped in `optax.MultiSteps`, so one call of the train step is one micro-batch
and the parameters change every `accumulation_steps` calls.
"""

from __future__ import annotations

import ml_collections
import optax

from cco_jax import errors

OPTIMIZERS = ('adam', 'adamw', 'sgd')
SCHEDULES = ('constant', 'cosine')


def create_learning_rate_fn(
  config: ml_collections.ConfigDict, steps_per_epoch: int, num_train_steps: int
) -> optax.Schedule:
  """Constant, or linear warmup then cosine decay to zero, in optimizer steps."""
  if config.schedule not in SCHEDULES:
    raise errors.UserError(
      f'config.optimizer.schedule={config.schedule!r} is unknown; choose one '
      f'of {SCHEDULES} (--config.optimizer.schedule=NAME).'
    )
  warmup_steps = int(config.warmup_epochs * steps_per_epoch)
  if config.schedule == 'constant':
    main = optax.constant_schedule(config.learning_rate)
  else:
    main = optax.cosine_decay_schedule(
      config.learning_rate, max(1, num_train_steps - warmup_steps)
    )
  if not warmup_steps:
    return main
  warmup = optax.linear_schedule(0.0, config.learning_rate, warmup_steps)
  return optax.join_schedules([warmup, main], [warmup_steps])


def create_optimizer(
  config: ml_collections.ConfigDict,
  steps_per_epoch: int,
  num_train_steps: int,
  accumulation_steps: int = 1,
) -> optax.GradientTransformation:
  """Builds the optimizer named by `config.name` (see `OPTIMIZERS`)."""
  if config.name not in OPTIMIZERS:
    raise errors.UserError(
      f'config.optimizer.name={config.name!r} is unknown; choose one of '
      f'{OPTIMIZERS} (--config.optimizer.name=NAME).'
    )
  schedule = create_learning_rate_fn(config, steps_per_epoch, num_train_steps)
  if config.name == 'adam':
    tx = optax.adam(schedule)
    if config.weight_decay:
      tx = optax.chain(optax.add_decayed_weights(config.weight_decay), tx)
  elif config.name == 'adamw':
    tx = optax.adamw(schedule, weight_decay=config.weight_decay)
  else:
    tx = optax.sgd(schedule, momentum=config.momentum, nesterov=True)
    if config.weight_decay:
      tx = optax.chain(optax.add_decayed_weights(config.weight_decay), tx)
  if config.grad_clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx)
  if accumulation_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=accumulation_steps)
  return tx
