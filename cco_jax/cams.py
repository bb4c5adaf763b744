"""Per-pixel logit decompositions: HiResCAMs and ContrastiveCAMs.

For a head made of global average pooling followed by a dense layer with kernel
`W` `(F, C)` and bias `b` `(C,)`, the logit of class `c` is

    s_c = (1 / (H W)) sum_{h,w,f} A[h,w,f] W[f,c] + b_c.

Its HiResCAM (gradient times activation, summed over channels) is therefore one
einsum, with no backward pass, and decomposes the logit exactly:

    M[b,h,w,c] = einsum('bhwf,fc->bhwc', A, W) / (H W),
    s_c        = sum_{h,w} M[h,w,c] + b_c                 (the logit-sum identity).

Softmax only sees logit differences, so the maps that matter are differences of
maps (ContrastiveCAMs): `K[..., c] = M[..., y] - M[..., c]`, zero at the label.

Both the head's dot (`models.CamHead`) and the map einsum run at
`HEAD_PRECISION` (`Precision.HIGHEST`): at the default precision an
accelerator may compute float32 products in TF32 (H100/H200) or one bfloat16
pass (TPU), and the identity then holds only to ~1e-3 of the logits. Both dots
are tiny next to the backbone, so full float32 costs nothing measurable.
`identity_tolerance(dtype)` states how closely the identity holds per dtype.

All functions are pure, channels-last, and safe under `jit`, `vmap` and `pmap`.
Shape checks are static (they run while tracing); value checks (label range)
run only on concrete inputs.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from cco_jax import checks

Array = jax.Array

# Precision of the head's dot and the map einsum (module docstring).
HEAD_PRECISION = jax.lax.Precision.HIGHEST


def hirescam(features: Array, kernel: Array) -> Array:
  """All-class HiResCAMs of a global-average-pool + dense head, in one einsum.

  `M[b,h,w,c] = sum_f features[b,h,w,f] * kernel[f,c] / (H*W)`, so that
  `M.sum((1, 2)) + bias == logits` exactly (up to float rounding).

  Args:
    features: `(B, H, W, F)` activations entering the pooling layer.
    kernel: `(F, C)` dense-head kernel.

  Returns:
    `(B, H, W, C)` maps, in the promoted dtype of the inputs.

  Example:
    >>> a = jnp.ones((1, 2, 2, 3)); w = jnp.ones((3, 4))
    >>> hirescam(a, w).sum((1, 2))      # == mean-pooled features @ w
    Array([[3., 3., 3., 3.]], dtype=float32)
  """
  checks.check_rank(features, 4, 'features', '(B, H, W, F)')
  checks.check_rank(kernel, 2, 'kernel', '(F, C)')
  if features.shape[-1] != kernel.shape[0]:
    raise ValueError(
      f'features has {features.shape[-1]} channels (shape {features.shape}) '
      f'but kernel expects {kernel.shape[0]} (shape {kernel.shape}); the '
      'kernel must be (F, C) with F = features.shape[-1].'
    )
  height, width = features.shape[1:3]
  maps = jnp.einsum('bhwf,fc->bhwc', features, kernel, precision=HEAD_PRECISION)
  return maps / (height * width)


def contrastive_cams(cams: Array, labels: Array) -> Array:
  """ContrastiveCAMs: each class's map subtracted from the target's.

  `K[b,h,w,c] = cams[b,h,w,labels[b]] - cams[b,h,w,c]`; `K[..., labels] == 0`
  and `K.sum((1, 2))[b, c] == (s_y - b_y) - (s_c - b_c)`.

  Args:
    cams: `(B, H, W, C)` HiResCAMs.
    labels: `(B,)` integer targets in `[0, C)`.

  Returns:
    `(B, H, W, C)` contrastive maps.
  """
  checks.check_cams_and_labels(cams, labels)
  target = jnp.take_along_axis(cams, labels[:, None, None, None], axis=-1)
  return target - cams


def pixel_influence(contrastive: Array, fg_mask: Array) -> Mapping[str, Array]:
  """How much contrastive evidence lies on the object versus the background.

  Per example (docs/method.md §8): `net = sum_{h,w,c} |K|`,
  `fg = sum m |K|`, `bg = sum (1 - m) |K|`, so `net == fg + bg`.

  Args:
    contrastive: `(B, H, W, C)` contrastive maps.
    fg_mask: `(B, H, W)` foreground mask in [0, 1] at the maps' resolution.

  Returns:
    A dict of `(B,)` arrays with keys `net`, `fg`, `bg`.
  """
  checks.check_cams_and_mask(contrastive, fg_mask)
  magnitude = jnp.abs(contrastive).sum(-1)
  mask = fg_mask.astype(magnitude.dtype)
  fg = (mask * magnitude).sum((1, 2))
  bg = ((1 - mask) * magnitude).sum((1, 2))
  return {'net': magnitude.sum((1, 2)), 'fg': fg, 'bg': bg}


def identity_error(
  logits: Array, cams: Array, bias: Array | None = None
) -> Array:
  """Largest violation of the logit-sum identity, `max |sum M + b - s|`.

  Args:
    logits: `(B, C)` logits of the model.
    cams: `(B, H, W, C)` HiResCAMs of the same forward pass.
    bias: optional `(C,)` head bias.

  Returns:
    A scalar: the maximum absolute error over the batch and classes.
  """
  checks.check_rank(logits, 2, 'logits', '(B, C)')
  checks.check_rank(cams, 4, 'cams', '(B, H, W, C)')
  recon = cams.astype(jnp.float32).sum((1, 2))
  if bias is not None:
    recon = recon + bias.astype(jnp.float32)
  return jnp.max(jnp.abs(recon - logits.astype(jnp.float32)))


def identity_tolerance(dtype) -> float:
  """How closely the logit-sum identity holds for maps computed in `dtype`.

  The bound applies to the relative error that `train_step.eval_step` reports,
  `max |sum_{h,w} M + b - s| / (max |s| + 1)`, with the head's dot and einsum
  at `HEAD_PRECISION`. Two parts: rounding the maps (and logits) to `dtype`,
  two units of its epsilon, plus float32 accumulation over the `F * H * W`
  products of each logit:

      tolerance = 2 eps(dtype) + 64 eps(float32)

  float32 7.9e-6, float16 2.0e-3, bfloat16 1.6e-2. Measured on a ResNet-50
  sized head (`(16, 14, 14, 2048)` features, 37 classes, logits up to ~350,
  mixed-sign and ReLU features, on CPU): float32 6e-7 to 8e-7; maps rounded to
  float16 1.4e-4 to 2.1e-4, to bfloat16 1.3e-3 to 1.7e-3; each ~10x below its
  tolerance. TF32 products (the GPU default for float32 dots; simulated by
  rounding both dots' inputs to a 10-bit mantissa) give 1.6e-4 to 2.6e-4, far
  above the float32 tolerance, so a head left at default precision fails.
  `models.CamHead` computes in float32 whatever the backbone's dtype, so a
  ResNet's maps take the float32 tolerance even for a bfloat16 backbone.

  Args:
    dtype: dtype of the maps and logits (e.g. `cams.dtype`), floating.

  Returns:
    The largest relative identity error a correct model produces, as a float.
  """
  dtype = jnp.dtype(dtype)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(
      f'identity_tolerance needs a floating dtype (that of the maps); got '
      f'{dtype.name}.'
    )
  eps = float(jnp.finfo(dtype).eps)
  return 2 * eps + 64 * float(jnp.finfo(jnp.float32).eps)
