"""Section `step` of the training benchmark: train-step times per objective.

The library's `train_step` (jit, buffers donated) for CE, ACE and ACE +
divergence on one model and fixed batch, the objectives taking turns step by
step; see `experiments/benchmarks/training.py`.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import functools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cco_jax import models
from cco_jax import objectives
from cco_jax import train_step as step_lib
from experiments.benchmarks import training_flops as flops_lib
from experiments.benchmarks import training_settings as settings
from experiments.benchmarks import training_timing as timing

MAX_REPEATS = 200


def compile_step(state, batch, objective: str, compiler_options: dict | None):
  """The library's step for `objective`, jitted with donation: (compiled,
  lower seconds, compile seconds, FLOPs). The FLOPs are XLA's count of the
  lowered module (before the backend rewrites convolutions and products into
  library calls, which a GPU's cost analysis counts as -1 FLOP each)."""
  fn = jax.jit(
    functools.partial(
      step_lib.train_step,
      objective=objectives.create({'name': objective, 'log_all_terms': False}),
      axis_name=None,
    ),
    donate_argnums=(0,),
  )
  start = time.perf_counter()
  lowered = fn.lower(state, batch)
  lower_s = time.perf_counter() - start
  start = time.perf_counter()
  compiled = lowered.compile(compiler_options or None)
  compile_s = time.perf_counter() - start
  return compiled, lower_s, compile_s, flops_lib.compiled_flops(lowered)


def time_steps(
  setting: settings.StepSetting,
  objectives: Sequence[str],
  repeats: int,
  *,
  dtype=jnp.float32,
  xla_variants: dict[str, dict] | None = None,
  peak_tflops: float = 0.0,
  pointwise_as_dot: bool = True,
  min_seconds: float = 0.0,
) -> dict:
  """Median step time of each (XLA variant, objective), taking turns step by step.

  Times max(`repeats`, `min_seconds` / warm-up step time) steps of each (at
  most `MAX_REPEATS`).
  """
  xla_variants = xla_variants or {'': {}}
  model = settings.build_model(setting, dtype, pointwise_as_dot)
  tx = optax.adam(1e-3)
  state0 = step_lib.create_train_state(
    timing.key(), model, setting.image_size, tx
  )
  batch = timing.synthetic_batch(
    model, setting.image_size, setting.batch, setting.num_classes
  )
  runs = {}
  load_start = timing.loadavg()
  for variant, options in xla_variants.items():
    for objective in objectives:
      compiled, lower_s, compile_s, flops = compile_step(
        state0, batch, objective, options
      )
      runs[variant, objective] = {
        'compiled': compiled,
        'state': jax.tree.map(jnp.copy, state0),
        'lower_s': lower_s,
        'compile_s': compile_s,
        'flops': flops,
        'wall': [],
        'cpu': [],
      }
  warm_up = []
  for run in runs.values():  # Warm-up, excluded.
    (run['state'], _), wall, _ = timing.timed(
      lambda r=run: r['compiled'](r['state'], batch)
    )
    warm_up.append(wall)
  # Short steps are noisy: take at least `min_seconds` of steps per objective.
  repeats = max(
    repeats, min(MAX_REPEATS, math.ceil(min_seconds / max(min(warm_up), 1e-6)))
  )
  for _ in range(repeats):
    for run in runs.values():
      (run['state'], metrics), wall, cpu = timing.timed(
        lambda r=run: r['compiled'](r['state'], batch)
      )
      run['wall'].append(wall)
      run['cpu'].append(cpu)
      run['loss'] = float(metrics['loss'])
  results = {}
  for (variant, objective), run in runs.items():
    median = timing.median(run['wall'])
    key = f'{objective}@{variant}' if variant else objective
    row = {
      'objective': objective,
      'xla_variant': variant,
      'median_s': median,
      'min_s': float(np.min(run['wall'])),
      'times_s': [round(t, 4) for t in run['wall']],
      'cpu_s_median': timing.median(run['cpu']),
      'images_per_s': setting.batch / median,
      'lower_s': run['lower_s'],
      'compile_s': run['compile_s'],
      'gflops_per_step': run['flops'] / 1e9,
      'achieved_tflops': run['flops'] / median / 1e12,
      'loss_last': run['loss'],
    }
    if peak_tflops:
      row['mfu'] = row['achieved_tflops'] / peak_tflops
    ce = runs.get((variant, 'ce'))
    if ce is not None:
      row['ratio_to_ce'] = median / timing.median(ce['wall'])
    results[key] = row
  del runs
  return {
    'setting': dataclasses.asdict(setting),
    'dtype': jnp.dtype(dtype).name,
    'pointwise_as_dot': pointwise_as_dot,
    'cam_size': list(models.cam_size(model, setting.image_size)),
    'loadavg_start': load_start,
    'loadavg_end': timing.loadavg(),
    'repeats': repeats,
    'objectives': results,
  }
