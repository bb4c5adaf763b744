"""Process setup before JAX starts: XLA CPU flags, several hosts, workdir lock.

* `apply()`: XLA CPU flags (below).
* `initialize_distributed(...)`: joins a multi-process run
  (`jax.distributed.initialize`) from flags or the `JAX_COORDINATOR_ADDRESS`,
  `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID` environment variables; on CPU the
  processes' collectives go over gloo.
* `WorkdirLock`: one run per workdir (an exclusive `fcntl` lock).
* `quiet_library_logs()`: no Orbax INFO flood, no repeated dataset lines;
* `apply_gpu()`, `enable_compilation_cache()`: GPU flags, compilation cache.

XLA CPU flags.

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

import fcntl
import importlib.util
import logging as logging_lib
import mmap
import os
from pathlib import Path
import socket

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
    raise ValueError(
      f'Environment variable {name}={value!r} is not an integer.'
    ) from None


def distributed_settings(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
) -> dict:
  """The arguments of `jax.distributed.initialize`: flags, else environment.

  Returns {} when nothing is set (a single-process run, or Cloud TPU, where
  JAX finds them itself). Raises ValueError when only some are set.
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
    raise ValueError(
      f'Multi-process run: {", ".join(missing)} not set. Give all three of '
      f'--coordinator_address/{ENV_COORDINATOR}, --num_processes/'
      f'{ENV_NUM_PROCESSES} and --process_id/{ENV_PROCESS_ID}.'
    )
  if given and not 0 <= settings['process_id'] < settings['num_processes']:
    raise ValueError(
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


class WorkdirInUse(RuntimeError):
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


class QuietLibraryLogs(logging_lib.Filter):
  """Keeps the log readable: drops Orbax's INFO chatter (dozens of lines per
  checkpoint), its "tracked_metric" warning on checkpoints saved without an
  evaluation and the tracebacks of its worker threads (the caller re-raises
  their error), and repeats of TFDS's and the data pipeline's INFO lines
  ("Load dataset info ...", "Using ... at ..."), which every evaluation would
  log again. Other warnings and errors always pass."""

  _REPEATED = ('/tensorflow_datasets/', '/cco_jax/data/', '/input_pipeline.py')

  def __init__(self):
    super().__init__()
    self._seen = set()

  def filter(self, record: logging_lib.LogRecord) -> bool:
    path = record.pathname.replace(os.sep, '/')
    if '/orbax/' in path:
      if record.levelno <= logging_lib.INFO or 'tracked_metric' in str(
        record.msg
      ):
        return False
      # A failed write is re-raised by the caller with its cause: log Orbax's
      # line about it, not the traceback of each of its threads.
      record.exc_info, record.exc_text = None, None
      return True
    if record.levelno > logging_lib.INFO:
      return True
    if any(part in path for part in self._REPEATED):
      key = (path, record.lineno, record.getMessage())
      if key in self._seen:
        return False
      self._seen.add(key)
    return True


def quiet_library_logs() -> None:
  """Installs `QuietLibraryLogs` on absl's handler (entry points call it)
  and drops the closed-event-loop tracebacks of a failed save
  (`closed_loop_noise`)."""
  from absl import logging  # pylint: disable=g-import-not-at-top

  from cco_jax import closed_loop_noise  # pylint: disable=g-import-not-at-top

  closed_loop_noise.install()

  handler = logging.get_absl_handler()
  if not any(isinstance(f, QuietLibraryLogs) for f in handler.filters):
    handler.addFilter(QuietLibraryLogs())
