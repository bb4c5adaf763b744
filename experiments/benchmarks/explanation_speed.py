r"""Explanations per second: all-class maps from the forward pass vs autodiff.

    python -m experiments.benchmarks.explanation_speed [--model=resnet50] \
        [--num_classes=37] [--image_size=224] [--batch_size=8] \
        [--autodiff_classes=4] [--repeats=3]

One explanation = the maps of EVERY class for one image. Three ways:
  ours       `head_features.forward_with_features` (the model's forward pass, which
             returns all C maps by one einsum; what `Explainer` runs), jitted;
  hirescam   post-hoc HiResCAM as a per-class explainer call computes it:
             per class one forward pass and the gradient of that class's
             logit with respect to the head's input (`explain.
             autodiff_hirescam`, jitted; XLA differentiates only the head);
  gradcam    Grad-CAM at the same layer the same way (`head_features.gradcam`).
A post-hoc tool that keeps one forward pass and runs C backward passes
through the head only would cost about one forward pass too; the training
benchmark's `cams` section times backward passes through the whole network
(`loss.backward()`-style), which is what common tools do.
Each is timed on the same random batch after a compile call and a warm-up
(`block_until_ready`), median over --repeats. The autodiff methods are timed
over --autodiff_classes classes and scaled to all C (each class is one
identical backward pass; --autodiff_classes=0 times all C). Prints a Markdown
table: seconds per batch for all classes, explanations/s and the speed-up of
ours; the maps of the three are checked equal (Grad-CAM: to ReLU of ours).
"""

from __future__ import annotations

import functools
import platform
import statistics
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from cco_jax import head_features
from cco_jax import models
from cco_jax.runtime import xla_cpu

_MODEL = flags.DEFINE_string('model', 'resnet50', 'Architecture.')
_NUM_CLASSES = flags.DEFINE_integer('num_classes', 37, 'Classes C.')
_IMAGE_SIZE = flags.DEFINE_integer('image_size', 224, 'Image side S.')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 8, 'Images per batch.')
_NUM_FILTERS = flags.DEFINE_integer('num_filters', 64, 'First-stage width.')
_AUTODIFF_CLASSES = flags.DEFINE_integer(
  'autodiff_classes', 4, 'Classes timed for the autodiff methods (0 = all).'
)
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed repeats (median).')


def _timed(fn, repeats: int) -> float:
  """Median seconds of `fn()` (its result blocked on) after two warm calls."""
  for _ in range(2):
    jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def measure(
  model_name: str,
  num_classes: int,
  image_size: int,
  batch_size: int,
  *,
  num_filters: int = 64,
  autodiff_classes: int = 4,
  repeats: int = 3,
  **model_kwargs,
) -> dict:
  """{method: seconds per batch for all classes}, and the maps' checks.
  `model_kwargs` go to `models.create_model` (e.g. a smaller `stage_sizes`)."""
  model = models.create_model(
    model_name, num_classes, num_filters=num_filters, **model_kwargs
  )
  images = jax.random.normal(
    jax.random.key(0), (batch_size, image_size, image_size, 3)
  )
  variables = jax.jit(functools.partial(model.init, train=False))(
    jax.random.key(1), images[:1]
  )
  ours = jax.jit(functools.partial(head_features.forward_with_features, model))
  posthoc = {
    'hirescam': jax.jit(
      functools.partial(head_features.autodiff_hirescam, model)
    ),
    'gradcam': jax.jit(functools.partial(head_features.gradcam, model)),
  }
  timed = autodiff_classes or num_classes
  timed = min(timed, num_classes)
  seconds = {'ours': _timed(lambda: ours(variables, images), repeats)}
  for name, fn in posthoc.items():

    def all_timed(fn=fn):
      return [
        fn(variables, images, jnp.full((batch_size,), c, jnp.int32))
        for c in range(timed)
      ]

    seconds[name] = _timed(all_timed, repeats) * num_classes / timed
  _, cams, _ = ours(variables, images)
  classes = jnp.full((batch_size,), num_classes - 1, jnp.int32)
  scale = float(jnp.abs(cams).max()) + 1e-12
  errors = {
    'hirescam': float(
      jnp.abs(
        posthoc['hirescam'](variables, images, classes) - cams[..., -1]
      ).max()
    )
    / scale,
    'gradcam': float(
      jnp.abs(
        posthoc['gradcam'](variables, images, classes)
        - jax.nn.relu(cams[..., -1])
      ).max()
    )
    / scale,
  }
  return {
    'seconds': seconds,
    'relative_map_error': errors,
    'autodiff_classes_timed': timed,
  }


def table(result: dict, batch_size: int) -> str:
  ours = result['seconds']['ours']
  rows = [
    '| method | s per batch (all classes) | explanations/s | ours is x faster |',
    '|---|---|---|---|',
  ]
  for name, seconds in result['seconds'].items():
    rows.append(
      f'| {name} | {seconds:.4g} | {batch_size / seconds:.4g} | '
      f'{seconds / ours:.1f} |'
    )
  return '\n'.join(rows)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  result = measure(
    _MODEL.value,
    _NUM_CLASSES.value,
    _IMAGE_SIZE.value,
    _BATCH_SIZE.value,
    num_filters=_NUM_FILTERS.value,
    autodiff_classes=_AUTODIFF_CLASSES.value,
    repeats=_REPEATS.value,
  )
  print(
    f'{_MODEL.value} (width {_NUM_FILTERS.value}), {_NUM_CLASSES.value} '
    f'classes, {_IMAGE_SIZE.value} px, batch {_BATCH_SIZE.value}; '
    f'{jax.devices()[0].device_kind} x{jax.device_count()}, '
    f'{platform.processor() or platform.machine()}; autodiff timed on '
    f'{result["autodiff_classes_timed"]} classes, scaled to all.'
  )
  print(table(result, _BATCH_SIZE.value))
  print(
    'max |map - ours| / max |ours|: '
    + ', '.join(f'{k} {v:.1e}' for k, v in result['relative_map_error'].items())
  )


if __name__ == '__main__':
  xla_cpu.apply()  # XLA flags, before JAX starts its backend
  app.run(main)
