"""The backbone interface: every family through one head, one registry, one step.

* ResNets on the interface compute what they computed before it: the same
  variable tree (names, shapes, initial values) and the same logits and maps,
  pinned from the main branch before the move (`tests/data/resnet_reference.*`,
  written by `jax.random.key(0, impl='threefry2x32')`; bit-identical on the
  machine that moved them with the default XLA flags, compared here within
  1e-6: the tests' flags and another CPU round differently in the last bits).
* The logit-sum identity of each family on random shapes (patch sizes, grids,
  widths, strides, batches, classes) and random variables with every
  LayerNorm affine, layer scale and head bias non-zero, against a float64
  NumPy reference of the head computed on the backbone's own features
  (`CamModel.features`' output, captured): per-position LayerNorm for the
  faithful head, the pooled vector's statistics for the control (which must
  equal timm's pool-then-norm), at initialisation and after ACE steps.
* Every registered objective takes a step on a ViT and a ConvNeXt (no
  BatchNorm: `batch_stats` stays `{}`), and the trainer runs, resumes,
  restores and explains a ViT end to end.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_models import assert_logit_sum_identity
from test_models import random_variables

from cco_jax import cam_head
from cco_jax import errors
from cco_jax import models
from cco_jax import objectives
from cco_jax import train_step as step_lib

DATA = Path(__file__).resolve().parent / 'data'

# ---------------------------------------------------------------------------
# ResNets unchanged by the move.
# ---------------------------------------------------------------------------


def _pinned_cases():
  return json.loads((DATA / 'resnet_reference.json').read_text())


@pytest.mark.parametrize('case', sorted(_pinned_cases()['cases']))
def test_resnets_compute_what_they_computed_before_the_interface(case):
  meta = _pinned_cases()
  reference = np.load(DATA / 'resnet_reference.npz')
  options = dict(meta['cases'][case])
  size, name = options.pop('size'), options.pop('name')
  classes = options.pop('num_classes')
  if 'stage_sizes' in options:
    options['stage_sizes'] = tuple(options['stage_sizes'])
  model = models.create_model(name, classes, **options)
  assert isinstance(model, cam_head.CamModel)
  images = np.random.default_rng(0).normal(size=(2, size, size, 3))
  images = jnp.asarray(images.astype(np.float32))
  variables = model.init(
    jax.random.key(0, impl='threefry2x32'), images, train=False
  )
  flat = jax.tree_util.tree_flatten_with_path(variables)[0]
  shapes = {jax.tree_util.keystr(p): list(x.shape) for p, x in flat}
  assert shapes == meta['shapes'][case]
  sums = [np.abs(np.asarray(x, np.float64)).sum() for _, x in flat]
  # Initial values: the same draws (the tests' XLA flags round the inverse
  # error function differently in the last bits, hence not exact).
  np.testing.assert_allclose(sums, reference[f'{case}/param_sum'], rtol=1e-6)
  logits, maps = model.apply(variables, images, train=False)
  (train_logits, train_maps), _ = model.apply(
    variables, images, train=True, mutable=['batch_stats']
  )
  for key, value in (
    ('logits', logits),
    ('maps', maps),
    ('train_logits', train_logits),
    ('train_maps', train_maps),
  ):
    np.testing.assert_allclose(
      value, reference[f'{case}/{key}'], rtol=1e-6, atol=1e-6, err_msg=key
    )


# ---------------------------------------------------------------------------
# The float64 reference of the shared head.
# ---------------------------------------------------------------------------


def forward_with_features(model, variables, images, train=False):
  """`(logits, maps, backbone features, head input)`, from one forward pass."""
  captured = {}

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == 'features':
      captured['backbone'] = out
    if isinstance(context.module, cam_head.CamHead):
      captured['head'] = args[0]
    return out

  with nn.intercept_methods(interceptor):
    if train:
      (logits, maps), _ = model.apply(
        variables, images, train=True, mutable=['batch_stats']
      )
    else:
      logits, maps = model.apply(variables, images, train=False)
  return logits, maps, captured['backbone'], captured['head']


def reference_head(features, params, faithful: bool, epsilon=1e-6):
  """float64 `(logits, maps)` of the shared head on the backbone's features."""
  z = np.asarray(features, np.float64)
  if 'head_norm' in params:
    scale = np.asarray(params['head_norm']['scale'], np.float64)
    shift = np.asarray(params['head_norm']['bias'], np.float64)
    source = z if faithful else z.mean((1, 2), keepdims=True)
    mean = source.mean(-1, keepdims=True)
    var = np.square(source - mean).mean(-1, keepdims=True)
    z = (z - mean) / np.sqrt(var + epsilon) * scale + shift
  kernel = np.asarray(params['head']['kernel'], np.float64)
  bias = np.asarray(params['head'].get('bias', 0.0), np.float64)
  _, height, width, _ = z.shape
  maps = np.einsum('bhwf,fc->bhwc', z, kernel) / (height * width)
  logits = z.mean((1, 2)) @ kernel + bias
  terms = np.abs(z).mean((1, 2)) @ np.abs(kernel) + np.abs(bias)
  return logits, maps, terms


def timm_pool_then_norm(features, params, epsilon=1e-6):
  """timm's control head in float64: mean over positions, LayerNorm, dense."""
  pooled = np.asarray(features, np.float64).mean((1, 2))
  mean = pooled.mean(-1, keepdims=True)
  var = np.square(pooled - mean).mean(-1, keepdims=True)
  normed = (pooled - mean) / np.sqrt(var + epsilon)
  normed = normed * np.asarray(params['head_norm']['scale'], np.float64)
  normed = normed + np.asarray(params['head_norm']['bias'], np.float64)
  kernel = np.asarray(params['head']['kernel'], np.float64)
  return normed @ kernel + np.asarray(params['head']['bias'], np.float64)


def check_against_reference(model, variables, images, train=False):
  """Asserts the identity and the float64 reference; returns the errors."""
  logits, maps, backbone, head_input = forward_with_features(
    model, variables, images, train
  )
  params = variables['params']
  faithful = model.cam_faithful
  ref_logits, ref_maps, terms = reference_head(backbone, params, faithful)
  scale = 1e-5 * (terms.max() + 1)
  np.testing.assert_allclose(logits, ref_logits, rtol=0, atol=scale)
  np.testing.assert_allclose(maps, ref_maps, rtol=0, atol=scale)
  if 'head_norm' in params and not faithful:
    np.testing.assert_allclose(
      ref_logits, timm_pool_then_norm(backbone, params), rtol=1e-12, atol=1e-12
    )
  bias = params['head'].get('bias')
  assert_logit_sum_identity(
    logits, maps, head_input, params['head']['kernel'], bias
  )
  recon = np.asarray(maps, np.float64).sum((1, 2))
  recon = recon + (0 if bias is None else np.asarray(bias, np.float64))
  return {
    'float32': float(np.abs(recon - np.asarray(logits, np.float64)).max()),
    'float64': float(np.abs(np.asarray(logits, np.float64) - ref_logits).max()),
  }


# ---------------------------------------------------------------------------
# The identity of each family on random shapes.
# ---------------------------------------------------------------------------


def _random_vit(seed, faithful):
  rng = np.random.default_rng(seed)
  patch = int(rng.choice([2, 4, 8]))
  grid = int(rng.integers(1, 5))
  heads = int(rng.choice([1, 2, 3]))
  options = dict(
    patch_size=patch,
    width=heads * int(rng.choice([4, 8])),
    depth=int(rng.integers(1, 3)),
    num_heads=heads,
  )
  classes, batch = int(rng.integers(2, 6)), int(rng.integers(1, 4))
  model = models.create_model(
    'vit_ti16', classes, cam_faithful=faithful, **options
  )
  return model, (batch, grid * patch, grid * patch, 3), (grid, grid)


def _random_convnext(seed, faithful):
  rng = np.random.default_rng(seed)
  stride = int(rng.choice([1, 2]))
  stages = tuple(
    int(n) for n in rng.integers(1, 3, size=int(rng.integers(2, 5)))
  )
  size = int(rng.choice([32, 48, 64]))
  classes, batch = int(rng.integers(2, 6)), int(rng.integers(1, 4))
  model = models.create_model(
    'convnext_tiny',
    classes,
    cam_faithful=faithful,
    width=int(rng.choice([4, 8])),
    stage_sizes=stages,
    last_stage_stride=stride,
  )
  side = size // 4 // 2 ** (len(stages) - 1)
  if stride == 1 and len(stages) > 1:
    side *= 2
  return model, (batch, size, size, 3), (side, side)


RANDOM = {'vit': _random_vit, 'convnext': _random_convnext}


@pytest.mark.parametrize('faithful', [True, False])
@pytest.mark.parametrize('seed', [0, 1])
@pytest.mark.parametrize('family', sorted(RANDOM))
def test_identity_on_random_shapes_against_float64(family, seed, faithful):
  model, image_shape, grid = RANDOM[family](seed, faithful)
  variables = random_variables(model, image_shape, seed)
  assert 'batch_stats' not in variables
  images = np.random.default_rng(seed + 10).normal(size=image_shape)
  images = jnp.asarray(images.astype(np.float32))
  _, maps, _, _ = forward_with_features(model, variables, images)
  chex.assert_shape(maps, (image_shape[0], *grid, model.num_classes))
  assert models.cam_size(model, image_shape[1]) == grid
  check_against_reference(model, variables, images)
  check_against_reference(model, variables, images, train=True)


@pytest.mark.parametrize('family', sorted(RANDOM))
def test_bfloat16_backbone_keeps_a_float32_head(family):
  model, image_shape, _ = RANDOM[family](5, True)
  model = model.clone(dtype=jnp.bfloat16)
  variables = random_variables(model, image_shape, 5)
  images = jnp.asarray(
    np.random.default_rng(6).normal(size=image_shape), jnp.float32
  )
  logits, maps, backbone, head_input = forward_with_features(
    model, variables, images
  )
  assert backbone.dtype == jnp.bfloat16
  assert logits.dtype == maps.dtype == head_input.dtype == jnp.float32
  check_against_reference(model, variables, images)


def test_head_norm_is_local_only_when_faithful():
  x = np.random.default_rng(0).normal(size=(2, 3, 4, 6)).astype(np.float32)
  moved = x.copy()
  moved[:, 1, 2] *= np.arange(1, 7)  # (A constant shift would not show.)
  for per_position in (True, False):
    norm = cam_head.HeadNorm(per_position=per_position)
    params = norm.init(jax.random.key(0), x)
    changed = np.abs(norm.apply(params, moved) - norm.apply(params, x)) > 1e-6
    changed = changed.any(-1)
    if per_position:  # Only the moved position changes.
      assert changed[:, 1, 2].all() and changed.sum() == 2
    else:  # The pooled statistics move every position.
      assert changed.all()


# ---------------------------------------------------------------------------
# Training: every objective through the same step, no BatchNorm.
# ---------------------------------------------------------------------------

TINY = {
  'vit': ('vit_s16', dict(patch_size=8, width=8, depth=1, num_heads=2)),
  'convnext': ('convnext_small', dict(width=4, stage_sizes=(1, 1))),
  'resnet': ('resnet18', dict(num_filters=4, stem='small', stage_sizes=(1, 1))),
}
IMAGE_SIZE = 16


def _tiny(family, faithful=True, classes=3):
  name, options = TINY[family]
  return models.create_model(name, classes, cam_faithful=faithful, **options)


def _batch(seed, batch_size, cam_hw, classes=3):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, classes, batch_size).astype(np.int32)
  images = rng.uniform(0, 1, (batch_size, IMAGE_SIZE, IMAGE_SIZE, 3))
  images[:, : IMAGE_SIZE // 2, : IMAGE_SIZE // 2] = (labels / classes)[
    :, None, None, None
  ]
  mask = np.zeros((batch_size, *cam_hw), np.float32)
  mask[:, : max(cam_hw[0] // 2, 1), : max(cam_hw[1] // 2, 1)] = 1.0
  pixel_mask = np.zeros((batch_size, IMAGE_SIZE, IMAGE_SIZE), np.float32)
  pixel_mask[:, : IMAGE_SIZE // 2, : IMAGE_SIZE // 2] = 1.0
  return {
    'image': images.astype(np.float32),
    'label': labels,
    'mask': mask,
    'pixel_mask': pixel_mask,
    'group': (labels + rng.integers(0, 2, batch_size)).astype(np.int32) % 4,
  }


def _train(model, objective, steps, seed=0):
  state = step_lib.create_train_state(
    jax.random.key(seed),
    model,
    IMAGE_SIZE,
    optax.adam(3e-3),
    objective_state=objective.init_state(),
  )
  batch = _batch(seed, 8, models.cam_size(model, IMAGE_SIZE))
  step = jax.jit(
    functools.partial(step_lib.train_step, objective=objective, axis_name=None)
  )
  losses = []
  for _ in range(steps):
    state, metrics = step(state, batch)
    assert float(metrics['nonfinite']) == 0.0
    losses.append(float(metrics['loss']))
  return state, losses, batch


OPTIONS = {'group_dro': {'group_counts': (4, 3, 2, 1)}}
OPTIONS['ce_reweighted'] = OPTIONS['group_dro']


# Every objective on a ViT or a ConvNeXt (alternating, to keep the suite's
# time), and ACE on both (test_identity_after_ace_steps trains ACE on each
# family for 4 steps as well).
BOTH = ('ace',)
FAMILY_OBJECTIVES = [
  (family, name)
  for i, name in enumerate(sorted(objectives.names()))
  for family in (
    ('vit', 'convnext') if name in BOTH else (('vit', 'convnext')[i % 2],)
  )
]


@pytest.mark.parametrize('family,name', FAMILY_OBJECTIVES)
def test_every_objective_trains_a_vit_or_convnext_through_one_step(
  family, name
):
  model = _tiny(family)
  objective = objectives.create({'name': name, **OPTIONS.get(name, {})}, seed=1)
  state, losses, _ = _train(model, objective, steps=1)
  assert state.batch_stats == {} and np.isfinite(losses).all()
  assert int(state.step) == 1
  initial = step_lib.create_train_state(
    jax.random.key(0), model, IMAGE_SIZE, optax.adam(3e-3)
  )
  moved = jax.tree.map(
    lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
    state.params,
    initial.params,
  )
  assert moved['head']['kernel'] and moved['head_norm']['scale']


@pytest.mark.parametrize('faithful', [True, False])
@pytest.mark.parametrize('family', ['convnext', 'vit'])
def test_identity_after_ace_steps(family, faithful):
  # The ResNets' identity after training: test_train_step, test_train.
  model = _tiny(family, faithful)
  state, losses, batch = _train(model, objectives.create({'name': 'ace'}), 4)
  assert min(losses[1:]) < losses[0], losses
  variables = {'params': state.params}
  if state.batch_stats:
    variables['batch_stats'] = state.batch_stats
  errors_ = check_against_reference(
    model, variables, jnp.asarray(batch['image'])
  )
  assert errors_['float32'] < 1e-5


def test_four_devices_step_without_batch_stats():
  model = _tiny('vit')
  objective = objectives.create({'name': 'ace_kld'})
  state = step_lib.create_train_state(  # SGD: Adam's first step is ~sign(g).
    jax.random.key(0), model, IMAGE_SIZE, optax.sgd(0.1)
  )
  batch = _batch(3, 8, models.cam_size(model, IMAGE_SIZE))
  sharded = step_lib.shard(
    jax.tree.map(lambda x: x.reshape((4, -1) + x.shape[1:]), batch)
  )
  p_state, metrics = step_lib.pmapped_train_step(objective)(
    step_lib.replicate(state), sharded
  )
  single, single_metrics = jax.jit(
    functools.partial(step_lib.train_step, objective=objective, axis_name=None)
  )(state, batch)
  np.testing.assert_allclose(
    metrics['loss'][0], single_metrics['loss'], rtol=1e-5
  )
  chex.assert_trees_all_close(
    step_lib.unreplicate(p_state.params), single.params, rtol=1e-4, atol=1e-6
  )


# ---------------------------------------------------------------------------
# Names and user errors.
# ---------------------------------------------------------------------------


def test_registry_names_every_family_once():
  assert models.names() == sorted(
    [*models.STAGE_SIZES, 'vit_ti16', 'vit_s16', 'vit_b16']
    + ['convnext_tiny', 'convnext_small']
  )
  assert models.family_of('vit_b16') == 'vit'
  assert not models.has_batch_norm('convnext_tiny')
  assert models.has_batch_norm('resnet50')
  big = models.create_model('vit_b16', 2)
  assert (big.width, big.depth, big.num_heads, big.mlp_dim) == (
    768,
    12,
    12,
    3072,
  )
  small = models.create_model('convnext_small', 2)
  assert small.stage_sizes == (3, 3, 27, 3) and small.width == 96


def test_vit_applied_to_another_image_size_names_the_grids():
  model = _tiny('vit')
  variables = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)), False)
  with pytest.raises(errors.UserError, match=r'give 3x3 = 9 tokens.*for 4'):
    model.apply(variables, jnp.zeros((1, 24, 24, 3)), train=False)


@pytest.mark.parametrize(
  'name, options, image_size, match',
  [
    ('vit_b', {}, 32, r"Unknown model 'vit_b' \(model.name\).*vit_b16"),
    ('vit_ti16', {'patch_size': 5}, 32, r'model.patch_size=5 does not divide'),
    ('vit_ti16', {'width': 10, 'num_heads': 3}, 32, r'model.width=10 .*heads'),
    ('vit_ti16', {'depth': -1}, 32, r'model.depth=-1 must be positive'),
    ('resnet18', {'patch_size': 8}, 32, r'model.patch_size=8 does not apply'),
    ('vit_s16', {'last_stage_stride': 1}, 32, r'last_stage_stride=1 does not'),
    ('convnext_tiny', {'last_stage_stride': 3}, 32, r'must be 1 .*, 2 or 0'),
    ('convnext_tiny', {'num_heads': 2}, 32, r'num_heads=2 does not apply'),
  ],
)
def test_bad_model_options_are_one_line_user_errors(
  name, options, image_size, match
):
  with pytest.raises(errors.UserError, match=match) as info:
    models.cam_size(models.create_model(name, 2, **options), image_size)
  assert '\n' not in str(info.value)


# ---------------------------------------------------------------------------
# The trainer, restore and explain, end to end on a ViT.
# ---------------------------------------------------------------------------


def test_trainer_restore_and_explain_a_vit(
  tmp_path, synthetic_pets_dir, synthetic_cvd_dir, synthetic_data_dir
):
  from test_train import tiny_config  # pylint: disable=g-import-not-at-top

  from cco_jax import explain as explain_lib
  from cco_jax import restore
  from cco_jax import train

  config = tiny_config(
    synthetic_pets_dir,
    synthetic_cvd_dir,
    synthetic_data_dir,
    **{
      'model.name': 'vit_ti16',
      'model.patch_size': 8,
      'model.width': 8,
      'model.depth': 1,
      'model.num_heads': 2,
      'loss.name': 'ace',
      'num_train_steps': 4,
      'eval_ood': False,
    },
  )
  workdir = tmp_path / 'vit'
  train.train_and_evaluate(config, str(workdir))
  run = restore.restore_model(str(workdir), step='last')
  assert run.step == 4 and run.cam_size == (4, 4)
  assert run.variables['batch_stats'] == {}
  images = (
    np.random.default_rng(0).normal(size=(3, 32, 32, 3)).astype(np.float32)
  )
  result = explain_lib.Explainer(run.model, run.variables).explain(images)
  assert result.cams.shape == (3, 4, 4, 2)
  np.testing.assert_allclose(
    result.map_sums, result.logits, rtol=1e-5, atol=1e-5
  )
  check_against_reference(run.model, run.variables, jnp.asarray(images))


# ---------------------------------------------------------------------------
# The experiment's configs and the benchmark script.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
  'variant', ['resnet_ace', 'vit_ce_control', 'convnext_ace']
)
def test_backbone_variants_have_the_benchmarks_map_grid(variant):
  from cco_jax import configuration  # pylint: disable=g-import-not-at-top
  from cco_jax import model_config  # pylint: disable=g-import-not-at-top
  from experiments.configs import (
    backbones,  # pylint: disable=g-import-not-at-top
  )

  config = backbones.get_config(variant)
  configuration.check_training_config(config)
  model = model_config.create_model(config, 2)
  assert models.cam_size(model, config.data.image_size) == (6, 6)
  assert model.cam_faithful == (not variant.endswith('control'))
  assert set(backbones.VARIANTS) == {
    f'{b}_{r}' for b in backbones.BACKBONES for r in backbones.RUNS
  }


def test_benchmark_script_smoke(monkeypatch):
  from experiments.benchmarks import (
    backbones as bench,  # pylint: disable=g-import-not-at-top
  )

  _, _, entries = bench.PRESETS['smoke']
  monkeypatch.setitem(
    bench.PRESETS, 'smoke', (16, 2, {'vit_ti16': entries['vit_ti16']})
  )
  timed = bench.measure_time('smoke', repeats=1)
  assert set(timed['rows']) == {'vit_ti16 ce_control', 'vit_ti16 ace_kld'}
  for row in timed['rows'].values():
    assert row['median_s'] > 0 and row['cam_size'] == [2, 2]
  identity = bench.measure_identity('smoke', steps=0)  # At init (cheap).
  for row in identity['rows'].values():
    for errors_ in row.values():
      assert errors_['float32'] < 1e-5 and errors_['float64'] < 1e-5
  bench.print_results(timed)
  bench.print_results(identity)
