"""Preemption: SIGTERM or SIGINT saves at the next step boundary, then stops.

Schedulers of preemptible machines (Cloud TPU VMs, spot/preemptible VMs,
Kubernetes, Slurm) send SIGTERM some seconds before they kill a job; a user
presses Ctrl-C (SIGINT). `Notice` turns either into a request that the loop
reads at every step boundary (`Notice.reached(step)`): the loop then saves a
checkpoint of that step, waits for it to be written and raises `Preempted`;
the entry points log it and exit with status 128 + the signal's number (143
for SIGTERM, 130 for SIGINT), the convention for a job ended by that signal.

* One process: a Python signal handler sets a flag; the next step saves.
  A second Ctrl-C stops at once (`KeyboardInterrupt`).
* Several processes (`jax.distributed`): a notice can reach any subset of
  them, and all must save the same step. JAX's preemption sync manager
  (started by `jax.distributed.initialize`) catches SIGTERM and agrees on the
  step with the others through the coordination service:
  `multihost_utils.reached_preemption_sync_point(step)` is true at the same
  step on every process (the largest step any of them had reached, plus one).
  SIGINT is forwarded to it as SIGTERM.

`pending_to_json` / `pending_from_json` carry the per-step metrics of the
current logging interval in the checkpoint, so that a run resumed from a step
between two log steps logs the same means as one never interrupted.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np


class Preempted(Exception):  # noqa: N818 (not an error: a requested stop)
  """The run saved the checkpoint of `step` and stopped on a signal."""

  def __init__(self, step: int, signal_name: str, checkpoints: str):
    self.step = step
    self.signal_name = signal_name
    self.exit_code = 128 + _number(signal_name)
    super().__init__(
      f'Stopped by {signal_name} after saving the checkpoint of step {step} '
      f'in {checkpoints}. Run the same command again to resume from it.'
    )


def _number(signal_name: str) -> int:
  return getattr(signal, signal_name, signal.SIGTERM).value


def _sync_manager_running() -> bool:
  """Whether JAX's preemption sync manager runs (a `jax.distributed` run
  with the preemption service enabled)."""
  from jax._src import distributed  # pylint: disable=g-import-not-at-top

  return distributed.global_state.preemption_sync_manager is not None


class Notice:
  """Catches SIGTERM and SIGINT while the loop runs (a context manager).

  `reached(step)` must be called at every step, on every process, with
  increasing steps; it is true at the step that must save and stop.
  Handlers are installed only from the main thread (Python's rule) and the
  previous ones are put back on exit.
  """

  def __init__(self):
    self.signal_name: str | None = None
    self._multiprocess = jax.process_count() > 1 and _sync_manager_running()
    self._previous = {}

  def __enter__(self) -> Notice:
    return self.install()

  def __exit__(self, *exc) -> None:
    self.uninstall()

  def install(self) -> Notice:
    """Catches the signals from now on; returns self."""
    if threading.current_thread() is not threading.main_thread():
      logging.warning(
        'Not in the main thread: SIGTERM and SIGINT will not save a checkpoint '
        'before the run stops.'
      )
      return self
    if jax.process_count() > 1 and not self._multiprocess:
      # Without the sync point the processes could stop at different steps.
      logging.warning(
        "JAX's preemption service is off (jax_enable_preemption_service): "
        'SIGTERM and SIGINT will not save a checkpoint before the run stops.'
      )
      return self
    signals = [signal.SIGINT]
    if not self._multiprocess:  # Else JAX's sync manager catches SIGTERM.
      signals.append(signal.SIGTERM)
    for number in signals:
      self._previous[number] = signal.signal(number, self._handle)
    return self

  def uninstall(self) -> None:
    """Puts the previous handlers back."""
    for number, handler in self._previous.items():
      signal.signal(number, handler)
    self._previous = {}

  def _handle(self, number: int, frame: FrameType | None) -> None:
    del frame
    first = self.signal_name is None
    self.signal_name = signal.Signals(number).name
    if number == signal.SIGINT:
      # A second Ctrl-C stops at once.
      signal.signal(signal.SIGINT, signal.default_int_handler)
      if not first:
        raise KeyboardInterrupt
    if self._multiprocess:
      os.kill(os.getpid(), signal.SIGTERM)  # To JAX's sync manager.

  def reached(self, step: int) -> bool:
    """Whether the loop must save `step` and stop (the same on all processes)."""
    if self._multiprocess:
      if not multihost_utils.reached_preemption_sync_point(step):
        return False
      self.signal_name = self.signal_name or 'SIGTERM'
      return True
    return self.signal_name is not None


def pending_to_json(pending: list[dict]) -> list[dict]:
  """Per-step metrics of the pmapped train step (replicated, shape
  `(devices,)` each) as JSON: `[{name: [value, dtype]}]`, exact (a float32
  is a float64 exactly)."""
  records = []
  for metrics in jax.device_get(pending):
    record = {}
    for name, value in metrics.items():
      first = np.asarray(value).reshape(-1)[0]
      record[name] = [first.item(), first.dtype.str]
    records.append(record)
  return records


def pending_from_json(records: list[dict]) -> list[dict]:
  """The inverse of `pending_to_json`, each value as an array of shape (1,)
  (the first device's, which is all the loop reads)."""
  return [
    {
      name: np.array([value], np.dtype(dtype))
      for name, (value, dtype) in r.items()
    }
    for r in records
  ]
