"""A readable log: Orbax's chatter and repeated data lines filtered out."""

from __future__ import annotations

import logging as logging_lib
import os


class QuietLibraryLogs(logging_lib.Filter):
  """Keeps the log readable: drops Orbax's INFO chatter (dozens of lines per
  checkpoint), its "tracked_metric" warning on checkpoints saved without an
  evaluation and the tracebacks of its worker threads (the caller re-raises
  their error), and repeats of TFDS's and the data pipeline's INFO lines
  ("Load dataset info ...", "Using ... at ..."), which every evaluation would
  log again, and TFDS's warning that a folder it is about to prepare has no
  dataset_info.json yet. Other warnings and errors always pass."""

  _REPEATED = ('/tensorflow_datasets/', '/cco_jax/data/', '/input_pipeline.py')
  # TFDS lines that say nothing to act on: the empty version folder it is
  # about to fill, "Generating dataset" and "Load dataset info" (the project
  # logs what it prepares and uses, from where).
  _TFDS_NOISE = (
    'has no dataset_info.json',
    'Generating dataset',
    'Load dataset info from',
  )

  def __init__(self):
    super().__init__()
    self._seen = set()

  def filter(self, record: logging_lib.LogRecord) -> bool:
    path = record.pathname.replace(os.sep, '/')
    if '/orbax/' in path:
      if record.levelno <= logging_lib.INFO or 'tracked_metric' in str(
        record.msg
      ):
        return False
      # A failed write is re-raised by the caller with its cause: log Orbax's
      # line about it, not the traceback of each of its threads.
      record.exc_info, record.exc_text = None, None
      return True
    if '/tensorflow_datasets/' in path and any(
      text in record.getMessage() for text in self._TFDS_NOISE
    ):
      return False
    if record.levelno > logging_lib.INFO:
      return True
    if any(part in path for part in self._REPEATED):
      key = (path, record.lineno, record.getMessage())
      if key in self._seen:
        return False
      self._seen.add(key)
    return True


def quiet_library_logs() -> None:
  """Installs `QuietLibraryLogs` on absl's handler (entry points call it)
  and drops the closed-event-loop tracebacks of a failed save
  (`closed_loop_noise`)."""
  from absl import logging  # pylint: disable=g-import-not-at-top

  from cco_jax import closed_loop_noise  # pylint: disable=g-import-not-at-top

  closed_loop_noise.install()

  handler = logging.get_absl_handler()
  if not any(isinstance(f, QuietLibraryLogs) for f in handler.filters):
    handler.addFilter(QuietLibraryLogs())
