"""Section `loop` of the training benchmark: the real loop versus its step.

`cco_jax.train.train_and_evaluate` on the Pets sample (input pipeline,
pmapped step, metric summaries, evaluation, figures and checkpoints at the
config's cadence), timed from its own log records over whole evaluation
periods (`training_settings.LoopSetting`), beside the same pmapped step on
one fixed device batch and the input pipeline alone. The step is compiled
once: the loop runs with the very pmapped functions the step timing
compiled. FLOPs per step come from a CPU lowering (`training_flops`), never
from the device's own cost analysis.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import contextlib
import dataclasses
import os
import shutil
import tempfile
import time

import jax
import jax.numpy as jnp

from cco_jax import configuration
from cco_jax import train_step as step_lib
from experiments.benchmarks import training_flops as flops_lib
from experiments.benchmarks import training_mfu as mfu_lib
from experiments.benchmarks import training_settings as settings
from experiments.benchmarks import training_timing as timing

RATES = ('full_loop', 'loop_without_evaluation', 'step_alone')


def loop_config(
  setting: settings.LoopSetting,
  pets_dir: str,
  tfds_data_dir: str,
  dtype=None,
  extra: dict | None = None,
):
  """The variant's config with the loop's cadence, data and steps."""
  if setting.eval_every % setting.log_every:
    raise ValueError(
      f'eval_every={setting.eval_every} must be a multiple of '
      f'log_every={setting.log_every} (evaluations at log steps).'
    )
  overrides = {
    'data.manual_dir': pets_dir,
    'data.tfds_data_dir': tfds_data_dir,
    'num_train_steps': setting.num_steps,
    'eval_every_steps': setting.eval_every,
    'log_every_steps': setting.log_every,
    'eval_ood': False,
    **dict(setting.overrides),
    **(extra or {}),
  }
  if dtype is not None:
    overrides['model.dtype'] = jnp.dtype(dtype).name
  return configuration.apply_overrides(
    settings.pets_config(setting.variant), overrides
  )


def window_rate(
  records: Sequence[dict], start: int, end: int, eval_every: int = 0
) -> dict:
  """Steps/s over the log intervals inside steps `(start, end]`.

  `records` are `metrics.jsonl` rows; those with `train_steps_per_second`
  (written at each log step, for the steps since the previous log) define
  intervals `(previous log step, step]`. The rate is total steps over total
  seconds of the intervals that lie inside the window. With `eval_every`,
  also the rate over the intervals that follow no evaluation (those starting
  at a multiple of `eval_every` hold its stall): the loop without evaluation.
  """
  logs = sorted(
    (r['step'], r['train_steps_per_second'])
    for r in records
    if 'train_steps_per_second' in r
  )
  intervals, previous = [], 0
  for step, rate in logs:
    if previous >= start and step <= end:
      intervals.append((previous, step, (step - previous) / rate))
    previous = step
  covered = sum(b - a for a, b, _ in intervals)
  if covered != end - start:
    raise ValueError(
      f'The log records cover {covered} of the {end - start} steps in '
      f'({start}, {end}]; logs at steps {[s for s, _ in logs]}.'
    )
  seconds = sum(t for _, _, t in intervals)
  result = {
    'steps_per_s': covered / seconds,
    'interval_steps_per_s': [round((b - a) / t, 4) for a, b, t in intervals],
    'window': [start, end],
  }
  if eval_every:
    quiet = [(a, b, t) for a, b, t in intervals if a % eval_every]
    if quiet:
      result['steps_per_s_without_evaluation'] = sum(
        b - a for a, b, _ in quiet
      ) / sum(t for _, _, t in quiet)
  return result


@contextlib.contextmanager
def shared_programs(train_module, setup):
  """While open, `train_module.build` (`train_setup.build`, what
  `train_and_evaluate` calls)
  returns setups that use `setup`'s pmapped train, eval and predict
  functions, model and optimizer: the loop runs the programs already
  compiled, not new copies (the state's model and optimizer are static parts
  of its pytree: new objects would make the pmapped step trace and compile
  again)."""
  build = train_module.build

  def build_sharing(config):
    return dataclasses.replace(
      build(config),
      model=setup.model,
      tx=setup.tx,
      p_train_step=setup.p_train_step,
      p_eval_step=setup.p_eval_step,
      p_predict=setup.p_predict,
    )

  train_module.build = build_sharing
  try:
    yield
  finally:
    train_module.build = build


def step_flops(config, variant: str, batch: int, flops_cache: dict) -> tuple:
  """(FLOPs of one device's step, where they come from): the bundle's count
  for `variant` at `batch`, else a CPU lowering when JAX runs on the CPU,
  else NaN (counting on the GPU process would cost device time)."""
  row = flops_cache.get(flops_lib.cache_key(variant, batch))
  if row is not None:
    counted = (row['model'], row['image_size'])
    if counted == (config.model.name, config.data.image_size):
      return row['flops'], 'flops.json (CPU lowering)'
    return float('nan'), f'none: flops.json counted {counted}, not this model'
  if jax.default_backend() == 'cpu':
    return flops_lib.config_step_flops(config, batch, 2), 'CPU lowering'
  return float('nan'), 'none: no count in flops.json for this batch'


def time_loop(
  setting: settings.LoopSetting,
  config,
  workdir: str,
  peak_tflops: float = 0.0,
  flops_cache: dict | None = None,
  programs: dict | None = None,
) -> dict:
  """Images/s and MFU of the real loop (`train.train_and_evaluate`) and of
  its pmapped step alone on one fixed batch, plus the input pipeline alone.

  `programs`: pmapped eval and predict functions shared between calls (a
  dict this call fills when empty): loops at several training batch sizes
  with one eval batch compile the eval and predict steps once.
  """
  from cco_jax import metric_writers  # pylint: disable=g-import-not-at-top
  from cco_jax import train  # pylint: disable=g-import-not-at-top
  from cco_jax import train_input  # pylint: disable=g-import-not-at-top
  from cco_jax import train_setup  # pylint: disable=g-import-not-at-top

  load_start = timing.loadavg()
  start, end = setting.window
  setup = train_setup.build(config)
  if programs is not None:
    setup = dataclasses.replace(
      setup,
      p_eval_step=programs.setdefault('p_eval_step', setup.p_eval_step),
      p_predict=programs.setdefault('p_predict', setup.p_predict),
    )
  batch = setup.schedule.micro_batch_size
  devices = jax.local_device_count()
  flops, flops_source = step_flops(
    config, setting.variant, batch // devices, flops_cache or {}
  )
  state = step_lib.replicate(
    step_lib.create_train_state(
      jax.random.key(config.seed, impl=config.rng_impl or None),
      setup.model,
      config.data.image_size,
      setup.tx,
    )
  )
  fixed = step_lib.shard(train_input.device_batch(next(setup.train_iter)))
  with timing.CompileLog() as first_compile:
    (state, _), first_s, _ = timing.timed(
      lambda: setup.p_train_step(state, fixed)
    )
  # The step alone runs half its steps before the loop and half after, so
  # that load drifting on a shared machine hits both alike.
  half = max(1, (end - start) // 2)

  def step_alone():
    nonlocal state
    for _ in range(half):
      state, metrics = setup.p_train_step(state, fixed)
    timing.block((state, metrics))

  def input_alone():
    for _ in range(end - start):
      next(setup.train_iter)

  _, before_s, _ = timing.timed(step_alone)
  with (
    timing.CompileLog() as loop_compiles,
    shared_programs(train_setup, setup),
  ):
    _, train_s, _ = timing.timed(
      lambda: train.train_and_evaluate(config, workdir)
    )
  loop = window_rate(
    metric_writers.read_metrics(workdir), start, end, setting.eval_every
  )
  _, after_s, _ = timing.timed(step_alone)
  _, input_s, _ = timing.timed(input_alone)
  close = getattr(setup.train_iter, 'close', None)
  if close is not None:
    close()
  rates = {
    'full_loop': loop['steps_per_s'],
    'loop_without_evaluation': loop['steps_per_s_without_evaluation'],
    'step_alone': 2 * half / (before_s + after_s),
    'input_pipeline_alone': (end - start) / input_s,
  }
  result = {
    name: mfu_lib.rate_row(
      rate, batch, devices, flops if name in RATES else None, peak_tflops
    )
    for name, rate in rates.items()
  }
  result['full_loop']['interval_steps_per_s'] = loop['interval_steps_per_s']
  result['step_alone']['steps_per_s_before_and_after_the_loop'] = [
    half / before_s,
    half / after_s,
  ]
  result.update(
    {
      'setting': dataclasses.asdict(setting),
      'model': config.model.name,
      'dtype': config.model.dtype,
      'image_size': config.data.image_size,
      'batch': batch,
      'per_device_batch': batch // devices,
      'devices': devices,
      'window_steps': list(loop['window']),
      'evaluations_in_window': setting.evals,
      'checkpoint_every': setup.schedule.checkpoint_every,
      'gflops_per_device_step': flops / 1e9,
      'flops_source': flops_source,
      'train_and_evaluate_s': train_s,
      'first_step_s (compile + run)': first_s,
      'train_step_compile': first_compile.summary(),
      'loop_compiles (eval, predict, ...)': loop_compiles.summary(),
      'loop_over_step': rates['full_loop'] / rates['step_alone'],
      'loop_without_evaluation_over_step': rates['loop_without_evaluation']
      / rates['step_alone'],
      # Share of the loop's time that evaluation (with figures, checkpoint)
      # takes: 1 - loop rate / loop-without-evaluation rate.
      'evaluation_share': 1
      - rates['full_loop'] / rates['loop_without_evaluation'],
      'loadavg_start': load_start,
      'loadavg_end': timing.loadavg(),
    }
  )
  return result


def run_loop(
  setting: settings.LoopSetting,
  pets_dir: str,
  tfds_data_dir: str,
  *,
  dtype=None,
  peak_tflops: float = 0.0,
  eval_every: int | None = None,
  extra: dict | None = None,
  flops_cache: dict | None = None,
  budget_left: Callable[[], float] | None = None,
  on_entry: Callable[[list[dict]], None] | None = None,
  clock: Callable[[], float] = time.monotonic,
) -> list[dict]:
  """The loop section on the Pets sample at `pets_dir`, once per per-device
  batch of the setting (skipped without the sample). `budget_left`: seconds
  left to the caller; a batch size is skipped, and says so, when fewer are
  left than the previous batch size took (each needs its own compile), or
  none. `on_entry` gets the entries so far after
  each (e.g. to write them before a time limit kills the process)."""
  if not os.path.isdir(pets_dir):
    return [{'skipped': f'no Pets sample at {pets_dir}'}]
  if eval_every:
    setting = dataclasses.replace(setting, eval_every=eval_every)
  temporary = tempfile.mkdtemp(prefix='cco_benchmark_loop_')
  tfds_data_dir = tfds_data_dir or os.path.join(temporary, 'tfds')
  entries, programs, previous_s = [], {}, 0.0
  try:
    for batch in setting.per_device_batches or (0,):
      left = budget_left() if budget_left is not None else float('inf')
      if left <= 0 or left < previous_s:
        entries.append(
          {
            'skipped': f'per-device batch {batch}: {max(left, 0):.0f} s left '
            f'in the budget, the previous batch size took {previous_s:.0f} s'
          }
        )
        continue
      started = clock()
      batch_override = {'per_device_batch_size': batch} if batch else {}
      config = loop_config(
        setting,
        pets_dir,
        tfds_data_dir,
        dtype,
        {**batch_override, **(extra or {})},
      )
      print(f'[loop] per-device batch {batch or "(config)"} ...', flush=True)
      entries.append(
        time_loop(
          setting,
          config,
          os.path.join(temporary, f'workdir_{batch}'),
          peak_tflops,
          flops_cache,
          programs,
        )
      )
      previous_s = clock() - started
      if on_entry is not None:
        on_entry(entries)
  finally:
    shutil.rmtree(temporary, ignore_errors=True)
  return entries
