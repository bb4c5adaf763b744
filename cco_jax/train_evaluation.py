"""Evaluation during and after training (phases 3 and 5 of `cco_jax.train`).

evaluate          means over a split from the pmapped eval step;
check_identity    the logit-sum identity on a validation batch (phase 3);
log_validation    the log line of a periodic validation;
final_evaluation  validation, test and Cats-vs-Dogs at the end (phase 5).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
import json

from absl import logging
import jax
import numpy as np

from cco_jax import metrics as metrics_lib
from cco_jax import train_guards
from cco_jax import train_input
from cco_jax import train_setup
from cco_jax import train_step as step_lib

FINAL_SPLITS = ('validation', 'test', 'ood')

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
    outputs.append(
      p_eval_step(state, step_lib.shard(train_input.device_batch(batch)))
    )
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


def final_evaluation(run, state, step: int) -> dict:
  """Phase 5: validation, test and, for species models, Cats-vs-Dogs
  accuracy of `run` (a `train.Run`), logged, recorded and written to
  `final_metrics.json`."""
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
