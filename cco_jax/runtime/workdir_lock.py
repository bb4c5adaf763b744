"""One run per workdir: an exclusive `fcntl` lock held while a run writes."""

from __future__ import annotations

import fcntl
import logging as logging_lib
import os
import socket

from cco_jax import errors


class WorkdirInUse(errors.UserError):
  """Another process holds the workdir's lock."""


class WorkdirLock:
  """An exclusive lock on a workdir, held while a run writes into it.

  `acquire()` takes an `fcntl` lock on `workdir/<name>` without waiting and
  writes the holder's PID and host into it; a second process fails at once
  with `WorkdirInUse` naming them. The kernel releases the lock when the
  process ends, even on `kill -9`, so a stale file never blocks a new run.
  Multi-process runs use one lock file per process (`run.lock.<index>` after
  the first), so a second run on the same workdir is refused on every host.
  """

  def __init__(self, workdir: str, process_index: int = 0):
    name = 'run.lock' if process_index == 0 else f'run.lock.{process_index}'
    self.path = os.path.join(os.fspath(workdir), name)
    self._fd = None

  def acquire(self) -> WorkdirLock:
    if '://' in self.path:
      logging_lib.getLogger(__name__).warning(
        'Object stores have no file locks: %s is not locked, so nothing stops '
        'a second run from writing into the same workdir.',
        self.path,
      )
      return self
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      holder = os.pread(fd, 256, 0).decode(errors='replace').split()
      os.close(fd)
      pid, host = (holder + ['?', '?'])[:2]
      raise WorkdirInUse(
        f'workdir in use by PID {pid} on host {host} ({self.path} is '
        'locked): wait for that run to end, stop it, or choose another '
        '--workdir.'
      ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f'{os.getpid()} {socket.gethostname()}\n'.encode(), 0)
    self._fd = fd
    return self

  def release(self) -> None:
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None

  def __enter__(self) -> WorkdirLock:
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()
