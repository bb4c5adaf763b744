"""Vision Transformers with a mean-pooled head, one backbone family.

`ViT.features` embeds non-overlapping `patch_size` patches, adds learned
position embeddings (one per token of the input's grid, sized at `init` from
the images), runs pre-norm encoder blocks and returns the tokens on their grid
`(B, S/p, S/p, D)`: the maps are at token resolution. There is no class
token; the head is the shared `cam_head` head with `HeadNorm` (timm's
`fc_norm`):

  * faithful (`cam_faithful=True`): a LayerNorm per token, then the mean over
    tokens and a bias-free dense head. This is big_vision's `pool_type='gap'`
    ViT (`encoder_norm` per token before `jnp.mean`), so the logit-sum
    identity is exact.
  * control (`cam_faithful=False`): timm's `VisionTransformer(global_pool=
    'avg', class_token=False)`: mean over tokens, then `fc_norm`, then a dense
    head with bias (computed as `HeadNorm` with the pooled vector's
    statistics, so its maps still sum to the logits).

Sizes (big_vision / timm; A. Steiner et al., "How to train your ViT", 2021):
`vit_ti16` (width 192, 3 heads), `vit_s16` (384, 6), `vit_b16` (768, 12),
12 blocks each, MLP 4x width, patch 16 (`patch_size` overrides it, e.g. 8 for
64 px images). Module names follow big_vision (`embedding`, `pos_embedding`,
`Transformer/encoderblock_k/{LayerNorm_0, MultiHeadDotProductAttention_0,
LayerNorm_1, MlpBlock_0}`); GELU is exact (erf), as timm's; LayerNorm epsilon
1e-6. No dropout or drop-path.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from cco_jax import cam_head
from cco_jax import errors

# name: (width, depth, num_heads); patch 16, MLP 4 x width.
SIZES = {
  'vit_ti16': (192, 12, 3),
  'vit_s16': (384, 12, 6),
  'vit_b16': (768, 12, 12),
}
PATCH_SIZE = 16
LN_EPSILON = 1e-6


class MlpBlock(nn.Module):
  """Dense(mlp_dim) -> exact GELU -> Dense(width); `(B, N, D)` -> `(B, N, D)`."""

  mlp_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    dense = lambda n: nn.Dense(
      n, dtype=self.dtype, kernel_init=nn.initializers.xavier_uniform()
    )
    y = nn.gelu(dense(self.mlp_dim)(x), approximate=False)
    return dense(x.shape[-1])(y)


class EncoderBlock(nn.Module):
  """Pre-norm block: `x + MHSA(LN(x))`, then `x + MLP(LN(x))`; `(B, N, D)`."""

  num_heads: int
  mlp_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    norm = lambda: nn.LayerNorm(epsilon=LN_EPSILON, dtype=self.dtype)
    y = norm()(x)
    y = nn.MultiHeadDotProductAttention(
      num_heads=self.num_heads,
      dtype=self.dtype,
      kernel_init=nn.initializers.xavier_uniform(),
      deterministic=True,
    )(y, y)
    x = x + y
    return x + MlpBlock(self.mlp_dim, dtype=self.dtype)(norm()(x))


class Encoder(nn.Module):
  """`depth` encoder blocks named `encoderblock_k`; `(B, N, D)` in and out."""

  depth: int
  num_heads: int
  mlp_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    for k in range(self.depth):
      x = EncoderBlock(
        self.num_heads, self.mlp_dim, dtype=self.dtype, name=f'encoderblock_{k}'
      )(x)
    return x


class ViT(cam_head.CamModel):
  """A ViT without class token whose head pools the tokens (module docstring).

  Attributes:
    num_classes: classes of the head.
    cam_faithful: per-token LayerNorm and no head bias (True) or timm's
      pool-then-norm head with bias (False).
    width, depth, num_heads, mlp_dim: the transformer's size.
    patch_size: side of the square patches; must divide the image size.
    dtype: computation dtype of the encoder (parameters and head float32).
  """

  num_classes: int
  cam_faithful: bool = True
  width: int = 192
  depth: int = 12
  num_heads: int = 3
  mlp_dim: int = 768
  patch_size: int = PATCH_SIZE
  dtype: Any = jnp.float32

  head_norm_epsilon = LN_EPSILON

  def features(self, x, train: bool):
    """Images `(B, S, S, 3)` -> tokens on their grid `(B, S/p, S/p, D)`."""
    del train  # No dropout, no batch statistics.
    p = self.patch_size
    if x.shape[1] % p or x.shape[2] % p:
      raise errors.UserError(
        f'model.patch_size={p} does not divide the image size '
        f'{x.shape[1]}x{x.shape[2]}; set --config.model.patch_size to a '
        'divisor of data.image_size (e.g. 8 for 64 px).'
      )
    x = nn.Conv(
      self.width,
      (p, p),
      strides=(p, p),
      padding='VALID',
      dtype=self.dtype,
      name='embedding',
    )(x.astype(self.dtype))
    batch, height, width, channels = x.shape
    tokens = x.reshape(batch, height * width, channels)
    self._check_grid(height * width, x.shape[1:3])
    position = self.param(
      'pos_embedding',
      nn.initializers.normal(stddev=1 / np.sqrt(channels)),
      (1, height * width, channels),
      jnp.float32,
    )
    tokens = tokens + position.astype(self.dtype)
    tokens = Encoder(
      self.depth,
      self.num_heads,
      self.mlp_dim,
      dtype=self.dtype,
      name='Transformer',
    )(tokens)
    return tokens.reshape(batch, height, width, channels)

  def _check_grid(self, tokens: int, grid: tuple[int, int]) -> None:
    """A UserError unless the position embeddings (if any) have `tokens` rows.

    They are sized at `init` from the images, so a model applied to images
    of another size would otherwise fail with a shape error deep in Flax.
    """
    if not self.has_variable('params', 'pos_embedding'):
      return
    stored = self.get_variable('params', 'pos_embedding').shape[1]
    if stored != tokens:
      raise errors.UserError(
        f'images of {grid[0] * self.patch_size}x{grid[1] * self.patch_size} '
        f'px give {grid[0]}x{grid[1]} = {tokens} tokens, but the ViT was '
        f'initialised for {stored} (its position embeddings); resize the '
        'images to the size it was trained at (data.image_size).'
      )


def build(
  name: str,
  num_classes: int,
  *,
  cam_faithful: bool = True,
  dtype: Any = jnp.float32,
  patch_size: int = 0,
  width: int = 0,
  depth: int = 0,
  num_heads: int = 0,
) -> ViT:
  """The ViT `name` (a key of `SIZES`); 0 = the named size's value.

  Raises:
    errors.UserError: a width not divisible by the number of heads, or a
      negative size.
  """
  named_width, named_depth, named_heads = SIZES[name]
  width, depth = width or named_width, depth or named_depth
  num_heads, patch_size = num_heads or named_heads, patch_size or PATCH_SIZE
  for field, value in (
    ('patch_size', patch_size),
    ('width', width),
    ('depth', depth),
    ('num_heads', num_heads),
  ):
    if value < 1:
      raise errors.UserError(
        f'model.{field}={value} must be positive (0 = the size of {name}); '
        f'set --config.model.{field} to a positive integer.'
      )
  if width % num_heads:
    raise errors.UserError(
      f'model.width={width} is not divisible by model.num_heads='
      f'{num_heads}; choose a width that is a multiple of the heads.'
    )
  return ViT(
    num_classes=num_classes,
    cam_faithful=cam_faithful,
    width=width,
    depth=depth,
    num_heads=num_heads,
    mlp_dim=4 * width,
    patch_size=patch_size,
    dtype=dtype,
  )


NAMES = tuple(SIZES)
