"""The XLA_FLAGS of test processes and of the subprocesses tests start.

Tests compile with XLA's backend optimisation level 0: most of the suite's
time is compiling tiny programs, which this makes about 1.5x faster. It
changes no semantics (no fast-math at any level). `CCO_TEST_XLA_OPTIMIZE=1`
compiles as users do.
"""

import os


def for_devices(num_devices: int) -> str:
  """XLA_FLAGS for a CPU process with `num_devices` virtual devices."""
  flags = [f'--xla_force_host_platform_device_count={num_devices}']
  if os.environ.get('CCO_TEST_XLA_OPTIMIZE', '0') != '1':
    flags.append('--xla_backend_optimization_level=0')
  return ' '.join(flags)
