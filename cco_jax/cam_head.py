"""The head every backbone shares: average pooling + dense, maps by one einsum.

A backbone family subclasses `CamModel` and implements one method,
`features(images, train) -> (B, H, W, F)`: the spatial feature map entering
the head (ResNet: the last block's output; ViT: the tokens on their grid;
ConvNeXt: the last stage's output). `CamModel.__call__` adds the head and
returns `(logits (B, C), maps (B, H, W, C))` with

    logits = mean_hw(A) @ W + b,   maps = cams.hirescam(A, W),
    maps.sum((1, 2)) + b == logits                    (the logit-sum identity),

whatever the family. `cam_faithful=True` drops the bias; `cam_faithful=False`
is the family's standard architecture with its bias (the control).

Families whose standard head normalises the pooled vector (timm's ConvNeXt
and its `global_pool='avg'` ViT: pool, LayerNorm, dense) set `head_norm`:
`HeadNorm` then runs in front of the pooling, with the same parameters,

  * faithful: a LayerNorm at every position (per-position statistics; the
    function differs from timm's pool-then-norm);
  * control: each position normalised with the statistics of the *pooled*
    vector. Pooling commutes with that affine map, so the logits are exactly
    timm's pool-then-norm-then-dense and the maps still sum to them; but the
    statistics come from every position, so a position's map is not a
    function of that position's features alone.

The head (norm, dot and einsum) computes in float32 at `cams.HEAD_PRECISION`
whatever dtype the backbone uses.
"""

from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from cco_jax import cams as cams_lib


class CamHead(nn.Module):
  """Global average pooling + dense, returning logits and all-class HiResCAMs.

  The logits are computed the ordinary way (pool, then dense) and the maps by
  `cams.hirescam`, so the logit-sum identity is a property of the model that
  tests can check, not a definition.
  """

  num_classes: int
  use_bias: bool

  @nn.compact
  def __call__(self, features):
    """`features` `(B, H, W, F)` -> `(logits (B, C), maps (B, H, W, C))`."""
    features = features.astype(jnp.float32)
    kernel = self.param(
      'kernel',
      nn.initializers.lecun_normal(),
      (features.shape[-1], self.num_classes),
      jnp.float32,
    )
    logits = jnp.matmul(
      features.mean((1, 2)), kernel, precision=cams_lib.HEAD_PRECISION
    )
    if self.use_bias:
      logits = logits + self.param(
        'bias', nn.initializers.zeros_init(), (self.num_classes,), jnp.float32
      )
    return logits, cams_lib.hirescam(features, kernel)


class HeadNorm(nn.Module):
  """LayerNorm over channels in front of the pooling (module docstring).

  Parameters `scale`, `bias` `(F,)` as `nn.LayerNorm`'s. `per_position`:
  statistics of each position (faithful); otherwise the statistics of the
  position-mean, applied at every position (= timm's pool-then-norm).
  """

  epsilon: float = 1e-6
  per_position: bool = True

  @nn.compact
  def __call__(self, x):
    """`x` `(B, H, W, F)` -> float32 `(B, H, W, F)`."""
    x = x.astype(jnp.float32)
    features = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones_init(), (features,))
    bias = self.param('bias', nn.initializers.zeros_init(), (features,))
    source = x if self.per_position else x.mean((1, 2), keepdims=True)
    mean = source.mean(-1, keepdims=True)
    var = jnp.square(source - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias


class CamModel(nn.Module):
  """A backbone (`features`) and the shared head: `(logits, maps)`.

  Subclasses declare the dataclass fields `num_classes: int` and
  `cam_faithful: bool`, implement `features`, and set the class attribute
  `head_norm_epsilon` (None: no `HeadNorm`, as ResNets; a float: timm's
  pooled-vector LayerNorm, moved in front of the pooling).
  """

  head_norm_epsilon: ClassVar[float | None] = None

  def features(self, x: jax.Array, train: bool) -> jax.Array:
    """Images `(B, S, S, 3)` -> the feature map `(B, H, W, F)`."""
    raise NotImplementedError

  @nn.compact
  def __call__(self, x, train: bool = True):
    """Images `(B, S, S, 3)` -> `(logits (B, C), maps (B, H, W, C))`."""
    features = self.features(x, train)
    if self.head_norm_epsilon is not None:
      features = HeadNorm(
        self.head_norm_epsilon,
        per_position=self.cam_faithful,
        name='head_norm',
      )(features)
    return CamHead(
      self.num_classes, use_bias=not self.cam_faithful, name='head'
    )(features)
