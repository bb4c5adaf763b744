"""A process of a multi-process run, supervised so that its last word is ours.

When process 0 of a `jax.distributed` run (the coordinator, which holds the
coordination service) dies, JAX's C++ runtime aborts every other process
within about a second, before any Python code can run: a stack dump is the
last thing their users see, naming no process and no way forward
(`cco_jax.peers` explains the death of any other process from Python).

So every entry point started as one of several processes (`needed`: more
than one process named by `--num_processes` or `JAX_NUM_PROCESSES`) runs its
own command again as a child (`CCO_SUPERVISED=1` set, so the child does not
do it again) and waits for it:

  * the child's output goes straight to the same stdout/stderr;
  * SIGTERM and SIGINT are passed on to the child (preemption: the child
    saves at the step boundary and exits 143, `cco_jax.preemption`);
  * the child dies with the supervisor (Linux `PR_SET_PDEATHSIG`), so
    `kill -9` of the process one started still ends the training;
  * the supervisor exits with the child's status; when the child was
    aborted (SIGABRT, the runtime's end after a lost peer), it first prints
    one line naming the process that most likely died — the coordinator,
    unless this is it — and the command to run again, and exits with
    `peers.EXIT_CODE` (75, "try again").
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys

SUPERVISED_ENV = 'CCO_SUPERVISED'
_PR_SET_PDEATHSIG = 1


def _flag(argv: list[str], name: str) -> str | None:
  for i, arg in enumerate(argv):
    if arg.startswith(f'--{name}='):
      return arg.split('=', 1)[1]
    if arg == f'--{name}' and i + 1 < len(argv):
      return argv[i + 1]
  return None


def process_count(argv: list[str]) -> int:
  """Processes of the run: --num_processes, else $JAX_NUM_PROCESSES, else 1."""
  text = _flag(argv, 'num_processes') or os.environ.get('JAX_NUM_PROCESSES')
  try:
    return int(text) if text else 1
  except ValueError:
    return 1  # The flag parser reports a bad value in one line.


def process_index(argv: list[str]) -> int | None:
  text = _flag(argv, 'process_id') or os.environ.get('JAX_PROCESS_ID')
  try:
    return int(text) if text else None
  except ValueError:
    return None


def needed(argv: list[str]) -> bool:
  """Whether this process should supervise itself (module docstring)."""
  return (
    os.environ.get(SUPERVISED_ENV) != '1'
    and sys.platform.startswith('linux')
    and process_count(argv) > 1
  )


def aborted_message(index: int | None, count: int, command: str) -> str:
  """The one line after the child was aborted by the runtime."""
  me = 'this process' if index is None else f'process {index}'
  if index == 0:
    cause = 'another process died or lost its network'
  else:
    cause = (
      'the coordinator, process 0, died or lost its network (the death of '
      'any other process is reported by name)'
    )
  return (
    f'{me[0].upper()}{me[1:]} of {count} was stopped by the JAX distributed '
    f'runtime: {cause}. Start all {count} processes again with the same '
    f'command to resume from the last checkpoint: {command}'
  )


def _die_with_parent() -> None:
  try:
    libc = ctypes.CDLL('libc.so.6', use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
  except OSError:
    pass


def run_supervised(argv: list[str]) -> None:
  """Runs this command as a supervised child and exits as it did."""
  from cco_jax import peers  # pylint: disable=g-import-not-at-top

  command = list(getattr(sys, 'orig_argv', [sys.executable, *argv]))
  child = subprocess.Popen(
    command,
    env={**os.environ, SUPERVISED_ENV: '1'},
    preexec_fn=_die_with_parent,
  )

  def forward(signum, _frame):
    if child.poll() is None:
      child.send_signal(signum)

  for signum in (signal.SIGTERM, signal.SIGINT):
    signal.signal(signum, forward)
  code = child.wait()
  if code == -signal.SIGABRT:
    print(
      'error: '
      + aborted_message(
        process_index(argv), process_count(argv), peers.resume_command()
      ),
      file=sys.stderr,
      flush=True,
    )
    sys.exit(peers.EXIT_CODE)
  sys.exit(128 - code if code < 0 else code)
