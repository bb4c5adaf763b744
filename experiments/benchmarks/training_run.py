"""Runs the training benchmark's sections and collects their results.

`run` is what `python -m experiments.benchmarks.training` calls (and the
tests, without absl flags): the `step`, `cams` and `loop` sections
(`training_steps`, `training_maps`, `training_loop`) on a preset's settings.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import os

import jax.numpy as jnp

from cco_jax.runtime import xla_cpu
from experiments.benchmarks import training_loop
from experiments.benchmarks import training_maps
from experiments.benchmarks import training_report
from experiments.benchmarks import training_settings as settings_lib
from experiments.benchmarks import training_steps


def run(
  chosen: settings_lib.Preset,
  settings: Sequence[settings_lib.StepSetting],
  sections: Sequence[str],
  repeats: int,
  *,
  added_flags: str = '',
  dtype=jnp.float32,
  objectives: Sequence[str] | None = None,
  compare_cpu_xla: bool = False,
  peak_tflops: float = 0.0,
  pets_dir: str = '',
  tfds_data_dir: str = '',
  loop_eval_every: int | None = None,
  loop_overrides: dict | None = None,
  compiler_options: dict | None = None,
  pointwise_as_dot: bool = True,
  min_seconds: float = 0.0,
  flops_cache: dict | None = None,
  budget_left: Callable[[], float] | None = None,
  save: Callable[[dict], None] | None = None,
) -> dict:
  """Runs the sections; returns the results (also what `main` writes as JSON).

  `compiler_options` (XLA debug options) apply to the timed steps' compilation,
  e.g. a lower optimisation level to make a smoke test compile faster.
  `flops_cache`: counts of `training_flops` (`flops.json`) for the loop;
  `budget_left`: seconds left, checked before each loop batch size.
  `save` gets the results so far after each section and loop batch size.
  """
  save = save or (lambda results: None)
  results = {
    'environment': training_report.environment(added_flags),
    'settings': {
      'sections': list(sections),
      'repeats': repeats,
      'dtype': jnp.dtype(dtype).name,
      'compare_cpu_xla': compare_cpu_xla,
      'peak_tflops': peak_tflops,
      'pointwise_as_dot': pointwise_as_dot,
    },
  }
  variants = (
    {
      'xla_default': dict(compiler_options or {}),
      'cpu_tuned': {**(compiler_options or {}), **xla_cpu.COMPILER_OPTIONS},
    }
    if compare_cpu_xla
    else {'': dict(compiler_options or {})}
  )
  if 'step' in sections:
    results['step'] = []
    for setting in settings:
      chosen_objectives = tuple(objectives or setting.objectives)
      print(f'[step] {setting.label} {chosen_objectives} ...', flush=True)
      results['step'].append(
        training_steps.time_steps(
          setting,
          chosen_objectives,
          repeats,
          dtype=dtype,
          xla_variants=variants,
          peak_tflops=peak_tflops,
          pointwise_as_dot=pointwise_as_dot,
          min_seconds=min_seconds,
        )
      )
      save(results)
  if 'cams' in sections:
    print('[cams] ...', flush=True)
    results['cams'] = training_maps.time_cams(chosen.cams, repeats)
    save(results)
  if 'loop' in sections:

    def save_loop(entries):
      results['loop'] = entries
      save(results)

    results['loop'] = training_loop.run_loop(
      chosen.loop,
      pets_dir,
      tfds_data_dir,
      dtype=dtype,
      peak_tflops=peak_tflops,
      eval_every=loop_eval_every,
      extra=loop_overrides,
      flops_cache=flops_cache,
      budget_left=budget_left,
      on_entry=save_loop,
    )
  results['environment']['loadavg_end'] = list(os.getloadavg())
  return results
