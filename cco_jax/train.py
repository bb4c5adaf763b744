"""The training loop: config + workdir in, trained model and records out.

`train_and_evaluate(config, workdir)` runs in named phases:
  1. `build` the model, objective, optimizer and data iterators from the config
     (`train_setup`);
  2. `resume_or_create` the state (resuming from `workdir/checkpoints`);
  3. `check_identity` of the logit-sum identity (at start and after a resume);
  4. the step loop, with periodic logging, evaluation and checkpoints (figures
     at the end, or every `figure_every_evals` evaluations); batches reach
     the devices from a background thread (`train_input.Prefetch`), the
     validation batches are read once (`train_input.EvalSplit`) and
     checkpoints are written in the background (waited for before the final
     evaluation and at close);
  5. a final evaluation on validation, test and (species models) Cats-vs-Dogs.

Everything it writes lands in `workdir`: `metrics.jsonl`, `tensorboard/`,
`config.json`, `checkpoints/`, `figures/`. A "step" is one call of the train
step (one micro-batch when `accumulation_steps > 1`). The checks that stop a
diverged run (`NonFiniteLoss`, `IdentityViolation`) are in `train_guards`.

Guarantees: one run per workdir (`runtime.WorkdirLock`; the second fails at
once); every step's non-finite flag is checked before anything is evaluated or
saved, and an evaluation with a non-finite loss or identity error stops the run
before its checkpoint, so no saved state has diverged; a resume refuses a
changed model/data config before touching `config.json`, falls back past
unreadable checkpoints (`checkpointing.restore_newest`), and drops records of
steps after the restored one from `metrics.jsonl`. On several hosts every
process runs the same loop; only process 0 writes records, figures and
`config.json`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
import json
import os
from typing import Any

from absl import logging
from etils import epath
import jax
import ml_collections
import numpy as np

from cco_jax import checkpointing
from cco_jax import configuration
from cco_jax import data as input_pipeline
from cco_jax import figures
from cco_jax import metric_writers
from cco_jax import metrics as metrics_lib
from cco_jax import pretrained
from cco_jax import run_record
from cco_jax import runtime
from cco_jax import train_guards
from cco_jax import train_input
from cco_jax import train_setup
from cco_jax import train_step as step_lib

# Re-exported: callers build models and catch the guards' errors from here.
Setup = train_setup.Setup
build = train_setup.build
create_model = train_setup.create_model
eval_iterator = train_setup.eval_iterator
IdentityViolation = train_guards.IdentityViolation
NonFiniteLoss = train_guards.NonFiniteLoss
check_evaluation = train_guards.check_evaluation
check_finite_steps = train_guards.check_finite_steps
device_batch = train_input.device_batch
batch_stats_averager = train_setup.batch_stats_averager
figures_due = train_setup.figures_due


# ----------------------------------------------------------------------------
# Phase 2: a fresh or restored state.
# ----------------------------------------------------------------------------


def resume_or_create(
  config, setup: Setup, manager
) -> tuple[Any, jax.Array, int]:
  """Phase 2: the unreplicated state, the RNG and the first step to run.

  Resumes from the newest checkpoint that restores; newer unreadable ones
  are logged and moved to `workdir/unrestorable_checkpoints/` (kept).
  """
  rng = jax.random.key(config.seed, impl=config.rng_impl or None)
  rng, init_rng = jax.random.split(rng)
  state = step_lib.create_train_state(
    init_rng,
    setup.model,
    config.data.image_size,
    setup.tx,
    num_groups=getattr(train_setup.create_objective(config), 'num_groups', 0),
  )
  if manager.latest_step() is None:
    init_from = config.model.get('init_from', '')
    state = pretrained.init_train_state(state, setup.model, init_from, init_rng)
    return state, rng, 0
  restored = checkpointing.restore_newest(manager, state)
  if restored.unrestorable:
    checkpointing.set_aside(manager, restored.unrestorable)
  setup.train_iter.set_state(restored.data_state)
  logging.info('Resumed from step %d of %s.', restored.step, manager.directory)
  return restored.state, restored.rng, restored.step


# ----------------------------------------------------------------------------
# Phase 3 and evaluation.
# ----------------------------------------------------------------------------


EVAL_IN_FLIGHT = 8  # Eval steps dispatched ahead of their results.


def evaluate(
  p_eval_step: Callable,
  state,
  batches: Iterable[dict],
  group_names: tuple[str, ...] | None = None,
) -> dict:
  """Means over a split: accuracy, ce, pixel influence and background share;
  with groups (a `p_eval_step` that sums them), per-group, worst-group and
  average-group accuracy (numbers only: empty groups are left out).

  `batches`: host batches, or batches already on the devices (e.g. an
  `train_input.EvalSplit`). The steps are dispatched back to back; their
  sums come to the host in one transfer at the end.
  """
  outputs = []
  for batch in batches:
    outputs.append(p_eval_step(state, step_lib.shard(device_batch(batch))))
    if len(outputs) > EVAL_IN_FLIGHT:  # Bounds the inputs queued on devices.
      jax.block_until_ready(outputs[-EVAL_IN_FLIGHT])
  totals = None
  for sums in jax.device_get(outputs):
    totals = metrics_lib.accumulate(
      totals, jax.tree.map(lambda x: np.asarray(x)[0], sums)
    )
  results = metrics_lib.summarise(totals, group_names)
  return {k: v for k, v in results.items() if isinstance(v, (int, float))}


def check_identity(
  config, setup: Setup, state, when: str, batch: dict | None = None
) -> float:
  """Phase 3: max relative |sum of maps + bias - logits| on a validation
  batch (`batch`, default the split's first)."""
  if batch is None:
    batches = eval_iterator(config, setup, 'validation')
    try:
      batch = next(iter(batches))
    finally:
      train_input.close_iterator(batches)
  error = float(
    np.max(
      setup.p_eval_step(state, step_lib.shard(device_batch(batch)))[
        'identity_error'
      ]
    )
  )
  tolerance = train_guards.identity_tolerance(config)
  logging.info(
    'Logit-sum identity %s: max relative error %.3g (tolerance %.3g).',
    when,
    error,
    tolerance,
  )
  train_guards.check_identity_error(error, tolerance, when)
  return error


def prefetch_with_state(iterator, size: int = 2) -> train_input.Prefetch:
  """Yields `(device_batch, iterator_state_after_it)`, `size` batches ahead.

  A thread reads and copies them to the devices (`train_input.Prefetch`);
  the paired state lets a checkpoint record the position of the last batch
  trained on, not of the prefetched ones.
  """
  return train_input.Prefetch(iterator, size)


# ----------------------------------------------------------------------------
# Phase 4: the loop.
# ----------------------------------------------------------------------------


class Run:
  """Holds what the loop's phases share: config, setup, writers, manager."""

  def __init__(
    self,
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    splits: input_pipeline.OpenSplits | None = None,
  ):
    self.config = config
    self.workdir = epath.Path(workdir)
    self.is_chief = jax.process_index() == 0
    self.figure_dir = self.workdir / 'figures'
    self.setup = build(config, splits)
    self.manager = train_setup.create_manager(
      config, workdir, self.setup.record.group_names
    )
    self.writer = metric_writers.MetricWriter(workdir, enabled=self.is_chief)
    budget_mb = config.get('eval_cache_mb', 512)
    if not isinstance(budget_mb, (int, float)) or budget_mb < 0:
      raise ValueError(
        f'config.eval_cache_mb = {budget_mb!r} must be a number >= 0 (MiB '
        'per device for the validation batches; 0 = read them at every '
        'evaluation).'
      )
    self.validation = train_input.EvalSplit(
      lambda: eval_iterator(config, self.setup, 'validation'),
      int(budget_mb * 2**20),
      jax.local_device_count(),
    )
    self._average_batch_stats = batch_stats_averager(config)

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
    """Writes `config.json` and the run record `run.json`."""
    if self.is_chief:
      (self.workdir / 'config.json').write_text(
        self.config.to_json_best_effort(indent=2)
      )
      self.setup.record.save(run_record.path_of(self.workdir))

  def evaluate_split(self, state, split: str, **kwargs) -> dict:
    """Evaluates `split`; validation from the batches read once per run."""
    if split == 'validation' and not kwargs:
      return evaluate(
        self.setup.p_eval_step,
        state,
        self.validation,
        self.setup.record.group_names,
      )
    batches = eval_iterator(self.config, self.setup, split, **kwargs)
    try:
      return evaluate(
        self.setup.p_eval_step, state, batches, self.setup.record.group_names
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
    if not self.is_chief:
      return
    flat = lambda x: np.asarray(x).reshape((-1,) + np.shape(x)[2:])
    real = np.flatnonzero(flat(batch['weight']) > 0)
    chosen = real[
      figures.examples_per_class(
        flat(batch['label'])[real], self.config.num_figure_examples
      )
    ]
    pick = lambda x: flat(x)[chosen]
    figures.save_cam_grid(
      str(self.figure_dir / f'cams_step_{step:07d}.png'),
      pick(batch['image']),
      pick(batch['mask']),
      pick(cams),
      pick(batch['label']),
      predictions=pick(logits).argmax(-1),
      class_names=self.setup.record.class_names,
      step=step,
    )
    figures.save_learning_curves(
      str(self.figure_dir / 'learning_curves.png'),
      metric_writers.read_metrics(self.workdir),
    )

  def checkpoint(
    self, state, rng, step: int, data_state, metrics: dict | None
  ) -> None:
    checkpointing.save(
      self.manager,
      step,
      step_lib.unreplicate(state),
      rng,
      data_state,
      metrics,
      record=self.setup.record.to_json(),
    )
    logging.info(
      'Saved the checkpoint of step %d in %s.', step, self.manager.directory
    )

  def last_good_checkpoint(self) -> str:
    """What a stopped run leaves to resume from, in words."""
    try:
      checkpointing.wait(self.manager)
    except OSError as e:
      logging.error('%s', e)
    step = self.manager.latest_step()
    if step is None:
      return (
        f'No checkpoint was saved in {self.manager.directory} before it, so '
        'there is no good state to resume from.'
      )
    return (
      f'The last good checkpoint is step {step} in {self.manager.directory} '
      '(nothing after it was saved).'
    )


def summarise_metrics(step_metrics: list[dict], first_step: int) -> dict:
  """Means of the logged steps' metrics; raises on a non-finite step."""
  check_finite_steps(step_metrics, first_step)
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
    runtime.WorkdirInUse: another process is running in `workdir`.
    ValueError: a bad config, or one that differs from the checkpoints' in
      `workdir` (nothing in `workdir` is changed then).
    NonFiniteLoss, IdentityViolation: the model diverged; nothing of the
      diverged state was saved and the message names the last good checkpoint.
  """
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  lock = runtime.WorkdirLock(workdir, jax.process_index()).acquire()
  run = None
  try:
    splits = input_pipeline.OpenSplits(config.data)  # Each opened once.
    config = train_setup.with_data_fields(config, splits)
    configuration.check_resumable(config, workdir)
    run = Run(config, workdir, splits)
    return _train_and_evaluate(run)
  finally:
    if run is not None:
      run.close()
    lock.release()


FINAL_SPLITS = ('validation', 'test', 'ood')


def _rewritten_on_resume(record: dict) -> bool:
  """A start (identity) or final-evaluation record, written again on resume."""
  keys = set(record) - {'step'}
  return keys == {'identity_error'} or all(
    k.split('_')[0] in FINAL_SPLITS for k in keys
  )


def _train_and_evaluate(run: Run) -> dict:
  config, setup, schedule = run.config, run.setup, run.setup.schedule
  state, rng, start_step = resume_or_create(config, setup, run.manager)
  if start_step > schedule.num_train_steps:
    raise ValueError(
      f'{run.workdir} has already trained {start_step} steps, more than the '
      f'{schedule.num_train_steps} this config asks for (num_train_steps='
      f'{config.num_train_steps}, num_epochs={config.num_epochs}). Ask for at '
      f'least {start_step} steps to continue (or to evaluate again), or use '
      'a new --workdir.'
    )
  run.writer.discard_after(start_step, rewritten=_rewritten_on_resume)
  run.save_config()
  figures_due(config, 0)  # A bad figure_every_evals fails before any step.
  state = step_lib.replicate(state)
  identity = check_identity(
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
  batches = prefetch_with_state(setup.train_iter)
  pending, pending_from, checked = [], start_step, 0
  step = start_step
  try:
    for step in range(start_step + 1, schedule.num_train_steps + 1):
      batch, data_state = next(batches)
      state, metrics = setup.p_train_step(state, batch)
      pending.append(metrics)
      last = step == schedule.num_train_steps
      due_log = step % schedule.log_every == 0 or last
      due_eval = step % schedule.eval_every == 0 or last
      due_save = step % schedule.checkpoint_every == 0 or last
      if not (due_log or due_eval or due_save):
        continue
      # Every step since the last check, before anything is evaluated or saved.
      check_finite_steps(pending[checked:], pending_from + checked)
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
      if due_eval:
        results = run.evaluate_split(state, 'validation')
        check_evaluation(config, results, step)
        logging.info(
          'Validation at step %d: accuracy %.4f, ce %.4f, background share '
          '%.3f (%d examples).',
          step,
          results['accuracy'],
          results['ce'],
          results['bg_share'],
          results['count'],
        )
        if 'worst_group_accuracy' in results:
          logging.info(
            'Validation worst-group accuracy %.4f, average-group %.4f.',
            results['worst_group_accuracy'],
            results['average_group_accuracy'],
          )
        eval_metrics = {f'eval_{k}': v for k, v in results.items()}
        run.writer.write(step, eval_metrics)
        if last or figures_due(config, step // schedule.eval_every):
          run.save_figures(state, step)
      if due_save:
        run.checkpoint(state, rng, step, data_state, eval_metrics)
  except (NonFiniteLoss, IdentityViolation) as e:
    raise type(e)(
      f'{e} Training stopped. {run.last_good_checkpoint()} Lower the '
      'learning rate or check the data.'
    ) from None
  finally:
    batches.close()

  checkpointing.wait(run.manager)  # The last save's failure raises here.
  return final_evaluation(run, state, step)


# ----------------------------------------------------------------------------
# Phase 5: final evaluation.
# ----------------------------------------------------------------------------


def final_evaluation(run: Run, state, step: int) -> dict:
  """Validation, test and, for species models, Cats-vs-Dogs accuracy."""
  results = {}
  splits = list(FINAL_SPLITS[:2])
  if run.config.eval_ood and run.config.data.task == 'species':
    splits.append('ood')
  for split in splits:
    metrics = run.evaluate_split(state, split)
    logging.info(
      'Final %s accuracy at step %d: %.4f (%d examples).',
      split,
      step,
      metrics['accuracy'],
      metrics['count'],
    )
    results.update({f'{split}_{k}': v for k, v in metrics.items()})
  run.writer.write(step, results)
  path = run.workdir / 'final_metrics.json'
  if run.is_chief:
    path.write_text(json.dumps({'step': step, **results}, indent=2))
    logging.info(
      'Final metrics in %s; records in %s; checkpoints in %s; figures in %s.',
      path,
      run.workdir / 'metrics.jsonl',
      run.manager.directory,
      run.figure_dir,
    )
  return results
