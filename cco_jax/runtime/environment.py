"""What a run ran on, so a reader can tell whether two runs could match.

`describe()` returns the CPU (model, the vector-instruction flags XLA and
YNNPACK choose kernels by, its cache sizes, the CPUs the process may use), the accelerators,
the XLA flags, `CCO_DETERMINISTIC` (`cco_jax.runtime.deterministic`) and the
versions of Python and the numerical libraries. The training loop appends it
to `WORKDIR/environment.json` (a list: one entry per start, so a run resumed
on another machine says so) and the comparison tables carry it.
"""

from __future__ import annotations

from importlib import metadata
import json
import os
import platform
import time

from etils import epath

FILE = 'environment.json'
PACKAGES = ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'numpy')
# CPU flags that select kernels (XLA's --xla_cpu_max_isa, YNNPACK, Eigen).
VECTOR_FLAGS = ('sse4_2', 'avx', 'avx2', 'fma', 'f16c', 'avx_vnni')
VECTOR_PREFIXES = ('avx512', 'amx')


def _cpu() -> dict:
  model, flags = platform.processor() or None, []
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        key, _, value = line.partition(':')
        if key.strip() == 'model name' and model in (None, '', 'x86_64'):
          model = value.strip()
        elif key.strip() == 'flags':
          flags = value.split()
          break
  except OSError:
    pass
  vector = sorted(
    f for f in set(flags) if f in VECTOR_FLAGS or f.startswith(VECTOR_PREFIXES)
  )
  return {
    'model': model,
    'vector_flags': vector,
    'caches': caches(),
    'cpu_count': os.cpu_count(),
    'usable_cpus': len(os.sched_getaffinity(0))
    if hasattr(os, 'sched_getaffinity')
    else os.cpu_count(),
  }


def caches(root: str = '/sys/devices/system/cpu/cpu0/cache') -> dict:
  """The first CPU's caches as Linux reports them, e.g. {'L1 Data': '32K',
  'L2 Unified': '1024K'} ({} where unknown). Eigen sizes its matrix-product
  blocks from them, which changes the order of sums between CPUs
  (docs/reproducibility.md)."""
  found = {}
  try:
    entries = sorted(os.listdir(root))
  except OSError:
    return found
  for entry in entries:
    if not entry.startswith('index'):
      continue
    try:
      values = [
        epath.Path(root, entry, name).read_text().strip()
        for name in ('level', 'type', 'size')
      ]
    except OSError:
      continue
    found[f'L{values[0]} {values[1]}'] = values[2]
  return found


def describe() -> dict:
  """The machine and software of this process (JSON values)."""
  import jax  # pylint: disable=g-import-not-at-top

  from cco_jax.runtime import (
    deterministic,  # pylint: disable=g-import-not-at-top
  )

  versions = {}
  for name in PACKAGES:
    try:
      versions[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      versions[name] = None
  return {
    'time': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()),
    'platform': platform.platform(),
    'python': platform.python_version(),
    'cpu': _cpu(),
    'devices': sorted({f'{d.platform}:{d.device_kind}' for d in jax.devices()}),
    'process_count': jax.process_count(),
    'xla_flags': os.environ.get('XLA_FLAGS', ''),
    'deterministic_threads': deterministic.threads(),
    'versions': versions,
  }


def append(workdir: str | os.PathLike) -> dict:
  """Appends `describe()` to WORKDIR/environment.json (local or remote, e.g.
  gs://); returns the entry."""
  entry = describe()
  entries = read(workdir)
  entries.append(entry)
  (epath.Path(workdir) / FILE).write_text(json.dumps(entries, indent=1))
  return entry


def read(workdir: str | os.PathLike) -> list[dict]:
  """The entries of WORKDIR/environment.json ([] if none)."""
  path = epath.Path(workdir) / FILE
  return json.loads(path.read_text()) if path.exists() else []
