"""Multi-label sigmoid heads (`cco_jax.objectives.binary`): `bce` and
`ace_bce` against float64 references, gradients, properties, the logit-sum
identity, class weights for every objective, and pmapped training steps."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from jax.test_util import check_grads
import numpy as np
import optax
import pytest

from cco_jax import errors
from cco_jax import losses
from cco_jax import models
from cco_jax import objectives
from cco_jax import train_step as step_lib

SHAPES = ((1, 1, 1, 2), (2, 3, 5, 4), (3, 7, 7, 2), (5, 6, 4, 5))


def random_case(seed, shape, multi_hot=True):
  rng = np.random.default_rng(seed)
  cams = rng.normal(size=shape).astype(np.float32)
  labels = rng.integers(0, shape[-1], shape[0]).astype(np.int32)
  targets = (rng.uniform(size=(shape[0], shape[-1])) < 0.4).astype(np.float32)
  if not multi_hot:
    targets = np.eye(shape[-1], dtype=np.float32)[labels]
  mask = (rng.uniform(size=shape[:3]) < 0.5).astype(np.float32)
  return cams, labels, targets, mask


def np_log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


def np_bce(logits, targets):
  """float64 loops: -t log sig(s) - (1 - t) log(1 - sig(s)), mean over C."""
  logits, targets = np.float64(logits), np.float64(targets)
  out = np.zeros(len(logits))
  for b in range(len(logits)):
    for c in range(logits.shape[1]):
      s, t = logits[b, c], targets[b, c]
      out[b] -= t * np_log_sigmoid(s) + (1 - t) * np_log_sigmoid(-s)
    out[b] /= logits.shape[1]
  return out


def np_ace_bce(cams, targets, mask):
  """float64 loops over pixels: z_ab = sum m M - sum |(1 - m) M|, z = sum M."""
  cams, targets, mask = np.float64(cams), np.float64(targets), np.float64(mask)
  batch, height, width, num_classes = cams.shape
  out = np.zeros(batch)
  for b in range(batch):
    for c in range(num_classes):
      ablated = total = 0.0
      for i in range(height):
        for j in range(width):
          m, value = mask[b, i, j], cams[b, i, j, c]
          ablated += m * value - abs((1 - m) * value)
          total += value
      t = targets[b, c]
      out[b] -= t * np_log_sigmoid(ablated) + (1 - t) * np_log_sigmoid(-total)
    out[b] /= num_classes
  return out


def run_objective(config, cams, labels, mask, targets=None, logits=None):
  objective = objectives.create(config)
  logits = cams.sum((1, 2)) if logits is None else logits
  batch = {} if targets is None else {'targets': targets}
  return objective(
    objectives.StepInputs(logits, cams, labels, mask, batch=batch)
  )


@pytest.mark.parametrize('shape', SHAPES)
@pytest.mark.parametrize('multi_hot', [True, False])
def test_objectives_match_float64_references(shape, multi_hot):
  cams, labels, targets, mask = random_case(sum(shape), shape, multi_hot)
  logits = cams.astype(np.float64).sum((1, 2))
  given = targets if multi_hot else None  # One-hot: from the labels.
  loss, metrics, _ = run_objective({'name': 'bce'}, cams, labels, mask, given)
  np.testing.assert_allclose(loss, np_bce(logits, targets).mean(), rtol=2e-5)
  loss, metrics, _ = run_objective(
    {'name': 'ace_bce', 'bce_weight': 0.7}, cams, labels, mask, given
  )
  expected = 0.7 * np_ace_bce(cams, targets, mask).mean()
  np.testing.assert_allclose(loss, expected, rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(metrics['ace_bce'], expected / 0.7, rtol=2e-5)
  assert {'ce', 'ace', 'kld', 'ace_bce', 'loss'} == set(metrics)


@pytest.mark.parametrize('shape', SHAPES[1:])
def test_float64_gradients_match_finite_differences(shape):
  cams, labels, targets, mask = random_case(7 + sum(shape), shape)
  soft = np.random.default_rng(1).uniform(size=mask.shape)
  with jax.enable_x64():
    for name in ('bce', 'ace_bce'):
      objective = objectives.create({'name': name, 'log_all_terms': False})

      def loss(c, objective=objective):
        inputs = objectives.StepInputs(
          c.sum((1, 2)), c, labels, soft, batch={'targets': targets}
        )
        return objective(inputs)[0]

      check_grads(loss, (jnp.asarray(cams, jnp.float64),), order=1)
      # And the float64 value is the reference's to 1e-12.
      value = loss(jnp.asarray(cams, jnp.float64))
      reference = (
        np_bce(cams.astype(np.float64).sum((1, 2)), targets)
        if name == 'bce'
        else np_ace_bce(cams, targets, soft)
      ).mean()
      np.testing.assert_allclose(value, reference, rtol=1e-12)


def test_all_ones_mask_makes_ace_bce_the_bce_of_the_logits():
  cams, labels, targets, _ = random_case(3, (4, 5, 5, 3))
  ones = np.ones(cams.shape[:3], np.float32)
  ace = run_objective({'name': 'ace_bce'}, cams, labels, ones, targets)[0]
  bce = run_objective({'name': 'bce'}, cams, labels, ones, targets)[0]
  np.testing.assert_allclose(ace, bce, rtol=1e-5)


def test_ablation_charges_background_evidence_of_positive_classes():
  cams, labels, targets, mask = random_case(4, (6, 4, 4, 3))
  ace = losses.ablated_binary_cross_entropy(
    cams, targets, np.broadcast_to(mask[..., None], cams.shape)
  )
  bce = losses.binary_cross_entropy(cams.sum((1, 2)), targets)
  assert np.all(np.asarray(ace) >= np.asarray(bce) - 1e-6)
  # Moving a positive class's evidence from the object to the skin hurts.
  positive = np.zeros_like(cams)
  positive[..., 0] = np.abs(cams[..., 0])
  inside = np.ones_like(mask)
  outside = np.zeros_like(mask)
  one = np.zeros_like(targets)
  one[:, 0] = 1
  on_object = run_objective({'name': 'ace_bce'}, positive, labels, inside, one)
  on_skin = run_objective({'name': 'ace_bce'}, positive, labels, outside, one)
  assert on_skin[0] > on_object[0] + 0.1


def test_sigmoid_head_is_declared_and_shapes_are_named():
  assert objectives.head('bce') == objectives.head('ace_bce') == 'sigmoid'
  assert objectives.head('ce') == objectives.head('ace_kld') == 'softmax'
  assert objectives.supervision('ace_bce') == ('mask',)
  with pytest.raises(ValueError, match=r'targets has shape \(2, 4\)'):
    losses.binary_cross_entropy(np.zeros((2, 3)), np.zeros((2, 4)))
  chex.assert_shape(
    losses.binary_cross_entropy(np.zeros((5, 3)), np.zeros((5, 3))), (5,)
  )


# ---------------------------------------------------------------------------
# Class weights: every objective, against the hand-weighted reference.
# ---------------------------------------------------------------------------

COUNTS = (30, 10, 0, 60)


def hand_weights(counts):
  """w_c = n / (C' n_c) over the C' present classes, 0 for absent ones."""
  n, present = sum(counts), sum(1 for c in counts if c)
  return np.array([n / (present * c) if c else 0.0 for c in counts])


@pytest.mark.parametrize(
  'name', ['ce', 'ace', 'ace_kld', 'bce', 'ace_bce', 'energy', 'ce_bg_cam']
)
def test_inverse_frequency_weights_match_the_hand_weighted_loss(name):
  cams, labels, _, mask = random_case(11, (8, 5, 5, 4), multi_hot=False)
  labels = np.array([0, 1, 3, 3, 0, 1, 3, 0], np.int32)
  plain = objectives.create({'name': name, 'log_all_terms': False})
  inputs = objectives.StepInputs(cams.sum((1, 2)), cams, labels, mask)
  per_example = {
    k: np.asarray(v, np.float64)
    for k, v in plain.per_example_losses(inputs).items()
  }
  weights = hand_weights(COUNTS)[labels]
  expected = sum(
    plain.coefficients[k] * (weights * v).mean() for k, v in per_example.items()
  )
  weighted = objectives.create(
    {
      'name': name,
      'log_all_terms': False,
      'class_weights': 'inverse_frequency',
      'class_counts': COUNTS,
    }
  )
  loss, metrics, _ = weighted(inputs)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  unweighted = sum(
    plain.coefficients[k] * v.mean() for k, v in per_example.items()
  )
  assert abs(float(loss) - unweighted) > 1e-4  # The weights did something.


def test_class_weights_are_checked():
  with pytest.raises(errors.UserError, match='class_weights'):
    objectives.create({'name': 'ce', 'class_weights': 'balanced'})
  with pytest.raises(errors.UserError, match='class_counts'):
    objectives.create({'name': 'ce', 'class_weights': 'inverse_frequency'})
  assert objectives.default_config('ce')['class_weights'] == 'none'


# ---------------------------------------------------------------------------
# The model is unchanged: identity exact, four pmapped steps learn.
# ---------------------------------------------------------------------------

NUM_CLASSES, IMAGE_SIZE = 3, 32


@pytest.mark.parametrize('name', ['bce', 'ace_bce'])
def test_four_pmapped_steps_lower_the_loss_and_keep_the_identity(name):
  model = models.create_model(
    'resnet18',
    NUM_CLASSES,
    num_filters=4,
    stem='strided',
    stage_sizes=(1, 1, 1, 1),
    bn_axis_name=step_lib.AXIS_NAME,
  )
  rng = np.random.default_rng(0)
  targets = (rng.uniform(size=(16, NUM_CLASSES)) < 0.5).astype(np.float32)
  images = rng.uniform(0, 1, (16, IMAGE_SIZE, IMAGE_SIZE, 3))
  images[:, :12, :12, :] = targets[:, None, None, :]  # Evidence on the object.
  cam_hw = models.cam_size(model, IMAGE_SIZE)
  mask = np.zeros((16,) + cam_hw, np.float32)
  mask[:, : cam_hw[0] // 2, : cam_hw[1] // 2] = 1.0
  batch = {
    'image': images.astype(np.float32),
    'label': targets.argmax(-1).astype(np.int32),
    'targets': targets,
    'mask': mask,
  }
  objective = objectives.create({'name': name})
  state = step_lib.create_train_state(
    jax.random.key(0), model, IMAGE_SIZE, optax.adam(1e-2)
  )
  sharded = step_lib.shard(
    jax.tree.map(lambda x: x.reshape((4, -1) + x.shape[1:]), batch)
  )
  p_step = step_lib.pmapped_train_step(objective)
  state = step_lib.replicate(state)
  seen = []
  for _ in range(4):
    state, metrics = p_step(state, sharded)
    metrics = step_lib.unreplicate(metrics)
    assert metrics['nonfinite'] == 0.0
    seen.append(float(metrics['loss']))
  assert seen[-1] < seen[0], seen
  single = step_lib.unreplicate(state)
  logits, cams = single.apply_fn(
    {'params': single.params, 'batch_stats': single.batch_stats},
    batch['image'],
    train=False,
  )
  assert 'bias' not in single.params['head']  # The faithful head.
  np.testing.assert_allclose(
    np.asarray(cams).sum((1, 2)), logits, rtol=1e-5, atol=1e-5
  )
  value = losses.binary_cross_entropy(logits, targets)
  assert np.all(np.isfinite(value))
