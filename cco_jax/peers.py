"""A dead peer explained: a multi-process run whose process died stops the
others within a set time, with one message naming it and the resume command.

Without this, the survivors of a dead worker wait for JAX's heartbeat timeout
(100 s by default), then the C++ runtime aborts them with a stack dump that
names no process. `Watchdog` is a thread in every process of a
`jax.distributed` run: each process writes a counter under
`cco_jax/alive/<index>` in the coordination service's key-value store every
`timeout / 10` seconds and reads the others'; a counter that has not changed
for `timeout` seconds means that process died (or lost its network). The
watchdog then logs

  Process 1 of 2 stopped responding (no sign of life for 30 s: it died or
  lost its network); process 0 stops too. Start all 2 processes again with
  the same command to resume from the last checkpoint: python -m ...

and ends the process at once with status `EXIT_CODE` (75, EX_TEMPFAIL: "try
again"). JAX's heartbeat timeout is set above `timeout`
(`initialize_options`), so the watchdog speaks first.

The timeout: `CCO_PEER_TIMEOUT_S` in the environment (seconds, default 60).

Limit: when process 0 (the coordinator, which holds the key-value store)
dies, the C++ runtime of the others aborts within about a second, before any
Python code can run; its message ("Terminating process because the JAX
distributed service detected fatal errors ...") is the last output then. The
watchdog names process 0 only when it gets there first.
"""

from __future__ import annotations

import atexit
import os
import shlex
import sys
import threading
import time

from absl import logging

TIMEOUT_ENV = 'CCO_PEER_TIMEOUT_S'
DEFAULT_TIMEOUT_S = 60.0
EXIT_CODE = 75
PREFIX = 'cco_jax/alive/'


def timeout_s(value: float | None = None) -> float:
  """`value`, else `$CCO_PEER_TIMEOUT_S`, else 60 (seconds, > 0)."""
  if value is None:
    text = os.environ.get(TIMEOUT_ENV, '').strip()
    try:
      value = float(text) if text else DEFAULT_TIMEOUT_S
    except ValueError:
      raise ValueError(
        f'{TIMEOUT_ENV}={text!r} is not a number: give the seconds after '
        'which a silent process counts as dead (e.g. 60).'
      ) from None
  if not value > 0:
    raise ValueError(
      f'The peer timeout must be > 0 seconds, not {value} ({TIMEOUT_ENV}).'
    )
  return float(value)


def initialize_options(timeout: float) -> dict:
  """`jax.distributed.initialize` options: JAX's own heartbeat timeout well
  above the watchdog's, so that the watchdog explains a death first."""
  return {'heartbeat_timeout_seconds': int(max(100, 2 * timeout + 10))}


def resume_command() -> str:
  """The command line this process was started with (shell-quoted)."""
  return shlex.join(getattr(sys, 'orig_argv', sys.argv))


def dead_peer_message(
  dead: list[int], me: int, count: int, timeout: float, command: str
) -> str:
  """The one message a survivor prints."""
  who = ', '.join(str(i) for i in dead)
  noun = 'Process' if len(dead) == 1 else 'Processes'
  return (
    f'{noun} {who} of {count} stopped responding (no sign of life for '
    f'{timeout:g} s: it died or lost its network); process {me} stops too. '
    f'Start all {count} processes again with the same command to resume '
    f'from the last checkpoint: {command}'
  )


class Watchdog:
  """Watches the other processes of a `jax.distributed` run (a thread)."""

  def __init__(self, client, index: int, count: int, timeout: float):
    self._client = client
    self._index, self._count, self._timeout = index, count, timeout
    self._interval = max(timeout / 10, 0.2)
    self._stopping = threading.Event()
    self._thread = threading.Thread(
      target=self._run, name='cco_jax-peer-watchdog', daemon=True
    )

  def start(self) -> Watchdog:
    self._thread.start()
    # At a normal exit process 0's key-value store goes away first: from
    # then on only a stale peer counts, not an unreachable store.
    atexit.register(self._stopping.set)
    return self

  def _run(self) -> None:
    seen: dict[str, tuple[str, float]] = {}
    started = time.monotonic()
    counter = 0
    while True:
      counter += 1
      try:
        self._client.key_value_set(
          f'{PREFIX}{self._index}', str(counter), allow_overwrite=True
        )
        values = {
          key.rsplit('/', 1)[-1]: value
          for key, value in self._client.key_value_dir_get(PREFIX)
        }
      except Exception:  # pylint: disable=broad-except
        if self._stopping.is_set():
          return  # Process 0 finished: a normal exit.
        self._stop([0])  # Process 0 holds the store: it is gone.
        return
      now = time.monotonic()
      dead = []
      for peer in range(self._count):
        if peer == self._index:
          continue
        key = str(peer)
        value = values.get(key)
        if key not in seen or seen[key][0] != value:
          seen[key] = (value, now if value is not None else started)
        if now - seen[key][1] > self._timeout:
          dead.append(peer)
      if dead:
        self._stop(dead)
        return
      time.sleep(self._interval)

  def _stop(self, dead: list[int]) -> None:
    message = dead_peer_message(
      dead, self._index, self._count, self._timeout, resume_command()
    )
    logging.error('%s', message)
    sys.stderr.flush()
    os._exit(EXIT_CODE)  # pylint: disable=protected-access


def watch(timeout: float) -> Watchdog | None:
  """Starts a `Watchdog` in a `jax.distributed` run of several processes."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax._src import distributed  # pylint: disable=g-import-not-at-top

  client = distributed.global_state.client
  if client is None or jax.process_count() < 2:
    return None
  return Watchdog(
    client, jax.process_index(), jax.process_count(), timeout
  ).start()
