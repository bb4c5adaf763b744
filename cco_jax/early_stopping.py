"""Early stopping on the validation `config.best_metric` (phase 4).

Training stops once the metric (higher is better: accuracy, mean AUC,
worst-group accuracy) has not improved on its best for
`config.early_stopping_patience` evaluations in a row (0 = never: train for
the whole budget). A NaN never improves. The state is saved with every
checkpoint (the loop state) so a resumed run counts on, and a run that
stopped stays stopped: resuming it goes straight to the final evaluation.
Each evaluation records `early_stopping_best`, `early_stopping_best_step`
and `early_stopping_evaluations_since_best` in `metrics.jsonl`; the step
that stops adds `early_stopped` = 1.
"""

from __future__ import annotations

import dataclasses
import math

from cco_jax import errors


@dataclasses.dataclass
class EarlyStopping:
  """The best value so far, where it was, and evaluations since."""

  patience: int
  best: float | None = None
  best_step: int = 0
  since_best: int = 0
  stopped: bool = False

  def __post_init__(self):
    if not isinstance(self.patience, int) or self.patience < 0:
      raise errors.UserError(
        f'config.early_stopping_patience = {self.patience!r} must be an '
        'integer >= 0 (evaluations without improvement; 0 = off).'
      )

  def update(self, step: int, value: float) -> bool:
    """Counts one evaluation of `value` at `step`; True: stop training now."""
    value = float(value)
    if not math.isnan(value) and (self.best is None or value > self.best):
      self.best, self.best_step, self.since_best = value, int(step), 0
    else:
      self.since_best += 1
    self.stopped = 0 < self.patience <= self.since_best
    return self.stopped

  def record(self) -> dict:
    """The metrics of this evaluation for `metrics.jsonl`."""
    out = {
      'early_stopping_best': self.best,
      'early_stopping_best_step': self.best_step,
      'early_stopping_evaluations_since_best': self.since_best,
    }
    if self.stopped:
      out['early_stopped'] = 1
    return out

  def to_json(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, values: dict | None, patience: int) -> EarlyStopping:
    """The saved state (None: a fresh one) under this run's `patience`."""
    state = cls(patience)
    for key in ('best', 'best_step', 'since_best'):
      if values and key in values:
        setattr(state, key, values[key])
    state.stopped = 0 < patience <= state.since_best
    return state
