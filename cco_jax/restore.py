"""A trained run, restored: its config, model, variables and chosen step.

`restore_run(workdir, step='best')` reads `workdir/config.json`, rebuilds the
model and restores one checkpoint of `workdir/checkpoints`:

  'best'   the highest validation accuracy among kept checkpoints
           (`CheckpointManager.best_step()`); the latest when none has metrics;
  'last'   the latest checkpoint;
  an int   that step (an error lists the steps that exist).

The model's variables come back unreplicated, on the default device; nothing
here imports the training loop, so evaluation and explanation stay light.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import ml_collections

from cco_jax import checkpointing
from cco_jax import config_schema
from cco_jax import errors
from cco_jax import models
from cco_jax import optimizers
from cco_jax import train_setup
from cco_jax import train_step as step_lib
from cco_jax.data import info

STEP_CHOICES = ('best', 'last')


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The training config saved in `workdir/config.json`.

  JSON has no tuples, so every list comes back as a tuple (as the config files
  write them, e.g. `model.stage_sizes`); fields the file lacks (written by an
  older version) get the schema's defaults (`config_schema.load_saved`).

  Raises:
    FileNotFoundError: `workdir/config.json` does not exist.
  """
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise FileNotFoundError(
      f'{path} does not exist: --workdir must be the directory of a training '
      'run (python -m experiments.pets --workdir=...), which writes it.'
    )
  return config_schema.load_saved(path)


@dataclasses.dataclass
class Run:
  """A restored training run.

  Attributes:
    config: the run's config.
    workdir: the run's directory.
    model: the `models.ResNet` (no pmap axis).
    variables: `{'params', 'batch_stats'}`, unreplicated.
    step: the restored step.
    checkpoint: how it was chosen: 'best', 'last' (also the fallback of 'best'
      when no checkpoint has metrics) or 'step'.
    cam_size: `(h, w)` of the maps.
    class_names: the classes of the head, in order.
  """

  config: ml_collections.ConfigDict
  workdir: str
  model: models.ResNet
  variables: Any
  step: int
  checkpoint: str
  cam_size: tuple[int, int]
  class_names: tuple[str, ...]

  def predict_fn(self):
    """A jitted `images (B, S, S, 3) -> (logits (B, C), cams (B, h, w, C))`."""
    model, variables = self.model, self.variables
    apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
    return lambda images: apply(variables, images)


def choose_step(manager, step) -> tuple[int, str]:
  """`(step, how)` for `step` in 'best' | 'last' | int (module docstring)."""
  steps = sorted(manager.all_steps())
  if not steps:
    raise FileNotFoundError(
      f'No checkpoint in {manager.directory}: train first '
      '(python -m experiments.pets --workdir=...).'
    )
  if step == 'best':
    best = manager.best_step()
    return (best, 'best') if best is not None else (steps[-1], 'last')
  if step == 'last':
    return steps[-1], 'last'
  try:
    wanted = int(step)
  except (TypeError, ValueError):
    raise errors.UserError(
      f"step must be 'best', 'last' or an int; got {step!r}."
    ) from None
  if wanted not in steps:
    raise errors.UserError(
      f'No checkpoint at step {wanted} in {manager.directory}; kept steps: '
      f'{steps}.'
    )
  return wanted, 'step'


def restore_run(
  workdir: str,
  *,
  step: int | str = 'best',
  config: ml_collections.ConfigDict | None = None,
) -> Run:
  """Rebuilds the model of `workdir` and restores one checkpoint.

  Args:
    workdir: a training run's directory (config.json, checkpoints/).
    step: 'best', 'last' or a step number (module docstring).
    config: the run's config with overrides (default: `load_config`).

  Raises:
    FileNotFoundError: no config.json or no checkpoint.
    errors.UserError (a ValueError): a bad `step`, or one not kept.
  """
  config = load_config(workdir) if config is None else config
  if not os.path.isdir(os.path.join(workdir, 'checkpoints')):
    raise FileNotFoundError(
      f'{workdir}/checkpoints does not exist: train first '
      '(python -m experiments.pets --workdir=...).'
    )
  class_names = info.class_names(config.data)
  model = train_setup.create_model(config, len(class_names))
  # Only the state's structure, shapes and dtypes matter (nothing is compiled
  # or run); the optimizer's step counts don't change its structure.
  tx = optimizers.create_optimizer(
    config.optimizer, 1, 1, config.accumulation_steps
  )
  rng = jax.random.key(0, impl=config.rng_impl or None)
  template = jax.eval_shape(
    lambda: step_lib.create_train_state(
      rng,
      model,
      config.data.image_size,
      tx,
      objective_state=train_setup.create_objective(config).init_state(),
    )
  )
  manager = train_setup.create_manager(config, workdir)
  try:
    chosen, how = choose_step(manager, step)
    state, _, _, chosen = checkpointing.restore(manager, template, chosen)
  finally:
    manager.close()
  return Run(
    config=config,
    workdir=workdir,
    model=model,
    variables={'params': state.params, 'batch_stats': state.batch_stats},
    step=int(chosen),
    checkpoint=how,
    cam_size=models.cam_size(model, config.data.image_size),
    class_names=tuple(class_names),
  )
