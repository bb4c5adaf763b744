"""The training loop: config + workdir in, trained model and records out.

`train_and_evaluate(config, workdir)` runs in named phases:
  1. `build` the model, objective, optimizer and data iterators from the config
     (`train_setup`);
  2. `resume_or_create` the state (resuming from `workdir/checkpoints`);
  3. `check_identity` of the logit-sum identity (at start and after a resume;
     `train_evaluation`);
  4. the step loop, with periodic logging, evaluation and checkpoints (figures
     at the end, or every `figure_every_evals` evaluations); batches reach
     the devices from a background thread (`train_input.Prefetch`), the
     validation batches are read once (`train_input.EvalSplit`) and
     checkpoints are written in the background (waited for before the final
     evaluation and at close);
  5. a final evaluation on validation, test and (species models) Cats-vs-Dogs
     (`train_evaluation.final_evaluation`).

The config is completed from the library's schema first
(`config_schema.complete`: unknown keys refused, missing ones at their
defaults). Everything it writes lands in `workdir`: `metrics.jsonl`,
`tensorboard/`, `config.json`, `checkpoints/`, `figures/`. A "step" is one
call of the train step (one micro-batch when `accumulation_steps > 1`). The
checks that stop a diverged run (`NonFiniteLoss`, `IdentityViolation`) are in
`train_guards`.

Guarantees: one run per workdir (`runtime.workdir_lock`; the second fails at
once); every step's non-finite flag is checked before anything is evaluated or
saved, and an evaluation with a non-finite loss or identity error stops the run
before its checkpoint, so no saved state has diverged; a resume refuses a
changed model/data config before touching `config.json`, falls back past
unreadable or corrupt checkpoints (`checkpointing.restore_newest`), and drops
records of steps after the restored one from `metrics.jsonl`; SIGTERM or
SIGINT saves the next step and raises `preemption.Preempted` (docs/faults.md).
On several hosts every process runs the same loop; only process 0 writes
records, figures and `config.json`.
"""

from __future__ import annotations

import os
from typing import Any

from absl import logging
from etils import epath
import jax
import ml_collections
import numpy as np

from cco_jax import checkpointing
from cco_jax import config_schema
from cco_jax import configuration
from cco_jax import data
from cco_jax import early_stopping
from cco_jax import errors
from cco_jax import metric_writers
from cco_jax import preemption
from cco_jax import pretrained
from cco_jax import run_record
from cco_jax import train_evaluation
from cco_jax import train_figures
from cco_jax import train_guards
from cco_jax import train_input
from cco_jax import train_setup
from cco_jax import train_step as step_lib
from cco_jax.data import prepare_record
from cco_jax.runtime import environment
from cco_jax.runtime import workdir_lock

# ----------------------------------------------------------------------------
# Phase 2: a fresh or restored state.
# ----------------------------------------------------------------------------


def resume_or_create(
  config, setup: train_setup.Setup, manager
) -> tuple[Any, jax.Array, int, dict]:
  """Phase 2: the unreplicated state, the RNG, the first step to run and
  the loop's saved state (`checkpointing.Restored.loop_state`; {} if new).

  Resumes from the newest checkpoint that restores and verifies; newer
  unreadable or corrupt ones are logged and moved to
  `workdir/unrestorable_checkpoints/` (kept).
  """
  rng = jax.random.key(config.seed, impl=config.rng_impl or None)
  rng, init_rng = jax.random.split(rng)
  state = step_lib.create_train_state(
    init_rng,
    setup.model,
    config.data.image_size,
    setup.tx,
    objective_state=setup.objective.init_state(),
  )
  if manager.latest_step() is None:
    state = pretrained.init_train_state(
      state, setup.model, config.model.init_from, init_rng
    )
    return state, rng, 0, {}
  restored = checkpointing.restore_newest(manager, state)
  if restored.unrestorable:
    checkpointing.set_aside(manager, restored.unrestorable)
  setup.train_iter.set_state(restored.data_state)
  logging.info('Resumed from step %d of %s.', restored.step, manager.directory)
  return restored.state, restored.rng, restored.step, restored.loop_state


# ----------------------------------------------------------------------------
# Phase 4: the loop.
# ----------------------------------------------------------------------------


class Run:
  """Holds what the loop's phases share: config, setup, writers, manager."""

  def __init__(
    self,
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    splits: data.OpenSplits | None = None,
  ):
    self.config = config
    self.workdir = epath.Path(workdir)
    self.is_chief = jax.process_index() == 0
    self.figure_dir = self.workdir / 'figures'
    self.setup = train_setup.build(config, splits)
    self.manager = train_setup.create_manager(
      config, workdir, self.setup.record.group_names
    )
    self.writer = metric_writers.MetricWriter(workdir, enabled=self.is_chief)
    budget_mb = config.eval_cache_mb
    if not isinstance(budget_mb, (int, float)) or budget_mb < 0:
      raise errors.UserError(
        f'config.eval_cache_mb = {budget_mb!r} must be a number >= 0 (MiB '
        'per device for the validation batches; 0 = read them at every '
        'evaluation).'
      )
    self.validation = train_input.EvalSplit(
      lambda: train_setup.eval_iterator(config, self.setup, 'validation'),
      int(budget_mb * 2**20),
      jax.local_device_count(),
    )
    self._average_batch_stats = train_setup.batch_stats_averager(config)
    self._auc = train_evaluation.auc_spec(config, self.setup)

  def close(self) -> None:
    """Stops the input workers, waits for the last checkpoint and closes the
    writers and the manager (a failed background save raises `OSError`)."""
    try:
      train_input.close_iterator(self.setup.train_iter)
      self.writer.close()
      checkpointing.wait(self.manager)
    finally:
      self.manager.close()

  def consistent(self, state):
    """`state` with the devices' BatchNorm statistics averaged when they are
    kept per device (`config.model.sync_batch_norm` False), so evaluation and
    checkpoints see one model; unchanged otherwise."""
    if self._average_batch_stats is None:
      return state
    return state.replace(
      batch_stats=self._average_batch_stats(state.batch_stats)
    )

  def save_config(self) -> None:
    """Writes `config.json` and the run record `run.json`, and appends what
    this start runs on to `environment.json`."""
    if self.is_chief:
      (self.workdir / 'config.json').write_text(
        self.config.to_json_best_effort(indent=2)
      )
      self.setup.record.save(run_record.path_of(self.workdir))
      environment.append(str(self.workdir))

  def evaluate_split(self, state, split: str, **kwargs) -> dict:
    """Evaluates `split`; validation from the batches read once per run;
    AUC of `config.auc_tasks` on the primary dataset's splits."""
    auc = self._auc if split != 'ood' else None
    if split == 'validation' and not kwargs:
      return train_evaluation.evaluate(
        self.setup.p_eval_step,
        state,
        self.validation,
        self.setup.record.group_names,
        auc,
      )
    batches = train_setup.eval_iterator(
      self.config, self.setup, split, **kwargs
    )
    try:
      return train_evaluation.evaluate(
        self.setup.p_eval_step,
        state,
        batches,
        self.setup.record.group_names,
        auc,
      )
    finally:
      train_input.close_iterator(batches)

  def save_figures(self, state, step: int) -> None:
    """CAM grid of validation examples and the learning curves.

    Every process runs the (pmapped) prediction, which a multi-process pmap
    needs; process 0 draws its examples and writes the files.
    """
    if not self.config.num_figure_examples:
      return
    batch = self.validation.first()
    logits, cams = self.setup.p_predict(state, batch['image'])
    if self.is_chief:
      train_figures.save(
        self.figure_dir,
        self.workdir,
        self.writer,
        batch,
        logits,
        cams,
        class_names=self.setup.record.class_names,
        num_examples=self.config.num_figure_examples,
        step=step,
      )

  def checkpoint(
    self,
    state,
    rng,
    step: int,
    data_state,
    metrics: dict | None,
    pending: list[dict],
    early: early_stopping.EarlyStopping | None = None,
  ) -> None:
    """Saves `step`, with the metrics of the steps not logged yet and the
    early-stopping state."""
    loop_state = {'pending_metrics': preemption.pending_to_json(pending)}
    if early is not None:
      loop_state['early_stopping'] = early.to_json()
    checkpointing.save(
      self.manager,
      step,
      step_lib.unreplicate(state),
      rng,
      data_state,
      metrics,
      loop_state,
      record=self.setup.record.to_json(),
    )
    logging.info(
      'Saved the checkpoint of step %d in %s.', step, self.manager.directory
    )

  def last_good_checkpoint(self, state) -> str:
    """What a stopped run leaves to resume from, in words (only checkpoints
    that restore and verify; `state`: the replicated state, for shapes)."""
    return train_guards.last_good_checkpoint(
      self.manager, step_lib.unreplicate(state)
    )


def summarise_metrics(step_metrics: list[dict], first_step: int) -> dict:
  """Means of the logged steps' metrics; raises on a non-finite step."""
  train_guards.check_finite_steps(step_metrics, first_step)
  stacked = jax.tree.map(
    lambda *x: np.stack([np.asarray(v)[0] for v in x]), *step_metrics
  )
  stacked.pop('nonfinite')
  return {f'train_{k}': float(np.mean(v)) for k, v in stacked.items()}


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str | os.PathLike
) -> dict:
  """Trains, evaluates and checkpoints as `config` says; returns final metrics.

  `workdir`: a path or `etils.epath.Path` (every file goes through `epath`;
  on an object store the workdir lock is skipped with a warning).

  Raises:
    workdir_lock.WorkdirInUse: another process is running in `workdir`.
    errors.UserError (a ValueError): a key the schema does not have
      (`config_schema.complete`; nothing is written), a bad value, or a config
      that differs from the checkpoints' in `workdir` (nothing in `workdir`
      is changed then).
    NonFiniteLoss, IdentityViolation: the model diverged; nothing of the
      diverged state was saved and the message names the last good checkpoint.
  """
  config = config_schema.complete(config, 'the config')  # Before any write.
  # The options given to experiments.prepare (data/prepare_record.py).
  prepare_record.adopt(config.data)
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  lock = workdir_lock.WorkdirLock(workdir, jax.process_index()).acquire()
  run = None
  try:
    splits = data.OpenSplits(config.data)  # Each opened once.
    config = train_setup.with_data_fields(config, splits)
    configuration.check_resumable(config, workdir)
    run = Run(config, workdir, splits)
    return _train_and_evaluate(run)
  finally:
    if run is not None:
      run.close()
    lock.release()


def _rewritten_on_resume(record: dict) -> bool:
  """A start (identity) or final-evaluation record, written again on resume."""
  keys = set(record) - {'step'}
  return keys == {'identity_error'} or all(
    k.split('_')[0] in train_evaluation.FINAL_SPLITS for k in keys
  )


def _train_and_evaluate(run: Run) -> dict:
  config, setup, schedule = run.config, run.setup, run.setup.schedule
  state, rng, start_step, loop_state = resume_or_create(
    config, setup, run.manager
  )
  if start_step > schedule.num_train_steps:
    raise errors.UserError(
      f'{run.workdir} has already trained {start_step} steps, more than the '
      f'{schedule.num_train_steps} this config asks for (num_train_steps='
      f'{config.num_train_steps}, num_epochs={config.num_epochs}). Ask for at '
      f'least {start_step} steps to continue (or to evaluate again), or use '
      'a new --workdir.'
    )
  run.writer.discard_after(start_step, rewritten=_rewritten_on_resume)
  run.save_config()
  train_setup.figures_due(
    config, 0
  )  # A bad figure_every_evals fails before any step.
  state = step_lib.replicate(state)
  identity = train_evaluation.check_identity(
    config,
    setup,
    state,
    'after restore' if start_step else 'at initialisation',
    run.validation.first(),
  )
  run.writer.write(start_step, {'identity_error': identity})
  logging.info(
    'Training steps %d..%d (%d per epoch, micro-batch %d) on %d devices%s; '
    'records in %s, checkpoints in %s.',
    start_step,
    schedule.num_train_steps,
    schedule.steps_per_epoch,
    schedule.micro_batch_size,
    jax.device_count(),
    f' of {jax.process_count()} processes' if jax.process_count() > 1 else '',
    run.workdir,
    run.manager.directory,
  )

  progress = metric_writers.ProgressLogger(schedule.num_train_steps, start_step)
  # Batches on the devices, each with the iterator state after it (for the
  # checkpoint), read ahead by a thread.
  batches = train_input.Prefetch(setup.train_iter, 2)
  # Steps since the last log (saved with each checkpoint) were checked.
  pending = preemption.pending_from_json(loop_state.get('pending_metrics', []))
  pending_from, checked = start_step - len(pending), len(pending)
  step = start_step
  early = early_stopping.EarlyStopping.from_json(
    loop_state.get('early_stopping'), config.early_stopping_patience
  )
  end = start_step if early.stopped else schedule.num_train_steps
  if early.stopped:
    logging.info(
      'This run stopped early at step %d (best %s at step %d): no more '
      'training.',
      start_step,
      early.best,
      early.best_step,
    )
  notice = preemption.Notice().install()
  try:
    for step in range(start_step + 1, end + 1):
      batch, data_state = next(batches)
      state, metrics = setup.p_train_step(state, batch)
      if step == start_step + 1 and step % schedule.log_every:
        progress.compiled(step)  # The ETA leaves compilation out.
      pending.append(metrics)
      last = step == schedule.num_train_steps
      stop = notice.reached(step)  # SIGTERM/SIGINT: save this step, stop.
      due_log = step % schedule.log_every == 0 or last
      due_eval = step % schedule.eval_every == 0 or last
      due_save = step % schedule.checkpoint_every == 0 or last or stop
      if not (due_log or due_eval or due_save):
        continue
      # Every step since the last check, before anything is evaluated or saved.
      train_guards.check_finite_steps(pending[checked:], pending_from + checked)
      checked = len(pending)
      if due_log:
        summary = summarise_metrics(pending, pending_from)
        pending, pending_from, checked = [], step, 0
        summary['train_steps_per_second'] = progress.log(
          step,
          f'loss {summary["train_loss"]:.4f} acc {summary["train_accuracy"]:.3f}',
        )
        run.writer.write(step, summary)
      eval_metrics = None
      if due_eval or due_save:
        state = run.consistent(state)
      stop_early = False
      if due_eval:
        results = run.evaluate_split(state, 'validation')
        train_guards.check_evaluation(config, results, step)
        train_evaluation.log_validation(step, results)
        eval_metrics = {f'eval_{k}': v for k, v in results.items()}
        stop_early = (
          early.update(step, results[config.best_metric]) and not last
        )
        run.writer.write(step, {**eval_metrics, **early.record()})
        if stop_early:
          logging.info(
            'Early stopping at step %d: validation %s has not improved on '
            '%.4f (step %d) for %d evaluations.',
            step,
            config.best_metric,
            early.best,
            early.best_step,
            early.since_best,
          )
        if (
          last
          or stop_early
          or train_setup.figures_due(config, step // schedule.eval_every)
        ):
          run.save_figures(state, step)
      if due_save or stop_early:
        run.checkpoint(
          state, rng, step, data_state, eval_metrics, pending, early
        )
      if stop_early:
        break
      if stop:
        checkpointing.wait(run.manager)
        raise preemption.Preempted(
          step, notice.signal_name, str(run.manager.directory)
        )
  except (train_guards.NonFiniteLoss, train_guards.IdentityViolation) as e:
    raise type(e)(
      f'{e} Training stopped. {run.last_good_checkpoint(state)} Lower the '
      'learning rate or check the data.'
    ) from None
  finally:
    notice.uninstall()
    batches.close()

  checkpointing.wait(run.manager)  # The last save's failure raises here.
  return train_evaluation.final_evaluation(run, state, step)
