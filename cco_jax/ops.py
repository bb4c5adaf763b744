"""Kernels that make ResNet training faster on CPU, with the values of Flax's own.

`max_pool` is `nn.max_pool` with a faster CPU gradient; `Conv` is `nn.Conv`
running 1x1 convolutions as matrix products. Both keep values and parameter
trees; measurements are in docs/benchmarks/training.md.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp


def _window_padding(
  size: int, window: int, stride: int, padding: int | str
) -> tuple[int, tuple[int, int]]:
  """Output size and (low, high) padding of a pooling window along one axis.

  `padding` is 'SAME' (as XLA pads: the low side gets the smaller half) or an
  int `p` (`p` on both sides, as torch's `MaxPool2d(padding=p)`).
  """
  if padding == 'SAME':
    out = -(-size // stride)
    total = max((out - 1) * stride + window - size, 0)
    return out, (total // 2, total - total // 2)
  return (size + 2 * padding - window) // stride + 1, (padding, padding)


def _flax_padding(padding: int | str):
  return padding if padding == 'SAME' else ((padding, padding),) * 2


def _max_pool_grad_by_slices(x, y, g, window: int, stride: int, padding):
  """`select_and_scatter_add` of `g` for a max pool, from strided slices.

  Each window routes its gradient to its first maximal element in row-major
  window order (XLA's select-and-scatter with `>=`), and each input element
  sums what it receives in window order, as XLA's CPU scatter does, so the
  result is bit-identical on CPU. XLA's CPU expansion of select-and-scatter
  (a variadic reduce-window plus a scatter) is several times slower
  (docs/benchmarks/training.md, "CPU kernels"). `padding` as in `max_pool`.
  """
  n, h, w, c = x.shape
  (oh, (top, bottom)), (ow, (left, right)) = (
    _window_padding(h, window, stride, padding),
    _window_padding(w, window, stride, padding),
  )
  padded = jnp.pad(
    x, ((0, 0), (top, bottom), (left, right), (0, 0)), constant_values=-jnp.inf
  )
  zero = jnp.zeros((), g.dtype)
  taken = jnp.zeros(y.shape, bool)
  routed = {}
  for i in range(window):
    for j in range(window):
      candidate = jax.lax.slice(
        padded,
        (0, i, j, 0),
        (n, i + stride * (oh - 1) + 1, j + stride * (ow - 1) + 1, c),
        (1, stride, stride, 1),
      )
      chosen = (candidate == y) & ~taken
      taken = taken | chosen
      routed[i, j] = jnp.where(chosen, g, zero)
  # Padded row stride*a + i is phase i % stride, position a + i // stride.
  shifts = (window - 1) // stride
  phases = {}
  for i in reversed(range(window)):  # Later windows reach an element with a
    for j in reversed(range(window)):  # smaller offset: this is window order.
      a, b = i // stride, j // stride
      part = jax.lax.pad(
        routed[i, j],
        zero,
        ((0, 0, 0), (a, shifts - a, 0), (b, shifts - b, 0), (0, 0, 0)),
      )
      key = (i % stride, j % stride)
      phases[key] = part if key not in phases else phases[key] + part
  empty = jnp.zeros((n, oh + shifts, ow + shifts, c), g.dtype)
  grid = jnp.stack(
    [
      jnp.stack([phases.get((p, q), empty) for q in range(stride)], 3)
      for p in range(stride)
    ],
    2,
  )
  grid = grid.reshape(n, stride * (oh + shifts), stride * (ow + shifts), c)
  # Rows and columns no window reaches (possible with explicit padding) get 0.
  grid = jnp.pad(
    grid,
    (
      (0, 0),
      (0, max(top + h - grid.shape[1], 0)),
      (0, max(left + w - grid.shape[2], 0)),
      (0, 0),
    ),
  )
  return grid[:, top : top + h, left : left + w, :]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def max_pool(
  x: jax.Array, window: int, stride: int, padding: int | str = 'SAME'
) -> jax.Array:
  """`nn.max_pool` of square windows on `(N, H, W, C)` with a faster CPU gradient.

  `padding` is 'SAME' (XLA's: for stride 2 and even sizes only the high side
  is padded) or an int `p`, padding `p` rows and columns of -inf on every
  side as torch's `nn.MaxPool2d(window, stride, padding=p)` does (torchvision's
  ResNet stem pool is `max_pool(x, 3, 2, 1)`). The value is `nn.max_pool`'s.
  The gradient is JAX's (select-and-scatter: each window's cotangent goes to
  its first maximal element); on CPU it is computed from strided slices
  (`_max_pool_grad_by_slices`, bit-identical), elsewhere by JAX's own rule.
  """
  return nn.max_pool(
    x,
    (window, window),
    strides=(stride, stride),
    padding=_flax_padding(padding),
  )


def _max_pool_fwd(x, window, stride, padding):
  y = max_pool(x, window, stride, padding)
  return y, (x, y)


def _max_pool_bwd(window, stride, padding, residuals, g):
  x, y = residuals

  def default(x, y, g):
    del y
    pool = lambda x: nn.max_pool(
      x,
      (window, window),
      strides=(stride, stride),
      padding=_flax_padding(padding),
    )
    return jax.vjp(pool, x)[1](g)[0]

  def cpu(x, y, g):
    return _max_pool_grad_by_slices(x, y, g, window, stride, padding)

  return (jax.lax.platform_dependent(x, y, g, cpu=cpu, default=default),)


max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


class Conv(nn.Conv):
  """`nn.Conv` that computes 1x1 convolutions as one matrix product.

  With `pointwise_as_dot` (the default) a 1x1 kernel (any stride, 'SAME' or
  'VALID' padding, no dilation or groups) runs as `x[:, ::s, ::s] @ kernel`;
  other kernels go to `nn.Conv` unchanged. Same parameters (the class keeps
  the name `Conv`, so the parameter tree is `Conv_0`, ... as with `nn.Conv`),
  same values up to float summation order. Why: XLA's CPU backend computes a
  convolution's weight gradient after transposing activations and gradients
  (batch last), a large share of a ResNet-50 step; a matrix product's
  gradients need no transposes (docs/benchmarks/training.md, "CPU kernels").
  """

  pointwise_as_dot: bool = True

  @nn.compact
  def __call__(self, inputs):
    strides = self.strides or (1, 1)
    strides = (strides,) * 2 if isinstance(strides, int) else tuple(strides)
    pointwise = (
      self.pointwise_as_dot
      and tuple(self.kernel_size) == (1, 1)
      and inputs.ndim == 4
      and self.feature_group_count == 1
      and self.padding in ('SAME', 'VALID')
      and all(
        d in (None, 1, (1, 1))
        for d in (self.input_dilation, self.kernel_dilation)
      )
    )
    if not pointwise:
      return nn.Conv.__call__(self, inputs)
    kernel = self.param(
      'kernel',
      self.kernel_init,
      (1, 1, inputs.shape[-1], self.features),
      self.param_dtype,
    )
    x = inputs[:, :: strides[0], :: strides[1], :]
    bias = (
      self.param('bias', self.bias_init, (self.features,), self.param_dtype)
      if self.use_bias
      else None
    )
    x, kernel, bias = nn.dtypes.promote_dtype(
      x, kernel[0, 0], bias, dtype=self.dtype
    )
    batch, height, width, channels = x.shape
    y = (x.reshape(-1, channels) @ kernel).reshape(
      batch, height, width, self.features
    )
    return y if bias is None else y + bias
