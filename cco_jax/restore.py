"""A trained model, restored for use: config, run record, model, variables, step.

`restore_model(workdir, step='best')` reads `workdir/config.json` and the run
record `workdir/run.json` (`cco_jax.run_record`), rebuilds the model
(`model_config.create_model`) and restores only its `params` and
`batch_stats` from one checkpoint of `workdir/checkpoints` (a partial Orbax
restore: no optimizer, no train state, no data). `step` is

  'best'   the highest validation accuracy among kept checkpoints
           (`CheckpointManager.best_step()`); the latest when none has metrics;
  'last'   the latest checkpoint;
  an int   that step (an error lists the steps that exist).

A workdir written before run records (no `run.json`) is refused in one line
that names the conversion command (`python -m experiments.run_record
--workdir=...`, which derives the record once from the config and the data):
using a model never opens its training data.
The variables come back unreplicated, on the default device. Nothing here
imports the training loop, its optimizer or its losses (a test checks it), so
evaluation and explanation stay light. ("Restore" means this; the training
loop *resumes* from a checkpoint.)
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from etils import epath
import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp

from cco_jax import checkpointing
from cco_jax import config_schema
from cco_jax import errors
from cco_jax import integrity
from cco_jax import model_config
from cco_jax import models
from cco_jax import run_record

STEP_CHOICES = ('best', 'last')
VARIABLES = ('params', 'batch_stats')


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
  return config_schema.load_saved(path, complete_loss=False)


@dataclasses.dataclass(frozen=True)
class TrainedModel:
  """A trained model, restored from a training run's directory.

  Attributes:
    config: the run's config.
    record: the run's record (`run_record.RunRecord`): classes, groups,
      image size, normalisation, ...
    workdir: the run's directory.
    model: the `models.ResNet` (no pmap axis).
    variables: `{'params', 'batch_stats'}`, unreplicated.
    step: the restored step.
    checkpoint: how it was chosen: 'best', 'last' (also the fallback of 'best'
      when no checkpoint has metrics) or 'step'.
  """

  config: ml_collections.ConfigDict
  record: run_record.RunRecord
  workdir: str
  model: models.ResNet
  variables: Any
  step: int
  checkpoint: str

  @property
  def cam_size(self) -> tuple[int, int]:
    """`(h, w)` of the maps."""
    return self.record.cam_size

  @property
  def class_names(self) -> tuple[str, ...]:
    """The classes of the head, in order."""
    return self.record.class_names

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
      f'{steps}. Pass --step=best, --step=last or one of these.'
    )
  return wanted, 'step'


def restore_variables(
  manager, step, model: models.ResNet, image_size: int
) -> tuple[dict, int, str]:
  """`(variables, step, how)`: `{'params', 'batch_stats'}` of `model` from
  the checkpoint `choose_step(manager, step)` chooses, nothing else.

  A partial restore of the item 'state' onto the variables' shapes and dtypes
  (from `jax.eval_shape` of `model.init` on `image_size` images; nothing is
  computed); their checksums are verified against the checkpoint's
  `integrity` item (`cco_jax.integrity`; checkpoints older than checksums
  have none).

  Raises:
    FileNotFoundError, errors.UserError: as `choose_step`.
    errors.UserError: the checkpoint does not hold these variables (e.g. the
      config's model differs from the one that wrote it); names the step.
  """
  step, how = choose_step(manager, step)
  images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  shapes = jax.eval_shape(
    lambda x: model.init(jax.random.key(0), x, train=False), images
  )
  target = {
    name: jax.tree.map(ocp.utils.to_shape_dtype_struct, shapes.get(name, {}))
    for name in VARIABLES
  }
  items = {
    'state': ocp.args.PyTreeRestore(
      item=target,
      restore_args=ocp.checkpoint_utils.construct_restore_args(target),
      partial_restore=True,
    )
  }
  # Checkpoints written before checksums existed have no 'integrity' item.
  verified = (epath.Path(manager.directory) / str(step) / 'integrity').exists()
  if verified:
    items['integrity'] = ocp.args.JsonRestore()
  try:
    restored = manager.restore(step, args=ocp.args.Composite(**items))
    variables = {name: restored['state'][name] for name in VARIABLES}
    # Orbax restores what it finds: the structure (jax.tree.map raises),
    # shapes and dtypes must be this model's.
    differ = jax.tree_util.tree_flatten_with_path(
      jax.tree.map(
        lambda x, t: (x.shape, x.dtype) != (t.shape, t.dtype),
        variables,
        target,
      )
    )[0]
    wrong = [jax.tree_util.keystr(path) for path, bad in differ if bad]
    if wrong:
      raise ValueError(f'shapes or dtypes differ at {wrong[0]}')
    if verified:
      integrity.verify(
        {'state': jax.device_get(variables)},
        restored['integrity'],
        subset=True,
      )
  except integrity.ChecksumMismatch as e:
    raise errors.UserError(
      f'The checkpoint {manager.directory}/{step} is corrupt: {e}. Choose '
      'another step (--step=N; kept steps: '
      f'{sorted(manager.all_steps())}).'
    ) from e
  except Exception as e:  # pylint: disable=broad-except
    first = str(e).strip().splitlines()[0] if str(e).strip() else ''
    raise errors.UserError(
      f"The checkpoint {manager.directory}/{step} does not hold this model's "
      f'params and batch_stats ({type(e).__name__}: {first[:300]}); restore '
      'it with the config.json it was trained with.'
    ) from e
  return jax.device_put(variables), step, how


def restore_model(
  workdir: str,
  *,
  step: int | str = 'best',
  config: ml_collections.ConfigDict | None = None,
) -> TrainedModel:
  """The model of `workdir` with the variables of one checkpoint.

  Args:
    workdir: a training run's directory (config.json, run.json,
      checkpoints/).
    step: 'best', 'last' or a step number (module docstring).
    config: the run's config with overrides (default: `load_config`).

  Raises:
    FileNotFoundError: no config.json or no checkpoint.
    errors.UserError (a ValueError): a bad `step`, one not kept, or a
      checkpoint of another model.
    run_record.RecordError: an unreadable run.json.
  """
  config = load_config(workdir) if config is None else config
  if not os.path.isdir(os.path.join(workdir, 'checkpoints')):
    raise FileNotFoundError(
      f'{workdir}/checkpoints does not exist: train first '
      '(python -m experiments.pets --workdir=...).'
    )
  record = run_record.RunRecord.load(run_record.path_of(workdir))
  model = model_config.create_model(config, len(record.class_names))
  manager = checkpointing.create_manager(
    workdir,
    config.keep_checkpoints,
    f'eval_{config.best_metric}',
  )
  try:
    variables, chosen, how = restore_variables(
      manager, step, model, record.image_size
    )
  finally:
    manager.close()
  return TrainedModel(
    config=config,
    record=record,
    workdir=workdir,
    model=model,
    variables=variables,
    step=int(chosen),
    checkpoint=how,
  )
