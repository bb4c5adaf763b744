"""Property tests for `cco_jax.models`: the logit-sum identity and the faithful changes.

Models are tiny (4-8 filters, 16-32 px, 'small' stem unless the stem is the point)
and get *random* variables drawn with numpy from the shapes `init` would produce
(`jax.eval_shape`): no threefry kernels to compile, and every BatchNorm scale/shift,
running statistic and head bias is non-zero, so a test that forgot the bias or a
BatchNorm could not pass by accident (flax's init zeroes the head bias and the last
BatchNorm scale of every block).

Rounding bound used for the identity (float32, unit roundoff u = eps/2 = 2**-24):
both the logits (`mean_hw(A) @ W + b`) and the map sums (`sum_hw einsum(A, W)/HW + b`)
are sums of the H*W*F products A[h,w,f] W[f,c] / (H W) evaluated along chains of at
most n = H*W + F + 2 floating-point operations, and for any summation order
`|fl(sum) - sum| <= n u sum|terms|` (Higham, Thm 3.1, first order). Writing
`S[b,c] = sum_{h,w,f} |A W| / (H W)`, the two sides therefore differ by at most
`2 n u (S + |b|)`. That bound is rigorous (typical errors are ~sqrt(n) times
smaller) yet ~1e-4 of S at these sizes: orders of magnitude below what a missing
bias (|b| ~ 1), a wrong normalisation (factor H or W) or a wrong channel contraction
would cause. The bfloat16 model computes its head in float32 on the bfloat16 features
(cast exactly), so the same float32 bound applies to it.
"""

from __future__ import annotations

import functools
import math
import zlib

from absl.testing import parameterized
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cco_jax import cams as cams_lib
from cco_jax import models
from cco_jax import ops

U32 = np.finfo(np.float32).eps / 2  # unit roundoff of float32, 2**-24 ~ 6e-8.
NUM_DEVICES = 4  # tests/conftest.py forces 4 virtual CPU devices.


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def _is_block(module, _method_name) -> bool:
  return isinstance(module, (models.ResidualBlock, models.BottleneckBlock))


@functools.cache
def _variable_shapes(model: models.ResNet, image_shape: tuple[int, ...]):
  images = jax.ShapeDtypeStruct(image_shape, jnp.float32)
  return jax.eval_shape(
    lambda x: model.init(jax.random.key(0), x, train=False), images
  )


def random_variables(model: models.ResNet, image_shape, seed: int):
  """Random variables with the structure of `model.init`, all entries non-trivial."""
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name, shape = path[-1].key, leaf.shape
    if name == 'kernel':  # LeCun-normal: keeps activations O(1) through depth.
      value = rng.normal(size=shape) / math.sqrt(math.prod(shape[:-1]))
    elif name in ('scale', 'var'):
      value = rng.uniform(0.5, 1.5, size=shape)
    elif name == 'bias' and path[-2].key == 'head':
      value = rng.normal(size=shape)
    else:  # BatchNorm shift and running mean.
      value = 0.1 * rng.normal(size=shape)
    return np.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(
    fill, _variable_shapes(model, tuple(image_shape))
  )


def flatten_variables(variables):
  """One float32 vector and its inverse (traced slicing, so cheap only under jit)."""
  leaves, treedef = jax.tree.flatten(variables)
  shapes = [leaf.shape for leaf in leaves]
  flat = np.concatenate([np.ravel(leaf) for leaf in leaves]).astype(np.float32)

  def unflatten(vector):
    out, start = [], 0
    for shape in shapes:
      size = math.prod(shape)
      out.append(vector[start : start + size].reshape(shape))
      start += size
    return jax.tree.unflatten(treedef, out)

  return flat, unflatten


def random_images(shape, seed: int) -> np.ndarray:
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def apply_with_features(model, variables, images, train: bool):
  """`(logits, cams, features)`; features = the last block's output (head input)."""
  mutable = ['batch_stats'] if train else []
  (logits, cams), state = model.apply(
    variables,
    images,
    train=train,
    mutable=mutable,
    capture_intermediates=_is_block,
  )
  blocks = state['intermediates']
  last = max(blocks, key=lambda name: int(name.rsplit('_', 1)[1]))
  return logits, cams, blocks[last]['__call__'][0]


def assert_logit_sum_identity(logits, cams, features, kernel, bias):
  """`cams.sum((1,2)) + bias == logits` within the rigorous float32 bound above."""
  a = np.asarray(features, np.float64)
  w = np.asarray(kernel, np.float64)
  b = np.zeros(w.shape[1]) if bias is None else np.asarray(bias, np.float64)
  _, height, width, channels = a.shape
  terms = np.einsum('bhwf,fc->bc', np.abs(a), np.abs(w)) / (height * width)
  n = height * width + channels + 2
  tol = 2 * n * U32 * (terms + np.abs(b))
  recon = np.asarray(cams, np.float64).sum((1, 2)) + b
  err = np.abs(recon - np.asarray(logits, np.float64))
  assert np.all(err <= tol), (
    f'logit-sum identity violated: max err {err.max():.3g}, '
    f'max err/tol {(err / tol).max():.3g}'
  )
  # The bound must be meaningful: far below the size of the logits' terms.
  assert np.all(tol <= 1e-3 * (terms + np.abs(b))), (
    'tolerance too loose to test'
  )


# Every architecture runs at its real stage sizes, tiny width and resolution, with
# no jit (op by op). Compiling a 16- or 33-block graph costs 3-15 s per case on a
# loaded 2-core CPU, so the jit and pmap variants (12 cases per block type) run
# resnet18 and resnet50 at stage_sizes (1, 1, 1, 1): both block types, and every
# depth-specific path (first and last block of the last stage, where the faithful
# changes apply), under all three variants. The four architectures differ from
# these only in depth, which the no-jit test covers.
ALL_NAMES = ('resnet18', 'resnet34', 'resnet50', 'resnet101')
IDENTITY_CONFIGS = {
  # name: (num_filters, image size, batch, num_classes)
  'resnet18': (4, 24, 3, 5),
  'resnet34': (4, 16, 2, 3),
  'resnet50': (4, 16, 2, 2),
  'resnet101': (4, 16, 2, 4),
}


# ---------------------------------------------------------------------------
# The logit-sum identity, every architecture, jit / no-jit / pmap
# ---------------------------------------------------------------------------


class LogitSumIdentityTest(chex.TestCase):
  def _check_identity(self, name, cam_faithful, train, stage_sizes=None):
    self.assertEqual(jax.device_count(), NUM_DEVICES)
    filters, size, batch, classes = IDENTITY_CONFIGS[name]
    model = models.create_model(
      name,
      classes,
      cam_faithful=cam_faithful,
      num_filters=filters,
      stem='small',
      stage_sizes=stage_sizes,
    )
    shape = (batch, size, size, 3)
    seed = zlib.crc32(f'{name}/{cam_faithful}/{train}'.encode())
    variables = random_variables(model, shape, seed)

    images = random_images(shape, seed)
    if self.variant.type == chex.ChexVariantType.WITH_PMAP:
      # chex broadcasts each argument leaf to the devices with eager ops, compiling
      # per leaf shape (~10 s for a ResNet's variables); one flat vector avoids that.
      flat, unflatten = flatten_variables(variables)
      forward = self.variant(
        lambda flat, x: apply_with_features(model, unflatten(flat), x, train)
      )
      logits, cams, features = forward(flat, images)
    else:
      forward = self.variant(
        lambda variables, x: apply_with_features(model, variables, x, train)
      )
      logits, cams, features = forward(variables, images)
    chex.assert_shape(logits, (batch, classes))
    chex.assert_shape(cams, (batch, *features.shape[1:3], classes))
    head = variables['params']['head']
    assert_logit_sum_identity(
      logits, cams, features, head['kernel'], head.get('bias')
    )
    # The identity must fail without the bias (the control's bias is ~N(0, 1)).
    if not cam_faithful:
      with self.assertRaises(AssertionError):
        assert_logit_sum_identity(logits, cams, features, head['kernel'], None)

  @chex.variants(with_jit=True, without_jit=True, with_pmap=True)
  @parameterized.product(
    name=('resnet18', 'resnet50'),
    cam_faithful=(True, False),
    train=(False, True),
  )
  def test_identity(self, name, cam_faithful, train):
    self._check_identity(name, cam_faithful, train, stage_sizes=(1, 1, 1, 1))

  @chex.variants(without_jit=True)
  @parameterized.parameters(
    *[
      (name, *mode)
      for name in ALL_NAMES
      for mode in ((True, True), (False, False))
    ]
  )
  def test_identity_real_depth(self, name, cam_faithful, train):
    self._check_identity(name, cam_faithful, train)

  @chex.variants(with_jit=True)
  @parameterized.parameters(
    ('resnet50', True)
  )  # the method's model, in bfloat16
  def test_identity_bfloat16(self, name, cam_faithful):
    filters, size, batch, classes = IDENTITY_CONFIGS[name]
    model = models.create_model(
      name,
      classes,
      cam_faithful=cam_faithful,
      num_filters=filters,
      stem='small',
      dtype=jnp.bfloat16,
      stage_sizes=(1, 1, 1, 1),
    )
    shape = (batch, size, size, 3)
    variables = random_variables(model, shape, seed=7)

    @self.variant
    def forward(variables, images):
      return apply_with_features(model, variables, images, train=False)

    logits, cams, features = forward(variables, random_images(shape, 8))
    self.assertEqual(
      features.dtype, jnp.bfloat16
    )  # the backbone really is bf16,
    self.assertEqual(logits.dtype, jnp.float32)  # the head is float32.
    self.assertEqual(cams.dtype, jnp.float32)
    head = variables['params']['head']
    assert_logit_sum_identity(
      logits, cams, features, head['kernel'], head.get('bias')
    )

  def test_identity_error_helper_on_model(self):
    model = models.create_model(
      'resnet18',
      3,
      cam_faithful=False,
      num_filters=4,
      stem='small',
      stage_sizes=(1, 1, 1, 1),
    )
    shape = (2, 16, 16, 3)
    variables = random_variables(model, shape, seed=3)
    logits, cams = model.apply(variables, random_images(shape, 4), train=False)
    bias = models.head_bias(variables)
    self.assertLess(float(cams_lib.identity_error(logits, cams, bias)), 1e-5)
    # Without the bias the error is exactly the largest |bias| entry (up to rounding).
    np.testing.assert_allclose(
      cams_lib.identity_error(logits, cams), np.abs(bias).max(), rtol=1e-4
    )


class SyncBatchNormTest(chex.TestCase):
  """`bn_axis_name`: a batch sharded over pmap normalises like the whole batch."""

  def test_sharded_batch_matches_whole_batch(self):
    self.assertEqual(jax.device_count(), NUM_DEVICES)
    shape = (2 * NUM_DEVICES, 16, 16, 3)
    kwargs = dict(num_filters=4, stem='small', stage_sizes=(1, 1, 1, 1))
    whole = models.create_model('resnet18', 3, **kwargs)
    sharded = models.create_model('resnet18', 3, bn_axis_name='batch', **kwargs)
    variables = random_variables(whole, shape, seed=11)
    images = random_images(shape, 12)

    (logits, cams), state = jax.jit(
      lambda v, x: whole.apply(v, x, train=True, mutable=['batch_stats'])
    )(variables, images)
    replicated = jax.tree.map(lambda x: np.stack([x] * NUM_DEVICES), variables)
    (p_logits, p_cams), p_state = jax.pmap(
      lambda v, x: sharded.apply(v, x, train=True, mutable=['batch_stats']),
      axis_name='batch',
    )(replicated, images.reshape(NUM_DEVICES, 2, *shape[1:]))

    np.testing.assert_allclose(
      p_logits.reshape(logits.shape), logits, rtol=1e-4, atol=1e-5
    )
    np.testing.assert_allclose(
      p_cams.reshape(cams.shape), cams, rtol=1e-4, atol=1e-5
    )
    # Replicas agree with each other and with the whole-batch statistics.
    chex.assert_trees_all_close(
      jax.tree.map(lambda x: x[0], p_state), state, rtol=1e-4, atol=1e-6
    )
    chex.assert_trees_all_close(
      jax.tree.map(lambda x: x[-1], p_state), state, rtol=1e-4, atol=1e-6
    )


# ---------------------------------------------------------------------------
# The three faithful changes (docs/method.md §5)
# ---------------------------------------------------------------------------


class FaithfulArchitectureTest(parameterized.TestCase):
  @parameterized.parameters(*ALL_NAMES)
  def test_faithful_head_has_no_bias_and_one_batchnorm_less(self, name):
    # The configurations of the identity tests, so the variable shapes are cached.
    filters, size, batch, num_classes = IDENTITY_CONFIGS[name]
    shape = (batch, size, size, 3)
    batchnorms = {}
    for cam_faithful in (True, False):
      model = models.create_model(
        name,
        num_classes,
        cam_faithful=cam_faithful,
        num_filters=filters,
        stem='small',
      )
      variables = random_variables(model, shape, seed=0)
      # Each BatchNorm keeps two running statistics (mean and var).
      batchnorms[cam_faithful] = (
        len(jax.tree.leaves(variables['batch_stats'])) // 2
      )
      head = variables['params']['head']
      width = filters * 2**3 * (4 if models.BOTTLENECK[name] else 1)
      self.assertEqual(head['kernel'].shape, (width, num_classes))
      if cam_faithful:
        self.assertEqual(set(head), {'kernel'})
        self.assertIsNone(models.head_bias(variables))
      else:
        self.assertEqual(set(head), {'kernel', 'bias'})
        self.assertEqual(models.head_bias(variables).shape, (num_classes,))
    # The last block's final BatchNorm is the only one the faithful model drops.
    self.assertEqual(batchnorms[False] - batchnorms[True], 1)

  @parameterized.parameters('resnet18', 'resnet50')
  def test_imagenet_stem_224_gives_14x14_vs_7x7(self, name):
    faithful = models.create_model(name, 37, cam_faithful=True, num_filters=4)
    control = models.create_model(name, 37, cam_faithful=False, num_filters=4)
    self.assertEqual(models.cam_size(faithful, 224), (14, 14))
    self.assertEqual(models.cam_size(control, 224), (7, 7))

  @parameterized.parameters(
    ('resnet18', 'imagenet', 64, 4),
    ('resnet18', 'strided', 32, 4),
    ('resnet50', 'imagenet', 96, 6),
  )
  def test_maps_are_twice_the_controls_resolution(
    self, name, stem, size, expected
  ):
    faithful = models.create_model(
      name, 2, cam_faithful=True, num_filters=4, stem=stem
    )
    control = models.create_model(
      name, 2, cam_faithful=False, num_filters=4, stem=stem
    )
    self.assertEqual(models.cam_size(faithful, size), (expected, expected))
    self.assertEqual(
      models.cam_size(control, size), (expected // 2, expected // 2)
    )

  def test_cam_size_matches_the_applied_model(self):
    for cam_faithful in (True, False):
      model = models.create_model(
        'resnet18',
        3,
        cam_faithful=cam_faithful,
        num_filters=4,
        stem='small',
        stage_sizes=(1, 1, 1, 1),
      )
      shape = (2, 16, 16, 3)
      _, cams = model.apply(
        random_variables(model, shape, 1), random_images(shape, 2), train=False
      )
      self.assertEqual(cams.shape[1:3], models.cam_size(model, 16))

  @parameterized.product(name=('resnet18', 'resnet50'), train=(False, True))
  def test_last_block_can_be_negative_control_is_nonnegative(self, name, train):
    shape = (2, 16, 16, 3)
    outputs = {}
    for cam_faithful in (True, False):
      model = models.create_model(
        name,
        3,
        cam_faithful=cam_faithful,
        num_filters=4,
        stem='small',
        stage_sizes=(1, 1, 1, 1),
      )
      variables = random_variables(model, shape, seed=5)
      _, _, features = apply_with_features(
        model, variables, random_images(shape, 6), train
      )
      outputs[cam_faithful] = np.asarray(features)
    # Faithful: no final ReLU, so the head sees negative activations (and negative
    # pooled features); control: ReLU output, so everything is >= 0.
    self.assertLess(outputs[True].min(), 0.0)
    self.assertLess(outputs[True].mean((1, 2)).min(), 0.0)
    self.assertGreaterEqual(outputs[False].min(), 0.0)
    self.assertGreaterEqual(outputs[False].mean((1, 2)).min(), 0.0)


# ---------------------------------------------------------------------------
# HiResCAM of a real head equals its autodiff definition
# ---------------------------------------------------------------------------


def grad_times_activation(head_fn, features):
  """`M_c = sum_f d s_c / dA * A`, per example, by reverse-mode autodiff."""

  def one(a):  # a: (H, W, F) -> jacobian (C, H, W, F)
    return jax.jacrev(lambda x: head_fn(x[None])[0])(a)

  jac = jax.jit(jax.vmap(one))(features)  # (B, C, H, W, F)
  return jnp.einsum('bchwf,bhwf->bhwc', jac, features)


class CamHeadTest(parameterized.TestCase):
  @parameterized.parameters(
    ((1, 1, 1, 1), 1, True),
    ((2, 3, 5, 7), 6, False),
    ((3, 4, 4, 16), 2, True),
    ((2, 6, 6, 3), 4, False),
  )
  def test_cams_are_gradient_times_activation(
    self, shape, num_classes, use_bias
  ):
    rng = np.random.default_rng(sum(shape) + num_classes)
    features = rng.normal(size=shape).astype(np.float32)
    head = models.CamHead(num_classes, use_bias=use_bias)
    params = {
      'kernel': rng.normal(size=(shape[-1], num_classes)).astype(np.float32)
    }
    if use_bias:
      params['bias'] = rng.normal(size=(num_classes,)).astype(np.float32)
    logits, cams = head.apply({'params': params}, features)
    expected = grad_times_activation(
      lambda a: head.apply({'params': params}, a)[0], features
    )
    np.testing.assert_allclose(cams, expected, rtol=1e-5, atol=1e-6)
    assert_logit_sum_identity(
      logits, cams, features, params['kernel'], params.get('bias')
    )

  @parameterized.parameters(('resnet18', True), ('resnet50', False))
  def test_model_cams_are_gradient_times_activation(self, name, cam_faithful):
    model = models.create_model(
      name,
      4,
      cam_faithful=cam_faithful,
      num_filters=4,
      stem='small',
      stage_sizes=(1, 1, 1, 1),
    )
    shape = (2, 16, 16, 3)
    variables = random_variables(model, shape, seed=9)
    logits, cams, features = apply_with_features(
      model, variables, random_images(shape, 10), train=False
    )
    head = models.CamHead(4, use_bias=not cam_faithful)
    head_vars = {'params': variables['params']['head']}
    kernel = variables['params']['head']['kernel']
    # The model's logits are its head applied to the captured features ...
    np.testing.assert_allclose(
      head.apply(head_vars, features)[0], logits, rtol=1e-6, atol=1e-6
    )
    # ... and its maps are HiResCAM: grad(logit_c, features) * features, summed over F.
    expected = grad_times_activation(
      lambda a: head.apply(head_vars, a)[0], features
    )
    scale = np.abs(np.asarray(cams)).max()
    np.testing.assert_allclose(cams, expected, rtol=1e-5, atol=1e-6 * scale)
    np.testing.assert_allclose(
      cams, cams_lib.hirescam(features, kernel), rtol=1e-6, atol=1e-7 * scale
    )


class MaxPoolTest(parameterized.TestCase):
  """`ops.max_pool` is `nn.max_pool` with a bit-identical, faster CPU gradient."""

  @parameterized.parameters(
    ((2, 7, 9, 3), 3, 2, 'SAME'),
    ((3, 16, 16, 4), 3, 2, 'SAME'),
    ((2, 10, 11, 4), 2, 2, 'SAME'),
    ((2, 9, 9, 2), 3, 1, 'SAME'),
    ((1, 13, 6, 2), 5, 3, 'SAME'),
    ((3, 16, 16, 4), 3, 2, 1),  # torchvision's stem pool on an even size.
    ((2, 7, 10, 3), 3, 2, 1),
    ((2, 9, 8, 2), 3, 1, 1),
    ((1, 13, 6, 2), 5, 3, 2),
    ((2, 11, 12, 2), 4, 3, 1),  # Rows no window reaches: zero gradient.
    ((2, 8, 9, 3), 2, 2, 0),
  )
  def test_value_and_gradient_equal_flax_bit_for_bit(
    self, shape, window, stride, padding
  ):
    rng = np.random.default_rng(sum(shape) + window)
    # Quantised ReLU outputs: many tied maxima, so the tie rule is exercised.
    x = jnp.asarray(
      np.round(np.maximum(rng.normal(size=shape), 0) * 4) / 4, jnp.float32
    )
    flax_padding = padding if padding == 'SAME' else [(padding, padding)] * 2
    reference = lambda x: nn.max_pool(
      x, (window, window), strides=(stride, stride), padding=flax_padding
    )
    y = reference(x)
    g = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
    pool = lambda x: ops.max_pool(x, window, stride, padding)
    value, vjp = jax.vjp(pool, x)
    expected = jax.jit(lambda x, g: jax.vjp(reference, x)[1](g)[0])(x, g)
    np.testing.assert_array_equal(value, y)
    np.testing.assert_array_equal(vjp(g)[0], expected)
    np.testing.assert_array_equal(
      jax.jit(lambda x, g: jax.vjp(pool, x)[1](g)[0])(x, g), expected
    )

  def test_symmetric_padding_pools_centred_windows(self):
    """Padding 1, stride 2 on an even size: windows centred on even pixels."""
    x = jnp.arange(2 * 6 * 6, dtype=jnp.float32).reshape(1, 6, 6, 2)
    x = x * jnp.asarray([1.0, -1.0])  # Channel 1: maxima at the low corner.
    y = np.asarray(ops.max_pool(x, 3, 2, 1))
    x = np.asarray(x)
    for a in range(3):
      for b in range(3):
        window = x[
          0, max(2 * a - 1, 0) : 2 * a + 2, max(2 * b - 1, 0) : 2 * b + 2
        ]
        np.testing.assert_array_equal(y[0, a, b], window.max((0, 1)))


class PointwiseConvTest(parameterized.TestCase):
  """`ops.Conv` computes 1x1 convolutions as matrix products: same params, values."""

  @parameterized.parameters(
    ((2, 7, 9, 3), 5, 1, False, 'SAME'),
    ((3, 8, 8, 4), 6, 2, False, 'SAME'),
    ((2, 9, 5, 2), 3, 2, True, 'SAME'),
    ((1, 11, 6, 5), 4, 3, True, 'VALID'),
    ((2, 6, 7, 3), 2, (2, 1), False, 'VALID'),
  )
  def test_value_and_gradients_equal_nn_conv(
    self, shape, features, strides, use_bias, padding
  ):
    rng = np.random.default_rng(sum(shape) + features)
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    kwargs = dict(
      features=features,
      kernel_size=(1, 1),
      strides=strides,
      use_bias=use_bias,
      padding=padding,
    )
    dot_conv, reference = ops.Conv(**kwargs), nn.Conv(**kwargs)
    shapes = jax.eval_shape(reference.init, jax.random.key(0), x)
    self.assertEqual(
      jax.tree.map(
        lambda a: a.shape, jax.eval_shape(dot_conv.init, jax.random.key(0), x)
      ),
      jax.tree.map(lambda a: a.shape, shapes),
    )
    variables = jax.tree.map(
      lambda a: jnp.asarray(rng.normal(size=a.shape), jnp.float32), shapes
    )
    y, vjp = jax.vjp(lambda v, x: dot_conv.apply(v, x), variables, x)
    expected, expected_vjp = jax.vjp(
      lambda v, x: reference.apply(v, x), variables, x
    )
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    g = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
    for got, want in zip(
      jax.tree.leaves(vjp(g)), jax.tree.leaves(expected_vjp(g))
    ):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

  def test_other_kernels_and_the_switch_use_nn_conv_exactly(self):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 8, 8, 3)), jnp.float32)
    for conv in (
      ops.Conv(4, (3, 3), strides=2),
      ops.Conv(4, (1, 1), strides=2, pointwise_as_dot=False),
    ):
      variables = conv.init(jax.random.key(1), x)
      reference = nn.Conv(4, conv.kernel_size, strides=2)
      np.testing.assert_array_equal(
        conv.apply(variables, x), reference.apply(variables, x)
      )

  @parameterized.parameters('resnet18', 'resnet50')
  def test_models_with_and_without_share_variables_and_outputs(self, name):
    make = lambda flag: models.create_model(
      name,
      3,
      num_filters=4,
      stem='small',
      stage_sizes=(1, 1, 1, 1),
      pointwise_as_dot=flag,
    )
    images = jnp.asarray(
      np.random.default_rng(1).random((2, 16, 16, 3)), jnp.float32
    )
    variables = make(False).init(jax.random.key(2), images, train=False)
    shapes = jax.eval_shape(
      lambda: make(True).init(jax.random.key(2), images, train=False)
    )
    self.assertEqual(
      jax.tree.map(lambda a: a.shape, shapes),
      jax.tree.map(lambda a: a.shape, variables),
    )
    for train in (False, True):
      kwargs = (
        dict(train=train, mutable=['batch_stats'])
        if train
        else dict(train=False)
      )
      got = make(True).apply(variables, images, **kwargs)
      want = make(False).apply(variables, images, **kwargs)
      for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------
# Construction errors
# ---------------------------------------------------------------------------


class CreateModelErrorsTest(parameterized.TestCase):
  @parameterized.parameters('resnet9', 'ResNet50', 'vit')
  def test_unknown_name_lists_choices(self, name):
    with pytest.raises(
      ValueError, match=rf"Unknown model '{name}'.*resnet101.*resnet50"
    ):
      models.create_model(name, 2)

  @parameterized.parameters(0, -3)
  def test_bad_num_classes(self, num_classes):
    with pytest.raises(
      ValueError, match=rf'num_classes must be >= 1; got {num_classes}'
    ):
      models.create_model('resnet18', num_classes)

  def test_unknown_stem(self):
    model = models.create_model('resnet18', 2, stem='cifar')
    with pytest.raises(
      ValueError, match="stem must be one of .*'imagenet'.*'small'.*got 'cifar'"
    ):
      models.cam_size(model, 32)

  def test_stage_sizes_override(self):
    model = models.create_model('resnet101', 2, stage_sizes=(1, 1, 1, 1))
    self.assertEqual(model.stage_sizes, (1, 1, 1, 1))
    self.assertIs(model.block_cls, models.BottleneckBlock)
    self.assertEqual(
      models.create_model('resnet34', 2).stage_sizes, (3, 4, 6, 3)
    )
    self.assertIs(
      models.create_model('resnet34', 2).block_cls, models.ResidualBlock
    )
