"""Where metrics go: JSON lines, TensorBoard event files, and the console.

`MetricWriter(workdir)` appends one JSON object per `write(step, metrics)` to
`workdir/metrics.jsonl` (with a `step` key), mirrors scalars to TensorBoard in
`workdir/tensorboard`, and `ProgressLogger` prints steps/s and the ETA.
Workdirs are `etils.epath` paths: local, or on an object store (`gs://...`),
where files cannot be appended to, so the JSON lines are rewritten whole.

Records recover from an interrupted write: a torn last line of
`metrics.jsonl` (the process was killed mid-write) is dropped with a one-line
warning, and removed from the file when the run resumes; a resumed run
rewrites the TensorBoard events to match the kept records, so TensorBoard
shows each step once after any number of resumes (`event_files`).
"""

from __future__ import annotations

import json
import math
import os
import time

from absl import logging
from etils import epath
import numpy as np
from PIL import Image

from cco_jax import event_files

# TensorBoard tags of the figures (`MetricWriter.write_image`).
IMAGE_PREFIX = 'figures/'


def _to_python(value):
  value = np.asarray(value)
  return value.item() if value.ndim == 0 else value.tolist()


class MetricWriter:
  """Appends metrics to `metrics.jsonl` and TensorBoard (only on process 0).

  A resumed run first calls `discard_after(step)`: records of steps after the
  restored checkpoint (written before an interruption) are dropped, so each
  step is recorded once; the TensorBoard events are rewritten to the same
  records (each `(tag, step)` once).
  """

  def __init__(self, workdir: str | os.PathLike, *, enabled: bool = True):
    self._enabled = enabled
    self._workdir = epath.Path(workdir)
    self._path = self._workdir / 'metrics.jsonl'
    self._appendable = '://' not in str(self._workdir)
    self._tb = None

  def discard_after(self, step: int, rewritten=lambda record: False) -> int:
    """Drops the records of steps > `step`, and those at `step` that a resumed
    run writes again (`rewritten(record)` true). Returns how many it dropped.
    """
    if not self._enabled or not self._path.exists():
      return 0
    records, torn = _read(self._path)
    kept = [
      r
      for r in records
      if r['step'] < step or (r['step'] == step and not rewritten(r))
    ]
    self._keep_tensorboard(kept, step)
    if torn or len(kept) != len(records):
      self._rewrite(kept)
      logging.info(
        'Dropped %d records from %s that this run writes again (resuming '
        'at step %d).',
        len(records) - len(kept),
        self._path,
        step,
      )
    return len(records) - len(kept)

  def _keep_tensorboard(self, records: list[dict], step: int) -> None:
    """Rewrites the TensorBoard events to the points of `records` and the
    figures (`write_image`) of steps before `step`."""
    points = {
      (key, r['step'])
      for r in records
      for key, value in r.items()
      if key != 'step' and _scalar(value)
    }
    event_files.keep_scalars(
      str(self._workdir / 'tensorboard'),
      lambda tag, s: (tag, s) in points
      or (tag.startswith(IMAGE_PREFIX) and s < step),
    )

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

      # A unique name: a resumed run's file never replaces an earlier one.
      self._tb = SummaryWriter(
        str(self._workdir / 'tensorboard'),
        filename_suffix=f'.{time.time_ns()}',
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
      if key != 'step' and _scalar(value):
        tb.add_scalar(key, value, int(step))
    tb.flush()

  def write_image(self, tag: str, png_path: str, step: int) -> None:
    """Shows the PNG figure at `png_path` in TensorBoard's Images tab as
    `figures/<tag>` at `step` (where JAX users look first)."""
    if not self._enabled:
      return
    with epath.Path(png_path).open('rb') as f:
      with Image.open(f) as image:
        pixels = np.asarray(image.convert('RGB'))
    tb = self._tensorboard()
    tb.add_image(f'{IMAGE_PREFIX}{tag}', pixels, int(step), dataformats='HWC')
    tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def _scalar(value) -> bool:
  """Whether a record's value is a TensorBoard point (a finite number)."""
  return isinstance(value, (int, float)) and math.isfinite(value)


def _read(path: epath.Path) -> tuple[list[dict], bool]:
  """The records of a JSON-lines file and whether its last line was torn
  (dropped, with a warning).

  Raises:
    ValueError: a line before the last is not JSON (named, with the fix).
  """
  lines = [
    (number, line)
    for number, line in enumerate(path.read_text().splitlines(), 1)
    if line.strip()
  ]
  records = []
  for i, (number, line) in enumerate(lines):
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError as e:
      if i == len(lines) - 1:
        logging.warning(
          'Dropped the torn last line %d of %s (%d characters, not JSON: an '
          'interrupted write).',
          number,
          path,
          len(line),
        )
        return records, True
      raise ValueError(
        f'{path}, line {number}, is not JSON ({e.msg}): {line[:80]!r}. '
        'Delete or repair that line, then run again.'
      ) from None
  return records, False


def read_metrics(workdir: str | os.PathLike) -> list[dict]:
  """All records of `workdir/metrics.jsonl`, in order (empty if none); a
  torn last line is dropped with a warning."""
  path = epath.Path(workdir) / 'metrics.jsonl'
  if not path.exists():
    return []
  return _read(path)[0]


class ProgressLogger:
  """Logs `step/total`, steps per second and the ETA every call to `log`.

  Call `compiled(step)` once the first step has been dispatched (its call
  returns after compiling): the rate is then measured from there, so the
  first ETA does not include compilation.
  """

  def __init__(self, total_steps: int, start_step: int):
    self._total = total_steps
    self._last_step = start_step
    self._last_time = time.perf_counter()

  def compiled(self, step: int) -> None:
    """Restarts the clock after `step`, the first (compiling) one."""
    self._last_step, self._last_time = step, time.perf_counter()

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
