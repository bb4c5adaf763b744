"""The Energy loss (`cco_jax.objectives.energy`): float64 reference, gradients,
properties, and training through the real step and the real entry point."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from jax.test_util import check_grads
import numpy as np
import optax
import pytest

from cco_jax import configuration
from cco_jax import metric_writers
from cco_jax import models
from cco_jax import objectives
from cco_jax import train
from cco_jax import train_step as step_lib
from cco_jax.objectives import energy
from experiments.configs import pets as pets_config

SHAPES = ((1, 1, 1, 2), (2, 3, 5, 4), (3, 7, 7, 2), (5, 6, 4, 5))
energy_jit = jax.jit(energy.energy_loss)


def random_case(seed, shape, soft=True):
  rng = np.random.default_rng(seed)
  cams = rng.normal(size=shape).astype(np.float32)
  labels = rng.integers(0, shape[-1], shape[0]).astype(np.int32)
  mask = rng.uniform(size=shape[:3])
  mask = (mask if soft else mask < 0.5).astype(np.float32)
  return cams, labels, mask


def np_energy(cams, labels, mask, eps=energy.EPS):
  """Loops in float64: 1 - (mask-weighted positive evidence) / evidence."""
  out = np.zeros(cams.shape[0])
  for b, y in enumerate(labels):
    inside = total = 0.0
    for i, j in np.ndindex(cams.shape[1:3]):
      evidence = max(float(cams[b, i, j, y]), 0.0)
      inside += float(mask[b, i, j]) * evidence
      total += evidence
    out[b] = 1.0 - inside / max(total, eps)
  return out


@pytest.mark.parametrize('shape', SHAPES)
@pytest.mark.parametrize('soft', [True, False])
def test_matches_float64_reference(shape, soft):
  cams, labels, mask = random_case(sum(shape), shape, soft)
  got = energy_jit(cams, labels, mask)
  chex.assert_shape(got, (shape[0],))
  np.testing.assert_allclose(
    got, np_energy(cams, labels, mask), rtol=1e-5, atol=1e-6
  )
  with jax.enable_x64():
    got64 = energy.energy_loss(
      cams.astype(np.float64), labels, mask.astype(np.float64)
    )
    np.testing.assert_allclose(got64, np_energy(cams, labels, mask), rtol=1e-12)


def test_docstring_example():
  cams = jnp.array([1.0, 3.0, -2.0, 0.0]).reshape(1, 2, 2, 1)
  mask = jnp.array([[[1.0, 0.0], [1.0, 1.0]]])
  np.testing.assert_allclose(
    energy.energy_loss(cams, jnp.array([0]), mask), [0.75], rtol=1e-7
  )


@pytest.mark.parametrize('shape', SHAPES[1:])
def test_gradients_match_finite_differences(shape):
  cams, labels, mask = random_case(7, shape)
  # Keep entries away from relu's kink so finite differences do not cross it.
  cams = np.where(np.abs(cams) < 0.1, 0.5, cams)
  with jax.enable_x64():
    check_grads(
      lambda c: energy.energy_loss(c, labels, mask.astype(np.float64)),
      (cams.astype(np.float64),),
      order=2,
      modes=('fwd', 'rev'),
    )


def test_all_ones_mask_gives_zero():
  cams, labels, _ = random_case(1, (4, 5, 5, 3))
  got = energy_jit(cams, labels, np.ones((4, 5, 5), np.float32))
  np.testing.assert_array_equal(got, np.zeros(4))


def test_evidence_entirely_outside_gives_one():
  cams, labels, _ = random_case(2, (4, 5, 5, 3))
  target = np.take_along_axis(cams, labels[:, None, None, None], -1)[..., 0]
  outside = (target <= 0).astype(np.float32)  # The mask misses all evidence.
  np.testing.assert_array_equal(energy_jit(cams, labels, outside), np.ones(4))


def test_no_positive_evidence_gives_one_and_a_finite_gradient():
  cams = -np.abs(random_case(3, (2, 4, 4, 3))[0])
  labels, mask = np.array([0, 2]), np.ones((2, 4, 4), np.float32)
  np.testing.assert_array_equal(energy_jit(cams, labels, mask), [1.0, 1.0])
  grad = jax.grad(lambda c: energy.energy_loss(c, labels, mask).sum())(cams)
  np.testing.assert_array_equal(grad, np.zeros_like(cams))


@pytest.mark.parametrize('scale', [1e-3, 0.5, 7.0, 1e4])
def test_invariant_to_scaling_the_map(scale):
  cams, labels, mask = random_case(4, (3, 6, 6, 4))
  np.testing.assert_allclose(
    energy_jit(scale * cams, labels, mask),
    energy_jit(cams, labels, mask),
    rtol=1e-5,
  )


def test_reads_only_the_target_class_and_lies_in_unit_interval():
  cams, labels, mask = random_case(5, (6, 4, 4, 3))
  got = energy_jit(cams, labels, mask)
  assert ((got >= 0) & (got <= 1)).all()
  others = cams.copy()
  for b, y in enumerate(labels):
    others[b, ..., [c for c in range(3) if c != y]] *= -3.0
  np.testing.assert_array_equal(energy_jit(others, labels, mask), got)


def test_shape_errors_are_named():
  cams, labels, mask = random_case(6, (2, 4, 4, 3))
  with pytest.raises(ValueError, match='CAM resolution'):
    energy.energy_loss(cams, labels, np.ones((2, 8, 8), np.float32))
  with pytest.raises(ValueError, match=r'\[0, 1\]'):
    energy.energy_loss(cams, labels, 255 * mask)


def test_objective_is_ce_plus_weighted_energy():
  cams, labels, mask = random_case(8, (4, 5, 5, 3))
  logits = cams.sum((1, 2))
  objective = objectives.create(
    {'name': 'energy', 'energy_weight': 0.3, 'ce_weight': 0.9}
  )
  assert objective.supervision == ('mask',)
  loss, metrics, state = objective(
    objectives.StepInputs(logits, cams, labels, mask)
  )
  log_p = logits - np.log(np.exp(logits.astype(np.float64)).sum(1))[:, None]
  ce = -log_p[np.arange(4), labels]
  expected = 0.9 * ce.mean() + 0.3 * np_energy(cams, labels, mask).mean()
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  assert state is None
  assert set(metrics) == {'ce', 'ace', 'kld', 'energy', 'loss'}


def test_default_weight_and_config_key():
  config = pets_config.get_config('cpu')
  assert config.loss.energy_weight == 0.05
  assert 'energy' in objectives.names()


# ---------------------------------------------------------------------------
# Training: 4 pmapped steps of the real train step, and the real entry point.
# ---------------------------------------------------------------------------

NUM_CLASSES, IMAGE_SIZE = 3, 32


def _batch(seed, batch_size, cam_hw):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, NUM_CLASSES, batch_size).astype(np.int32)
  images = rng.uniform(0, 1, (batch_size, IMAGE_SIZE, IMAGE_SIZE, 3))
  images[:, :12, :12, :] = (labels / NUM_CLASSES)[:, None, None, None]
  mask = np.zeros((batch_size,) + cam_hw, np.float32)
  mask[:, : cam_hw[0] // 2, : cam_hw[1] // 2] = 1.0
  return {
    'image': images.astype(np.float32),
    'label': labels,
    'mask': mask,
  }


def test_four_pmapped_steps_lower_the_energy():
  model = models.create_model(
    'resnet18',
    NUM_CLASSES,
    num_filters=4,
    stem='strided',
    stage_sizes=(1, 1, 1, 1),
    bn_axis_name=step_lib.AXIS_NAME,
  )
  objective = objectives.create({'name': 'energy', 'energy_weight': 5.0})
  state = step_lib.create_train_state(
    jax.random.key(0), model, IMAGE_SIZE, optax.adam(1e-2)
  )
  batch = _batch(0, 16, models.cam_size(model, IMAGE_SIZE))
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
    np.testing.assert_allclose(
      metrics['loss'], metrics['ce'] + 5.0 * metrics['energy'], rtol=1e-5
    )
    seen.append(float(metrics['energy']))
  assert seen[-1] < seen[0], seen
  for leaf in jax.tree.leaves(state.params):
    for replica in np.asarray(leaf)[1:]:
      np.testing.assert_array_equal(replica, np.asarray(leaf)[0])


def test_entry_point_trains_energy_for_four_steps(
  tmp_path, synthetic_pets_dir, synthetic_cvd_dir, synthetic_data_dir
):
  config = pets_config.get_config('cpu')
  with config.unlocked():
    config.data.manual_dir = str(synthetic_pets_dir)
    config.data.ood_manual_dir = str(synthetic_cvd_dir)
    config.data.tfds_data_dir = str(synthetic_data_dir)
    config.data.image_size = 32
    config.model.num_filters = 4
    config.batch_size = 8
    config.eval_batch_size = 16
    config.log_every_steps = 1
    config.eval_every_steps = 4
    config.num_figure_examples = 0
  config = configuration.apply_overrides(
    config, {'loss.name': 'energy', 'num_train_steps': 4}
  )
  train.train_and_evaluate(config, str(tmp_path))
  records = metric_writers.read_metrics(tmp_path)
  logged = [r for r in records if 'train_energy' in r]
  assert [r['step'] for r in logged] == [1, 2, 3, 4]
  for record in logged:
    assert 0.0 <= record['train_energy'] <= 1.0
    np.testing.assert_allclose(
      record['train_loss'],
      record['train_ce'] + 0.05 * record['train_energy'],
      rtol=1e-5,
    )
