"""Several hosts: joining a multi-process run (`jax.distributed`).

`initialize_distributed(...)` reads flags or the `JAX_COORDINATOR_ADDRESS`,
`JAX_NUM_PROCESSES`, `JAX_PROCESS_ID` environment variables; on CPU the
processes' collectives go over gloo.
"""

from __future__ import annotations

import os

from cco_jax import errors

ENV_COORDINATOR = 'JAX_COORDINATOR_ADDRESS'
ENV_NUM_PROCESSES = 'JAX_NUM_PROCESSES'
ENV_PROCESS_ID = 'JAX_PROCESS_ID'


def _env_int(name: str) -> int | None:
  value = os.environ.get(name, '').strip()
  if not value:
    return None
  try:
    return int(value)
  except ValueError:
    raise errors.UserError(
      f'Environment variable {name}={value!r} is not an integer.'
    ) from None


def distributed_settings(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
) -> dict:
  """The arguments of `jax.distributed.initialize`: flags, else environment.

  Returns {} when nothing is set (a single-process run, or Cloud TPU, where
  JAX finds them itself). Raises `errors.UserError` when only some are set
  or process_id is out of range.
  """
  settings = {
    'coordinator_address': coordinator_address
    or os.environ.get(ENV_COORDINATOR)
    or None,
    'num_processes': num_processes
    if num_processes is not None
    else _env_int(ENV_NUM_PROCESSES),
    'process_id': process_id
    if process_id is not None
    else _env_int(ENV_PROCESS_ID),
  }
  given = {k: v for k, v in settings.items() if v is not None}
  if given and len(given) != len(settings):
    missing = sorted(set(settings) - set(given))
    raise errors.UserError(
      f'Multi-process run: {", ".join(missing)} not set. Give all three of '
      f'--coordinator_address/{ENV_COORDINATOR}, --num_processes/'
      f'{ENV_NUM_PROCESSES} and --process_id/{ENV_PROCESS_ID}.'
    )
  if given and not 0 <= settings['process_id'] < settings['num_processes']:
    raise errors.UserError(
      f'process_id={settings["process_id"]} must be in '
      f'[0, num_processes={settings["num_processes"]}).'
    )
  return given


def initialize_distributed(
  enabled: bool = False,
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
) -> bool:
  """Joins a multi-process run if asked to; returns whether it did.

  Asked = `enabled` (Cloud TPU: JAX finds the rest) or any of the settings
  given (arguments first, then the `JAX_*` environment variables). With more
  than one process, CPU collectives go over gloo (without it, XLA's CPU
  backend cannot run a computation across processes), unless
  `jax_cpu_collectives_implementation` is already set. A `peers.Watchdog`
  stops this process with one message when another one dies
  (`$CCO_PEER_TIMEOUT_S`). Call it before any JAX computation.
  """
  settings = distributed_settings(
    coordinator_address, num_processes, process_id
  )
  if not (enabled or settings):
    return False
  import jax  # pylint: disable=g-import-not-at-top

  from cco_jax import peers  # pylint: disable=g-import-not-at-top

  if settings.get('num_processes', 2) > 1:
    current = jax.config.jax_cpu_collectives_implementation
    if current in (None, '', 'none'):
      jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  timeout = peers.timeout_s()
  jax.distributed.initialize(**settings, **peers.initialize_options(timeout))
  peers.watch(timeout)  # A dead process: one message, then a clean stop.
  return True
