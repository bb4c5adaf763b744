"""XLA CPU flags: convolutions off YNNPACK, where jaxlib knows the option.

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
`jax.devices()` call); `experiments.cli` calls it before parsing flags. The options
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
