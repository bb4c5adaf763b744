"""Measuring primitives of the training benchmark: clocks, load, compiles.

`timed` blocks on a result and returns wall and process CPU seconds;
`time_repeated` takes a median after a warm-up; `CompileLog` records how long
XLA compiled (or fetched from the persistent cache) while it is open;
`synthetic_batch` makes the fixed batch the step section times.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cco_jax import models

# JAX's monitoring events (jax._src.dispatch.BACKEND_COMPILE_EVENT and the
# persistent cache's retrieval time), as `CompileLog` records them.
COMPILE_EVENTS = {
  '/jax/core/compile/backend_compile_duration': 'compile',
  '/jax/compilation_cache/cache_retrieval_time_sec': 'cache_load',
}


def key(seed: int = 0) -> jax.Array:
  """A PRNG key (RBG: threefry kernels compile slowly on CPU, jax 0.10.2)."""
  return jax.random.key(seed, impl='rbg')


def synthetic_batch(
  model: models.ResNet,
  image_size: int,
  batch: int,
  num_classes: int,
  seed: int = 0,
) -> dict:
  """Images `(batch, S, S, 3)` in [0, 1], random labels `(batch,)` and random
  binary masks `(batch, H, W)` at the model's CAM size."""
  rng = np.random.default_rng(seed)
  height, width = models.cam_size(model, image_size)
  return {
    'image': jnp.asarray(
      rng.random((batch, image_size, image_size, 3), np.float32)
    ),
    'label': jnp.asarray(rng.integers(0, num_classes, batch), jnp.int32),
    'mask': jnp.asarray(rng.random((batch, height, width)) < 0.4, jnp.float32),
  }


def block(tree) -> None:
  jax.block_until_ready(tree)


def timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
  """(result, wall seconds, process CPU seconds), blocking on the result."""
  wall, cpu = time.perf_counter(), time.process_time()
  result = fn()
  block(result)
  return result, time.perf_counter() - wall, time.process_time() - cpu


def loadavg() -> float:
  return round(os.getloadavg()[0], 2)


def median(values: Sequence[float]) -> float:
  return float(np.median(values)) if values else float('nan')


def time_repeated(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
  """Median wall seconds of `repeats` calls after one warm-up, and the last
  result."""
  result = fn()
  block(result)  # Warm-up (and compilation).
  times = []
  for _ in range(repeats):
    result, wall, _ = timed(fn)
    times.append(wall)
  return median(times), result


def relative_error(a, b) -> float:
  """max |a - b| / max |b|, in float64."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


class CompileLog:
  """Records XLA compilations while open (a context manager).

  `events` lists `(kind, seconds)`: kind 'compile' for each backend compile,
  'cache_load' for each program read from the persistent compilation cache.
  """

  def __init__(self):
    self.events: list[tuple[str, float]] = []

  def _listen(self, event: str, duration: float, **kwargs) -> None:
    del kwargs
    if event in COMPILE_EVENTS:
      self.events.append((COMPILE_EVENTS[event], float(duration)))

  def __enter__(self) -> CompileLog:
    jax.monitoring.register_event_duration_secs_listener(self._listen)
    return self

  def __exit__(self, *exc) -> None:
    jax.monitoring.unregister_event_duration_listener(self._listen)

  def summary(self) -> dict:
    """Counts and seconds of compiles and cache loads, and the longest."""
    out = {}
    for kind in COMPILE_EVENTS.values():
      times = [s for k, s in self.events if k == kind]
      out[f'{kind}s'] = len(times)
      out[f'{kind}_s'] = round(sum(times), 3)
      out[f'{kind}_max_s'] = round(max(times, default=0.0), 3)
    return out
