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
  return jnp.einsum('bhwf,fc->bhwc', features, kernel) / (height * width)


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

  Per example (METHOD.md §8): `net = sum_{h,w,c} |K|`,
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
