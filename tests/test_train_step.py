"""The pmapped train step on 4 virtual CPU devices, and checkpoint round trips."""

import dataclasses
import functools

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cco_jax import checkpointing
from cco_jax import losses
from cco_jax import models
from cco_jax import objectives
from cco_jax import train_step as step_lib

NUM_CLASSES = 3
IMAGE_SIZE = 32


def _model(axis_name):
  return models.create_model(
    'resnet18',
    NUM_CLASSES,
    num_filters=4,
    stem='strided',
    stage_sizes=(1, 1, 1, 1),
    bn_axis_name=axis_name,
  )


def _batch(seed, batch_size, cam_hw):
  """Images whose class is written in a corner the mask covers: learnable."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, NUM_CLASSES, batch_size).astype(np.int32)
  images = rng.uniform(0, 1, (batch_size, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(
    np.float32
  )
  images[:, :12, :12, :] = labels[:, None, None, None] / NUM_CLASSES
  mask = np.zeros((batch_size,) + cam_hw, np.float32)
  mask[:, : cam_hw[0] // 2, : cam_hw[1] // 2] = 1.0
  return {'image': images, 'label': labels, 'mask': mask}


def _shard(batch, devices):
  return step_lib.shard(
    jax.tree.map(lambda x: x.reshape((devices, -1) + x.shape[1:]), batch)
  )


@pytest.fixture(scope='module')
def setup():
  assert jax.local_device_count() == 4, 'tests/conftest.py sets 4 CPU devices'
  model = _model(step_lib.AXIS_NAME)
  tx = optax.adam(1e-2)
  state = step_lib.create_train_state(jax.random.key(0), model, IMAGE_SIZE, tx)
  cam_hw = models.cam_size(model, IMAGE_SIZE)
  objective = objectives.create({'name': 'ace_kld'})
  return model, tx, state, cam_hw, objective


def test_pmapped_step_equals_single_device_whole_batch(setup):
  # SGD: parameter differences are then linear in gradient differences (Adam's
  # first step is ~lr * sign(g), which amplifies rounding where g ~ 0).
  _, _, _, cam_hw, objective = setup
  tx = optax.sgd(0.1)
  state = step_lib.create_train_state(
    jax.random.key(0), _model(step_lib.AXIS_NAME), IMAGE_SIZE, tx
  )
  batch = _batch(0, 8, cam_hw)
  p_step = jax.pmap(
    functools.partial(step_lib.train_step, objective=objective),
    axis_name=step_lib.AXIS_NAME,
  )
  p_state, p_metrics = p_step(step_lib.replicate(state), _shard(batch, 4))

  single = step_lib.create_train_state(
    jax.random.key(0), _model(None), IMAGE_SIZE, tx
  )
  s_state, s_metrics = jax.jit(
    functools.partial(step_lib.train_step, objective=objective, axis_name=None)
  )(single, batch)

  # Float32 sums reassociated across shards: agreement to ~1e-5 relative.
  chex.assert_trees_all_close(
    step_lib.unreplicate(p_state.params), s_state.params, rtol=1e-4, atol=1e-6
  )
  chex.assert_trees_all_close(
    step_lib.unreplicate(p_state.batch_stats),
    s_state.batch_stats,
    rtol=1e-4,
    atol=1e-6,
  )
  for key in ('loss', 'ce', 'ace', 'kld', 'accuracy'):
    np.testing.assert_allclose(
      p_metrics[key][0], s_metrics[key], rtol=1e-4, atol=1e-6
    )


def test_replicas_stay_identical_and_loss_falls(setup):
  _, _, state, cam_hw, objective = setup
  p_step = step_lib.pmapped_train_step(objective)
  state = step_lib.replicate(state)
  batch = _shard(_batch(1, 16, cam_hw), 4)
  losses_seen = []
  for _ in range(15):
    state, metrics = p_step(state, batch)
    losses_seen.append(float(metrics['loss'][0]))
  for tree in (state.params, state.batch_stats, state.opt_state):
    for leaf in jax.tree.leaves(tree):
      leaf = np.asarray(leaf)
      for replica in leaf[1:]:
        np.testing.assert_array_equal(replica, leaf[0])
  assert int(state.step[0]) == 15
  assert losses_seen[-1] < 0.7 * losses_seen[0], losses_seen


def test_step_does_not_retrace(setup):
  _, _, state, cam_hw, objective = setup

  @chex.assert_max_traces(n=1)
  def step(state, batch):
    return step_lib.train_step(state, batch, objective=objective)

  p_step = jax.pmap(step, axis_name=step_lib.AXIS_NAME)
  state = step_lib.replicate(state)
  for seed in range(3):
    state, _ = p_step(state, _shard(_batch(seed, 8, cam_hw), 4))


def test_nonfinite_loss_leaves_state_unchanged(setup):
  _, _, state, cam_hw, objective = setup
  batch = _batch(2, 8, cam_hw)
  batch['image'][0, 0, 0, 0] = np.nan
  p_step = jax.pmap(
    functools.partial(step_lib.train_step, objective=objective),
    axis_name=step_lib.AXIS_NAME,
  )
  replicated = step_lib.replicate(state)
  new_state, metrics = p_step(replicated, _shard(batch, 4))
  assert float(metrics['nonfinite'][0]) == 1.0
  chex.assert_trees_all_equal(
    step_lib.unreplicate(new_state.params), state.params
  )


def test_eval_step_counts_padding_and_identity(setup):
  _, _, state, cam_hw, _ = setup
  batch = _batch(3, 8, cam_hw)
  batch['weight'] = np.array([1, 1, 1, 1, 1, 0, 0, 0], np.float32)
  sums = step_lib.pmapped_eval_step()(
    step_lib.replicate(state), _shard(batch, 4)
  )
  sums = jax.tree.map(lambda x: np.asarray(x[0]), sums)
  assert sums['count'] == 5
  assert 0 <= sums['correct'] <= 5
  np.testing.assert_allclose(sums['net'], sums['fg'] + sums['bg'], rtol=1e-5)
  assert sums['identity_error'] < 1e-5


def test_checkpoint_round_trip_is_exact_and_device_independent(setup, tmp_path):
  _, _, state, cam_hw, objective = setup
  p_step = step_lib.pmapped_train_step(objective)
  replicated, _ = p_step(
    step_lib.replicate(state), _shard(_batch(4, 8, cam_hw), 4)
  )
  trained = step_lib.unreplicate(replicated)
  manager = checkpointing.create_manager(str(tmp_path), keep=2)
  rng = jax.random.key(7)
  checkpointing.save(
    manager,
    1,
    trained,
    rng,
    {'position': 5, 'epoch': 0},
    {'eval_accuracy': 0.5},
  )
  restored, rng2, data_state, step = checkpointing.restore(manager, state)
  assert step == 1 and data_state == {'position': 5, 'epoch': 0}
  chex.assert_trees_all_equal(restored.params, trained.params)
  chex.assert_trees_all_equal(restored.batch_stats, trained.batch_stats)
  chex.assert_trees_all_equal(restored.opt_state, trained.opt_state)
  assert int(restored.step) == int(trained.step)
  np.testing.assert_array_equal(
    jax.random.key_data(rng2), jax.random.key_data(rng)
  )
  # Restored state runs on a single device (no pmap) as well.
  single = jax.jit(
    functools.partial(step_lib.train_step, objective=objective, axis_name=None)
  )
  restored = restored.replace(apply_fn=_model(None).apply)
  single(restored, _batch(5, 4, cam_hw))


def test_manager_keeps_last_k_and_best(setup, tmp_path):
  _, _, state, _, _ = setup
  manager = checkpointing.create_manager(str(tmp_path), keep=2)
  accuracies = [0.2, 0.9, 0.3, 0.4, 0.5]
  for step, acc in enumerate(accuracies, start=1):
    checkpointing.save(
      manager, step, state, jax.random.key(0), {}, {'eval_accuracy': acc}
    )
  assert sorted(manager.all_steps()) == [2, 4, 5]
  assert manager.best_step() == 2


class _TinyCamNet(flax.linen.Module):
  """Conv (stride 4), synchronised BatchNorm and a per-pixel head: a model
  with the step's interface that compiles in a fraction of a ResNet's time."""

  @flax.linen.compact
  def __call__(self, x, train: bool = True):
    x = flax.linen.Conv(4, (4, 4), strides=(4, 4))(x)
    x = flax.linen.BatchNorm(
      use_running_average=not train, axis_name=step_lib.AXIS_NAME
    )(x)
    cams = flax.linen.Dense(NUM_CLASSES, use_bias=False)(flax.linen.relu(x))
    return cams.sum((1, 2)), cams


def test_group_dro_weights_are_checkpointed(tmp_path):
  model, tx = _TinyCamNet(), optax.adam(1e-2)
  objective = objectives.create(
    {'name': 'group_dro', 'dro_step_size': 1.0, 'group_counts': (3, 5)}
  )
  state = step_lib.create_train_state(
    jax.random.key(0),
    model,
    IMAGE_SIZE,
    tx,
    objective_state=objective.init_state(),
  )
  np.testing.assert_array_equal(state.group_weights, [0.5, 0.5])
  batch = _batch(6, 8, (IMAGE_SIZE // 4, IMAGE_SIZE // 4))
  batch['group'] = (np.arange(8) % 2).astype(np.int32)
  replicated, _ = step_lib.pmapped_train_step(objective)(
    step_lib.replicate(state), _shard(batch, 4)
  )
  trained = step_lib.unreplicate(replicated)
  assert abs(float(trained.group_weights[0]) - 0.5) > 1e-6
  manager = checkpointing.create_manager(str(tmp_path), keep=1)
  checkpointing.save(
    manager, 1, trained, jax.random.key(0), {}, {'eval_accuracy': 0.5}
  )
  restored, _, _, _ = checkpointing.restore(manager, state)
  np.testing.assert_array_equal(restored.group_weights, trained.group_weights)
  with pytest.raises(
    ValueError, match=r'objective_state=objective.init_state\(\)'
  ):
    step_lib.train_step(
      step_lib.create_train_state(jax.random.key(0), model, IMAGE_SIZE, tx),
      batch,
      objective=objective,
      axis_name=None,
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class _CountingObjective(objectives.Objective):
  """A plug-in the library does not register: CE whose state counts the
  steps it saw and which reads a batch entry of its own."""

  name = 'counting'
  supervision = ('mask',)

  def per_example_losses(self, x):
    return {'ce': losses.cross_entropy(x.logits, x.labels)}

  @property
  def coefficients(self):
    return {'ce': 1.0}

  def init_state(self):
    return jnp.zeros((), jnp.float32)

  def reduce(self, per_example, x):
    values, metrics, state = super().reduce(per_example, x)
    return values, {'steps_seen': state + 1}, state + 1


def test_step_runs_any_objective_through_the_interface():
  # The step knows no objective by kind: an unregistered one with a state
  # trains, its state is carried, and its metrics are averaged and returned.
  model, tx = _TinyCamNet(), optax.adam(1e-2)
  objective = _CountingObjective()
  state = step_lib.create_train_state(
    jax.random.key(0),
    model,
    IMAGE_SIZE,
    tx,
    objective_state=objective.init_state(),
  )
  batch = _batch(7, 8, (IMAGE_SIZE // 4, IMAGE_SIZE // 4))
  p_step = step_lib.pmapped_train_step(objective)
  state = step_lib.replicate(state)
  for step in range(1, 4):
    state, metrics = p_step(state, _shard(batch, 4))
    np.testing.assert_array_equal(metrics['steps_seen'], np.full(4, step))
  np.testing.assert_array_equal(state.group_weights, np.full(4, 3.0))
  assert set(metrics) >= {'ce', 'loss', 'accuracy', 'grad_norm'}
  del batch['mask']
  with pytest.raises(ValueError, match=r"needs batch\['mask'\]"):
    p_step(state, _shard(batch, 4))
