"""Property tests for `cco_jax.cams` (docs/method.md §1-2, §8).

Each function is checked against an independent float64 numpy reference written
from docs/method.md, against its defining property (autodiff for HiResCAM, the
logit-difference identity for ContrastiveCAMs), under jit and without, and at its
input checks.
"""

from __future__ import annotations

from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cco_jax import cams as cams_lib

# float32 comparisons against float64 references: the maps are sums of at most a few
# hundred products of O(1) numbers, so a relative error of 1e-5 (~100 ulp) is ample
# for correct code and orders of magnitude below any real mistake.
RTOL = 1e-5


# ---------------------------------------------------------------------------
# numpy references (float64), written from docs/method.md
# ---------------------------------------------------------------------------


def np_hirescam(features, kernel):
  a = np.asarray(features, np.float64)
  w = np.asarray(kernel, np.float64)
  b, h, wd, f = a.shape
  out = np.zeros((b, h, wd, w.shape[1]))
  for c in range(
    w.shape[1]
  ):  # M_c = sum_f A_f W[f, c] / (H W), class by class.
    out[..., c] = (a * w[:, c]).sum(-1) / (h * wd)
  return out


def np_contrastive(cams, labels):
  m = np.asarray(cams, np.float64)
  out = np.empty_like(m)
  for i, y in enumerate(np.asarray(labels)):
    out[i] = m[i, ..., y][..., None] - m[i]
  return out


def np_pixel_influence(contrastive, mask):
  k = np.abs(np.asarray(contrastive, np.float64))
  m = np.asarray(mask, np.float64)[..., None]
  return {
    'net': k.sum((1, 2, 3)),
    'fg': (m * k).sum((1, 2, 3)),
    'bg': ((1 - m) * k).sum((1, 2, 3)),
  }


def random_case(seed, shape, soft_mask=False):
  """Random cams `(B, H, W, C)`, labels `(B,)` and a mask `(B, H, W)`."""
  rng = np.random.default_rng(seed)
  cams = rng.normal(size=shape).astype(np.float32)
  labels = rng.integers(0, shape[-1], size=shape[0]).astype(np.int32)
  if soft_mask:
    mask = rng.uniform(size=shape[:3]).astype(np.float32)
  else:
    mask = (rng.uniform(size=shape[:3]) < 0.5).astype(np.float32)
  return cams, labels, mask


SHAPES = ((1, 1, 1, 2), (2, 3, 5, 4), (3, 7, 7, 2), (4, 14, 14, 37))


# ---------------------------------------------------------------------------
# HiResCAM
# ---------------------------------------------------------------------------


def logits_of(features, kernel):
  """The head the maps decompose: global average pooling, then the dense kernel."""
  return features.mean((1, 2)) @ kernel


class HiResCamTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(
    ((1, 1, 1, 1), 1),
    ((2, 3, 5, 7), 4),
    ((3, 4, 4, 16), 2),
    ((2, 14, 14, 8), 37),
  )
  def test_matches_reference_and_logit_sum(self, shape, num_classes):
    rng = np.random.default_rng(sum(shape) * num_classes)
    features = rng.normal(size=shape).astype(np.float32)
    kernel = rng.normal(size=(shape[-1], num_classes)).astype(np.float32)
    cams = self.variant(cams_lib.hirescam)(features, kernel)
    chex.assert_shape(cams, (*shape[:3], num_classes))
    expected = np_hirescam(features, kernel)
    scale = (
      np.abs(features).max()
      * np.abs(kernel).max()
      * shape[-1]
      / np.prod(shape[1:3])
    )
    np.testing.assert_allclose(cams, expected, rtol=RTOL, atol=RTOL * scale)
    # Logit-sum identity on the reference logits (float64), float32 rounding.
    logits = logits_of(features.astype(np.float64), kernel.astype(np.float64))
    np.testing.assert_allclose(
      np.asarray(cams, np.float64).sum((1, 2)),
      logits,
      rtol=RTOL,
      atol=RTOL * scale * np.prod(shape[1:3]),
    )

  @parameterized.parameters(
    ((1, 1, 1, 1), 1), ((2, 3, 5, 7), 4), ((3, 4, 4, 6), 3)
  )
  def test_equals_gradient_times_activation(self, shape, num_classes):
    """M_c = sum_f (d logit_c / dA) * A, with the gradient taken by autodiff."""
    rng = np.random.default_rng(7 + sum(shape))
    features = jnp.asarray(rng.normal(size=shape), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(shape[-1], num_classes)), jnp.float32)

    @jax.jit  # one compile instead of one per primitive (eager mode)
    def by_autodiff(features, kernel):
      per_class = []
      for c in range(
        num_classes
      ):  # one backward pass per class, summed over the batch
        grad = jax.grad(lambda a, c=c: logits_of(a, kernel)[:, c].sum())(
          features
        )
        per_class.append((grad * features).sum(-1))
      # And the same through the full Jacobian, (B, C, B, H, W, F).
      jac = jax.jacrev(lambda a: logits_of(a, kernel))(features)
      return jnp.stack(per_class, -1), jnp.einsum(
        'bcbhwf,bhwf->bhwc', jac, features
      )

    expected, via_jac = by_autodiff(features, kernel)
    cams = cams_lib.hirescam(features, kernel)
    np.testing.assert_allclose(cams, expected, rtol=RTOL, atol=1e-6)
    np.testing.assert_allclose(cams, via_jac, rtol=RTOL, atol=1e-6)

  def test_is_not_plain_grad_cam(self):
    """Sanity: a wrong normalisation would be caught (the tests above can fail)."""
    features = np.ones((1, 2, 3, 1), np.float32)
    kernel = np.full((1, 1), 6.0, np.float32)
    np.testing.assert_allclose(
      cams_lib.hirescam(features, kernel), np.ones((1, 2, 3, 1))
    )

  def test_dtype_promotion(self):
    features = jnp.ones((1, 2, 2, 3), jnp.bfloat16)
    kernel = jnp.ones((3, 2), jnp.float32)
    self.assertEqual(cams_lib.hirescam(features, kernel).dtype, jnp.float32)

  def test_channel_mismatch(self):
    with pytest.raises(
      ValueError,
      match=r'features has 5 channels \(shape \(2, 3, 3, 5\)\)'
      r'.*kernel expects 4 \(shape \(4, 3\)\)',
    ):
      cams_lib.hirescam(np.zeros((2, 3, 3, 5)), np.zeros((4, 3)))

  @parameterized.parameters(
    ((2, 3, 5), (5, 3), 'features', 4),
    ((2, 3, 3, 5), (5,), 'kernel', 2),
    ((2, 3, 3, 5, 1), (5, 3), 'features', 4),
  )
  def test_wrong_rank(self, features_shape, kernel_shape, name, rank):
    with pytest.raises(
      ValueError, match=rf'{name} must have rank {rank}.*got shape'
    ):
      cams_lib.hirescam(np.zeros(features_shape), np.zeros(kernel_shape))


# ---------------------------------------------------------------------------
# ContrastiveCAMs
# ---------------------------------------------------------------------------


class ContrastiveCamsTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(
    *[(shape, seed) for shape in SHAPES for seed in (0, 1)]
  )
  def test_properties(self, shape, seed):
    cams, labels, _ = random_case(seed, shape)
    bias = np.random.default_rng(seed + 100).normal(size=shape[-1])
    logits = cams.astype(np.float64).sum((1, 2)) + bias
    contrastive = np.asarray(
      self.variant(cams_lib.contrastive_cams)(cams, labels)
    )
    chex.assert_shape(contrastive, shape)
    # Zero at the label, exactly.
    rows = np.arange(shape[0])
    self.assertTrue(np.all(contrastive[rows, :, :, labels] == 0.0))
    # Matches the definition.
    np.testing.assert_allclose(
      contrastive, np_contrastive(cams, labels), rtol=RTOL, atol=1e-6
    )
    # Sums to the bias-free logit difference s_y - s_c - (b_y - b_c).
    unbiased = logits - bias
    expected = unbiased[rows, labels][:, None] - unbiased
    np.testing.assert_allclose(
      contrastive.astype(np.float64).sum((1, 2)),
      expected,
      rtol=RTOL,
      atol=RTOL * np.abs(cams).sum((1, 2)).max(),
    )

  def test_label_selects_the_map(self):
    cams = np.zeros((2, 1, 1, 3), np.float32)
    cams[0, 0, 0] = [1.0, 2.0, 4.0]
    cams[1, 0, 0] = [1.0, 2.0, 4.0]
    out = cams_lib.contrastive_cams(cams, np.array([0, 2]))
    np.testing.assert_array_equal(out[0, 0, 0], [0.0, -1.0, -3.0])
    np.testing.assert_array_equal(out[1, 0, 0], [3.0, 2.0, 0.0])

  def test_labels_checked_under_jit_shapes_only(self):
    cams, labels, _ = random_case(0, (2, 3, 3, 4))
    # Shape checks still run while tracing ...
    with pytest.raises(
      ValueError, match=r'labels has batch size 3 \(shape \(3,\)\)'
    ):
      jax.jit(cams_lib.contrastive_cams)(cams, np.zeros(3, np.int32))
    # ... value checks are skipped for tracers (no host sync in compiled code).
    jax.jit(cams_lib.contrastive_cams)(cams, labels)

  def test_concrete_arrays_closed_over_under_jit(self):
    """Regression: labels/masks that are concrete jax arrays captured by a jitted
    function used to crash the value checks (np.min staged a jnp.min on them)."""
    cams, labels, mask = random_case(0, (2, 3, 3, 4))
    labels, mask = jnp.asarray(labels), jnp.asarray(mask)
    contrastive = jax.jit(lambda c: cams_lib.contrastive_cams(c, labels))(cams)
    np.testing.assert_allclose(
      contrastive, np_contrastive(cams, labels), atol=1e-6
    )
    out = jax.jit(lambda k: cams_lib.pixel_influence(k, mask))(contrastive)
    np.testing.assert_allclose(
      out['net'], np_pixel_influence(contrastive, mask)['net'], rtol=RTOL
    )
    # They are concrete, so they are still checked.
    bad_labels, bad_mask = jnp.array([0, 4]), 2 * mask
    with pytest.raises(
      ValueError,
      match=r'labels must lie in \[0, 4\).*got values in '
      r'\[0, 4\]',
    ):
      jax.jit(lambda c: cams_lib.contrastive_cams(c, bad_labels))(cams)
    with pytest.raises(
      ValueError, match=r'fg_mask values must lie in \[0, 1\]'
    ):
      jax.jit(lambda k: cams_lib.pixel_influence(k, bad_mask))(contrastive)


class LabelAndCamErrorsTest(parameterized.TestCase):
  """Bad inputs to contrastive_cams raise ValueErrors that name the shapes."""

  def setUp(self):
    super().setUp()
    self.cams, self.labels, self.mask = random_case(0, (2, 4, 4, 3))

  def test_cams_rank_3(self):
    with pytest.raises(
      ValueError, match=r'cams must have rank 4 .*got shape \(2, 4, 4\)'
    ):
      cams_lib.contrastive_cams(self.cams[..., 0], self.labels)

  def test_batch_mismatch(self):
    with pytest.raises(
      ValueError,
      match=r'labels has batch size 3 \(shape \(3,\)\) but the '
      r'maps/logits have batch size 2',
    ):
      cams_lib.contrastive_cams(self.cams, np.array([0, 1, 2]))

  @parameterized.parameters(([-1, 0], -1, 0), ([0, 3], 0, 3), ([5, 2], 2, 5))
  def test_labels_out_of_range(self, labels, lo, hi):
    with pytest.raises(
      ValueError,
      match=rf'labels must lie in \[0, 3\) for 3 classes; got '
      rf'values in \[{lo}, {hi}\]',
    ):
      cams_lib.contrastive_cams(self.cams, np.array(labels))

  def test_float_labels(self):
    with pytest.raises(
      ValueError,
      match='labels must be integer class indices, got dtype float32',
    ):
      cams_lib.contrastive_cams(self.cams, np.array([0.0, 1.0], np.float32))

  def test_one_hot_labels(self):
    with pytest.raises(
      ValueError, match=r'labels must have rank 1 .*got shape \(2, 3\)'
    ):
      cams_lib.contrastive_cams(self.cams, np.eye(3, dtype=np.int32)[:2])


# ---------------------------------------------------------------------------
# Pixel influence
# ---------------------------------------------------------------------------


class PixelInfluenceTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(
    *[
      (shape, seed, soft)
      for shape in SHAPES
      for seed in (0, 1)
      for soft in (False, True)
    ]
  )
  def test_properties(self, shape, seed, soft):
    cams, labels, mask = random_case(seed, shape, soft_mask=soft)
    contrastive = cams_lib.contrastive_cams(cams, labels)
    influence = self.variant(cams_lib.pixel_influence)
    out = influence(contrastive, mask)
    self.assertEqual(set(out), {'net', 'fg', 'bg'})
    expected = np_pixel_influence(contrastive, mask)
    for key in ('net', 'fg', 'bg'):
      chex.assert_shape(out[key], (shape[0],))
      self.assertTrue(np.all(np.asarray(out[key]) >= 0), key)
      np.testing.assert_allclose(out[key], expected[key], rtol=RTOL, atol=1e-6)
    np.testing.assert_allclose(
      out['fg'] + out['bg'], out['net'], rtol=RTOL, atol=1e-6
    )
    # All-foreground: fg == net, bg == 0; all-background: the reverse.
    ones = influence(contrastive, np.ones_like(mask))
    np.testing.assert_allclose(ones['fg'], ones['net'], rtol=RTOL)
    np.testing.assert_array_equal(ones['bg'], 0.0)
    zeros = influence(contrastive, np.zeros_like(mask))
    np.testing.assert_allclose(zeros['bg'], zeros['net'], rtol=RTOL)
    np.testing.assert_array_equal(zeros['fg'], 0.0)

  def test_hand_computed(self):
    # One image, 1x2 pixels, two classes, label 0: K[..., 1] = M0 - M1 = [2, -3].
    cams = np.array([[[[1.0, -1.0], [0.0, 3.0]]]], np.float32)  # (1, 1, 2, 2)
    contrastive = cams_lib.contrastive_cams(cams, np.array([0]))
    np.testing.assert_array_equal(contrastive[0, 0, :, 1], [2.0, -3.0])
    out = cams_lib.pixel_influence(
      contrastive, np.array([[[1.0, 0.0]]], np.float32)
    )
    np.testing.assert_allclose(
      [out['net'][0], out['fg'][0], out['bg'][0]], [5.0, 2.0, 3.0]
    )

  def test_mask_at_image_resolution(self):
    contrastive = np.zeros((2, 14, 14, 37), np.float32)
    with pytest.raises(
      ValueError,
      match=r'fg_mask has shape \(2, 224, 224\) but the maps '
      r'have shape \(2, 14, 14, 37\).*\(B, H, W\) = \(2, 14, 14\)',
    ):
      cams_lib.pixel_influence(contrastive, np.ones((2, 224, 224), np.float32))

  @parameterized.parameters((-0.5, 1.0), (0.0, 2.0), (-1.0, 3.0))
  def test_mask_values_outside_unit_interval(self, lo, hi):
    mask = np.full((1, 2, 2), 0.5, np.float32)
    mask[0, 0, 0], mask[0, 1, 1] = lo, hi
    with pytest.raises(
      ValueError,
      match=rf'fg_mask values must lie in \[0, 1\].*got '
      rf'\[{lo}, {hi}\]',
    ):
      cams_lib.pixel_influence(np.zeros((1, 2, 2, 3), np.float32), mask)

  def test_mask_wrong_rank(self):
    with pytest.raises(
      ValueError, match=r'fg_mask must have rank 3 .*got shape \(4, 4\)'
    ):
      cams_lib.pixel_influence(
        np.zeros((1, 4, 4, 3), np.float32), np.ones((4, 4))
      )


# ---------------------------------------------------------------------------
# identity_error
# ---------------------------------------------------------------------------


class IdentityErrorTest(parameterized.TestCase):
  @parameterized.parameters(
    ((2, 3, 3, 4), 0), ((1, 7, 7, 2), 1), ((3, 14, 14, 37), 2)
  )
  def test_measures_the_identity(self, shape, seed):
    rng = np.random.default_rng(seed)
    cams = rng.normal(size=shape).astype(np.float32)
    bias = rng.normal(size=shape[-1]).astype(np.float32)
    logits = (cams.astype(np.float64).sum((1, 2)) + bias).astype(np.float32)
    self.assertLess(
      float(cams_lib.identity_error(logits, cams, bias)),
      1e-5 * np.abs(cams).sum((1, 2)).max(),
    )
    # A perturbation of one logit by delta is reported as delta.
    perturbed = logits.copy()
    perturbed[-1, 0] += 0.25
    np.testing.assert_allclose(
      cams_lib.identity_error(perturbed, cams, bias), 0.25, rtol=1e-3
    )
    # Forgetting the bias shows up as max |bias|.
    np.testing.assert_allclose(
      cams_lib.identity_error(logits, cams), np.abs(bias).max(), rtol=1e-3
    )

  def test_ranks(self):
    with pytest.raises(
      ValueError, match=r'logits must have rank 2 .*got shape \(2,\)'
    ):
      cams_lib.identity_error(np.zeros(2), np.zeros((2, 1, 1, 2)))
    with pytest.raises(
      ValueError, match=r'cams must have rank 4 .*got shape \(2, 1, 2\)'
    ):
      cams_lib.identity_error(np.zeros((2, 2)), np.zeros((2, 1, 2)))


# ---------------------------------------------------------------------------
# Precision of the head and the maps on accelerators, identity tolerance
# ---------------------------------------------------------------------------

HIGHEST = jax.lax.Precision.HIGHEST


def dot_precisions(closed_jaxpr) -> list:
  """The `precision` of every dot_general in a jaxpr, sub-jaxprs included."""
  found = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == 'dot_general':
        found.append(eqn.params['precision'])
      for value in eqn.params.values():
        for sub in value if isinstance(value, (tuple, list)) else (value,):
          if hasattr(sub, 'eqns'):
            walk(sub)
          elif hasattr(sub, 'jaxpr') and hasattr(sub.jaxpr, 'eqns'):
            walk(sub.jaxpr)

  walk(closed_jaxpr.jaxpr)
  return found


def is_highest(precision) -> bool:
  return precision is not None and all(p == HIGHEST for p in precision)


def round_mantissa(x, bits: int):
  """float32 `x` rounded to `bits` mantissa bits (10: TF32's products)."""
  raw = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
  drop = 23 - bits
  raw = (raw + (1 << (drop - 1))) & ~np.uint64((1 << drop) - 1)
  return raw.astype(np.uint32).view(np.float32)


class PrecisionTest(parameterized.TestCase):
  def test_map_einsum_runs_at_highest(self):
    jaxpr = jax.make_jaxpr(cams_lib.hirescam)(
      jnp.ones((2, 3, 3, 5)), jnp.ones((5, 4))
    )
    precisions = dot_precisions(jaxpr)
    self.assertLen(precisions, 1)
    self.assertTrue(is_highest(precisions[0]), precisions)

  @parameterized.parameters(jnp.float32, jnp.bfloat16)
  def test_only_the_head_dots_run_at_highest(self, dtype):
    """Forward and gradient: head dot, einsum and their transposes at
    HIGHEST; the backbone's dots (1x1 convolutions) keep the fast default."""
    from cco_jax import models  # pylint: disable=g-import-not-at-top

    model = models.create_model(
      'resnet50',
      3,
      num_filters=4,
      stem='small',
      stage_sizes=(1, 1),
      dtype=dtype,
    )
    images = jnp.zeros((2, 8, 8, 3))
    variables = jax.eval_shape(
      lambda: model.init(jax.random.key(0), images, train=False)
    )
    params = variables['params']
    batch_stats = variables['batch_stats']

    def forward(p, s):
      return model.apply({'params': p, 'batch_stats': s}, images, train=False)

    forward_dots = dot_precisions(jax.make_jaxpr(forward)(params, batch_stats))
    self.assertLen([p for p in forward_dots if is_highest(p)], 2)
    self.assertGreater(len([p for p in forward_dots if p is None]), 3)

    def loss(p, s):
      logits, cams = forward(p, s)
      return logits.sum() + (cams**2).sum()

    grad_dots = dot_precisions(
      jax.make_jaxpr(jax.grad(loss))(params, batch_stats)
    )
    highest = [p for p in grad_dots if is_highest(p)]
    # 2 forward + the kernel's cotangent of each + the features' cotangent of
    # each (the backbone's gradient flows through both).
    self.assertLen(highest, 6)
    self.assertGreater(len(grad_dots), len(highest))


class IdentityToleranceTest(parameterized.TestCase):
  def test_values_and_order(self):
    f32 = cams_lib.identity_tolerance(jnp.float32)
    self.assertAlmostEqual(f32, 66 * 2.0**-23, delta=1e-12)
    self.assertAlmostEqual(
      cams_lib.identity_tolerance('bfloat16'), 2 * 2.0**-7 + 64 * 2.0**-23
    )
    self.assertLess(f32, cams_lib.identity_tolerance(jnp.float16))
    self.assertLess(
      cams_lib.identity_tolerance(jnp.float16),
      cams_lib.identity_tolerance(jnp.bfloat16),
    )
    with pytest.raises(ValueError, match='floating dtype.*int32'):
      cams_lib.identity_tolerance(jnp.int32)

  @parameterized.parameters((0, False), (1, True))
  def test_separates_exact_heads_from_low_precision_ones(self, seed, relu):
    """A ResNet-50 sized head at HIGHEST passes the float32 tolerance; the
    same head with TF32 products (the GPU default) fails it; maps rounded to
    bfloat16 pass the bfloat16 tolerance, maps missing a row of pixels do not."""
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(4, 14, 14, 2048)).astype(np.float32)
    if relu:
      features = np.maximum(features, 0)
    features += rng.normal(size=(4, 1, 1, 2048)).astype(np.float32)
    kernel = (rng.normal(size=(2048, 37)) * 30 / np.sqrt(2048)).astype(
      np.float32
    )

    def relative_error(rounding=lambda x: x, maps_dtype=jnp.float32):
      """`rounding` is applied to each dot's inputs, as TF32 products do."""
      pooled = features.mean((1, 2))
      logits = jnp.matmul(rounding(pooled), rounding(kernel), precision=HIGHEST)
      maps = cams_lib.hirescam(rounding(features), rounding(kernel))
      maps = maps.astype(maps_dtype).astype(jnp.float32)
      error = cams_lib.identity_error(logits, maps)
      return float(error / (jnp.abs(logits).max() + 1)), maps, logits

    exact, maps, logits = relative_error()
    self.assertLess(exact, cams_lib.identity_tolerance(jnp.float32))
    tf32, _, _ = relative_error(lambda x: round_mantissa(x, 10))
    self.assertGreater(tf32, 5 * cams_lib.identity_tolerance(jnp.float32))
    bf16, _, _ = relative_error(maps_dtype=jnp.bfloat16)
    self.assertLess(bf16, cams_lib.identity_tolerance(jnp.bfloat16))
    # A real mistake (one row of pixels lost) exceeds even bfloat16's.
    dropped = maps.at[:, 0].set(0)
    worst = float(
      cams_lib.identity_error(logits, dropped) / (jnp.abs(logits).max() + 1)
    )
    self.assertGreater(worst, cams_lib.identity_tolerance(jnp.bfloat16))
