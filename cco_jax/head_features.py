"""The activations entering the head, captured and differentiated.

`forward_with_features` returns a model's logits, maps and the head's input
`A` from one forward pass (`nn.intercept_methods` on `models.CamHead`);
`feature_gradients` differentiates a class logit with respect to `A`. On them,
the post-hoc maps the field compares against: `autodiff_hirescam` (equal to
the exact maps for these models) and `gradcam`. `cco_jax.explain` uses the
capture for channel decompositions; `cco_jax.evaluation` the post-hoc maps.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from cco_jax import models


def forward_with_features(model: nn.Module, variables, images: jax.Array):
  """`(logits (B, C), cams (B, h, w, C), features (B, h, w, F))`.

  `features` are the activations entering the head (float32), captured with
  `nn.intercept_methods` from the same forward pass.
  """
  captured = {}

  def interceptor(next_fun, args, kwargs, context):
    if isinstance(context.module, models.CamHead):
      captured['features'] = args[0].astype(jnp.float32)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    logits, cams = model.apply(variables, images, train=False)
  return logits, cams, captured['features']


def feature_gradients(model: nn.Module, variables, images, classes):
  """`(d s_c / d A, A)`, both `(B, h, w, F)`: the gradient of each image's
  class logit `s_c` (`classes` `(B,)`) with respect to the activations `A`
  entering the head, by autodiff through the real head (one backward pass)."""

  def total_logit(delta):
    def interceptor(next_fun, args, kwargs, context):
      if isinstance(context.module, models.CamHead):
        args = (args[0].astype(jnp.float32) + delta,)
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
      logits, _ = model.apply(variables, images, train=False)
    return jnp.take_along_axis(logits, classes[:, None], -1).sum()

  features = forward_with_features(model, variables, images)[2]
  return jax.grad(total_logit)(jnp.zeros_like(features)), features


def autodiff_hirescam(model: nn.Module, variables, images, classes):
  """HiResCAM computed post hoc: `sum_f (d s_c / d A) * A`, `(B, h, w)`.

  Equal to `cams[..., c]` for these models (`tests/test_explain.py`), at the
  price of a backward pass per class. Source: R. L. Draelos, L. Carin, "Use
  HiResCAM instead of Grad-CAM for faithful explanations of convolutional
  neural networks" (2020).
  """
  grads, features = feature_gradients(model, variables, images, classes)
  return (grads * features).sum(-1)


def gradcam(model: nn.Module, variables, images, classes):
  """Grad-CAM at the layer entering the head, by autodiff, `(B, h, w)`:
  `ReLU(sum_f alpha_f A[..., f])` with `alpha_f = mean_{h,w} d s_c / d A`.

  Source: R. R. Selvaraju et al., "Grad-CAM: Visual Explanations from Deep
  Networks via Gradient-based Localization", ICCV 2017. (Behind a global
  average pool the gradient is the same at every position, so this is the
  class's HiResCAM clipped at 0: positive evidence only.)
  """
  grads, features = feature_gradients(model, variables, images, classes)
  alpha = grads.mean((1, 2), keepdims=True)
  return jax.nn.relu((alpha * features).sum(-1))
