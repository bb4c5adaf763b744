"""ResNets with the method's three changes (docs/method.md §5), one backbone family.

`ResNet.features` is the torchvision-layout ResNet v1.5 up to its last block;
the head is the shared `cam_head.CamModel` head (no `HeadNorm`).
`cam_faithful=True` applies the method's three changes:
  1. the last stage does not downsample (224 px in -> 14 x 14 maps, not 7 x 7);
  2. the head has no bias;
  3. the last block ends without BatchNorm and ReLU (activations may be < 0).
`cam_faithful=False` is the cross-entropy control with all three put back; its
maps are still exact once the bias is added.

Parameter names are those of the ResNets before the backbone interface (the
head is `head`, the stem `conv_init`/`bn_init`, the blocks
`BottleneckBlock_k`/`ResidualBlock_k`), so old checkpoints restore and
`cco_jax.pretrained` maps torchvision's names onto them.
"""

from __future__ import annotations

from collections.abc import Sequence
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cco_jax import cam_head
from cco_jax import ops

ModuleDef = Any

STAGE_SIZES = {
  'resnet18': (2, 2, 2, 2),
  'resnet34': (3, 4, 6, 3),
  'resnet50': (3, 4, 6, 3),
  'resnet101': (3, 4, 23, 3),
  'resnet152': (3, 8, 36, 3),
}
# Single 3x3-conv stems for low-resolution inputs, by their stride.
STEM_STRIDES = {'small': 1, 'strided': 2}
# Convolutions and the stem's max-pool pad symmetrically, as torchvision does
# (3x3: 1 on every side; 7x7 stem: 3). Flax's 'SAME' would pad a stride-2
# window of an even size only on the high side, shifting every sample by one
# pixel, so torchvision's weights would compute something else.
PAD_3X3 = ((1, 1), (1, 1))
BOTTLENECK = {
  'resnet18': False,
  'resnet34': False,
  'resnet50': True,
  'resnet101': True,
  'resnet152': True,
}


def _residual_output(
  block: nn.Module, residual: jax.Array, y: jax.Array
) -> jax.Array:
  """A block's tail: final BN (zero-initialised scale), projection shortcut, add, ReLU.

  Called inside `block`'s compact `__call__`, so the submodules it creates are
  the block's (`BatchNorm_k`, `conv_proj`, `norm_proj`). The final BN and ReLU
  are skipped where `block.final_norm_and_relu` is False (the faithful last block).
  """
  if block.final_norm_and_relu:
    y = block.norm(scale_init=nn.initializers.zeros_init())(y)
  if residual.shape != y.shape:
    residual = block.conv(
      y.shape[-1], (1, 1), (block.strides, block.strides), name='conv_proj'
    )(residual)
    residual = block.norm(name='norm_proj')(residual)
  y = residual + y
  return nn.relu(y) if block.final_norm_and_relu else y


class ResidualBlock(nn.Module):
  """Basic two-conv residual block (ResNet-18/34)."""

  filters: int
  conv: ModuleDef
  norm: ModuleDef
  strides: int = 1
  final_norm_and_relu: bool = True

  @nn.compact
  def __call__(self, x):
    residual = x
    y = self.conv(
      self.filters, (3, 3), (self.strides, self.strides), padding=PAD_3X3
    )(x)
    y = nn.relu(self.norm()(y))
    y = self.conv(self.filters, (3, 3), padding=PAD_3X3)(y)
    return _residual_output(self, residual, y)


class BottleneckBlock(nn.Module):
  """Bottleneck residual block (ResNet-50/101/152); output has 4x filters."""

  filters: int
  conv: ModuleDef
  norm: ModuleDef
  strides: int = 1
  final_norm_and_relu: bool = True

  @nn.compact
  def __call__(self, x):
    residual = x
    y = nn.relu(self.norm()(self.conv(self.filters, (1, 1))(x)))
    y = self.conv(
      self.filters, (3, 3), (self.strides, self.strides), padding=PAD_3X3
    )(y)
    y = nn.relu(self.norm()(y))
    y = self.conv(self.filters * 4, (1, 1))(y)
    return _residual_output(self, residual, y)


class ResNet(cam_head.CamModel):
  """ResNet v1.5 with a CAM head; torchvision's layout and padding.

  With `cam_faithful=False` and the 'imagenet' stem it computes torchvision's
  `resnet18`...`resnet152` in eval mode (`cco_jax.pretrained` loads weights).

  Attributes:
    stage_sizes: blocks per stage.
    block_cls: `ResidualBlock` or `BottleneckBlock`.
    num_classes: classes of the head.
    num_filters: width of the first stage (64 for the standard nets).
    cam_faithful: apply the method's three changes (module docstring).
    stem: 'imagenet' (7x7/2 conv + 3x3/2 max-pool, /4), 'strided' (3x3/2
      conv, /2) or 'small' (3x3/1 conv, /1); the last two suit small inputs.
    dtype: computation dtype of the backbone (parameters stay float32).
    bn_axis_name: mapped axis over which BatchNorm averages batch statistics
      in training (e.g. 'batch' inside `pmap`), so replicas stay identical and
      a sharded batch normalises exactly like the whole batch; None outside.
    pointwise_as_dot: run 1x1 convolutions as matrix products (`Conv`); the
      parameters are the same either way.
  """

  stage_sizes: Sequence[int]
  block_cls: ModuleDef
  num_classes: int
  num_filters: int = 64
  cam_faithful: bool = True
  stem: str = 'imagenet'
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None
  pointwise_as_dot: bool = True

  def features(self, x, train: bool):
    """Images `(B, S, S, 3)` -> the last block's output `(B, H, W, F)`."""
    conv = functools.partial(
      ops.Conv,
      use_bias=False,
      dtype=self.dtype,
      param_dtype=jnp.float32,
      pointwise_as_dot=self.pointwise_as_dot,
    )
    norm = functools.partial(
      nn.BatchNorm,
      use_running_average=not train,
      momentum=0.9,
      epsilon=1e-5,
      dtype=self.dtype,
      param_dtype=jnp.float32,
      axis_name=self.bn_axis_name if train else None,
    )
    x = x.astype(self.dtype)
    if self.stem == 'imagenet':
      x = conv(
        self.num_filters,
        (7, 7),
        (2, 2),
        padding=[(3, 3), (3, 3)],
        name='conv_init',
      )(x)
      x = nn.relu(norm(name='bn_init')(x))
      x = ops.max_pool(x, 3, 2, 1)
    elif self.stem in STEM_STRIDES:
      stride = STEM_STRIDES[self.stem]
      x = conv(
        self.num_filters,
        (3, 3),
        (stride, stride),
        padding=PAD_3X3,
        name='conv_init',
      )(x)
      x = nn.relu(norm(name='bn_init')(x))
    else:
      raise ValueError(
        f"stem must be one of 'imagenet', {sorted(STEM_STRIDES)}; "
        f'got {self.stem!r}.'
      )
    last_stage = len(self.stage_sizes) - 1
    for i, block_size in enumerate(self.stage_sizes):
      for j in range(block_size):
        downsample = (
          i > 0 and j == 0 and not (self.cam_faithful and i == last_stage)
        )
        is_last_block = i == last_stage and j == block_size - 1
        x = self.block_cls(
          self.num_filters * 2**i,
          conv=conv,
          norm=norm,
          strides=2 if downsample else 1,
          final_norm_and_relu=not (self.cam_faithful and is_last_block),
        )(x)
    return x


NAMES = tuple(STAGE_SIZES)


def build(
  name: str,
  num_classes: int,
  *,
  cam_faithful: bool = True,
  dtype: Any = jnp.float32,
  num_filters: int = 64,
  stem: str = 'imagenet',
  stage_sizes: Sequence[int] | None = None,
  bn_axis_name: str | None = None,
  pointwise_as_dot: bool = True,
) -> ResNet:
  """The ResNet `name` (a key of `STAGE_SIZES`); see `models.create_model`."""
  block = BottleneckBlock if BOTTLENECK[name] else ResidualBlock
  return ResNet(
    stage_sizes=tuple(stage_sizes or STAGE_SIZES[name]),
    block_cls=block,
    num_classes=num_classes,
    num_filters=num_filters,
    cam_faithful=cam_faithful,
    stem=stem,
    dtype=dtype,
    bn_axis_name=bn_axis_name,
    pointwise_as_dot=pointwise_as_dot,
  )
