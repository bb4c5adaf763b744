"""Checkpoint selection rules, applied after training to its records.

Which checkpoint a comparison reports decides what it measures. A rule that
reads validation worst-group accuracy uses group labels — on a benchmark
whose training set has no minority example, those validation images are the
only minority examples the method ever touches. A user without group labels
selects on what they have. The rules (`RULES`):

  worst_group  highest validation worst-group accuracy; ties: higher
               validation accuracy, then lower validation CE, then the
               earlier step  [uses group labels]
  accuracy     highest validation accuracy; ties: lower validation CE, then
               the earlier step  [labels only]
  last         the last evaluated step  [nothing]

A rule reads the `eval_*` records of `metrics.jsonl`
(`metric_writers.read_metrics`) and names a step; the run must have kept that
step's checkpoint (`config.keep_checkpoints` at least the number of
evaluations, as `experiments/configs/spurious.py` sets).
"""

from __future__ import annotations

from collections.abc import Sequence

from cco_jax import errors

# rule -> (what it uses, description)
RULES = {
  'worst_group': ('group labels', 'validation worst-group accuracy'),
  'accuracy': ('labels only', 'validation accuracy'),
  'last': ('nothing', 'the last step'),
}


def _key(rule: str, record: dict) -> tuple:
  ce = record.get('eval_ce', float('inf'))
  if rule == 'worst_group':
    return (
      record['eval_worst_group_accuracy'],
      record['eval_accuracy'],
      -ce,
      -record['step'],
    )
  return (record['eval_accuracy'], -ce, -record['step'])


def evaluations(records: Sequence[dict]) -> list[dict]:
  """The records holding validation metrics, by step."""
  return sorted(
    (r for r in records if 'eval_accuracy' in r), key=lambda r: r['step']
  )


def select_step(records: Sequence[dict], rule: str) -> int:
  """The step `rule` chooses among the evaluation `records`.

  Raises:
    errors.UserError: an unknown rule, no evaluation, or 'worst_group' on a
      run without group metrics.
  """
  if rule not in RULES:
    raise errors.UserError(
      f'Unknown selection rule {rule!r}; choose from {sorted(RULES)}.'
    )
  evals = evaluations(records)
  if not evals:
    raise errors.UserError(
      'No validation records in metrics.jsonl: the run never evaluated; '
      'set config.eval_every_steps.'
    )
  if rule == 'last':
    return evals[-1]['step']
  if rule == 'worst_group' and 'eval_worst_group_accuracy' not in evals[0]:
    raise errors.UserError(
      "Selection rule 'worst_group' needs group metrics; the run has none "
      "(its data has no 'group' column): use 'accuracy' or 'last'."
    )
  return max(evals, key=lambda r: _key(rule, r))['step']


def validation_at(records: Sequence[dict], step: int) -> dict:
  """The `eval_*` values logged at `step` (empty if none)."""
  found = {}
  for r in records:
    if r['step'] == step:
      found.update({k: v for k, v in r.items() if k.startswith('eval_')})
  return found
