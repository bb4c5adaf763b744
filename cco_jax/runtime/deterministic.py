"""Runs that repeat on other CPU machines: `CCO_DETERMINISTIC=<threads>`.

On XLA's CPU backend the same program, weights and batches give bitwise
identical results run after run on one machine, but not across machines.
Measured on the project's 2-core machine (`docs/reproducibility.md`; a
120-step ACE run of `experiments/configs/spurious.py`, losses compared at
every logged step):

  * the number of CPUs the process may use changes the training loss from
    the first logged step (XLA splits work over a thread pool the size of
    the CPU affinity set; YNNPACK's reductions and dots do too), with or
    without YNNPACK, and whether Eigen is multi-threaded or not;
  * the instruction set XLA compiles for (`--xla_cpu_max_isa`, AVX-512 here
    by default) changes it once YNNPACK is off; YNNPACK picks its own kernels
    from the CPU it finds, which no flag pins.

`apply()`, called by every entry point (`experiments.cli`) before JAX starts,
removes all three when `CCO_DETERMINISTIC` is set to a thread count N:

  * the process's CPU affinity is cut to N CPUs (the first N it may use), so
    the thread pool has N threads on any machine with at least N CPUs;
  * YNNPACK fusions are off (`--xla_cpu_experimental_ynn_fusion_type=`), so
    no kernel is chosen by CPU detection at run time;
  * XLA compiles for AVX2 (`--xla_cpu_max_isa=AVX2`), which every x86-64
    server since 2013 has (AVX-512 machines and AMD EPYC alike).

The cost, measured in `docs/reproducibility.md`, is the speed of YNNPACK's
kernels and of any CPUs beyond N. What each run ran on is written to
`WORKDIR/environment.json` (`cco_jax.runtime.environment`), so a reader can
tell whether two runs could have matched.
"""

from __future__ import annotations

import os
import sys

from cco_jax import errors

ENV = 'CCO_DETERMINISTIC'
XLA_FLAGS = (
  '--xla_cpu_experimental_ynn_fusion_type=',
  '--xla_cpu_max_isa=AVX2',
)


def threads() -> int | None:
  """The thread count `CCO_DETERMINISTIC` asks for (None: not set or 0).

  Raises:
    errors.UserError: the value is not a non-negative integer.
  """
  text = os.environ.get(ENV, '').strip()
  if not text:
    return None
  try:
    count = int(text)
  except ValueError:
    count = -1
  if count < 0:
    raise errors.UserError(
      f'{ENV}={text!r}: give the number of CPU threads every run of the '
      f'comparison uses (e.g. {ENV}=2), or unset it.'
    )
  return count or None


def apply() -> str:
  """Pins threads, kernels and ISA as `CCO_DETERMINISTIC` asks; returns the
  XLA flags it added ('' when off). Call before JAX initialises backends.

  Raises:
    errors.UserError: a bad value, fewer CPUs than asked for, or XLA_FLAGS
      already setting one of the pinned options to something else.
  """
  count = threads()
  if count is None:
    return ''
  allowed = sorted(os.sched_getaffinity(0))
  if len(allowed) < count:
    raise errors.UserError(
      f'{ENV}={count}, but this process may use {len(allowed)} CPUs; set '
      f'{ENV}={len(allowed)} on every machine of the comparison, or run it '
      'on a larger machine.'
    )
  current = os.environ.get('XLA_FLAGS', '')
  added = []
  for flag in XLA_FLAGS:
    option = flag.split('=')[0]
    present = [f for f in current.split() if f.split('=')[0] == option]
    if present and present != [flag]:
      raise errors.UserError(
        f'XLA_FLAGS sets {present[-1]}, but {ENV} needs {flag}; unset one.'
      )
    if not present:
      added.append(flag)
  os.sched_setaffinity(0, allowed[:count])
  os.environ['XLA_FLAGS'] = ' '.join([current, *added]).strip()
  return ' '.join(added)


# Sets its CPU affinity, then becomes the command: a child limited to some
# CPUs without `preexec_fn` (unsafe to fork from a multithreaded process).
_PINNED = (
  'import os, sys; '
  "os.sched_setaffinity(0, [int(c) for c in sys.argv[1].split(',')]); "
  'os.execv(sys.argv[2], sys.argv[2:])'
)


def offered_cpus(cpus, argv: list[str]) -> list[str]:
  """`argv` (an absolute executable first) run with only `cpus` offered: what
  a machine with that many CPUs would give it (for tests and benchmarks)."""
  return [
    sys.executable,
    '-c',
    _PINNED,
    ','.join(str(c) for c in cpus),
    *argv,
  ]
