"""A persistent XLA compilation cache shared by processes and runs."""

from __future__ import annotations

import os

COMPILATION_CACHE_ENV = 'CCO_COMPILATION_CACHE'


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
