"""ConvNeXts (Z. Liu et al., "A ConvNet for the 2020s", 2022), one backbone family.

`ConvNeXt.features` is timm's `convnext_tiny` / `convnext_small` up to the
last stage: a 4x4/4 patchify stem with LayerNorm, four stages of blocks
(depthwise 7x7 conv, LayerNorm, MLP 4x with exact GELU, layer scale `gamma`,
residual), each stage after the first opening with LayerNorm + 2x2/2 conv.

The surgery its head needs. timm's head pools, *then* applies a LayerNorm
(`head.norm`), then the dense layer with bias; a norm after the pooling
breaks the logit-sum identity. Here that LayerNorm is the shared
`cam_head.HeadNorm` (same parameters):

  * faithful (`cam_faithful=True`): the LayerNorm at every position before the
    pooling (per-position statistics) and no head bias. This is a different
    function from timm's; pretrained weights load unchanged into it.
  * control (`cam_faithful=False`): timm's head exactly (the pooled vector's
    statistics, applied at every position, then pooling, dense and bias), so
    a control with timm's weights computes timm's logits.

`last_stage_stride=1` keeps the last stage at the third stage's resolution
(its 2x2 downsampling conv runs at stride 1 with the same weights, padded on
the high side): twice finer maps, as the faithful ResNet's last stage.
LayerNorm epsilon 1e-6 everywhere (timm's). No drop-path.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from cco_jax import cam_head
from cco_jax import errors

# name: (blocks per stage, first-stage channels); channels double per stage.
SIZES = {
  'convnext_tiny': ((3, 3, 9, 3), 96),
  'convnext_small': ((3, 3, 27, 3), 96),
}
LN_EPSILON = 1e-6
LAYER_SCALE_INIT = 1e-6


class ConvNeXtBlock(nn.Module):
  """`x + gamma * MLP(LN(dwconv7x7(x)))`; `(B, H, W, C)` in and out."""

  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1]
    y = nn.Conv(
      channels,
      (7, 7),
      padding=((3, 3), (3, 3)),
      feature_group_count=channels,
      dtype=self.dtype,
      name='conv_dw',
    )(x)
    y = nn.LayerNorm(epsilon=LN_EPSILON, dtype=self.dtype, name='norm')(y)
    y = nn.Dense(4 * channels, dtype=self.dtype, name='fc1')(y)
    y = nn.gelu(y, approximate=False)
    y = nn.Dense(channels, dtype=self.dtype, name='fc2')(y)
    gamma = self.param(
      'gamma', nn.initializers.constant(LAYER_SCALE_INIT), (channels,)
    )
    return x + gamma.astype(self.dtype) * y


class ConvNeXt(cam_head.CamModel):
  """ConvNeXt with the shared CAM head (module docstring).

  Attributes:
    stage_sizes: blocks per stage.
    num_classes: classes of the head.
    width: channels of the first stage (doubling per stage).
    cam_faithful: per-position head LayerNorm, no bias (True) or timm's head.
    last_stage_stride: 2 (timm) or 1 (finer maps).
    dtype: computation dtype of the backbone (parameters and head float32).
  """

  stage_sizes: Sequence[int]
  num_classes: int
  width: int = 96
  cam_faithful: bool = True
  last_stage_stride: int = 2
  dtype: Any = jnp.float32

  head_norm_epsilon = LN_EPSILON

  def features(self, x, train: bool):
    """Images `(B, S, S, 3)` -> the last stage's output `(B, H, W, F)`,
    `H = S/32` (`S/16` with `last_stage_stride=1`)."""
    del train  # No dropout, no batch statistics.
    norm = lambda name: nn.LayerNorm(
      epsilon=LN_EPSILON, dtype=self.dtype, name=name
    )
    x = nn.Conv(
      self.width,
      (4, 4),
      strides=(4, 4),
      padding='VALID',
      dtype=self.dtype,
      name='stem_conv',
    )(x.astype(self.dtype))
    x = norm('stem_norm')(x)
    last = len(self.stage_sizes) - 1
    for i, size in enumerate(self.stage_sizes):
      if i > 0:
        stride = self.last_stage_stride if i == last else 2
        x = norm(f'stage{i}_downsample_norm')(x)
        x = nn.Conv(
          self.width * 2**i,
          (2, 2),
          strides=(stride, stride),
          padding='VALID' if stride == 2 else ((0, 1), (0, 1)),
          dtype=self.dtype,
          name=f'stage{i}_downsample_conv',
        )(x)
      for j in range(size):
        x = ConvNeXtBlock(dtype=self.dtype, name=f'stage{i}_block{j}')(x)
    return x


def build(
  name: str,
  num_classes: int,
  *,
  cam_faithful: bool = True,
  dtype: Any = jnp.float32,
  stage_sizes: Sequence[int] | None = None,
  width: int = 0,
  last_stage_stride: int = 0,
) -> ConvNeXt:
  """The ConvNeXt `name` (a key of `SIZES`); `stage_sizes=None`, `width=0`
  and `last_stage_stride=0` take the named size's (and timm's stride 2).

  Raises:
    errors.UserError: a stride other than 1 or 2, a non-positive width.
  """
  named_stages, named_width = SIZES[name]
  last_stage_stride = last_stage_stride or 2
  if last_stage_stride not in (1, 2):
    raise errors.UserError(
      f'model.last_stage_stride={last_stage_stride} must be 1 (finer maps), '
      "2 or 0 (timm's downsampling); set --config.model.last_stage_stride."
    )
  width = width or named_width
  if width < 1:
    raise errors.UserError(
      f'model.width={width} must be positive (0 = {named_width}, the width '
      f'of {name}); set --config.model.width.'
    )
  return ConvNeXt(
    stage_sizes=tuple(stage_sizes or named_stages),
    num_classes=num_classes,
    width=width,
    cam_faithful=cam_faithful,
    last_stage_stride=last_stage_stride,
    dtype=dtype,
  )


NAMES = tuple(SIZES)
