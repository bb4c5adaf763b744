"""Classifiers whose logits decompose exactly into per-position maps.

`create_model(name, num_classes, cam_faithful=True)` builds a Flax linen
module whose `apply(variables, images, train=...)` returns `(logits, cams)`:
`logits` `(B, C)` from global average pooling and a dense head, and `cams`
`(B, H, W, C)` = `cco_jax.cams.hirescam(features, head_kernel)`, so that
`cams.sum((1, 2)) + bias == logits`, for every family.

One interface (`cco_jax.cam_head.CamModel`): a family's backbone returns the
spatial feature map `(B, H, W, F)`; the head (average + dense, maps by one
einsum, float32) is shared. `name` picks the family from one registry,
`FAMILIES`:

  resnet    resnet18 ... resnet152  (`cco_jax.resnet`; BatchNorm)
  vit       vit_ti16, vit_s16, vit_b16  (`cco_jax.vit`; no class token,
            maps at token resolution)
  convnext  convnext_tiny, convnext_small  (`cco_jax.convnext`)

`cam_faithful=True` is the method's architecture (no head bias, and each
family's surgery: docs/backbones.md); `cam_faithful=False` the family's
standard architecture with its bias (the cross-entropy control). The head
always runs in float32, whatever `dtype` the backbone computes in, so the
identity holds to float32 rounding even for bfloat16 backbones.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cco_jax import cam_head
from cco_jax import convnext
from cco_jax import errors
from cco_jax import resnet
from cco_jax import vit

# The names other modules have always imported from here.
CamHead = cam_head.CamHead
CamModel = cam_head.CamModel
ResNet = resnet.ResNet
ResidualBlock = resnet.ResidualBlock
BottleneckBlock = resnet.BottleneckBlock
STAGE_SIZES = resnet.STAGE_SIZES
STEM_STRIDES = resnet.STEM_STRIDES
BOTTLENECK = resnet.BOTTLENECK


@dataclasses.dataclass(frozen=True)
class Family:
  """A backbone family: its model names and how to build one.

  Attributes:
    names: the `model.name`s it provides.
    build: `build(name, num_classes, *, cam_faithful, dtype, **options)`.
    options: the `create_model` keywords its `build` reads (beyond
      `cam_faithful` and `dtype`); a new option given to another family is
      refused (`NEW_OPTIONS`).
    batch_norm: whether the variables have `batch_stats`.
  """

  names: tuple[str, ...]
  build: Callable[..., nn.Module]
  options: tuple[str, ...]
  batch_norm: bool


FAMILIES = {
  'resnet': Family(
    resnet.NAMES,
    resnet.build,
    (
      'num_filters',
      'stem',
      'stage_sizes',
      'bn_axis_name',
      'pointwise_as_dot',
    ),
    batch_norm=True,
  ),
  'vit': Family(
    vit.NAMES,
    vit.build,
    ('patch_size', 'width', 'depth', 'num_heads'),
    batch_norm=False,
  ),
  'convnext': Family(
    convnext.NAMES,
    convnext.build,
    ('stage_sizes', 'width', 'last_stage_stride'),
    batch_norm=False,
  ),
}
# Options only some families read, with their "not set" value: setting one
# for a family that ignores it is a mistake worth an error. (The ResNet's
# older options have non-zero defaults and are ignored by the others.)
NEW_OPTIONS = {
  'patch_size': 0,
  'width': 0,
  'depth': 0,
  'num_heads': 0,
  'last_stage_stride': 0,
}


def names() -> list[str]:
  """Every model name, sorted."""
  return sorted(n for family in FAMILIES.values() for n in family.names)


def family_of(name: str) -> str:
  """The family (a key of `FAMILIES`) of the model `name`.

  Raises:
    errors.UserError: an unknown name, listing the choices.
  """
  for key, family in FAMILIES.items():
    if name in family.names:
      return key
  raise errors.UserError(
    f'Unknown model {name!r} (model.name); choose one of {names()}.'
  )


def create_model(
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
  patch_size: int = 0,
  width: int = 0,
  depth: int = 0,
  num_heads: int = 0,
  last_stage_stride: int = 0,
) -> cam_head.CamModel:
  """Builds a model by name.

  Args:
    name: one of `names()` ('resnet18' ... 'resnet152', 'vit_ti16',
      'vit_s16', 'vit_b16', 'convnext_tiny', 'convnext_small').
    num_classes: number of output classes (2 for species, 37 for breeds).
    cam_faithful: the method's architecture (True) or the CE control (False).
    dtype: backbone computation dtype, e.g. `jnp.bfloat16`; params are float32.
    num_filters: ResNet: first-stage width (64 standard; 16-32 for a CPU model).
    stem: ResNet: 'imagenet', 'strided' or 'small' (see `resnet.ResNet`).
    stage_sizes: ResNet, ConvNeXt: override the blocks per stage (depth),
      e.g. (1, 1, 1, 1); a ViT ignores it (its depth is `depth`), so the
      small CPU configs' (1, 1, 1, 1) can stay.
    bn_axis_name: ResNet: see `resnet.ResNet`; the train step passes its
      pmap axis name (the other families have no BatchNorm and ignore it).
    pointwise_as_dot: ResNet: see `resnet.ResNet`.
    patch_size: ViT: patch side (0 = 16).
    width: ViT: token width; ConvNeXt: first-stage channels (0 = named).
    depth: ViT: encoder blocks (0 = named, 12).
    num_heads: ViT: attention heads (0 = named).
    last_stage_stride: ConvNeXt: 1 (finer maps) or 2 (0 = 2, timm's).

  Returns:
    An un-initialised module. Initialise with
    `model.init(rng, images, train=False)`.

  Raises:
    errors.UserError: an unknown name, a bad class count, or an option set
      for a family that does not read it.
  """
  family = FAMILIES[family_of(name)]
  if num_classes < 1:
    raise errors.UserError(
      f'num_classes must be >= 1; got {num_classes} (the data has no classes?).'
    )
  given = dict(
    num_filters=num_filters,
    stem=stem,
    stage_sizes=stage_sizes,
    bn_axis_name=bn_axis_name,
    pointwise_as_dot=pointwise_as_dot,
    patch_size=patch_size,
    width=width,
    depth=depth,
    num_heads=num_heads,
    last_stage_stride=last_stage_stride,
  )
  for option, unset in NEW_OPTIONS.items():
    if option not in family.options and given[option] != unset:
      raise errors.UserError(
        f'model.{option}={given[option]} does not apply to {name}; it is read '
        f'by {[k for k, f in FAMILIES.items() if option in f.options]} models '
        f'only. Leave --config.model.{option} at {unset}.'
      )
  options = {k: v for k, v in given.items() if k in family.options}
  return family.build(
    name, num_classes, cam_faithful=cam_faithful, dtype=dtype, **options
  )


def has_batch_norm(name: str) -> bool:
  """Whether models of `name` carry `batch_stats`."""
  return FAMILIES[family_of(name)].batch_norm


def cam_size(model: nn.Module, image_size: int) -> tuple[int, int]:
  """The `(H, W)` of the model's maps for square `image_size` inputs (no FLOPs)."""
  images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  (_, cams), _ = jax.eval_shape(
    lambda x: model.init_with_output(jax.random.key(0), x, train=False), images
  )
  return tuple(cams.shape[1:3])


def head_bias(variables) -> jax.Array | None:
  """The head's bias, or None for a bias-free (faithful) head."""
  return variables['params']['head'].get('bias')
