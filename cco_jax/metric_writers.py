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
  """Appends metrics to `metrics.jsonl` and TensorBoard (only on process 0)."""

  def __init__(self, workdir: str, *, enabled: bool = True):
    self._enabled = enabled
    self._path = os.path.join(workdir, 'metrics.jsonl')
    self._tb = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      from tensorboardX import (
        SummaryWriter,  # pylint: disable=g-import-not-at-top
      )

      self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def write(self, step: int, metrics: dict) -> None:
    """Records `metrics` (scalars or small arrays) at `step`."""
    if not self._enabled:
      return
    record = {
      'step': int(step),
      **{k: _to_python(v) for k, v in metrics.items()},
    }
    with open(self._path, 'a') as f:
      f.write(json.dumps(record) + '\n')
    for key, value in record.items():
      if (
        key != 'step'
        and isinstance(value, (int, float))
        and math.isfinite(value)
      ):
        self._tb.add_scalar(key, value, int(step))
    self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


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
