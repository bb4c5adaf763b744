"""Where metrics go: JSON lines, TensorBoard event files, and the console.

`MetricWriter(workdir)` appends one JSON object per `write(step, metrics)` to
`workdir/metrics.jsonl` (with a `step` key), mirrors scalars to TensorBoard in
`workdir/tensorboard`, and `ProgressLogger` prints steps/s and the ETA.
Workdirs are `etils.epath` paths: local, or on an object store (`gs://...`),
where files cannot be appended to, so the JSON lines are rewritten whole.
"""

from __future__ import annotations

import json
import math
import os
import time

from absl import logging
from etils import epath
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

  def __init__(self, workdir: str | os.PathLike, *, enabled: bool = True):
    self._enabled = enabled
    self._workdir = epath.Path(workdir)
    self._path = self._workdir / 'metrics.jsonl'
    self._appendable = '://' not in str(self._workdir)
    self._tb = None
    self._purge_step = None

  def discard_after(self, step: int, rewritten=lambda record: False) -> int:
    """Drops the records of steps > `step`, and those at `step` that a resumed
    run writes again (`rewritten(record)` true). Returns how many it dropped.
    """
    if not self._enabled or not self._path.exists():
      return 0
    records = read_metrics(self._workdir)
    kept = [
      r
      for r in records
      if r['step'] < step or (r['step'] == step and not rewritten(r))
    ]
    if len(kept) != len(records):
      self._rewrite(kept)
      logging.info(
        'Dropped %d records from %s that this run writes again (resuming '
        'at step %d).',
        len(records) - len(kept),
        self._path,
        step,
      )
    self._purge_step = step + 1
    return len(records) - len(kept)

  def _rewrite(self, records: list[dict]) -> None:
    """Replaces the JSON lines by `records` (atomically where local)."""
    text = ''.join(json.dumps(r) + '\n' for r in records)
    if not self._appendable:
      self._path.write_text(text)
      return
    temporary = self._path.parent / (self._path.name + '.tmp')
    temporary.write_text(text)
    temporary.replace(self._path)

  def _tensorboard(self):
    if self._tb is None:
      from tensorboardX import (
        SummaryWriter,  # pylint: disable=g-import-not-at-top
      )

      self._tb = SummaryWriter(
        str(self._workdir / 'tensorboard'), purge_step=self._purge_step
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
    self._workdir.mkdir(parents=True, exist_ok=True)
    if self._appendable:
      with self._path.open('a') as f:
        f.write(json.dumps(record) + '\n')
    else:  # Object stores: no append.
      self._rewrite(read_metrics(self._workdir) + [record])
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


def read_metrics(workdir: str | os.PathLike) -> list[dict]:
  """All records of `workdir/metrics.jsonl`, in order (empty if none)."""
  path = epath.Path(workdir) / 'metrics.jsonl'
  if not path.exists():
    return []
  lines = path.read_text().splitlines()
  return [json.loads(line) for line in lines if line.strip()]


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
