"""XLA CPU settings that make training steps faster, applied before JAX starts.

jaxlib 0.10.2 hands convolutions on CPU to YNNPACK ("ynn_fusion"). Its weight
gradient (the convolution of activations with output gradients) is 10-20x
slower than its forward pass on the 2-core AMD EPYC machine this project was
measured on (docs/benchmarks/training.md): a 3x3, 64->64 convolution on a
(32, 32, 32, 64) batch took ~1.0-1.5 s for the weight gradient and ~0.07 s
forward. Dropping convolutions from YNNPACK's list, so that XLA's own (Eigen)
convolutions run instead, while keeping YNNPACK's fast reductions and dots,
halved the ResNet-18 (128 px, batch 32) train step. Numerics are unchanged:
both paths compute the same float32 convolution, up to summation order.

`apply()` appends `CPU_XLA_FLAGS` to `XLA_FLAGS` unless
  * `XLA_FLAGS` already sets that option (yours wins),
  * `CCO_CPU_XLA_TUNING=0` is in the environment, or
  * the installed jaxlib does not know the option (XLA aborts on unknown
    flags, so it is looked up in jaxlib's shared library first).
It must run before JAX initialises its backends (the first computation or
`jax.devices()` call); the entry points call it at import time. The options
only affect compilation for the CPU backend; GPU and TPU steps are unchanged.
"""

from __future__ import annotations

import importlib.util
import mmap
import os
from pathlib import Path

OPTION = 'xla_cpu_experimental_ynn_fusion_type'
# Remove convolutions from the default YNNPACK fusions (keeps reduce and dot).
CPU_XLA_FLAGS = f'--{OPTION}=-individual_convolution'
# The same setting as a per-compilation option (`Lowered.compile(...)`), for
# A/B comparisons inside one process; equivalent to the flag (same fusions).
COMPILER_OPTIONS = {
  OPTION: 'LIBRARY_FUSION_TYPE_REDUCE,LIBRARY_FUSION_TYPE_DOT'
}
DISABLE_ENV = 'CCO_CPU_XLA_TUNING'


def jaxlib_knows(option: str) -> bool:
  """Whether the installed jaxlib's XLA has a debug option named `option`."""
  spec = importlib.util.find_spec('jaxlib')
  if spec is None or spec.origin is None:
    return False
  needle = option.encode()
  for library in sorted(Path(spec.origin).parent.glob('*.so')):
    if library.stat().st_size == 0:
      continue
    with (
      open(library, 'rb') as f,
      mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m,
    ):
      if m.find(needle) != -1:
        return True
  return False


def apply() -> str:
  """Adds `CPU_XLA_FLAGS` to `XLA_FLAGS` when safe; returns what was added ('' if not)."""
  current = os.environ.get('XLA_FLAGS', '')
  if os.environ.get(DISABLE_ENV, '1') == '0' or OPTION in current:
    return ''
  if not jaxlib_knows(OPTION):
    return ''
  os.environ['XLA_FLAGS'] = f'{current} {CPU_XLA_FLAGS}'.strip()
  return CPU_XLA_FLAGS


# ----------------------------------------------------------------------------
# GPU: XLA flags and a persistent compilation cache.
# ----------------------------------------------------------------------------

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
COMPILATION_CACHE_ENV = 'CCO_COMPILATION_CACHE'


def cuda_plugin_installed() -> bool:
  """Whether a JAX CUDA plugin is installed (without starting JAX)."""
  for name in CUDA_PLUGINS:
    try:
      if importlib.util.find_spec(name) is not None:
        return True
    except ModuleNotFoundError:  # The parent package (jax_plugins) is absent.
      continue
  return False


def apply_gpu(force: bool = False) -> str:
  """Adds `GPU_XLA_FLAGS` to `XLA_FLAGS` where a CUDA plugin is installed.

  Like `apply()` for CPU: skipped for an option `XLA_FLAGS` already sets
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
    and jaxlib_knows(flag[2:].split('=')[0])
  ]
  if added:
    os.environ['XLA_FLAGS'] = ' '.join([current, *added]).strip()
  return ' '.join(added)


def compilation_cache_dir(directory: str | None = None) -> str:
  """`directory` if given ('' = no cache), else `$CCO_COMPILATION_CACHE`."""
  if directory is not None:
    return directory
  return os.environ.get(COMPILATION_CACHE_ENV, '')


def enable_compilation_cache(
  directory: str | None = None, min_compile_seconds: float = 1.0
) -> str:
  """Keeps compiled XLA programs in `directory` across processes and runs.

  ResNet-50's train step takes minutes to compile on a GPU host; with the
  cache, a second process (a resumed run, the evaluation after training, a
  rerun) loads it in seconds. Programs that compiled in under
  `min_compile_seconds` are not stored. Call before the first compilation.

  Args:
    directory: cache location (a local path, or any path JAX's cache takes);
      None reads `$CCO_COMPILATION_CACHE`; '' disables the cache.
    min_compile_seconds: JAX's `jax_persistent_cache_min_compile_time_secs`.

  Returns:
    The directory in use ('' when disabled).
  """
  directory = compilation_cache_dir(directory)
  if not directory:
    return ''
  import jax  # pylint: disable=g-import-not-at-top

  if '://' not in directory:
    os.makedirs(directory, exist_ok=True)
  jax.config.update('jax_compilation_cache_dir', directory)
  jax.config.update(
    'jax_persistent_cache_min_compile_time_secs', min_compile_seconds
  )
  return directory
