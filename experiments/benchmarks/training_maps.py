"""Section `cams` of the training benchmark: all-class maps by one einsum
versus per-class autodiff (through the head, and through the whole network
as post-hoc tools do it); see `experiments/benchmarks/training.py`.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import functools
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from cco_jax import cams as cams_lib
from cco_jax import models
from experiments.benchmarks import training_settings as settings
from experiments.benchmarks import training_timing as timing


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


def time_feature_maps(
  features: jax.Array, num_classes: int, repeats: int
) -> dict:
  """Einsum versus per-class autodiff through the head, on given features."""
  kernel = (
    jax.random.normal(timing.key(1), (features.shape[-1], num_classes)) * 0.02
  )
  hirescam = jax.jit(cams_lib.hirescam)
  einsum_s, maps = timing.time_repeated(
    lambda: hirescam(features, kernel), repeats
  )
  loop_s, loop_maps = timing.time_repeated(
    lambda: autodiff_maps_loop(features, kernel), repeats
  )
  vmap_s, vmap_maps = timing.time_repeated(
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
    'max_rel_err_loop': timing.relative_error(loop_maps, maps),
    'max_rel_err_vmap': timing.relative_error(vmap_maps, maps),
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
  setting: settings.CamSetting, num_classes: int, classes_to_time: Sequence[int]
) -> dict:
  """Forward (maps by einsum) versus forward + one whole-network backward per class."""
  model = settings.build_model(setting).clone(num_classes=num_classes)
  shape = (setting.network_batch, setting.image_size, setting.image_size, 3)
  images = jax.random.uniform(timing.key(2), shape)
  variables = jax.jit(functools.partial(model.init, train=False))(
    timing.key(3), images[:1]
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
  forward_s, (_, einsum_maps) = timing.time_repeated(
    lambda: forward_with_maps(params), repeats
  )
  vjp_s, (_, vjp_fn, features) = timing.time_repeated(
    lambda: forward_for_vjp(params, zero), repeats
  )
  timing.block(
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
      timing.block(outputs)
      times.append(time.perf_counter() - start)
      maps = jnp.stack([m for _, m in outputs], -1)
    backward_s = timing.median(times)
    autodiff_s = vjp_s + backward_s
    kernel = params['head']['kernel'][:, :count]
    einsum_s, _ = timing.time_repeated(
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
      'max_rel_err': timing.relative_error(maps, einsum_maps[..., :count]),
    }
  return results


def time_cams(setting: settings.CamSetting, repeats: int) -> dict:
  load_start = timing.loadavg()
  model = settings.build_model(setting)
  height, width = models.cam_size(model, setting.image_size)
  shapes = jax.eval_shape(
    lambda x: model.init(timing.key(), x, train=False),
    jax.ShapeDtypeStruct(
      (1, setting.image_size, setting.image_size, 3), jnp.float32
    ),
  )
  channels = shapes['params']['head']['kernel'].shape[0]
  features = jax.random.normal(
    timing.key(4), (setting.batch, height, width, channels)
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
    'loadavg_end': timing.loadavg(),
  }
