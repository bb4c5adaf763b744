"""Where metrics go: JSON lines, TensorBoard event files, and the console.

`MetricWriter(workdir)` appends one JSON object per `write(step, metrics)` to
`workdir/metrics.jsonl` (with a `step` key), mirrors scalars to TensorBoard in
`workdir/tensorboard`, and `ProgressLogger` prints steps/s and the ETA.
"""

from __future__ import annotations

import json
import math
import os
import time

from absl import logging
import numpy as np


def _to_python(value):
  value = np.asarray(value)
  return value.item() if value.ndim == 0 else value.tolist()


class MetricWriter:
  """Appends metrics to `metrics.jsonl` and TensorBoard (only on process 0).

  A resumed run first calls `discard_after(step)`: records of steps after the
  restored checkpoint (written before an interruption) are dropped, so each
  step is recorded once; TensorBoard purges its events after that step too.
  """

  def __init__(self, workdir: str, *, enabled: bool = True):
    self._enabled = enabled
    self._workdir = workdir
    self._path = os.path.join(workdir, 'metrics.jsonl')
    self._tb = None
    self._purge_step = None

  def discard_after(self, step: int, rewritten=lambda record: False) -> int:
    """Drops the records of steps > `step`, and those at `step` that a resumed
    run writes again (`rewritten(record)` true). Returns how many it dropped.
    """
    if not self._enabled or not os.path.exists(self._path):
      return 0
    records = read_metrics(self._workdir)
    kept = [
      r
      for r in records
      if r['step'] < step or (r['step'] == step and not rewritten(r))
    ]
    if len(kept) != len(records):
      temporary = self._path + '.tmp'
      with open(temporary, 'w') as f:
        f.writelines(json.dumps(r) + '\n' for r in kept)
      os.replace(temporary, self._path)
      logging.info(
        'Dropped %d records from %s that this run writes again (resuming '
        'at step %d).',
        len(records) - len(kept),
        self._path,
        step,
      )
    self._purge_step = step + 1
    return len(records) - len(kept)

  def _tensorboard(self):
    if self._tb is None:
      from tensorboardX import (
        SummaryWriter,  # pylint: disable=g-import-not-at-top
      )

      self._tb = SummaryWriter(
        os.path.join(self._workdir, 'tensorboard'), purge_step=self._purge_step
      )
    return self._tb

  def write(self, step: int, metrics: dict) -> None:
    """Records `metrics` (scalars or small arrays) at `step`."""
    if not self._enabled:
      return
    record = {
      'step': int(step),
      **{k: _to_python(v) for k, v in metrics.items()},
    }
    os.makedirs(self._workdir, exist_ok=True)
    with open(self._path, 'a') as f:
      f.write(json.dumps(record) + '\n')
    tb = self._tensorboard()
    for key, value in record.items():
      if (
        key != 'step'
        and isinstance(value, (int, float))
        and math.isfinite(value)
      ):
        tb.add_scalar(key, value, int(step))
    tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def read_metrics(workdir: str) -> list[dict]:
  """All records of `workdir/metrics.jsonl`, in order (empty if none)."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


class ProgressLogger:
  """Logs `step/total`, steps per second and the ETA every call to `log`."""

  def __init__(self, total_steps: int, start_step: int):
    self._total = total_steps
    self._last_step = start_step
    self._last_time = time.perf_counter()

  def log(self, step: int, extra: str = '') -> float:
    now = time.perf_counter()
    rate = (step - self._last_step) / max(now - self._last_time, 1e-9)
    self._last_step, self._last_time = step, now
    eta = (self._total - step) / rate if rate > 0 else float('inf')
    logging.info(
      'step %d/%d  %.2f steps/s  ETA %s  %s',
      step,
      self._total,
      rate,
      time.strftime('%H:%M:%S', time.gmtime(eta))
      if math.isfinite(eta)
      else '?',
      extra,
    )
    return rate
