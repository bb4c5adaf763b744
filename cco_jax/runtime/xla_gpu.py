"""XLA flags for GPUs, added where a JAX CUDA plugin is installed."""

from __future__ import annotations

import importlib.util
import os

from cco_jax.runtime import xla_cpu

# The latency-hiding scheduler overlaps collectives (the gradient all-reduce
# of a data-parallel step, BatchNorm statistics) with compute; NVIDIA's JAX
# images set it by default. It only affects compilation for GPUs.
GPU_XLA_FLAGS = ('--xla_gpu_enable_latency_hiding_scheduler=true',)
GPU_DISABLE_ENV = 'CCO_GPU_XLA_TUNING'
CUDA_PLUGINS = (
  'jax_cuda13_plugin',
  'jax_cuda12_plugin',
  'jax_plugins.xla_cuda13',
  'jax_plugins.xla_cuda12',
)


def cuda_plugin_installed() -> bool:
  """Whether a JAX CUDA plugin is installed (without starting JAX)."""
  for name in CUDA_PLUGINS:
    try:
      if importlib.util.find_spec(name) is not None:
        return True
    except ModuleNotFoundError:  # The parent package (jax_plugins) is absent.
      continue
  return False


def apply(force: bool = False) -> str:
  """Adds `GPU_XLA_FLAGS` to `XLA_FLAGS` where a CUDA plugin is installed.

  Like `xla_cpu.apply()`: skipped for an option `XLA_FLAGS` already sets
  (yours wins), with `CCO_GPU_XLA_TUNING=0`, or where jaxlib does not know
  the option. Must run before JAX initialises its backends. `force` applies
  them without a CUDA plugin (they only affect GPU compilation).

  Returns:
    The flags added, space-separated ('' if none).
  """
  if os.environ.get(GPU_DISABLE_ENV, '1') == '0':
    return ''
  if not (force or cuda_plugin_installed()):
    return ''
  current = os.environ.get('XLA_FLAGS', '')
  added = [
    flag
    for flag in GPU_XLA_FLAGS
    if flag[2:].split('=')[0] not in current
    and xla_cpu.jaxlib_knows(flag[2:].split('=')[0])
  ]
  if added:
    os.environ['XLA_FLAGS'] = ' '.join([current, *added]).strip()
  return ' '.join(added)
