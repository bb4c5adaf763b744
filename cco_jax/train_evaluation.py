"""Evaluation during and after training (phases 3 and 5 of `cco_jax.train`).

evaluate          means over a split from the pmapped eval step (and, with
                  an `AucSpec`, the ROC AUC of binary tasks);
check_identity    the logit-sum identity on a validation batch (phase 3);
log_validation    the log line of a periodic validation;
final_evaluation  validation, test and Cats-vs-Dogs at the end (phase 5).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
import dataclasses
import json

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np

from cco_jax import errors
from cco_jax import metrics as metrics_lib
from cco_jax import train_guards
from cco_jax import train_input
from cco_jax import train_setup
from cco_jax import train_step as step_lib
from cco_jax.evaluation import auc as auc_lib

FINAL_SPLITS = ('validation', 'test', 'ood')

EVAL_IN_FLIGHT = 8  # Eval steps dispatched ahead of their results.


@dataclasses.dataclass(frozen=True)
class AucSpec:
  """What `evaluate` needs to score binary tasks by ROC AUC: the pmapped
  `predict_step`, the class names, the tasks (class names) and the head
  ('softmax' or 'sigmoid', `objectives.head`)."""

  p_predict: Callable
  class_names: tuple[str, ...]
  tasks: tuple[str, ...]
  head: str


def auc_spec(config, setup: train_setup.Setup) -> AucSpec | None:
  """The validation's AUC tasks: `config.auc_tasks`, else, when
  `config.best_metric` is 'mean_auc', `auc.default_tasks`; None: no AUC."""
  names = setup.record.class_names
  tasks = tuple(config.get('auc_tasks', ()) or ())
  if not tasks and config.best_metric == 'mean_auc':
    tasks = auc_lib.default_tasks(names)
  if not tasks:
    return None
  try:
    auc_lib.task_indices(names, tasks)  # A task that is no class fails here.
  except ValueError as e:
    raise errors.UserError(str(e)) from None
  head = 'sigmoid' if setup.objective.head == 'sigmoid' else 'softmax'
  return AucSpec(setup.p_predict, tuple(names), tasks, head)


def evaluate(
  p_eval_step: Callable,
  state,
  batches: Iterable[dict],
  group_names: tuple[str, ...] | None = None,
  auc: AucSpec | None = None,
) -> dict:
  """Means over a split: accuracy, ce, pixel influence and background share;
  with groups (a `p_eval_step` that sums them), per-group, worst-group and
  average-group accuracy (numbers only: empty groups are left out); with
  `auc`, `mean_auc`, `auc_<task>` and `auc_balanced_accuracy`
  (`auc_scores`).

  `batches`: host batches, or batches already on the devices (e.g. an
  `train_input.EvalSplit`). The steps are dispatched back to back; their
  sums come to the host in one transfer at the end.
  """
  outputs, scored = [], []
  for batch in batches:
    sharded = step_lib.shard(train_input.device_batch(batch))
    outputs.append(p_eval_step(state, sharded))
    if auc is not None:
      logits = auc.p_predict(state, sharded['image'])[0]
      keys = ('label', 'weight', 'targets')
      scored.append((logits, {k: batch[k] for k in keys if k in batch}))
    if len(outputs) > EVAL_IN_FLIGHT:  # Bounds the inputs queued on devices.
      jax.block_until_ready(outputs[-EVAL_IN_FLIGHT])
  totals = None
  for sums in jax.device_get(outputs):
    totals = metrics_lib.accumulate(
      totals, jax.tree.map(lambda x: np.asarray(x)[0], sums)
    )
  results = metrics_lib.summarise(totals, group_names)
  results = {k: v for k, v in results.items() if isinstance(v, (int, float))}
  if auc is not None:
    results.update(auc_scores(auc, jax.device_get(scored)))
  return results


def auc_scores(auc: AucSpec, scored: Sequence[tuple]) -> dict:
  """`mean_auc`, `auc_<task>`, `auc_balanced_accuracy` of the real examples
  of `scored` ((logits, {label, weight[, targets]}) per batch, (D, b, ...)),
  over every process's examples; no intervals (`auc.auc_metrics`)."""
  flat = lambda x: np.asarray(x).reshape((-1,) + np.shape(x)[2:])
  logits = np.concatenate([flat(logits) for logits, _ in scored])
  fields = {
    key: np.concatenate([flat(batch[key]) for _, batch in scored])
    for key in scored[0][1]
  }
  if jax.process_count() > 1:  # Every host holds its own examples.
    logits, fields = multihost_utils.process_allgather((logits, fields))
    logits = logits.reshape((-1,) + logits.shape[2:])
    fields = {k: v.reshape((-1,) + v.shape[2:]) for k, v in fields.items()}
  real = fields['weight'] > 0
  results = auc_lib.auc_metrics(
    logits[real],
    fields['label'][real],
    class_names=auc.class_names,
    tasks=auc.tasks,
    head=auc.head,
    targets=fields['targets'][real] if 'targets' in fields else None,
    num_resamples=0,
  )
  out = {
    'mean_auc': results['mean_auc'],
    'auc_balanced_accuracy': results['balanced_accuracy'],
  }
  out.update({f'auc_{t}': v['auc'] for t, v in results['tasks'].items()})
  return out


def check_identity(
  config, setup: train_setup.Setup, state, when: str, batch: dict | None = None
) -> float:
  """Phase 3: max relative |sum of maps + bias - logits| on a validation
  batch (`batch`, default the split's first)."""
  if batch is None:
    batches = train_setup.eval_iterator(config, setup, 'validation')
    try:
      batch = next(iter(batches))
    finally:
      train_input.close_iterator(batches)
  error = float(
    np.max(
      setup.p_eval_step(state, step_lib.shard(train_input.device_batch(batch)))[
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


def log_validation(step: int, results: dict) -> None:
  """Logs a periodic validation's accuracy, ce, background share and groups."""
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
  if 'mean_auc' in results:
    logging.info(
      'Validation mean AUC %.4f (%s), balanced accuracy %.4f.',
      results['mean_auc'],
      ', '.join(
        f'{k[4:]} {v:.4f}'
        for k, v in results.items()
        if k.startswith('auc_') and k != 'auc_balanced_accuracy'
      ),
      results['auc_balanced_accuracy'],
    )


def final_evaluation(run, state, step: int) -> dict:
  """Phase 5: validation, test and, for species models, Cats-vs-Dogs
  accuracy of `run` (a `train.Run`), logged, recorded and written to
  `final_metrics.json`; returns what it wrote (`step` and the metrics)."""
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
  final = {'step': step, **results}
  path = run.workdir / 'final_metrics.json'
  if run.is_chief:
    path.write_text(json.dumps(final, indent=2))
    logging.info(
      'Final metrics in %s; records in %s; checkpoints in %s; figures in %s.',
      path,
      run.workdir / 'metrics.jsonl',
      run.manager.directory,
      run.figure_dir,
    )
  return final
