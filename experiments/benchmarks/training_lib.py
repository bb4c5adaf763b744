"""The measurements behind `python -m experiments.benchmarks.training` (no absl flags here).

Step times of CE / ACE / ACE + divergence, all-class maps by one einsum versus
per-class autodiff, and the training loop versus the step alone; see
`experiments/benchmarks/training.py`'s docstring for what each section measures and the
presets. Keeping the flags in the entry point lets tests and other tools import
these functions next to other entry points without flag-name clashes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
import functools
import math
import os
from pathlib import Path
import platform
import shutil
import sys
import tempfile
import time
from typing import Any

from absl import app
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cco_jax import cams as cams_lib
from cco_jax import configuration
from cco_jax import models
from cco_jax import objectives
from cco_jax import train_step as step_lib
from cco_jax.runtime import xla_cpu

# `cco_jax.train` (input pipeline: TFDS, Grain) and the configs (ml_collections)
# are imported where the `cpu` preset and the loop need them, so that the `gpu`
# preset runs on an image with only jax, flax and optax.

SHARED_DATA = Path(__file__).resolve().parents[2].parent / 'shared' / 'data'
SECTIONS = ('step', 'cams', 'loop')
MAX_REPEATS = 200
OBJECTIVES = ('ce', 'ace', 'ace_kld')


# ----------------------------------------------------------------------------
# Settings.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StepSetting:
  """A model and batch to time train steps on."""

  label: str
  name: str  # A models.STAGE_SIZES name, or 'config:VARIANT' (experiments/configs/pets.py).
  image_size: int
  batch: int
  num_classes: int
  num_filters: int = 64
  stem: str = 'imagenet'
  stage_sizes: tuple[int, ...] = ()
  objectives: tuple[str, ...] = OBJECTIVES
  # False: the CE control (last stage downsamples, head bias, final BN + ReLU),
  # i.e. the unchanged torchvision architecture of the PyTorch reference figures.
  cam_faithful: bool = True


@dataclasses.dataclass(frozen=True)
class CamSetting:
  """Shapes for the map section."""

  name: str
  image_size: int
  batch: int  # Features-level comparison.
  network_batch: int  # Whole-network comparison.
  classes: tuple[int, ...]
  num_filters: int = 64
  stem: str = 'imagenet'
  stage_sizes: tuple[int, ...] = ()
  network_repeats: int = 1


@dataclasses.dataclass(frozen=True)
class Preset:
  steps: tuple[StepSetting, ...]
  cams: CamSetting
  sections: tuple[str, ...]
  repeats: int
  loop: LoopSetting


def _pets_config(variant: str):
  from experiments.configs import (
    pets as pets_config,  # pylint: disable=g-import-not-at-top
  )

  return pets_config.get_config(variant)


def _config_setting(variant: str, label: str, **overrides) -> StepSetting:
  config = _pets_config(variant)
  model = config.model
  fields = dict(
    label=label,
    name=f'config:{variant}',
    image_size=config.data.image_size,
    batch=config.batch_size,
    num_classes=2,
    num_filters=model.num_filters,
    stem=model.stem,
    stage_sizes=tuple(model.stage_sizes),
  )
  fields.update(overrides)
  return StepSetting(**fields)


def preset(name: str, smoke: bool) -> Preset:
  """The settings of a preset (`smoke` shrinks everything to seconds)."""
  if smoke:
    tiny = dict(num_filters=8, stem='strided', stage_sizes=(1, 1, 1, 1))
    return Preset(
      steps=(
        StepSetting(
          'tiny_resnet18',
          'resnet18',
          32,
          4,
          2,
          objectives=('ce', 'ace_kld'),
          **tiny,
        ),
      ),
      cams=CamSetting(
        'resnet50', 32, batch=2, network_batch=1, classes=(2, 5), **tiny
      ),
      sections=SECTIONS,
      repeats=2,
      loop=LoopSetting(
        'cpu',
        eval_every=4,
        log_every=2,
        evals=1,
        overrides=(
          ('data.image_size', 32),
          ('model.num_filters', 4),
          ('batch_size', 8),
          ('eval_batch_size', 16),
          ('num_figure_examples', 2),
        ),
      ),
    )
  if name == 'cpu':
    return Preset(
      steps=(
        StepSetting('resnet18_128', 'resnet18', 128, 32, 2),
        StepSetting(
          'resnet18_128_control',
          'resnet18',
          128,
          32,
          2,
          objectives=('ce',),
          cam_faithful=False,
        ),
        _config_setting('cpu', 'cpu_config'),
        StepSetting('resnet50_224_b8_c37', 'resnet50', 224, 8, 37),
        StepSetting(
          'resnet50_224_b8_c37_control',
          'resnet50',
          224,
          8,
          37,
          objectives=('ce',),
          cam_faithful=False,
        ),
      ),
      cams=CamSetting(
        'resnet50', 224, batch=8, network_batch=1, classes=(2, 37)
      ),
      sections=SECTIONS,
      repeats=7,
      # One epoch of full Pets (3,312 training images) at batch 32 is ~103
      # steps: evaluation (validation split, figures, checkpoint) that often.
      loop=LoopSetting('cpu', eval_every=100, log_every=10, evals=1),
    )
  return Preset(
    steps=(
      # The model, batch and objective the loop section trains.
      _config_setting('binary', 'binary_config', objectives=('ace_kld',)),
      StepSetting('resnet50_224_b80_c37', 'resnet50', 224, 80, 37),
      StepSetting(
        'resnet50_224_b80_c2',
        'resnet50',
        224,
        80,
        2,
        objectives=('ce', 'ace_kld'),
      ),
      StepSetting(
        'resnet50_224_b192_c37',
        'resnet50',
        224,
        192,
        37,
        objectives=('ace_kld',),
      ),
    ),
    cams=CamSetting(
      'resnet50',
      224,
      batch=80,
      network_batch=8,
      classes=(2, 37),
      network_repeats=3,
    ),
    sections=('step', 'cams', 'loop'),
    repeats=20,
    # The paper-scale `binary` config (ResNet-50 @224, batch 80, ACE +
    # divergence). One epoch of full Pets at batch 80 is ~41 steps.
    loop=LoopSetting('binary', eval_every=40, log_every=10, evals=3),
  )


def parse_setting(spec: str, settings: Sequence[StepSetting]) -> StepSetting:
  """A preset label, or NAME:SIZE:BATCH:CLASSES."""
  for setting in settings:
    if setting.label == spec:
      return setting
  parts = spec.split(':')
  if len(parts) != 4 or parts[0] not in models.STAGE_SIZES:
    raise app.UsageError(
      f'--models entry {spec!r} is neither a preset label '
      f'({[s.label for s in settings]}) nor NAME:SIZE:BATCH:CLASSES with NAME in '
      f'{sorted(models.STAGE_SIZES)}.'
    )
  name, size, batch, classes = parts[0], *map(int, parts[1:])
  return StepSetting(spec.replace(':', '_'), name, size, batch, classes)


def build_model(
  setting: StepSetting | CamSetting,
  dtype=jnp.float32,
  pointwise_as_dot: bool = True,
) -> models.ResNet:
  """The setting's model (CamSettings get 2 classes; callers clone)."""
  name = setting.name
  if name.startswith('config:'):
    name = _pets_config(name.split(':', 1)[1]).model.name
  return models.create_model(
    name,
    getattr(setting, 'num_classes', 2),
    cam_faithful=getattr(setting, 'cam_faithful', True),
    dtype=dtype,
    num_filters=setting.num_filters,
    stem=setting.stem,
    stage_sizes=setting.stage_sizes or None,
    pointwise_as_dot=pointwise_as_dot,
  )


# ----------------------------------------------------------------------------
# Helpers.
# ----------------------------------------------------------------------------


def _key(seed: int = 0) -> jax.Array:
  # RBG keys: threefry random-bit kernels compile slowly on CPU (jax 0.10.2).
  return jax.random.key(seed, impl='rbg')


def synthetic_batch(
  model: models.ResNet,
  image_size: int,
  batch: int,
  num_classes: int,
  seed: int = 0,
) -> dict:
  """Images in [0, 1], random labels and random binary masks at CAM size."""
  rng = np.random.default_rng(seed)
  height, width = models.cam_size(model, image_size)
  return {
    'image': jnp.asarray(
      rng.random((batch, image_size, image_size, 3), np.float32)
    ),
    'label': jnp.asarray(rng.integers(0, num_classes, batch), jnp.int32),
    'mask': jnp.asarray(rng.random((batch, height, width)) < 0.4, jnp.float32),
  }


def _block(tree) -> None:
  jax.block_until_ready(tree)


def timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
  """(result, wall seconds, process CPU seconds), blocking on the result."""
  wall, cpu = time.perf_counter(), time.process_time()
  result = fn()
  _block(result)
  return result, time.perf_counter() - wall, time.process_time() - cpu


def _flops(compiled) -> float:
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return float('nan')
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  return float((analysis or {}).get('flops', float('nan')))


def loadavg() -> float:
  return round(os.getloadavg()[0], 2)


def _median(values: Sequence[float]) -> float:
  return float(np.median(values)) if values else float('nan')


# ----------------------------------------------------------------------------
# Section 1: train steps.
# ----------------------------------------------------------------------------


def compile_step(state, batch, objective: str, compiler_options: dict | None):
  """The library's step for `objective`, jitted with donation, and its timings."""
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
  return compiled, lower_s, time.perf_counter() - start


def time_steps(
  setting: StepSetting,
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
  model = build_model(setting, dtype, pointwise_as_dot)
  tx = optax.adam(1e-3)
  state0 = step_lib.create_train_state(_key(), model, setting.image_size, tx)
  batch = synthetic_batch(
    model, setting.image_size, setting.batch, setting.num_classes
  )
  runs = {}
  load_start = loadavg()
  for variant, options in xla_variants.items():
    for objective in objectives:
      compiled, lower_s, compile_s = compile_step(
        state0, batch, objective, options
      )
      runs[variant, objective] = {
        'compiled': compiled,
        'state': jax.tree.map(jnp.copy, state0),
        'lower_s': lower_s,
        'compile_s': compile_s,
        'flops': _flops(compiled),
        'wall': [],
        'cpu': [],
      }
  warm_up = []
  for run in runs.values():  # Warm-up, excluded.
    (run['state'], _), wall, _ = timed(
      lambda r=run: r['compiled'](r['state'], batch)
    )
    warm_up.append(wall)
  # Short steps are noisy: take at least `min_seconds` of steps per objective.
  repeats = max(
    repeats, min(MAX_REPEATS, math.ceil(min_seconds / max(min(warm_up), 1e-6)))
  )
  for _ in range(repeats):
    for run in runs.values():
      (run['state'], metrics), wall, cpu = timed(
        lambda r=run: r['compiled'](r['state'], batch)
      )
      run['wall'].append(wall)
      run['cpu'].append(cpu)
      run['loss'] = float(metrics['loss'])
  results = {}
  for (variant, objective), run in runs.items():
    median = _median(run['wall'])
    key = f'{objective}@{variant}' if variant else objective
    row = {
      'objective': objective,
      'xla_variant': variant,
      'median_s': median,
      'min_s': float(np.min(run['wall'])),
      'times_s': [round(t, 4) for t in run['wall']],
      'cpu_s_median': _median(run['cpu']),
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
      row['ratio_to_ce'] = median / _median(ce['wall'])
    results[key] = row
  del runs
  return {
    'setting': dataclasses.asdict(setting),
    'dtype': jnp.dtype(dtype).name,
    'pointwise_as_dot': pointwise_as_dot,
    'cam_size': list(models.cam_size(model, setting.image_size)),
    'loadavg_start': load_start,
    'loadavg_end': loadavg(),
    'repeats': repeats,
    'objectives': results,
  }


# ----------------------------------------------------------------------------
# Section 2: maps by one einsum versus per-class autodiff.
# ----------------------------------------------------------------------------


def head_logits(features: jax.Array, kernel: jax.Array) -> jax.Array:
  """The faithful model's head: global average pooling, then a bias-free dense."""
  return features.mean((1, 2)) @ kernel


@jax.jit
def autodiff_map_of_class(features, kernel, c):
  """HiResCAM of class `c` by autodiff through the head: sum_f dS_c/dA * A."""
  grad = jax.grad(lambda a: head_logits(a, kernel)[:, c].sum())(features)
  return (grad * features).sum(-1)


@jax.jit
def autodiff_maps_vmap(features, kernel):
  """All classes' autodiff HiResCAMs at once (vmap of the per-class backward)."""
  classes = jnp.arange(kernel.shape[1])
  maps = jax.vmap(lambda c: autodiff_map_of_class(features, kernel, c))(classes)
  return jnp.moveaxis(maps, 0, -1)


def autodiff_maps_loop(features, kernel):
  """One jitted backward per class (Python loop), stacked to (B, H, W, C)."""
  return jnp.stack(
    [
      autodiff_map_of_class(features, kernel, c) for c in range(kernel.shape[1])
    ],
    -1,
  )


def _time_repeated(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
  result = fn()
  _block(result)  # Warm-up (and compilation).
  times = []
  for _ in range(repeats):
    result, wall, _ = timed(fn)
    times.append(wall)
  return _median(times), result


def _relative_error(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def time_feature_maps(
  features: jax.Array, num_classes: int, repeats: int
) -> dict:
  """Einsum versus per-class autodiff through the head, on given features."""
  kernel = jax.random.normal(_key(1), (features.shape[-1], num_classes)) * 0.02
  hirescam = jax.jit(cams_lib.hirescam)
  einsum_s, maps = _time_repeated(lambda: hirescam(features, kernel), repeats)
  loop_s, loop_maps = _time_repeated(
    lambda: autodiff_maps_loop(features, kernel), repeats
  )
  vmap_s, vmap_maps = _time_repeated(
    lambda: autodiff_maps_vmap(features, kernel), repeats
  )
  return {
    'classes': num_classes,
    'features_shape': list(features.shape),
    'einsum_s': einsum_s,
    'autodiff_head_loop_s': loop_s,
    'autodiff_head_vmap_s': vmap_s,
    'ratio_loop_to_einsum': loop_s / einsum_s,
    'ratio_vmap_to_einsum': vmap_s / einsum_s,
    'max_rel_err_loop': _relative_error(loop_maps, maps),
    'max_rel_err_vmap': _relative_error(vmap_maps, maps),
  }


def network_functions(model: models.ResNet, variables: dict, images: jax.Array):
  """Jitted (forward with maps), (forward keeping the VJP), (one class's backward).

  The backward of class c pulls a one-hot cotangent on the logits back through
  the whole network: to the parameters (as `loss.backward()` does in post-hoc
  tools) and to a zero perturbation added to the head's input, whose cotangent
  is dS_c/dA; the map is that times A, summed over channels.
  """
  batch_stats = variables.get('batch_stats', {})

  def logits_and_features(params, perturbation):
    captured = []

    def perturb_head_input(next_fun, args, kwargs, context):
      if (
        isinstance(context.module, models.CamHead)
        and context.method_name == '__call__'
      ):
        captured.append(args[0])
        return next_fun(args[0] + perturbation, *args[1:], **kwargs)
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(perturb_head_input):
      logits, _ = model.apply(
        {'params': params, 'batch_stats': batch_stats}, images, train=False
      )
    return logits, captured[0]

  forward_with_maps = jax.jit(
    lambda params: model.apply(
      {'params': params, 'batch_stats': batch_stats}, images, train=False
    )
  )

  @jax.jit
  def forward_for_vjp(params, perturbation):
    return jax.vjp(logits_and_features, params, perturbation, has_aux=True)

  @functools.partial(jax.jit, static_argnums=(3,))
  def backward_of_class(vjp_fn, features, c, num_classes):
    cotangent = jnp.broadcast_to(
      jax.nn.one_hot(c, num_classes), (features.shape[0], num_classes)
    )
    param_grads, feature_grads = vjp_fn(cotangent)
    return param_grads, (feature_grads * features).sum(-1)

  return forward_with_maps, forward_for_vjp, backward_of_class


def time_network_maps(
  setting: CamSetting, num_classes: int, classes_to_time: Sequence[int]
) -> dict:
  """Forward (maps by einsum) versus forward + one whole-network backward per class."""
  model = build_model(setting).clone(num_classes=num_classes)
  shape = (setting.network_batch, setting.image_size, setting.image_size, 3)
  images = jax.random.uniform(_key(2), shape)
  variables = jax.jit(functools.partial(model.init, train=False))(
    _key(3), images[:1]
  )
  forward_with_maps, forward_for_vjp, backward_of_class = network_functions(
    model, variables, images
  )
  params = variables['params']
  height, width = models.cam_size(model, setting.image_size)
  features_shape = (
    setting.network_batch,
    height,
    width,
    params['head']['kernel'].shape[0],
  )
  zero = jnp.zeros(features_shape, jnp.float32)
  repeats = setting.network_repeats
  forward_s, (_, einsum_maps) = _time_repeated(
    lambda: forward_with_maps(params), repeats
  )
  vjp_s, (_, vjp_fn, features) = _time_repeated(
    lambda: forward_for_vjp(params, zero), repeats
  )
  _block(
    backward_of_class(vjp_fn, features, 0, num_classes)
  )  # Compile, warm up.
  hirescam = jax.jit(cams_lib.hirescam)
  results = {
    'network_batch': setting.network_batch,
    'features_shape': list(features_shape),
    'num_classes_of_network': num_classes,
    'forward_with_maps_s': forward_s,
    'forward_keeping_vjp_s': vjp_s,
    'classes': {},
  }
  for count in classes_to_time:
    times, maps = [], None
    for _ in range(repeats):
      start = time.perf_counter()
      outputs = [
        backward_of_class(vjp_fn, features, c, num_classes)
        for c in range(count)
      ]
      _block(outputs)
      times.append(time.perf_counter() - start)
      maps = jnp.stack([m for _, m in outputs], -1)
    backward_s = _median(times)
    autodiff_s = vjp_s + backward_s
    kernel = params['head']['kernel'][:, :count]
    einsum_s, _ = _time_repeated(
      lambda k=kernel: hirescam(features, k), max(repeats, 5)
    )
    results['classes'][str(count)] = {
      'backward_passes': count,
      'backwards_s': backward_s,
      'backward_per_class_s': backward_s / count,
      'autodiff_total_s': autodiff_s,
      'einsum_on_these_features_s': einsum_s,
      'ratio_backwards_to_einsum': backward_s / einsum_s,
      'ratio_autodiff_total_to_forward_with_maps': autodiff_s / forward_s,
      'max_rel_err': _relative_error(maps, einsum_maps[..., :count]),
    }
  return results


def time_cams(setting: CamSetting, repeats: int) -> dict:
  load_start = loadavg()
  model = build_model(setting)
  height, width = models.cam_size(model, setting.image_size)
  shapes = jax.eval_shape(
    lambda x: model.init(_key(), x, train=False),
    jax.ShapeDtypeStruct(
      (1, setting.image_size, setting.image_size, 3), jnp.float32
    ),
  )
  channels = shapes['params']['head']['kernel'].shape[0]
  features = jax.random.normal(
    _key(4), (setting.batch, height, width, channels)
  )
  feature_level = {
    str(c): time_feature_maps(features, c, repeats) for c in setting.classes
  }
  network = time_network_maps(
    setting, max(setting.classes), sorted(setting.classes)
  )
  return {
    'setting': dataclasses.asdict(setting),
    'features': feature_level,
    'network': network,
    'loadavg_start': load_start,
    'loadavg_end': loadavg(),
  }


# ----------------------------------------------------------------------------
# Section 3: the training loop versus the step alone.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LoopSetting:
  """The config the loop trains, and the cadence its timed window spans.

  `train.train_and_evaluate` runs `(evals + 1) * eval_every + log_every`
  steps. Its log records give steps/s per `log_every` steps, measured between
  the synchronising log calls, so each evaluation's stall (evaluation, figures,
  checkpoint) lands in the interval after it. The timed window starts after
  the first evaluation's interval (which also compiles the eval and predict
  steps) and holds `evals` whole evaluation periods.
  """

  variant: str  # experiments/configs/pets.py variant.
  eval_every: int
  log_every: int
  evals: int = 2
  overrides: tuple[tuple[str, Any], ...] = ()

  @property
  def window(self) -> tuple[int, int]:
    """Steps `(start, end]` of the timed window."""
    start = self.eval_every + self.log_every
    return start, start + self.evals * self.eval_every

  @property
  def num_steps(self) -> int:
    return self.window[1]


def loop_config(
  setting: LoopSetting,
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
  return configuration.apply_overrides(_pets_config(setting.variant), overrides)


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


def _pmapped_flops(p_train_step, state, batch) -> float:
  """FLOPs of one device's step, from XLA's cost analysis of the pmapped step."""
  try:
    return _flops(p_train_step.lower(state, batch).compile())
  except Exception:  # pylint: disable=broad-except
    return float('nan')


def time_loop(
  setting: LoopSetting, config, workdir: str, peak_tflops: float = 0.0
) -> dict:
  """Images/s and MFU of the real loop (`train.train_and_evaluate`) and of
  its pmapped step alone on one fixed batch, plus the input pipeline alone."""
  from cco_jax import metric_writers  # pylint: disable=g-import-not-at-top
  from cco_jax import train  # pylint: disable=g-import-not-at-top
  from cco_jax import train_input  # pylint: disable=g-import-not-at-top
  from cco_jax import train_setup  # pylint: disable=g-import-not-at-top

  load_start = loadavg()
  start, end = setting.window
  setup = train_setup.build(config)
  state = step_lib.create_train_state(
    jax.random.key(config.seed, impl=config.rng_impl or None),
    setup.model,
    config.data.image_size,
    setup.tx,
  )
  state = step_lib.replicate(state)
  fixed = step_lib.shard(train_input.device_batch(next(setup.train_iter)))
  flops = _pmapped_flops(setup.p_train_step, state, fixed)
  (state, _), first_s, _ = timed(lambda: setup.p_train_step(state, fixed))
  # The step alone runs half its steps before the loop and half after, so
  # that load drifting on a shared machine hits both alike.
  half = max(1, (end - start) // 2)

  def step_alone():
    nonlocal state
    for _ in range(half):
      state, metrics = setup.p_train_step(state, fixed)
    _block((state, metrics))

  def input_alone():
    for _ in range(end - start):
      next(setup.train_iter)

  _, before_s, _ = timed(step_alone)
  _, train_s, _ = timed(lambda: train.train_and_evaluate(config, workdir))
  loop = window_rate(
    metric_writers.read_metrics(workdir), start, end, setting.eval_every
  )
  _, after_s, _ = timed(step_alone)
  _, input_s, _ = timed(input_alone)
  steps = end - start
  close = getattr(setup.train_iter, 'close', None)
  if close is not None:
    close()
  batch = setup.schedule.micro_batch_size
  devices = jax.local_device_count()
  rates = {
    'full_loop': loop['steps_per_s'],
    'loop_without_evaluation': loop['steps_per_s_without_evaluation'],
    'step_alone': 2 * half / (before_s + after_s),
    'input_pipeline_alone': steps / input_s,
  }
  result = {
    name: {
      'steps_per_s': rate,
      'images_per_s': rate * batch,
      'images_per_s_per_device': rate * batch / devices,
      'achieved_tflops_per_device': flops * rate / 1e12,
    }
    for name, rate in rates.items()
  }
  del result['input_pipeline_alone']['achieved_tflops_per_device']
  if peak_tflops:
    for name in ('full_loop', 'loop_without_evaluation', 'step_alone'):
      result[name]['mfu'] = (
        result[name]['achieved_tflops_per_device'] / peak_tflops
      )
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
      'devices': devices,
      'window_steps': list(loop['window']),
      'evaluations_in_window': setting.evals,
      'gflops_per_device_step': flops / 1e9,
      'train_and_evaluate_s': train_s,
      'first_step_s (compile + run)': first_s,
      'loop_over_step': rates['full_loop'] / rates['step_alone'],
      'loop_without_evaluation_over_step': rates['loop_without_evaluation']
      / rates['step_alone'],
      # Share of the loop's time that evaluation (with figures, checkpoint)
      # takes: 1 - loop rate / loop-without-evaluation rate.
      'evaluation_share': 1
      - rates['full_loop'] / rates['loop_without_evaluation'],
      'loadavg_start': load_start,
      'loadavg_end': loadavg(),
    }
  )
  return result


# ----------------------------------------------------------------------------
# Output.
# ----------------------------------------------------------------------------


def environment(added_flags: str) -> dict:
  from importlib import metadata  # pylint: disable=g-import-not-at-top

  device = jax.devices()[0]
  return {
    'machine': platform.machine(),
    'processor': platform.processor(),
    'cpus': os.cpu_count(),
    'python': sys.version.split()[0],
    'jax': jax.__version__,
    'jaxlib': metadata.version('jaxlib'),
    'flax': metadata.version('flax'),
    'optax': metadata.version('optax'),
    'numpy': np.__version__,
    'backend': jax.default_backend(),
    'device_kind': device.device_kind,
    'device_count': jax.device_count(),
    'xla_flags': os.environ.get('XLA_FLAGS', ''),
    'cpu_xla_flags_added': added_flags,
    'loadavg_start': list(os.getloadavg()),
  }


def print_tables(results: dict) -> None:
  env = results['environment']
  print(
    f'\n{env["backend"]} ({env["device_kind"]}), {env["cpus"]} CPUs, jax '
    f'{env["jax"]}, XLA_FLAGS={env["xla_flags"]!r}'
  )
  for entry in results.get('step', []):
    setting = entry['setting']
    print(
      f'\n[step] {setting["label"]}: {setting["name"]} @{setting["image_size"]} px, '
      f'batch {setting["batch"]}, {setting["num_classes"]} classes, '
      f'{"" if setting.get("cam_faithful", True) else "CE control architecture, "}'
      f'{entry["dtype"]}, '
      f'{"1x1 as dot" if entry.get("pointwise_as_dot", True) else "1x1 by nn.Conv"}, '
      f'maps {entry["cam_size"]}, median of {entry["repeats"]}, '
      f'load {entry["loadavg_start"]} -> {entry["loadavg_end"]}'
    )
    print(
      f'  {"objective":22s} {"median s":>9s} {"img/s":>8s} {"/ CE":>6s} '
      f'{"CPU s":>7s} {"compile s":>9s} {"GFLOP":>8s} {"TFLOP/s":>8s}'
      + (
        f' {"MFU":>6s}'
        if any('mfu' in r for r in entry['objectives'].values())
        else ''
      )
    )
    for key, row in entry['objectives'].items():
      ratio = f'{row["ratio_to_ce"]:.3f}' if 'ratio_to_ce' in row else '-'
      mfu = f' {row["mfu"]:6.1%}' if 'mfu' in row else ''
      print(
        f'  {key:22s} {row["median_s"]:9.3f} {row["images_per_s"]:8.1f} {ratio:>6s} '
        f'{row["cpu_s_median"]:7.2f} {row["lower_s"] + row["compile_s"]:9.1f} '
        f'{row["gflops_per_step"]:8.1f} {row["achieved_tflops"]:8.3f}{mfu}'
      )
  if 'cams' in results:
    cams = results['cams']
    print(f'\n[cams] load {cams["loadavg_start"]} -> {cams["loadavg_end"]}')
    for count, row in cams['features'].items():
      print(
        f'  C={count:>3s} features {row["features_shape"]}: einsum '
        f'{row["einsum_s"] * 1e3:.3f} ms; autodiff through the head: loop '
        f'{row["autodiff_head_loop_s"] * 1e3:.2f} ms ({row["ratio_loop_to_einsum"]:.0f}x), '
        f'vmap {row["autodiff_head_vmap_s"] * 1e3:.2f} ms '
        f'({row["ratio_vmap_to_einsum"]:.0f}x); max rel err '
        f'{max(row["max_rel_err_loop"], row["max_rel_err_vmap"]):.1e}'
      )
    net = cams['network']
    print(
      f'  whole network, batch {net["network_batch"]}: forward with all maps '
      f'{net["forward_with_maps_s"]:.3f} s; forward keeping the VJP '
      f'{net["forward_keeping_vjp_s"]:.3f} s'
    )
    for count, row in net['classes'].items():
      extra = (
        f'; backwards / einsum on the same features '
        f'{row["ratio_backwards_to_einsum"]:.0f}x'
      )
      print(
        f'  C={count:>3s}: {row["backward_passes"]} backward passes '
        f'{row["backwards_s"]:.3f} s ({row["backward_per_class_s"]:.3f} s each); '
        f'autodiff total / forward with maps '
        f'{row["ratio_autodiff_total_to_forward_with_maps"]:.1f}x{extra}; max rel err '
        f'{row["max_rel_err"]:.1e}'
      )
  if 'loop' in results:
    loop = results['loop']
    if 'skipped' in loop:
      print(f'\n[loop] skipped: {loop["skipped"]}')
    else:
      setting = loop['setting']
      print(
        f'\n[loop] {setting["variant"]} config ({loop["model"]}, '
        f'{loop["dtype"]}) @{loop["image_size"]} px, batch {loop["batch"]} on '
        f'{loop["devices"]} device(s); steps {loop["window_steps"]} with '
        f'{loop["evaluations_in_window"]} evaluation(s), every '
        f'{setting["eval_every"]} steps; load {loop["loadavg_start"]} -> '
        f'{loop["loadavg_end"]}'
      )
      for name in (
        'full_loop',
        'loop_without_evaluation',
        'step_alone',
        'input_pipeline_alone',
      ):
        row = loop[name]
        mfu = f'  MFU {row["mfu"]:6.1%}' if 'mfu' in row else ''
        tflops = row.get('achieved_tflops_per_device')
        tflops = f'  {tflops:8.3f} TFLOP/s/device' if tflops else ''
        print(
          f'  {name:22s} {row["images_per_s"]:9.1f} images/s '
          f'({row["images_per_s_per_device"]:.1f} per device){tflops}{mfu}'
        )
      print(
        f'  loop / step {loop["loop_over_step"]:.3f}; without evaluation '
        f'{loop["loop_without_evaluation_over_step"]:.3f}; evaluation share '
        f'{loop["evaluation_share"]:.1%}'
      )


def run(
  chosen: Preset,
  settings: Sequence[StepSetting],
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
) -> dict:
  """Runs the sections; returns the results (also what `main` writes as JSON).

  `compiler_options` (XLA debug options) apply to the timed steps' compilation,
  e.g. a lower optimisation level to make a smoke test compile faster.
  """
  results = {
    'environment': environment(added_flags),
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
        time_steps(
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
  if 'cams' in sections:
    print('[cams] ...', flush=True)
    results['cams'] = time_cams(chosen.cams, repeats)
  if 'loop' in sections:
    print('[loop] ...', flush=True)
    results['loop'] = run_loop(
      chosen,
      pets_dir,
      tfds_data_dir,
      dtype=dtype,
      peak_tflops=peak_tflops,
      eval_every=loop_eval_every,
      extra=loop_overrides,
    )
  results['environment']['loadavg_end'] = list(os.getloadavg())
  return results


def run_loop(
  chosen: Preset,
  pets_dir: str,
  tfds_data_dir: str,
  *,
  dtype=None,
  peak_tflops: float = 0.0,
  eval_every: int | None = None,
  extra: dict | None = None,
) -> dict:
  """The loop section on the Pets sample at `pets_dir` (skipped without it)."""
  if not os.path.isdir(pets_dir):
    return {'skipped': f'no Pets sample at {pets_dir}'}
  setting = chosen.loop
  if eval_every:
    setting = dataclasses.replace(setting, eval_every=eval_every)
  temporary = tempfile.mkdtemp(prefix='cco_benchmark_loop_')
  try:
    config = loop_config(
      setting,
      pets_dir,
      tfds_data_dir or os.path.join(temporary, 'tfds'),
      dtype,
      extra,
    )
    return time_loop(
      setting, config, os.path.join(temporary, 'workdir'), peak_tflops
    )
  finally:
    shutil.rmtree(temporary, ignore_errors=True)
