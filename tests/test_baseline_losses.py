"""The baselines' objectives, ACE's SWD and contrastive CutMix.

Each loss is compared with an independent float64 numpy implementation of its
equation (loops and explicit indexing where the library vectorises), on random
inputs of several shapes, to rtol 1e-5 in float32; gradients are checked
against finite differences in float64 (`check_grads`); the Group DRO update
against a hand computation; CutMix by its defining properties. A few pmapped
train steps with each objective run on a tiny ResNet on 4 virtual devices.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.test_util import check_grads
import numpy as np
import optax
import pytest

from cco_jax import baseline_losses as bl
from cco_jax import cutmix
from cco_jax import losses
from cco_jax import objectives
from cco_jax import train_step as step_lib

RTOL = 1e-5
SHAPES = ((1, 1, 1, 2), (2, 3, 5, 4), (3, 7, 7, 2), (4, 6, 6, 5))


def random_case(seed, shape, soft=False):
  rng = np.random.default_rng(seed)
  cams = rng.normal(size=shape).astype(np.float32)
  labels = rng.integers(0, shape[-1], shape[0]).astype(np.int32)
  mask = rng.uniform(size=shape[:3])
  mask = (mask if soft else mask < 0.5).astype(np.float32)
  return cams, labels, mask


def np_log_softmax(x):
  x = np.asarray(x, np.float64)
  top = x.max(-1, keepdims=True)
  return x - top - np.log(np.exp(x - top).sum(-1, keepdims=True))


def np_ce(logits, labels):
  return -np_log_softmax(logits)[np.arange(len(labels)), labels]


def sum_atol(x):
  """Float32 rounding of a sum of |x| terms: 1e-6 relative to that sum."""
  return 1e-6 * (np.abs(np.asarray(x, np.float64)).sum() + 1.0)


# ---------------------------------------------------------------------------
# rrr: input-gradient penalty
# ---------------------------------------------------------------------------


def np_input_gradient_penalty(grads, pixel_mask):
  out = np.zeros(len(grads))
  for b in range(len(grads)):
    for i, j, k in np.ndindex(grads.shape[1:]):
      out[b] += ((1.0 - pixel_mask[b, i, j]) * grads[b, i, j, k]) ** 2
  return out


@pytest.mark.parametrize('shape', [(1, 2, 2, 3), (3, 5, 5, 3), (2, 8, 8, 1)])
def test_input_gradient_penalty_matches_numpy(shape):
  rng = np.random.default_rng(shape[1])
  grads = rng.normal(size=shape).astype(np.float32)
  pixel_mask = (rng.uniform(size=shape[:3]) < 0.4).astype(np.float32)
  got = jax.jit(bl.input_gradient_penalty)(grads, pixel_mask)
  expected = np_input_gradient_penalty(
    grads.astype(np.float64), pixel_mask.astype(np.float64)
  )
  np.testing.assert_allclose(got, expected, rtol=RTOL)
  # Only the background counts: gradients on the object are free.
  np.testing.assert_array_equal(
    bl.input_gradient_penalty(grads * pixel_mask[..., None], pixel_mask), 0
  )


def linear_cam_logits(weights, images):
  """A linear model `logits = sum_pixels x W` (a bias-free one-layer CAM)."""
  return jnp.einsum('bhwk,kc->bc', images, weights)


def test_rrr_input_gradient_of_a_linear_model_is_analytic():
  # d/dx sum_c log p_c = sum_c W_c - C sum_k p_k W_k at every pixel.
  rng = np.random.default_rng(0)
  images = rng.normal(size=(3, 4, 5, 3)).astype(np.float32)
  weights = rng.normal(size=(3, 4)).astype(np.float32)
  grads = jax.grad(
    lambda x: bl.log_probability_sum(linear_cam_logits(weights, x)).sum()
  )(images)
  logits = np.einsum(
    'bhwk,kc->bc', images.astype(np.float64), weights.astype(np.float64)
  )
  p = np.exp(np_log_softmax(logits))
  w64 = weights.astype(np.float64)
  per_example = w64.sum(1)[None] - 4 * p @ w64.T  # (B, 3)
  expected = np.broadcast_to(per_example[:, None, None, :], images.shape)
  np.testing.assert_allclose(grads, expected, rtol=RTOL, atol=1e-5)


def test_rrr_objective_value_and_double_backward():
  rng = np.random.default_rng(1)
  images = rng.normal(size=(2, 3, 3, 2))
  labels = np.array([0, 2], np.int32)
  pixel_mask = (rng.uniform(size=(2, 3, 3)) < 0.5).astype(np.float64)
  weights0 = rng.normal(size=(2, 3))
  objective = objectives.create(
    {'name': 'rrr', 'rrr_weight': 0.7, 'log_all_terms': False}
  )
  assert objective.needs_input_gradients

  def loss(weights, images):
    grads = jax.grad(
      lambda x: objective.input_score(linear_cam_logits(weights, x)).sum()
    )(images)
    logits = linear_cam_logits(weights, images)
    cams = jnp.zeros(images.shape[:3] + (3,), images.dtype)
    x = objectives.StepInputs(
      logits,
      cams,
      labels,
      jnp.ones(images.shape[:3]),
      batch={'pixel_mask': pixel_mask},
      input_grads=grads,
    )
    return objective(x)[0]

  # Value: CE + 0.7 * penalty with the analytic gradient.
  logits = np.einsum('bhwk,kc->bc', images, weights0)
  p = np.exp(np_log_softmax(logits))
  g = weights0.sum(1)[None] - 3 * p @ weights0.T
  grads = np.broadcast_to(g[:, None, None, :], images.shape)
  expected = np_ce(logits, labels).mean() + 0.7 * np.mean(
    np_input_gradient_penalty(grads, pixel_mask)
  )
  with jax.enable_x64():
    np.testing.assert_allclose(loss(weights0, images), expected, rtol=1e-10)
    # The gradient with respect to the weights goes through the input
    # gradient (second derivatives): finite differences agree.
    check_grads(lambda w: loss(w, images), (weights0,), order=1, atol=1e-6)


# ---------------------------------------------------------------------------
# ce_bg_cam: the target map outside the mask
# ---------------------------------------------------------------------------


@pytest.mark.parametrize('shape', SHAPES)
def test_background_cam_penalty_matches_numpy(shape):
  cams, labels, mask = random_case(shape[1], shape, soft=True)
  got = jax.jit(bl.background_cam_penalty)(cams, labels, mask)
  expected = np.zeros(shape[0])
  for b, y in enumerate(labels):
    for i, j in np.ndindex(shape[1:3]):
      expected[b] += abs((1.0 - mask[b, i, j]) * float(cams[b, i, j, y]))
  np.testing.assert_allclose(got, expected, rtol=RTOL, atol=sum_atol(cams))


def test_ce_bg_cam_objective_and_gradients():
  cams, labels, mask = random_case(3, (3, 4, 4, 3))
  logits = cams.sum((1, 2))
  objective = objectives.create({'name': 'ce_bg_cam', 'bg_cam_weight': 0.3})
  loss, metrics, q = objective(
    objectives.StepInputs(logits, cams, labels, mask)
  )
  penalty = np.array(
    [
      np.abs((1 - mask[b]) * cams[b, ..., y]).astype(np.float64).sum()
      for b, y in enumerate(labels)
    ]
  )
  expected = np_ce(logits, labels).mean() + 0.3 * penalty.mean()
  np.testing.assert_allclose(loss, expected, rtol=RTOL)
  assert q is None and set(metrics) == {'ce', 'ace', 'kld', 'bg_cam', 'loss'}
  with jax.enable_x64():
    check_grads(
      lambda c: bl.background_cam_penalty(c, labels, mask).sum(),
      (cams.astype(np.float64),),
      order=1,
    )


# ---------------------------------------------------------------------------
# ce_reweighted and group_dro
# ---------------------------------------------------------------------------


def test_inverse_frequency_weights_known_values():
  # n = 100, three groups present: w_g = 100 / (3 n_g); the absent one gets 0.
  weights = bl.inverse_frequency_weights([70, 20, 0, 10])
  np.testing.assert_allclose(
    weights, [100 / 210, 100 / 60, 0.0, 100 / 30], rtol=1e-6
  )
  counts = np.array([70, 20, 0, 10])
  assert np.isclose((counts * weights).sum() / counts.sum(), 1.0)


@pytest.mark.parametrize('counts', [[], [3, -1], [0, 0]])
def test_inverse_frequency_weights_bad_counts(counts):
  with pytest.raises(ValueError, match='group_counts'):
    bl.inverse_frequency_weights(counts)


@pytest.mark.parametrize(
  'batch,classes,counts', [(5, 2, (9, 1)), (8, 4, (5, 0, 2, 7))]
)
def test_reweighted_cross_entropy_matches_numpy(batch, classes, counts):
  rng = np.random.default_rng(batch)
  logits = (3 * rng.normal(size=(batch, classes))).astype(np.float32)
  labels = rng.integers(0, classes, batch).astype(np.int32)
  present = np.flatnonzero(np.array(counts) > 0)
  groups = rng.choice(present, batch).astype(np.int32)
  objective = objectives.create(
    {'name': 'ce_reweighted', 'group_counts': counts}
  )
  loss, _, _ = objective(
    objectives.StepInputs(
      logits,
      np.zeros((batch, 1, 1, classes), np.float32),
      labels,
      np.ones((batch, 1, 1), np.float32),
      batch={'group': groups},
    )
  )
  n, g_present = sum(counts), len(present)
  w = np.array([n / (g_present * counts[g]) for g in groups])
  np.testing.assert_allclose(
    loss, (w * np_ce(logits, labels)).mean(), rtol=RTOL
  )


def test_group_dro_matches_hand_computation():
  # Groups 0, 0, 1, 3 (group 2 absent): L = [(1 + 2) / 2, 3, 0, 4].
  per_example = jnp.array([1.0, 2.0, 3.0, 4.0])
  groups = jnp.array([0, 0, 1, 3])
  q = jnp.array([0.4, 0.3, 0.2, 0.1])
  eta = 0.5
  loss, q_new, group_losses = bl.group_dro_loss(
    per_example, groups, q, step_size=eta
  )
  np.testing.assert_allclose(group_losses, [1.5, 3.0, 0.0, 4.0])
  unnormalised = np.array(
    [
      0.4 * np.exp(0.5 * 1.5),
      0.3 * np.exp(0.5 * 3.0),
      0.2 * np.exp(0.0),
      0.1 * np.exp(0.5 * 4.0),
    ]
  )
  expected_q = unnormalised / unnormalised.sum()
  np.testing.assert_allclose(q_new, expected_q, rtol=1e-6)
  np.testing.assert_allclose(
    loss, expected_q @ np.array([1.5, 3.0, 0.0, 4.0]), rtol=1e-6
  )
  # q' carries no gradient: d loss / d l_i = q'_{g_i} / n_{g_i}.
  grad = jax.grad(lambda v: bl.group_dro_loss(v, groups, q, step_size=eta)[0])(
    per_example
  )
  np.testing.assert_allclose(
    grad,
    [expected_q[0] / 2, expected_q[0] / 2, expected_q[1], expected_q[3]],
    rtol=1e-6,
  )
  # eta = 0 keeps the weights.
  np.testing.assert_allclose(
    bl.group_dro_loss(per_example, groups, q, step_size=0.0)[1], q, rtol=1e-6
  )


def test_group_dro_under_pmap_equals_whole_batch():
  rng = np.random.default_rng(4)
  per_example = rng.uniform(0, 3, (4, 3)).astype(np.float32)
  groups = rng.integers(0, 3, (4, 3)).astype(np.int32)
  q = np.array([0.5, 0.3, 0.2], np.float32)

  def sharded(values, g):
    loss, q_new, _ = bl.group_dro_loss(
      values, g, q, step_size=0.3, axis_name='i'
    )
    return jax.lax.pmean(loss, 'i'), q_new

  p_loss, p_q = jax.pmap(sharded, axis_name='i')(per_example, groups)
  loss, q_new, _ = bl.group_dro_loss(
    per_example.ravel(), groups.ravel(), q, step_size=0.3
  )
  np.testing.assert_allclose(p_loss, np.full(4, loss), rtol=1e-6)
  np.testing.assert_allclose(p_q, np.broadcast_to(q_new, (4, 3)), rtol=1e-6)


def test_group_dro_objective_reports_weights():
  logits = np.array([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]], np.float32)
  labels = np.array([0, 0, 1], np.int32)
  groups = np.array([0, 1, 1], np.int32)
  objective = objectives.create(
    {'name': 'group_dro', 'dro_step_size': 0.1, 'group_counts': (5, 5)}
  )
  q = objective.init_state()
  np.testing.assert_array_equal(q, [0.5, 0.5])
  loss, metrics, q_new = objective(
    objectives.StepInputs(
      logits,
      np.zeros((3, 1, 1, 2), np.float32),
      labels,
      np.ones((3, 1, 1), np.float32),
      batch={'group': groups},
      state=q,
    )
  )
  ce = np_ce(logits, labels)
  group_losses = np.array([ce[0], ce[1:].mean()])
  expected_q = q * np.exp(0.1 * group_losses)
  expected_q /= expected_q.sum()
  np.testing.assert_allclose(q_new, expected_q, rtol=1e-6)
  np.testing.assert_allclose(loss, expected_q @ group_losses, rtol=RTOL)
  np.testing.assert_allclose(
    metrics['worst_group_loss'], group_losses.max(), rtol=RTOL
  )


# ---------------------------------------------------------------------------
# ace_swd: the sliced-Wasserstein divergence
# ---------------------------------------------------------------------------


def np_sliced_wasserstein(cams, labels, mask, directions, t, s):
  """Per image: drop the target channel, project, sort, apply f, average."""
  cams = np.asarray(cams, np.float64)
  directions = np.asarray(directions, np.float64)
  out = np.zeros(len(cams))
  for b, y in enumerate(labels):
    k = cams[b, ..., y][..., None] - cams[b]  # (H, W, C)
    k = np.delete(k, y, axis=-1).reshape(-1, cams.shape[-1] - 1)
    m = np.asarray(mask[b], np.float64).ravel()
    cloud = np.concatenate([k, s * m[:, None]], 1)  # (N, C)
    mass = t * m / m.sum() if m.sum() > 0 else np.zeros_like(m)
    target = np.concatenate(
      [np.repeat(mass[:, None], k.shape[1], 1), s * m[:, None]], 1
    )
    values = []
    for u in directions:
      u1 = np.append(u, 1.0)
      tgt = np.sort(target @ u1)
      gap = tgt - np.sort(cloud @ u1)
      for g, tv in zip(gap, tgt):
        if g >= 0:
          values.append(g)
        elif tv != 0:
          values.append(np.sqrt(1 - g) - 1)
        else:
          values.append(-g)
    out[b] = np.mean(values)
  return out


@pytest.mark.parametrize('shape', SHAPES)
@pytest.mark.parametrize('soft', [False, True])
def test_sliced_wasserstein_matches_numpy(shape, soft):
  cams, labels, mask = random_case(shape[2] + soft, shape, soft=soft)
  cams *= 3
  directions = bl.random_directions(
    jax.random.key(shape[1]), shape[-1] + 1, shape[-1] - 1
  )
  got = jax.jit(
    functools.partial(
      bl.sliced_wasserstein, target_scale=4.0, spatial_scale=7.0
    )
  )(cams, labels, mask, directions)
  expected = np_sliced_wasserstein(cams, labels, mask, directions, 4.0, 7.0)
  np.testing.assert_allclose(got, expected, rtol=RTOL, atol=sum_atol(cams) / 10)


def test_sliced_wasserstein_zero_at_the_target_and_gradients():
  rng = np.random.default_rng(5)
  batch, height, width, classes = 2, 3, 4, 3
  mask = (rng.uniform(size=(batch, height, width)) < 0.5).astype(np.float64)
  mask[:, 0, 0] = 1
  labels = np.array([1, 2], np.int32)
  # M_y = t m / sum m and M_c = 0 elsewhere: every K_c equals the target.
  cams = np.zeros((batch, height, width, classes))
  for b, y in enumerate(labels):
    cams[b, ..., y] = 5.0 * mask[b] / mask[b].sum()
  directions = np.asarray(
    bl.random_directions(jax.random.key(0), 4, 2),
    np.float64,
  )
  with jax.enable_x64():
    np.testing.assert_allclose(
      bl.sliced_wasserstein(cams, labels, mask, directions), 0.0, atol=1e-12
    )
    noisy = cams + rng.normal(size=cams.shape)
    check_grads(
      lambda c: bl.sliced_wasserstein(c, labels, mask, directions).sum(),
      (noisy,),
      order=1,
      atol=1e-5,
    )


def test_random_directions_are_unit_vectors():
  d = bl.random_directions(jax.random.key(3), 16, 5)
  chex.assert_shape(d, (16, 5))
  np.testing.assert_allclose(np.linalg.norm(d, axis=1), 1.0, rtol=1e-6)


def test_ace_swd_objective_draws_directions_from_the_key():
  cams, labels, mask = random_case(6, (2, 4, 4, 3))
  objective = objectives.create(
    {
      'name': 'ace_swd',
      'swd_weight': 2.0,
      'swd_directions': 5,
      'log_all_terms': False,
    }
  )
  assert objective.needs_rng
  rng = jax.random.key(11)
  loss, metrics, _ = objective(
    objectives.StepInputs(cams.sum((1, 2)), cams, labels, mask, rng=rng)
  )
  directions = bl.random_directions(rng, 5, 2)
  swd = np_sliced_wasserstein(cams, labels, mask, directions, 5.0, 10.0)
  ace = losses.ablated_cross_entropy(cams, labels, mask)
  np.testing.assert_allclose(metrics['swd'], swd.mean(), rtol=RTOL, atol=1e-6)
  np.testing.assert_allclose(
    loss, np.mean(ace) + 2.0 * swd.mean(), rtol=RTOL, atol=1e-6
  )


# ---------------------------------------------------------------------------
# Contrastive CutMix
# ---------------------------------------------------------------------------


def cutmix_case(seed, batch=6, side=4, stride=4, classes=3):
  rng = np.random.default_rng(seed)
  images = rng.uniform(size=(batch, side * stride, side * stride, 3))
  labels = rng.integers(0, classes, batch).astype(np.int32)
  mask = (rng.uniform(size=(batch, side, side)) < 0.5).astype(np.float32)
  return images.astype(np.float32), labels, mask


@pytest.mark.parametrize('seed,alpha', [(0, 1.0), (1, 0.3)])
def test_cutmix_ids_areas_and_images_agree(seed, alpha):
  images, labels, mask = cutmix_case(seed)
  rng = jax.random.key(seed)
  out = jax.jit(functools.partial(cutmix.contrastive_cutmix, alpha=alpha))(
    rng, images, labels, mask
  )
  in_box, _ = jax.jit(cutmix.sample_boxes, static_argnums=(1, 2, 3, 4))(
    rng, 6, 4, 4, alpha
  )
  in_box = np.asarray(in_box)
  assert in_box.any() and not in_box.all(), 'boxes should vary'
  ids = np.where(mask >= 0.5, labels[:, None, None], -1)
  for i in range(6):
    j = (i - 1) % 6
    box = in_box[i]
    class_mask = np.asarray(out['class_mask'][i])
    # Ids: the partner's inside the box, the image's own outside.
    np.testing.assert_array_equal(class_mask[box], ids[j][box])
    np.testing.assert_array_equal(class_mask[~box], ids[i][~box])
    # Images: the same box, scaled by the stride.
    pixels = np.kron(box, np.ones((4, 4), bool))
    np.testing.assert_array_equal(out['image'][i][pixels], images[j][pixels])
    np.testing.assert_array_equal(out['image'][i][~pixels], images[i][~pixels])
    # Labels: the larger area is the reference, weight = the smaller area.
    area = box.mean()
    ref, other = (
      (labels[i], labels[j]) if area <= 0.5 else (labels[j], labels[i])
    )
    assert out['label'][i] == ref and out['other_label'][i] == other
    expected_w = min(area, 1 - area) if ref != other else 0.0
    np.testing.assert_allclose(out['other_weight'][i], expected_w, rtol=1e-6)
    np.testing.assert_array_equal(out['mask'][i], class_mask == ref)
    np.testing.assert_array_equal(
      out['other_mask'][i], (class_mask >= 0) & (class_mask != ref)
    )
  # A box is a rectangle: its rows and columns form contiguous runs.
  for box in in_box:
    rows, cols = np.flatnonzero(box.any(1)), np.flatnonzero(box.any(0))
    if rows.size:
      assert box[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].all()
      assert box.sum() == rows.size * cols.size


def test_cutmix_box_sizes_follow_lambda():
  rng = jax.random.key(7)
  in_box, lam = jax.jit(cutmix.sample_boxes, static_argnums=(1, 2, 3, 4))(
    rng, 400, 14, 14, 1.0
  )
  in_box, lam = np.asarray(in_box), np.asarray(lam)
  half = np.floor(0.5 * np.sqrt(1 - lam) * 14)
  # Clipping only shrinks a box of side 2 * half.
  assert (in_box.sum((1, 2)) <= (2 * half) ** 2).all()
  unclipped = (in_box.any(2).sum(1) == 2 * half) & (
    in_box.any(1).sum(1) == 2 * half
  )
  assert unclipped.mean() > 0.1
  # Beta(1, 1) areas: the mean pasted fraction is well inside (0, 1).
  assert 0.05 < in_box.mean() < 0.5


def test_cutmix_rejects_mismatched_sides():
  with pytest.raises(ValueError, match='multiples of the mask sides'):
    cutmix.contrastive_cutmix(
      jax.random.key(0),
      np.zeros((2, 10, 10, 3)),
      np.zeros(2, np.int32),
      np.zeros((2, 4, 4)),
    )


def np_cutmix_ace(cams, ref, m, other, m_o, w):
  """The original's form: logits a_c = sum -K m + |K| (1 - m) + (K - |K|) s_c,
  with s_c = m_o for c = o, and soft-target cross-entropy against
  (1 - w) onehot(ref) + w onehot(o)."""
  out = np.zeros(len(cams))
  c = cams.shape[-1]
  for b in range(len(cams)):
    k = np.asarray(cams[b], np.float64)
    k = k[..., ref[b]][..., None] - k
    mm = np.asarray(m[b], np.float64)[..., None]
    sparse = np.zeros_like(k)
    sparse[..., other[b]] = m_o[b]
    a = (-k * mm + np.abs(k) * (1 - mm) + (k - np.abs(k)) * sparse).sum((0, 1))
    t = np.zeros(c)
    t[ref[b]] += 1 - w[b]
    t[other[b]] += w[b]
    out[b] = -(t * np_log_softmax(a)).sum()
  return out


@pytest.mark.parametrize('shape', SHAPES[1:])
def test_cutmix_ace_matches_the_original_form(shape):
  cams, labels, mask = random_case(shape[1], shape)
  cams *= 3
  images = np.zeros((shape[0], 2 * shape[1], 2 * shape[2], 3), np.float32)
  out = jax.jit(cutmix.contrastive_cutmix)(
    jax.random.key(shape[1]), images, labels, mask
  )
  args = [
    np.asarray(out[k])
    for k in ('label', 'mask', 'other_label', 'other_mask', 'other_weight')
  ]
  got = jax.jit(cutmix.cutmix_ablated_cross_entropy)(cams, *args)
  expected = np_cutmix_ace(cams, *args)
  np.testing.assert_allclose(got, expected, rtol=RTOL, atol=sum_atol(cams) / 10)


def test_cutmix_ace_without_a_paste_is_ace():
  cams, labels, mask = random_case(8, (3, 5, 5, 4))
  got = cutmix.cutmix_ablated_cross_entropy(
    cams, labels, mask, (labels + 1) % 4, np.zeros_like(mask), np.zeros(3)
  )
  np.testing.assert_allclose(
    got, losses.ablated_cross_entropy(cams, labels, mask), rtol=1e-6
  )


def test_cutmix_ace_rewards_the_pasted_class_winning_on_its_pixels():
  # One pasted cell of class 1 (label weight w) in an image of class 0: its
  # contrast enters d_1 with its sign, so raising class 1's map there lowers
  # the loss (plain ACE penalises it as background) until p_1 = w, i.e.
  # d_1 = log((1 - w) / w).
  mask = np.array([[[1, 0], [0, 0]]], np.float32)
  other_mask = np.array([[[0, 1], [0, 0]]], np.float32)
  w = 0.25

  def cams_with(rise):
    return jnp.zeros((1, 2, 2, 2)).at[0, 0, 1, 1].set(rise)

  def mixed(rise):
    return cutmix.cutmix_ablated_cross_entropy(
      cams_with(rise),
      np.array([0]),
      mask,
      np.array([1]),
      other_mask,
      np.array([w], np.float32),
    )[0]

  def plain(rise):
    return losses.ablated_cross_entropy(cams_with(rise), np.array([0]), mask)[0]

  assert jax.grad(mixed)(0.5) < 0 < jax.grad(plain)(0.5)
  np.testing.assert_allclose(
    jax.grad(mixed)(float(np.log((1 - w) / w))), 0.0, atol=1e-6
  )


# ---------------------------------------------------------------------------
# The registry
# ---------------------------------------------------------------------------


def test_registry_supervision():
  expected = {
    'ce': (),
    'ace': ('mask',),
    'ace_kld': ('mask',),
    'ce_kld': ('mask',),
    'rrr': ('pixel_mask',),
    'ce_bg_cam': ('mask',),
    'group_dro': ('group',),
    'ce_reweighted': ('group',),
    'ace_swd': ('mask',),
    'energy': ('mask',),
    'bce': (),
    'ace_bce': ('mask',),
  }
  assert {n: objectives.supervision(n) for n in objectives.names()} == expected


@pytest.mark.parametrize(
  'name,options,match',
  [
    ('ce', {'cutmix_alpha': 1.0}, r'option of the ACE objectives \(ace, '),
    ('rrr', {'cutmix_alpha': 1.0}, 'option of the ACE'),
    ('ce_kld', {'cutmix_alpha': 1.0}, 'option of the ACE'),
    ('group_dro', {}, 'group_counts'),
    ('ce_reweighted', {'group_counts': (0, 0)}, 'all 0'),
    ('group_dro', {'group_counts': (1, 1), 'dro_step_size': -1.0}, '>= 0'),
    ('energy', {'energy_weight': -0.1}, 'energy_weight must be >= 0'),
  ],
)
def test_bad_options(name, options, match):
  with pytest.raises(ValueError, match=match):
    objectives.create({'name': name, **options})


def test_cutmix_is_an_option_of_every_ace_objective():
  for name in ('ace', 'ace_kld', 'ace_swd'):
    objective = objectives.create({'name': name, 'cutmix_alpha': 1.0})
    assert objective.needs_rng and objective.cutmix_alpha == 1.0


def test_missing_supervision_is_named():
  objective = objectives.create({'name': 'rrr'})
  with pytest.raises(
    ValueError, match=r"needs batch\['pixel_mask'\].*data.pixel_masks=True"
  ):
    objective.check_batch({'image': 0, 'label': 0, 'mask': 0})


# ---------------------------------------------------------------------------
# Train steps under pmap (4 virtual devices)
# ---------------------------------------------------------------------------

NUM_CLASSES = 3
IMAGE_SIZE = 32
CAM_HW = (8, 8)


class TinyCamNet(nn.Module):
  """Conv (stride 4), synchronised BatchNorm, ReLU and a per-pixel head: the
  train step's model interface (logits and exact maps) at a fraction of a
  ResNet's compile time."""

  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.Conv(4, (4, 4), strides=(4, 4))(x)
    x = nn.BatchNorm(
      use_running_average=not train, axis_name=self.bn_axis_name
    )(x)
    cams = nn.Dense(NUM_CLASSES, use_bias=False)(nn.relu(x)) / 64.0
    return cams.sum((1, 2)), cams


def _model(axis_name):
  return TinyCamNet(bn_axis_name=axis_name)


def _batch(seed, batch_size, cam_hw):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, NUM_CLASSES, batch_size).astype(np.int32)
  images = rng.uniform(0, 1, (batch_size, IMAGE_SIZE, IMAGE_SIZE, 3))
  images[:, :16, :16, :] = (labels / NUM_CLASSES)[:, None, None, None]
  mask = np.zeros((batch_size,) + cam_hw, np.float32)
  mask[:, : cam_hw[0] // 2, : cam_hw[1] // 2] = 1.0
  pixel_mask = np.zeros((batch_size, IMAGE_SIZE, IMAGE_SIZE), np.float32)
  pixel_mask[:, :16, :16] = 1.0
  return {
    'image': images.astype(np.float32),
    'label': labels,
    'mask': mask,
    'pixel_mask': pixel_mask,
    'group': (labels + rng.integers(0, 2, batch_size)).astype(np.int32) % 4,
  }


def _shard(batch):
  return step_lib.shard(
    jax.tree.map(lambda x: x.reshape((4, -1) + x.shape[1:]), batch)
  )


STEP_OBJECTIVES = {
  'rrr': {'name': 'rrr', 'rrr_weight': 1.0},
  'ce_bg_cam': {'name': 'ce_bg_cam', 'bg_cam_weight': 0.1},
  'group_dro': {
    'name': 'group_dro',
    'dro_step_size': 0.5,
    'group_counts': (4, 3, 2, 1),
  },
  'ce_reweighted': {'name': 'ce_reweighted', 'group_counts': (4, 3, 2, 1)},
  'ace_swd': {'name': 'ace_swd', 'swd_weight': 1.0},
  'ace_cutmix': {'name': 'ace', 'cutmix_alpha': 1.0},
}


@pytest.mark.parametrize('name', sorted(STEP_OBJECTIVES))
def test_pmapped_steps_with_each_objective(name):
  model = _model(step_lib.AXIS_NAME)
  objective = objectives.create(STEP_OBJECTIVES[name], seed=3)
  state = step_lib.create_train_state(
    jax.random.key(0),
    model,
    IMAGE_SIZE,
    optax.adam(1e-2),
    objective_state=objective.init_state(),
  )
  cam_hw = CAM_HW
  p_step = step_lib.pmapped_train_step(objective)
  state = step_lib.replicate(state)
  batch = _shard(_batch(1, 16, cam_hw))
  seen = []
  for _ in range(6):
    state, metrics = p_step(state, batch)
    seen.append(float(metrics['loss'][0]))
    assert float(metrics['nonfinite'][0]) == 0.0, name
  assert np.isfinite(seen).all() and min(seen[1:]) < seen[0], seen
  for leaf in jax.tree.leaves((state.params, state.group_weights)):
    leaf = np.asarray(leaf)
    for replica in leaf[1:]:
      np.testing.assert_array_equal(replica, leaf[0])
  if name == 'group_dro':
    q = np.asarray(state.group_weights[0])
    np.testing.assert_allclose(q.sum(), 1.0, rtol=1e-6)
    assert np.abs(q - 0.25).max() > 1e-4, q
  else:
    assert state.group_weights is None


def test_rrr_pmapped_step_equals_single_device_whole_batch():
  objective = objectives.create({'name': 'rrr', 'rrr_weight': 10.0})
  tx = optax.sgd(0.1)
  model = _model(step_lib.AXIS_NAME)
  batch = _batch(2, 8, CAM_HW)
  state = step_lib.create_train_state(jax.random.key(0), model, IMAGE_SIZE, tx)
  p_state, p_metrics = jax.pmap(
    functools.partial(step_lib.train_step, objective=objective),
    axis_name=step_lib.AXIS_NAME,
  )(step_lib.replicate(state), _shard(batch))
  single = step_lib.create_train_state(
    jax.random.key(0), _model(None), IMAGE_SIZE, tx
  )
  s_state, s_metrics = jax.jit(
    functools.partial(step_lib.train_step, objective=objective, axis_name=None)
  )(single, batch)
  assert float(s_metrics['rrr']) > 0
  np.testing.assert_allclose(p_metrics['rrr'][0], s_metrics['rrr'], rtol=1e-4)
  chex.assert_trees_all_close(
    step_lib.unreplicate(p_state.params), s_state.params, rtol=1e-4, atol=1e-6
  )


def test_config_loss_section_is_the_objectives_keys():
  from experiments.configs import pets  # pylint: disable=g-import-not-at-top

  config = pets.get_config('cpu')
  keys = {
    k for n in objectives.names() for k in objectives.get(n).config_keys()
  }
  assert set(config.loss) - {'name', 'log_all_terms'} == keys
  with config.unlocked():
    config.loss.name = 'group_dro'
    config.loss.group_counts = [4, 0, 2]
    config.loss.dro_step_size = 3.0
  objective = objectives.create(config.loss)
  assert objective.group_counts == (4, 0, 2) and objective.dro_step_size == 3.0
  assert objective.ce_weight == config.loss.ce_weight
  monitor = objective.monitors[1]
  assert (
    monitor.name == 'ace_kld' and monitor.kld_weight == config.loss.kld_weight
  )


@pytest.mark.parametrize('name', objectives.names())
def test_every_registered_objective_keeps_the_interface(name):
  # The contract the train step relies on, for any objective registered.
  cls = objectives.get(name)
  assert issubclass(cls, objectives.Objective) and cls.name == name
  assert set(cls.supervision) <= set(objectives.core.SUPERVISION_FIXES)
  objective = objectives.create({'name': name, 'group_counts': (2, 3)})
  cams, labels, mask = random_case(4, (4, 3, 3, 3))
  batch = {
    'pixel_mask': np.ones((4, 6, 6), np.float32),
    'group': np.array([0, 1, 1, 0], np.int32),
  }
  x = objectives.StepInputs(
    cams.sum((1, 2)),
    cams,
    labels,
    mask,
    batch=batch,
    input_grads=np.ones((4, 6, 6, 3), np.float32),
    state=objective.init_state(),
    rng=jax.random.key(0),
  )
  per_example = objective.per_example_losses(x)
  assert set(per_example) == set(objective.coefficients)
  for value in per_example.values():
    chex.assert_shape(value, (4,))
  loss, metrics, _ = objective(x)
  chex.assert_shape(loss, ())
  assert {'ce', 'ace', 'kld', 'loss'} | set(per_example) <= set(metrics)
  expected = sum(c * metrics[t] for t, c in objective.coefficients.items())
  np.testing.assert_allclose(loss, expected, rtol=1e-6)


def test_evaluation_libraries_do_not_import_the_objectives():
  # metrics, cams and models serve evaluation and inference: importing them
  # must not load the training objectives or their losses.
  code = (
    'import sys\n'
    'import cco_jax.cams, cco_jax.metrics, cco_jax.models\n'
    'training = ("cco_jax.objectives", "cco_jax.losses",'
    ' "cco_jax.baseline_losses", "cco_jax.cutmix")\n'
    'print(sorted(m for m in sys.modules if m.startswith(training)))\n'
  )
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  out = subprocess.run(
    [sys.executable, '-c', code], env=env, capture_output=True, text=True
  )
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == '[]', out.stdout
