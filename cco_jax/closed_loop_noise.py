"""Drops the "RuntimeError: Event loop is closed" tracebacks of a failed save.

When one write of an Orbax checkpoint fails (a full disk, a quota), Orbax's
background thread stops its asyncio event loop at once, while TensorStore's
other writes of the same save are still running; as each of them completes,
TensorStore calls `loop.call_soon_threadsafe` on the closed loop and prints
the resulting `RuntimeError('Event loop is closed')` with its traceback
(as an "unraisable" exception, through `sys.unraisablehook`), once per
pending write: 8 to 70 identical
tracebacks around the one error that matters, which `checkpointing.save`
reports with its cause. `install()` wraps `sys.unraisablehook` to drop
exactly these (that error, raised by asyncio's closed-loop check); every
other exception is printed as before.
"""

from __future__ import annotations

import sys
import traceback

MESSAGE = 'Event loop is closed'


def is_closed_loop_noise(error_type, error, tb) -> bool:
  """Whether an exception is asyncio's closed-loop error (nothing else)."""
  if not (isinstance(error, RuntimeError) and str(error) == MESSAGE):
    return False
  frames = traceback.extract_tb(tb)
  return bool(frames) and frames[-1].name == '_check_closed'


class _Hook:
  """`sys.unraisablehook` without the closed-loop noise."""

  def __init__(self, previous):
    self.previous = previous

  def __call__(self, unraisable):
    if not is_closed_loop_noise(
      unraisable.exc_type, unraisable.exc_value, unraisable.exc_traceback
    ):
      self.previous(unraisable)


def install() -> None:
  """Wraps `sys.unraisablehook` (once)."""
  if not isinstance(sys.unraisablehook, _Hook):
    sys.unraisablehook = _Hook(sys.unraisablehook)
