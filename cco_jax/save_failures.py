"""A checkpoint save that failed, explained: its errno, the free space there,
the steps that are intact, and its partial files removed.

`checkpointing.save` and `checkpointing.wait` turn any failure of an Orbax
save (synchronous or in the background) into `save_error(...)`: one `OSError`
naming the step's path, the cause (e.g. no space left), the free space and
the intact steps read from the directory itself.
"""

from __future__ import annotations

import errno as errno_lib
import os
import re
import shutil

from absl import logging
from etils import epath
import orbax.checkpoint as ocp


def free_space(path: str | os.PathLike) -> str:
  """Free space on the disk holding `path` (or its nearest existing parent);
  unknown on object stores."""
  path = epath.Path(path)
  if '://' in str(path):
    return 'unknown free space (object store)'
  try:
    while not path.exists() and path.parent != path:
      path = path.parent
    free = shutil.disk_usage(os.fspath(path)).free
  except OSError:
    return 'unknown free space'
  return f'{free / 2**20:.1f} MiB free'


def underlying_errno(error: BaseException) -> int:
  """The errno of the first `OSError` in `error`'s chain, else one in its text."""
  seen = error
  while seen is not None:
    if isinstance(seen, OSError) and seen.errno:
      return seen.errno
    seen = seen.__cause__ or seen.__context__
  match = re.search(
    r'(?:os error|errno|os_error_code)[^0-9]{0,4}(\d+)', str(error), re.I
  )
  return int(match.group(1)) if match else errno_lib.EIO


def save_error(
  manager: ocp.CheckpointManager, step: int | None, error: BaseException
) -> OSError:
  """The `OSError` of a failed save of `step` (None: unknown); removes its
  partial files."""
  directory = epath.Path(manager.directory)
  path = str(directory / str(step) if step is not None else directory)
  if step is not None:
    remove_partial_save(directory, step)
  code = underlying_errno(error)
  # The cause is in the message; its traceback is Orbax's.
  return OSError(
    code,
    f'Saving the checkpoint of step {step} failed ({os.strerror(code)}; '
    f'{free_space(path)} there): {type(error).__name__}: '
    f'{str(error).splitlines()[0] if str(error) else ""} Earlier checkpoints '
    f'are intact: steps {finished_steps(directory)}. Free some space (or '
    'fix the permissions) and run again to resume.',
    path,
  )


PARTIAL = re.compile(r'^(\d+)\.orbax-checkpoint-tmp')


def finished_steps(directory: epath.Path) -> list[int]:
  """Steps whose save finished (a step directory, not a temporary one),
  read from `directory` itself: the manager's list can lag behind an
  asynchronous save that completed."""
  if not directory.is_dir():
    return []
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def partial_steps(directory: epath.Path) -> list[int]:
  """Steps with a temporary (unfinished or failed) save in `directory`."""
  if not directory.is_dir():
    return []
  names = (p.name for p in directory.iterdir())
  return sorted({int(m.group(1)) for m in map(PARTIAL.match, names) if m})


def remove_partial_save(directory: epath.Path, step: int) -> None:
  """Removes the temporary directory of a save of `step` that failed."""
  if not directory.is_dir():
    return
  for path in directory.iterdir():
    if path.name.startswith(f'{step}.orbax-checkpoint-tmp'):
      logging.warning(
        'Removing the partial checkpoint %s of a failed save.', path
      )
      path.rmtree(missing_ok=True)
