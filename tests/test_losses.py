"""Property tests for `cco_jax.losses` and the objectives built from them
(docs/method.md §2-4).

Every loss is compared with an independent float64 numpy implementation written
from docs/method.md, with optax where optax has the same loss, and with its defining
properties (ACE == CE with an all-ones mask, ACE >= CE, the divergence's target
term carries no gradient, ...). Gradients are checked against finite differences
in float64.

Tolerances: float32 results against float64 references use rtol 1e-5 plus an
absolute term of 1e-6 times the sum of |map entries| that enter the margin (a margin
is a sum of H*W terms, so its float32 rounding error is at most ~H*W*eps*sum|K|/HW
= eps*sum|K| with eps = 1.2e-7; the loss is 1-Lipschitz in each margin).
"""

from __future__ import annotations

import functools
import math

from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
from jax.test_util import check_grads
import numpy as np
import optax
import pytest

from cco_jax import losses
from cco_jax import models
from cco_jax import objectives

RTOL = 1e-5

# Jitted losses for the property checks outside chex.variants: on CPU, eager mode
# compiles every primitive for every new shape, which costs more than one compile of
# the whole function. (Value checks skip tracers; the error tests call the originals.)
ace_jit = jax.jit(losses.ablated_cross_entropy)
abce_jit = jax.jit(losses.ablated_binary_cross_entropy)


# ---------------------------------------------------------------------------
# numpy references (float64), written from docs/method.md
# ---------------------------------------------------------------------------


def np_logsumexp(x, axis=-1):
  x = np.asarray(x, np.float64)
  top = x.max(axis, keepdims=True)
  return (top + np.log(np.exp(x - top).sum(axis, keepdims=True))).squeeze(axis)


def np_log_softmax(x, axis=-1):
  return x - np.expand_dims(np_logsumexp(x, axis), axis)


def np_softplus(x):
  return np.logaddexp(0.0, np.asarray(x, np.float64))


def np_cross_entropy(logits, labels, smoothing=0.0):
  logits = np.asarray(logits, np.float64)
  num_classes = logits.shape[-1]
  targets = np.full(logits.shape, smoothing / num_classes)
  targets[np.arange(len(labels)), labels] += 1.0 - smoothing
  return -(targets * np_log_softmax(logits)).sum(-1)


def np_contrastive(cams, labels):
  m = np.asarray(cams, np.float64)
  return np.stack(
    [m[i, ..., y][..., None] - m[i] for i, y in enumerate(labels)]
  )


def np_ace(cams, labels, mask):
  """docs/method.md §3: d_c = sum m K_c - sum |(1 - m) K_c|; ACE = log sum_c exp(-d_c)."""
  k = np_contrastive(cams, labels)
  m = np.asarray(mask, np.float64)[..., None]
  d = (m * k).sum((1, 2)) - np.abs((1 - m) * k).sum((1, 2))
  return np_logsumexp(-d)


def np_cam_divergence(cams, labels, mask, cam_scale, mask_scale, form):
  """docs/method.md §4, one image and one class at a time."""
  k = np_contrastive(cams, labels)
  batch, height, width, num_classes = k.shape
  out = np.zeros(batch)
  for b in range(batch):
    m = np.asarray(mask[b], np.float64).ravel()
    log_p = np_log_softmax(mask_scale * m)
    for c in range(num_classes):
      log_q = np_log_softmax(cam_scale * k[b, :, :, c].ravel())
      if form == 'talk':
        out[b] += (m * np.exp(log_p) * -log_q).sum()
      else:
        out[b] += (m * np.exp(log_p) * (log_p - log_q)).sum() / num_classes
  return out


def np_ablated_bce(cams, targets, masks):
  """docs/method.md §4: -t log sig(sum mM - sum|(1-m)M|) - (1-t) log(1 - sig(sum M))."""
  m = np.asarray(masks, np.float64)
  c = np.asarray(cams, np.float64)
  t = np.asarray(targets, np.float64)
  ablated = (m * c).sum((1, 2)) - np.abs((1 - m) * c).sum((1, 2))
  total = c.sum((1, 2))
  # -log sig(x) = log(1 + e^-x); -log(1 - sig(x)) = log(1 + e^x)
  return (t * np_softplus(-ablated) + (1 - t) * np_softplus(total)).mean(-1)


def random_case(seed, shape, soft_mask=False, scale=1.0):
  rng = np.random.default_rng(seed)
  cams = (scale * rng.normal(size=shape)).astype(np.float32)
  labels = rng.integers(0, shape[-1], size=shape[0]).astype(np.int32)
  if soft_mask:
    mask = rng.uniform(size=shape[:3]).astype(np.float32)
  else:
    mask = (rng.uniform(size=shape[:3]) < 0.5).astype(np.float32)
  return cams, labels, mask


def margin_atol(cams):
  """1e-6 * the largest sum_{h,w} |K| (float32 rounding of a margin, see top)."""
  return 1e-6 * (
    2 * np.abs(np.asarray(cams, np.float64)).sum((1, 2)).max() + 1.0
  )


SHAPES = ((1, 1, 1, 2), (2, 3, 5, 4), (3, 7, 7, 2), (4, 14, 14, 37))
CASES = [(shape, seed) for seed, shape in enumerate(SHAPES)]


# ---------------------------------------------------------------------------
# cross_entropy
# ---------------------------------------------------------------------------


class CrossEntropyTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(((1, 2), 0), ((5, 3), 1), ((8, 37), 2))
  def test_matches_optax(self, shape, seed):
    rng = np.random.default_rng(seed)
    logits = (rng.normal(size=shape) * [0.1, 10.0, 100.0][seed]).astype(
      np.float32
    )
    labels = rng.integers(0, shape[-1], size=shape[0]).astype(np.int32)
    ce = self.variant(losses.cross_entropy)(logits, labels)
    chex.assert_shape(ce, (shape[0],))
    np.testing.assert_allclose(
      ce,
      optax.softmax_cross_entropy_with_integer_labels(logits, labels),
      rtol=RTOL,
      atol=1e-6,
    )
    np.testing.assert_allclose(
      ce,
      np_cross_entropy(logits, labels),
      rtol=RTOL,
      atol=1e-6 * np.abs(logits).max(),
    )

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters((0.1, (3, 5)), (0.3, (4, 37)), (0.9, (2, 2)))
  def test_label_smoothing_matches_optax(self, alpha, shape):
    rng = np.random.default_rng(int(alpha * 10))
    logits = (3 * rng.normal(size=shape)).astype(np.float32)
    labels = rng.integers(0, shape[-1], size=shape[0]).astype(np.int32)
    ce = self.variant(
      lambda x, y: losses.cross_entropy(x, y, label_smoothing=alpha)
    )(logits, labels)
    onehot = jax.nn.one_hot(labels, shape[-1])
    expected = optax.softmax_cross_entropy(
      logits, optax.smooth_labels(onehot, alpha)
    )
    np.testing.assert_allclose(ce, expected, rtol=RTOL, atol=1e-6)
    np.testing.assert_allclose(
      ce, np_cross_entropy(logits, labels, alpha), rtol=RTOL, atol=1e-6
    )
    # Smoothing changes the loss (the option is not ignored).
    self.assertGreater(
      np.abs(ce - losses.cross_entropy(logits, labels)).max(), 1e-3
    )

  def test_uniform_logits(self):
    np.testing.assert_allclose(
      losses.cross_entropy(jnp.zeros((3, 7)), jnp.array([0, 3, 6])),
      np.full(3, math.log(7)),
      rtol=1e-6,
    )

  @parameterized.parameters(1.0, -0.1, 1.5)
  def test_bad_label_smoothing(self, alpha):
    with pytest.raises(
      ValueError, match=rf'label_smoothing must lie in \[0, 1\); got {alpha}'
    ):
      losses.cross_entropy(
        jnp.zeros((2, 3)), jnp.array([0, 1]), label_smoothing=alpha
      )

  def test_bad_labels_and_logits(self):
    logits = np.zeros((2, 3), np.float32)
    with pytest.raises(
      ValueError, match=r'labels must lie in \[0, 3\).*got values in \[0, 3\]'
    ):
      losses.cross_entropy(logits, np.array([0, 3]))
    with pytest.raises(
      ValueError, match=r'labels must lie in \[0, 3\).*\[-2, 1\]'
    ):
      losses.cross_entropy(logits, np.array([-2, 1]))
    with pytest.raises(
      ValueError, match='must be integer class indices, got dtype float'
    ):
      losses.cross_entropy(logits, np.array([0.0, 1.0]))
    with pytest.raises(
      ValueError, match=r'logits must have rank 2 .*got shape \(2, 1, 3\)'
    ):
      losses.cross_entropy(logits[:, None], np.array([0, 1]))
    with pytest.raises(
      ValueError,
      match=r'labels has batch size 1 \(shape \(1,\)\) but the '
      r'maps/logits have batch size 2',
    ):
      losses.cross_entropy(logits, np.array([0]))

  def test_gradient_matches_finite_differences(self):
    with jax.enable_x64(True):
      rng = np.random.default_rng(0)
      logits = jnp.asarray(rng.normal(size=(3, 4)), jnp.float64)
      labels = jnp.array([0, 3, 1])
      check_grads(
        jax.jit(lambda x: losses.cross_entropy(x, labels, 0.2).sum()),
        (logits,),
        order=1,
        modes=['rev'],
      )


# ---------------------------------------------------------------------------
# Ablated cross-entropy (ACE)
# ---------------------------------------------------------------------------


def _bg_nonpositive(cams, labels, mask, rng):
  """Makes K <= 0 at every pixel with m < 1 by lowering the target's map there."""
  cams = cams.copy()
  for b, y in enumerate(labels):
    bg = mask[b] < 1
    lowest = cams[b].min(-1)
    cams[b, ..., y] = np.where(
      bg, lowest - rng.uniform(0, 1, size=lowest.shape), cams[b, ..., y]
    )
  return cams


class AblatedCrossEntropyTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(
    *[(shape, seed, soft) for shape, seed in CASES for soft in (False, True)]
  )
  def test_matches_reference(self, shape, seed, soft):
    cams, labels, mask = random_case(seed, shape, soft_mask=soft)
    ace = self.variant(losses.ablated_cross_entropy)(cams, labels, mask)
    chex.assert_shape(ace, (shape[0],))
    np.testing.assert_allclose(
      ace, np_ace(cams, labels, mask), rtol=RTOL, atol=margin_atol(cams)
    )
    # The margins themselves: d_y == 0 exactly; ACE == CE(logits=-d, label=y).
    margins = losses.ablated_margins(cams, labels, mask)
    self.assertTrue(
      np.all(np.asarray(margins)[np.arange(shape[0]), labels] == 0)
    )
    np.testing.assert_allclose(
      ace, losses.cross_entropy(-margins, labels), rtol=1e-6, atol=1e-6
    )

  @parameterized.parameters(*CASES)
  def test_all_ones_mask_is_cross_entropy(self, shape, seed):
    cams, labels, _ = random_case(seed, shape)
    logits = cams.astype(np.float64).sum((1, 2))  # a bias-free head
    ace = ace_jit(cams, labels, np.ones(shape[:3], np.float32))
    np.testing.assert_allclose(
      ace, np_cross_entropy(logits, labels), rtol=RTOL, atol=margin_atol(cams)
    )

  @parameterized.parameters(
    *[(shape, seed, soft) for shape, seed in CASES for soft in (False, True)]
  )
  def test_at_least_cross_entropy(self, shape, seed, soft):
    cams, labels, mask = random_case(seed, shape, soft_mask=soft)
    logits = cams.astype(np.float64).sum((1, 2))
    ace = np.asarray(ace_jit(cams, labels, mask), np.float64)
    ce = np_cross_entropy(logits, labels)
    self.assertTrue(np.all(ace >= ce - margin_atol(cams)), (ace, ce))

  @parameterized.parameters(
    *[
      (shape, seed, soft)
      for shape, seed in CASES
      if shape[1] > 1
      for soft in (False, True)
    ]
  )
  def test_equality_iff_no_positive_background_contrast(
    self, shape, seed, soft
  ):
    rng = np.random.default_rng(seed + 17)
    cams, labels, mask = random_case(seed, shape, soft_mask=soft, scale=0.1)
    mask[:, 0, 0] = 0.0  # at least one background pixel per image
    cams = _bg_nonpositive(cams, labels, mask, rng)
    contrastive = np_contrastive(cams, labels)
    self.assertTrue(np.all(contrastive[mask < 1] <= 0))
    ce = np_cross_entropy(cams.astype(np.float64).sum((1, 2)), labels)
    ace = np.asarray(ace_jit(cams, labels, mask), np.float64)
    np.testing.assert_allclose(ace, ce, rtol=RTOL, atol=margin_atol(cams))

    # One background pixel with positive contrast against every class: d_c drops by
    # 2 (1 - m) K_c >= 2 for every c != y, so ACE - CE >= log(1 - q + q e^2) > 0,
    # q = the softmax mass CE puts on the other classes.
    lifted = cams.copy()
    for b, y in enumerate(labels):
      lifted[b, 0, 0, y] = lifted[b, 0, 0].max() + 1.0
    logits = lifted.astype(np.float64).sum((1, 2))
    ce = np_cross_entropy(logits, labels)
    q = 1.0 - np.exp(-ce)
    bound = np.log1p(q * (math.e**2 - 1))
    ace = np.asarray(ace_jit(lifted, labels, mask), np.float64)
    self.assertTrue(
      np.all(ace - ce >= bound - margin_atol(lifted)), (ace - ce, bound)
    )
    self.assertTrue(
      np.all(bound > 100 * margin_atol(lifted))
    )  # strictly, measurably

  def test_bias_free_model(self):
    """On a real bias-free (faithful) model, all-ones-mask ACE equals CE on its logits."""
    model = models.create_model(
      'resnet18', 5, num_filters=4, stem='small', stage_sizes=(1, 1, 1, 1)
    )
    images = (
      np.random.default_rng(0).normal(size=(3, 16, 16, 3)).astype(np.float32)
    )
    variables = _random_variables(model, images.shape, seed=1)
    logits, cams = jax.jit(lambda v, x: model.apply(v, x, train=False))(
      variables, images
    )
    labels = np.array([0, 4, 2])
    ace = losses.ablated_cross_entropy(
      cams, labels, np.ones(cams.shape[:3], np.float32)
    )
    np.testing.assert_allclose(
      ace,
      losses.cross_entropy(logits, labels),
      rtol=RTOL,
      atol=margin_atol(cams),
    )

  def test_gradient_matches_finite_differences(self):
    with jax.enable_x64(True):
      cams, labels, mask = random_case(3, (2, 3, 4, 5), soft_mask=True)
      cams = jnp.asarray(cams, jnp.float64)
      fn = jax.jit(
        lambda c: losses.ablated_cross_entropy(c, labels, mask).sum()
      )
      check_grads(fn, (cams,), order=1, modes=['rev'])
      self.assertTrue(np.all(np.isfinite(jax.grad(fn)(cams))))

  def test_mask_at_image_resolution(self):
    cams, labels, _ = random_case(0, (2, 14, 14, 3))
    with pytest.raises(
      ValueError,
      match=r'fg_mask has shape \(2, 224, 224\) but the maps '
      r'have shape \(2, 14, 14, 3\)',
    ):
      losses.ablated_cross_entropy(
        cams, labels, np.ones((2, 224, 224), np.float32)
      )

  def test_bad_mask_values_and_labels(self):
    cams, labels, mask = random_case(0, (2, 4, 4, 3))
    with pytest.raises(
      ValueError, match=r'fg_mask values must lie in \[0, 1\]'
    ):
      losses.ablated_cross_entropy(cams, labels, 255 * mask)
    with pytest.raises(ValueError, match=r'labels must lie in \[0, 3\)'):
      losses.ablated_cross_entropy(cams, np.array([3, 0]), mask)
    with pytest.raises(
      ValueError, match=r'cams must have rank 4 .*got shape \(2, 4, 4\)'
    ):
      losses.ablated_cross_entropy(cams[..., 0], labels, mask)


def _random_variables(model, image_shape, seed):
  """Random variables with the structure of `model.init` (no PRNG kernels to compile)."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(
    lambda x: model.init(jax.random.key(0), x, train=False),
    jax.ShapeDtypeStruct(image_shape, jnp.float32),
  )

  def fill(path, leaf):
    name = path[-1].key
    if name == 'kernel':
      value = rng.normal(size=leaf.shape) / math.sqrt(
        math.prod(leaf.shape[:-1])
      )
    elif name in ('scale', 'var'):
      value = rng.uniform(0.5, 1.5, size=leaf.shape)
    else:
      value = 0.1 * rng.normal(size=leaf.shape)
    return np.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


# ---------------------------------------------------------------------------
# cam_divergence
# ---------------------------------------------------------------------------


def divergence_without_target(
  cams, labels, fg_mask, cam_scale, mask_scale, form
):
  """The same expression with the target class's term removed (jax, for gradients)."""
  target = jnp.take_along_axis(cams, labels[:, None, None, None], axis=-1)
  contrastive = target - cams
  batch, height, width, num_classes = cams.shape
  m = fg_mask.reshape(batch, -1)
  log_p = jax.nn.log_softmax(mask_scale * m, axis=1)
  log_q = jax.nn.log_softmax(
    cam_scale * contrastive.reshape(batch, -1, num_classes), axis=1
  )
  if form == 'talk':
    per_class = ((m * jnp.exp(log_p))[..., None] * -log_q).sum(1)
  else:
    per_class = (
      (m * jnp.exp(log_p))[..., None] * (log_p[..., None] - log_q)
    ).sum(1)
    per_class = per_class / num_classes
  others = 1.0 - jax.nn.one_hot(labels, num_classes, dtype=cams.dtype)
  return (per_class * others).sum(-1)


class CamDivergenceTest(chex.TestCase):
  def test_hand_computed_2x2(self):
    # Image 0: label 0, K_1 = M_0 - M_1 = [[1, 0], [0, 0]], mask [[1, 0], [0, 0]].
    # Image 1: label 1, K_0 = M_1 - M_0 = [[1, 1], [0, 0]], mask all ones.
    # mask_scale = ln 3 and cam_scale = ln 2 make every softmax rational.
    cams = np.zeros((2, 2, 2, 2), np.float32)
    cams[0, 0, 0, 0] = 1.0
    cams[1, 0, :, 1] = 1.0
    labels = np.array([0, 1])
    mask = np.array([[[1, 0], [0, 0]], [[1, 1], [1, 1]]], np.float32)
    # P = softmax(ln3 * m): image 0 -> [3, 1, 1, 1] / 6; image 1 -> uniform.
    p = np.array([[1 / 2, 1 / 6, 1 / 6, 1 / 6], [1 / 4, 1 / 4, 1 / 4, 1 / 4]])
    # Q[b, :, c] = softmax(ln2 * K_c), pixels flattened row-major; the target's is uniform.
    q = np.array(
      [
        [[1 / 4, 2 / 5], [1 / 4, 1 / 5], [1 / 4, 1 / 5], [1 / 4, 1 / 5]],
        [[1 / 3, 1 / 4], [1 / 3, 1 / 4], [1 / 6, 1 / 4], [1 / 6, 1 / 4]],
      ]
    )
    m = mask.reshape(2, 4, 1)
    talk = (m * p[..., None] * -np.log(q)).sum((1, 2))
    paper = (m * p[..., None] * (np.log(p)[..., None] - np.log(q))).sum(
      (1, 2)
    ) / 2
    # Closed forms of the same numbers.
    np.testing.assert_allclose(
      talk, [0.5 * math.log(10), 0.5 * math.log(18) + math.log(4)]
    )
    np.testing.assert_allclose(
      paper, [0.25 * math.log(5 / 2), 0.25 * math.log(9 / 8)]
    )
    for form, expected in (('talk', talk), ('paper', paper)):
      out = losses.cam_divergence(
        cams,
        labels,
        mask,
        cam_scale=math.log(2),
        mask_scale=math.log(3),
        form=form,
      )
      np.testing.assert_allclose(out, expected, rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(
    *[
      (shape, seed, form)
      for shape, seed in CASES
      if shape != (3, 7, 7, 2)
      for form in ('talk', 'paper')
    ]
  )
  def test_matches_reference(self, shape, seed, form):
    cams, labels, mask = random_case(seed, shape, soft_mask=seed % 2 == 1)
    scales = ((10.0, 50.0), (50.0, 1.0))[
      form == 'paper'
    ]  # talk's and paper's settings
    fn = self.variant(
      lambda c, y, m: losses.cam_divergence(c, y, m, *scales, form=form)
    )
    out = fn(cams, labels, mask)
    chex.assert_shape(out, (shape[0],))
    expected = np_cam_divergence(cams, labels, mask, *scales, form)
    # log Q ~ cam_scale * |K| in size, rounded in float32.
    atol = 1e-6 * scales[0] * np.abs(cams).max() * shape[-1]
    np.testing.assert_allclose(out, expected, rtol=RTOL, atol=atol)

  def test_defaults_are_the_talks(self):
    cams, labels, mask = random_case(4, (2, 4, 4, 3), soft_mask=True)
    np.testing.assert_allclose(
      losses.cam_divergence(cams, labels, mask),
      np_cam_divergence(cams, labels, mask, 10.0, 50.0, 'talk'),
      rtol=RTOL,
    )

  @parameterized.parameters(
    *[
      (shape, seed, form)
      for shape, seed in CASES[1:3]
      for form in ('talk', 'paper')
    ]
  )
  def test_target_term_carries_no_gradient(self, shape, seed, form):
    cams, labels, mask = random_case(seed, shape, soft_mask=True)
    cams, mask, labels = (
      jnp.asarray(cams),
      jnp.asarray(mask),
      jnp.asarray(labels),
    )
    args = (labels, mask, 10.0, 50.0)
    full = lambda c: losses.cam_divergence(c, *args, form=form).sum()
    reduced = lambda c: divergence_without_target(c, *args, form).sum()
    both = jax.jit(
      lambda c: (jax.value_and_grad(full)(c), jax.value_and_grad(reduced)(c))
    )
    (v_full, g_full), (v_reduced, g_reduced) = both(cams)
    self.assertTrue(np.all(np.isfinite(g_full)))
    self.assertGreater(np.abs(g_full).max(), 1e-3)  # the test is not vacuous
    np.testing.assert_allclose(
      g_full, g_reduced, rtol=1e-4, atol=1e-6 * np.abs(g_full).max()
    )
    # The removed term is the constant sum m P (log(HW) [+ log P]) (/ C for 'paper').
    m = np.asarray(mask, np.float64).reshape(shape[0], -1)
    log_p = np_log_softmax(50.0 * m)
    hw = shape[1] * shape[2]
    if form == 'talk':
      constant = (m * np.exp(log_p) * math.log(hw)).sum()
    else:
      constant = (m * np.exp(log_p) * (log_p + math.log(hw))).sum() / shape[-1]
    np.testing.assert_allclose(
      float(v_full) - float(v_reduced), constant, rtol=1e-4, atol=1e-4
    )

  @parameterized.parameters(('talk', 1e3), ('paper', 1e3))
  def test_gradient_finite_for_extreme_inputs(self, form, scale):
    cams, labels, mask = random_case(5, (3, 5, 5, 4), scale=scale)
    mask[0] = 0.0  # empty foreground
    mask[1] = 1.0  # full foreground
    grad = jax.jit(
      jax.grad(
        lambda c: losses.cam_divergence(c, labels, mask, form=form).sum()
      )
    )(cams)
    self.assertTrue(np.all(np.isfinite(grad)))
    # An empty foreground contributes nothing.
    out = losses.cam_divergence(cams, labels, mask, form=form)
    self.assertEqual(float(out[0]), 0.0)
    np.testing.assert_array_equal(grad[0], 0.0)

  def test_gradient_matches_finite_differences(self):
    with jax.enable_x64(True):
      cams, labels, mask = random_case(6, (2, 3, 3, 3), soft_mask=True)
      cams = jnp.asarray(cams, jnp.float64)
      for form in ('talk', 'paper'):
        check_grads(
          jax.jit(
            lambda c, form=form: losses.cam_divergence(
              c, labels, mask, 2.0, 3.0, form=form
            ).sum()
          ),
          (cams,),
          order=1,
          modes=['rev'],
        )

  def test_bad_form(self):
    cams, labels, mask = random_case(0, (1, 2, 2, 2))
    with pytest.raises(
      ValueError, match="form must be 'talk' or 'paper'; got 'kl'"
    ):
      losses.cam_divergence(cams, labels, mask, form='kl')

  def test_mask_at_image_resolution(self):
    cams, labels, _ = random_case(0, (2, 7, 7, 2))
    with pytest.raises(
      ValueError,
      match=r'fg_mask has shape \(2, 224, 224\) but the maps '
      r'have shape \(2, 7, 7, 2\)',
    ):
      losses.cam_divergence(cams, labels, np.ones((2, 224, 224), np.float32))


# ---------------------------------------------------------------------------
# ablated_binary_cross_entropy
# ---------------------------------------------------------------------------


def random_multilabel(seed, shape, soft_targets=False):
  rng = np.random.default_rng(seed)
  cams = rng.normal(size=shape).astype(np.float32)
  if soft_targets:
    targets = rng.uniform(size=(shape[0], shape[-1])).astype(np.float32)
  else:
    targets = (rng.uniform(size=(shape[0], shape[-1])) < 0.5).astype(np.float32)
  masks = (rng.uniform(size=shape) < 0.5).astype(np.float32)
  return cams, targets, masks


@jax.jit
def optax_bce(logits, targets):
  return optax.sigmoid_binary_cross_entropy(
    jnp.asarray(logits, jnp.float32), jnp.asarray(targets, jnp.float32)
  ).mean(-1)


class AblatedBinaryCrossEntropyTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(
    *[(shape, seed, soft) for shape, seed in CASES for soft in (False, True)]
  )
  def test_matches_reference(self, shape, seed, soft):
    cams, targets, masks = random_multilabel(seed, shape, soft_targets=soft)
    out = self.variant(losses.ablated_binary_cross_entropy)(
      cams, targets, masks
    )
    chex.assert_shape(out, (shape[0],))
    np.testing.assert_allclose(
      out,
      np_ablated_bce(cams, targets, masks),
      rtol=RTOL,
      atol=margin_atol(cams),
    )

  @parameterized.parameters(
    *[(shape, seed, soft) for shape, seed in CASES for soft in (False, True)]
  )
  def test_special_cases(self, shape, seed, soft):
    cams, targets, masks = random_multilabel(seed, shape, soft_targets=soft)
    total = cams.astype(np.float64).sum((1, 2))
    absolute = np.abs(cams.astype(np.float64)).sum((1, 2))
    atol = margin_atol(cams)
    abce = abce_jit
    ones, zeros = np.ones_like(masks), np.zeros_like(masks)
    # All-ones masks: the ablated logit is the logit, so it is plain sigmoid BCE on
    # z = sum M, for any targets.
    np.testing.assert_allclose(
      abce(cams, targets, ones), optax_bce(total, targets), rtol=RTOL, atol=atol
    )
    # All-negative targets: only sum M matters, whatever the masks.
    negatives = np.zeros_like(targets)
    np.testing.assert_allclose(
      abce(cams, negatives, masks),
      np_softplus(total).mean(-1),
      rtol=RTOL,
      atol=atol,
    )
    np.testing.assert_allclose(
      abce(cams, negatives, masks),
      abce(cams, negatives, ones),
      rtol=RTOL,
      atol=atol,
    )
    # All-positive targets and empty masks: the ablated logit is -sum |M|.
    positives = np.ones_like(targets)
    np.testing.assert_allclose(
      abce(cams, positives, zeros),
      optax_bce(-absolute, positives),
      rtol=RTOL,
      atol=atol,
    )
    np.testing.assert_allclose(
      abce(cams, positives, zeros),
      np_softplus(absolute).mean(-1),
      rtol=RTOL,
      atol=atol,
    )
    # Ablation only lowers the positive logit: ABCE >= BCE(sum M) for any masks.
    self.assertTrue(
      np.all(
        np.asarray(abce(cams, targets, masks))
        >= np.asarray(optax_bce(total, targets)) - atol
      )
    )

  def test_gradient_matches_finite_differences(self):
    with jax.enable_x64(True):
      cams, targets, masks = random_multilabel(
        2, (2, 3, 3, 4), soft_targets=True
      )
      masks = np.random.default_rng(0).uniform(size=masks.shape)
      cams = jnp.asarray(cams, jnp.float64)
      fn = jax.jit(
        lambda c: losses.ablated_binary_cross_entropy(c, targets, masks).sum()
      )
      check_grads(fn, (cams,), order=1, modes=['rev'])

  def test_bad_shapes(self):
    cams, targets, masks = random_multilabel(0, (2, 4, 4, 3))
    abce = losses.ablated_binary_cross_entropy
    with pytest.raises(
      ValueError,
      match=r'fg_masks has shape \(2, 4, 4\) but cams has shape '
      r'\(2, 4, 4, 3\)',
    ):
      abce(cams, targets, masks[..., 0])
    with pytest.raises(
      ValueError,
      match=r'fg_masks has shape \(2, 224, 224, 3\) but cams has '
      r'shape \(2, 4, 4, 3\)',
    ):
      abce(cams, targets, np.ones((2, 224, 224, 3), np.float32))
    with pytest.raises(
      ValueError,
      match=r'targets has shape \(2, 4\); expected \(B, C\) = '
      r'\(2, 3\)',
    ):
      abce(cams, np.ones((2, 4), np.float32), masks)
    with pytest.raises(
      ValueError, match=r'targets must have rank 2 .*got shape \(2,\)'
    ):
      abce(cams, np.ones((2,), np.float32), masks)
    with pytest.raises(
      ValueError, match=r'cams must have rank 4 .*got shape \(2, 4, 4\)'
    ):
      abce(cams[..., 0], targets, masks[..., 0])


# ---------------------------------------------------------------------------
# The objectives built from these losses (cco_jax.objectives)
# ---------------------------------------------------------------------------

CUSTOM = {
  'ce_weight': 0.7,
  'ace_weight': 1.3,
  'kld_weight': 0.05,
  'cam_scale': 5.0,
  'mask_scale': 20.0,
  'divergence_form': 'paper',
  'label_smoothing': 0.1,
}


def objective_inputs(seed, shape=(3, 4, 4, 5)):
  cams, labels, mask = random_case(seed, shape, soft_mask=True)
  logits = (
    cams.sum((1, 2)) + np.random.default_rng(seed).normal(size=shape[-1])
  ).astype(np.float32)
  return logits, cams, labels, mask


def run_objective(objective, logits, cams, labels, mask):
  """`(loss, metrics)` of an objective that reads only the model's outputs."""
  loss, metrics, state = objective(
    objectives.StepInputs(logits, cams, labels, mask)
  )
  assert state is None
  return loss, metrics


def term_means(options, logits, cams, labels, mask):
  return {
    'ce': float(
      losses.cross_entropy(logits, labels, options['label_smoothing']).mean()
    ),
    'ace': float(losses.ablated_cross_entropy(cams, labels, mask).mean()),
    'kld': float(
      losses.cam_divergence(
        cams,
        labels,
        mask,
        options['cam_scale'],
        options['mask_scale'],
        form=options['divergence_form'],
      ).mean()
    ),
  }


class ObjectivesTest(chex.TestCase):
  def test_defaults_are_the_talks_setting(self):
    defaults = objectives.default_config()
    self.assertEqual(
      tuple(
        defaults[key]
        for key in (
          'name',
          'ace_weight',
          'kld_weight',
          'cam_scale',
          'mask_scale',
          'divergence_form',
        )
      ),
      ('ace_kld', 1.0, 1e-3, 10.0, 50.0, 'talk'),
    )

  def test_ce_is_mean_cross_entropy(self):
    logits, cams, labels, mask = objective_inputs(0)
    loss, metrics = run_objective(
      objectives.create({'name': 'ce'}), logits, cams, labels, mask
    )
    expected = np_cross_entropy(logits, labels).mean()
    np.testing.assert_allclose(loss, expected, rtol=RTOL)
    np.testing.assert_allclose(metrics['ce'], expected, rtol=RTOL)

  def test_ace_kld_default_weights(self):
    logits, cams, labels, mask = objective_inputs(1)
    loss, _ = run_objective(
      objectives.create({'name': 'ace_kld'}), logits, cams, labels, mask
    )
    ace = np_ace(cams, labels, mask).mean()
    kld = np_cam_divergence(cams, labels, mask, 10.0, 50.0, 'talk').mean()
    np.testing.assert_allclose(loss, 1.0 * ace + 1e-3 * kld, rtol=RTOL)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(
    ('ce', ('ce',)),
    ('ace', ('ace',)),
    ('ace_kld', ('ace', 'kld')),
    ('ce_kld', ('ce', 'kld')),
  )
  def test_loss_is_weighted_sum_of_term_means(self, name, used):
    # Non-default weights, temperatures, form and smoothing: each must be used.
    logits, cams, labels, mask = objective_inputs(1)
    objective = objectives.create({'name': name, **CUSTOM})
    self.assertEqual(tuple(objective.coefficients), used)
    loss, metrics = self.variant(functools.partial(run_objective, objective))(
      logits, cams, labels, mask
    )
    means = term_means(CUSTOM, logits, cams, labels, mask)
    expected = sum(CUSTOM[f'{t}_weight'] * means[t] for t in used)
    np.testing.assert_allclose(loss, expected, rtol=RTOL)
    self.assertEqual(set(metrics), {'ce', 'ace', 'kld', 'loss'})
    np.testing.assert_allclose(metrics['loss'], loss, rtol=1e-7)
    for term in ('ce', 'ace', 'kld'):
      np.testing.assert_allclose(
        metrics[term], means[term], rtol=RTOL, err_msg=term
      )

  @parameterized.parameters(
    ('ce', {'ce', 'loss'}),
    ('ace', {'ce', 'ace', 'loss'}),
    ('ace_kld', {'ce', 'ace', 'kld', 'loss'}),
    ('ce_kld', {'ce', 'kld', 'loss'}),
  )
  def test_metrics_keys_without_logging_all(self, name, keys):
    objective = objectives.create({'name': name, 'log_all_terms': False})
    _, metrics = run_objective(objective, *objective_inputs(2))
    self.assertEqual(set(metrics), keys)

  @parameterized.parameters(
    ('ce', False, True),
    ('ace', True, False),
    ('ace_kld', True, False),
    ('ce_kld', True, True),
  )
  def test_gradient_flows_only_through_used_terms(
    self, name, cams_used, logits_used
  ):
    logits, cams, labels, mask = objective_inputs(3)
    objective = objectives.create({'name': name})  # logs every term
    g_logits, g_cams = jax.jit(
      jax.grad(
        lambda x, c: run_objective(objective, x, c, labels, mask)[0],
        argnums=(0, 1),
      )
    )(logits, cams)
    self.assertEqual(bool(np.abs(g_cams).max() > 0), cams_used)
    self.assertEqual(bool(np.abs(g_logits).max() > 0), logits_used)

  @parameterized.parameters('cross_entropy', 'ACE', 'kld', '')
  def test_unknown_name(self, name):
    with pytest.raises(
      ValueError,
      match=rf"Unknown config.loss.name '{name}'; choose one of "
      r"\['ace', 'ace_bce', 'ace_kld', 'ace_swd', 'bce', 'ce', 'ce_bg_cam', "
      r"'ce_kld', 'ce_reweighted', 'energy', 'group_dro', 'rrr'\]",
    ):
      objectives.create({'name': name})
