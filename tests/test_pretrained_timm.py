"""timm ViT / ConvNeXt weights into `cco_jax.vit` / `cco_jax.convnext`.

Without torch: the mapping's bookkeeping (every tensor used once, faithful and
control take the same tensors but the head bias, problems named, fresh heads,
position embeddings resampled). With torch and timm (skipped cleanly
otherwise; run it where they are installed, docs/backbones.md): timm models
with random weights, including every LayerNorm affine and a non-trivial
layer scale, loaded into the control compute timm's logits within 1e-4, and
into the faithful model keep the logit-sum identity.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cco_jax import errors
from cco_jax import models
from cco_jax import pretrained
from cco_jax import pretrained_export
from cco_jax import pretrained_timm

# Tiny versions: (model.name, create_model options, timm name, timm options).
TINY = {
  'vit': (
    'vit_ti16',
    dict(patch_size=8, width=24, depth=2, num_heads=3),
    'vit_tiny_patch16_224',
    dict(
      patch_size=8,
      embed_dim=24,
      depth=2,
      num_heads=3,
      global_pool='avg',
      class_token=False,
    ),
  ),
  'convnext': (
    'convnext_tiny',
    dict(width=8, stage_sizes=(1, 2, 1, 1)),
    'convnext_tiny',
    dict(depths=(1, 2, 1, 1), dims=(8, 16, 32, 64)),
  ),
}
SIZE = 32


def _model(family, classes, faithful, **extra):
  name, options, _, _ = TINY[family]
  return models.create_model(
    name, classes, cam_faithful=faithful, **{**options, **extra}
  )


def _random_state_dict(family, classes, seed=0):
  """A timm-named state dict with random values, built from the rules."""
  rng = np.random.default_rng(seed)
  control = _model(family, classes, faithful=False)
  images = jax.ShapeDtypeStruct((1, SIZE, SIZE, 3), jnp.float32)
  shapes = jax.eval_shape(
    lambda x: control.init(jax.random.key(0), x, train=False), images
  )['params']
  flat = pretrained.flatten(shapes)
  if family == 'vit':
    rules = pretrained_timm.vit_rules(
      control, flat[('pos_embedding',)].shape[1], []
    )
  else:
    rules = pretrained_timm.convnext_rules(control)
  out = {}
  for rule in rules:
    if rule.key not in out:
      shape = _file_shape(rule, flat[rule.path].shape)
      out[rule.key] = rng.normal(scale=0.3, size=shape).astype(np.float32)
  return out


def _file_shape(rule, flax_shape):
  name = rule.key.rsplit('.', 1)[-1]
  if 'qkv' in rule.key:
    width = flax_shape[0] if name == 'weight' else flax_shape[0] * flax_shape[1]
    return (3 * width, width) if name == 'weight' else (3 * width,)
  if rule.key.endswith('proj.weight') and 'attn' in rule.key:
    return (flax_shape[-1], flax_shape[0] * flax_shape[1])
  if len(flax_shape) == 4:  # HWIO -> OIHW.
    return (flax_shape[3], flax_shape[2], flax_shape[0], flax_shape[1])
  if len(flax_shape) == 2 and rule.key != 'pos_embed':
    return flax_shape[::-1]
  return flax_shape


@pytest.mark.parametrize('family', sorted(TINY))
def test_every_tensor_is_used_and_the_faithful_model_drops_only_the_bias(
  family,
):
  state_dict = _random_state_dict(family, 5)
  _, control = pretrained_timm.convert(
    state_dict, _model(family, 5, False), image_size=SIZE
  )
  _, faithful = pretrained_timm.convert(
    state_dict, _model(family, 5, True), image_size=SIZE
  )
  assert sorted(control.loaded) == sorted(state_dict)
  fc_bias = 'head.bias' if family == 'vit' else 'head.fc.bias'
  assert sorted(faithful.loaded) == sorted(set(state_dict) - {fc_bias})
  assert list(faithful.dropped) == [fc_bias]
  assert any('before the pooling' in n for n in faithful.notes)
  assert any('pooled vector' in n for n in control.notes)


@pytest.mark.parametrize('family', sorted(TINY))
def test_load_keeps_the_identity_and_faithful_differs_only_in_the_head(family):
  state_dict = _random_state_dict(family, 4, seed=1)
  images = jnp.asarray(
    np.random.default_rng(2).normal(size=(3, SIZE, SIZE, 3)), jnp.float32
  )
  outputs = {}
  for faithful in (False, True):
    model = _model(family, 4, faithful)
    variables, _ = pretrained_timm.convert(state_dict, model, image_size=SIZE)
    logits, maps = model.apply(variables, images, train=False)
    bias = models.head_bias(variables)
    recon = maps.sum((1, 2)) + (0 if bias is None else bias)
    np.testing.assert_allclose(recon, logits, rtol=1e-5, atol=1e-5)
    outputs[faithful] = np.asarray(logits)
  # Same weights, different head norm placement: different functions.
  assert not np.allclose(outputs[False], outputs[True], atol=1e-3)


def test_fresh_head_headless_and_named_problems():
  state_dict = _random_state_dict('convnext', 5)
  model = _model('convnext', 3, True)
  variables, report = pretrained_timm.convert(
    state_dict, model, image_size=SIZE, rng=jax.random.key(3)
  )
  assert report.fresh == ['params/head/kernel']
  assert set(report.dropped) == {'head.fc.weight', 'head.fc.bias'}
  assert variables['params']['head']['kernel'].shape == (64, 3)
  headless = {
    k: v for k, v in state_dict.items() if not k.startswith('head.fc')
  }
  _, report = pretrained_timm.convert(headless, model, image_size=SIZE)
  assert 'the file has no head (head.fc.weight).' in report.notes
  broken = dict(state_dict, cls_token=np.zeros((1, 1, 8), np.float32))
  del broken['stages.1.blocks.1.gamma']
  broken['stem.0.weight'] = np.zeros((8, 3, 2, 2), np.float32)
  with pytest.raises(errors.UserError) as info:
    pretrained_timm.convert(broken, model, image_size=SIZE)
  message = str(info.value)
  assert '1 missing keys: stages.1.blocks.1.gamma' in message
  assert '1 unexpected keys: cls_token' in message
  assert 'stem.0.weight: file (8, 3, 2, 2)' in message


def test_class_token_vit_is_refused_by_name():
  state_dict = _random_state_dict('vit', 5)
  state_dict['cls_token'] = np.zeros((1, 1, 24), np.float32)
  state_dict['norm.weight'] = np.ones(24, np.float32)
  with pytest.raises(
    errors.UserError, match='unexpected keys: cls_token, norm'
  ):
    pretrained_timm.convert(
      state_dict, _model('vit', 5, False), image_size=SIZE
    )


def test_position_embeddings_are_resampled_to_the_grid():
  state_dict = _random_state_dict('vit', 5)  # 4x4 grid at 32 px.
  grid = state_dict['pos_embed'].reshape(4, 4, 24)
  model = _model('vit', 5, True)
  variables, report = pretrained_timm.convert(state_dict, model, image_size=64)
  resampled = np.asarray(variables['params']['pos_embedding']).reshape(8, 8, 24)
  assert any('resampled from 16 to 64 tokens' in n for n in report.notes)
  # Bilinear upsampling by 2 keeps the mean and stays within the range.
  np.testing.assert_allclose(
    resampled.mean((0, 1)), grid.mean((0, 1)), atol=1e-5
  )
  assert resampled.max() <= grid.max() + 1e-6
  assert resampled.min() >= grid.min() - 1e-6


def test_load_dispatches_and_init_train_state_reads_the_grid(tmp_path):
  import optax
  from safetensors import numpy as st_numpy

  from cco_jax import train_step as step_lib

  state_dict = _random_state_dict('vit', 5)
  path = str(tmp_path / 'vit.safetensors')
  st_numpy.save_file(state_dict, path)
  model = _model('vit', 5, False)
  loaded = pretrained.load(path, model, image_size=SIZE)
  assert set(loaded) == {'params'}
  state = step_lib.create_train_state(
    jax.random.key(0), model, SIZE, optax.adam(1e-3)
  )
  state = pretrained.init_train_state(state, model, path, jax.random.key(1))
  jax.tree.map(np.testing.assert_array_equal, state.params, loaded['params'])
  assert state.batch_stats == {}


@pytest.mark.parametrize(
  'family,faithful,classes',
  [
    ('vit', False, 5),
    ('vit', True, 3),
    ('convnext', False, 2),
    ('convnext', True, 7),
  ],
)
def test_export_is_the_exact_inverse_of_the_import(family, faithful, classes):
  """file -> model -> file gives every tensor back bit for bit (the qkv parts
  fused again), but the faithful head's bias, which the model does not have."""
  state_dict = _random_state_dict(family, classes, seed=classes)
  model = _model(family, classes, faithful)
  variables, _ = pretrained_timm.convert(state_dict, model, image_size=SIZE)
  exported = pretrained_export.to_timm_state_dict(variables, model)
  fc_bias = 'head.bias' if family == 'vit' else 'head.fc.bias'
  expected = set(state_dict) - ({fc_bias} if faithful else set())
  assert set(exported) == expected
  for key in expected:
    assert exported[key].dtype == np.float32, key
    np.testing.assert_array_equal(exported[key], state_dict[key], err_msg=key)
  again, _ = pretrained_timm.convert(exported, model, image_size=SIZE)
  jax.tree.map(np.testing.assert_array_equal, again, variables)


@pytest.mark.parametrize('family', ['resnet', *sorted(TINY)])
def test_save_writes_a_file_load_reads_back_exactly(tmp_path, family):
  if family == 'resnet':
    model = models.create_model(
      'resnet18', 4, cam_faithful=False, num_filters=4
    )
  else:
    model = _model(family, 4, False)
  images = jnp.zeros((1, SIZE, SIZE, 3), jnp.float32)
  variables = model.init(jax.random.key(5), images, train=False)
  rng = np.random.default_rng(6)  # Non-zero biases and norms, unlike an init.
  variables = jax.tree.map(
    lambda v: (v + 0.1 * rng.normal(size=v.shape)).astype(np.float32),
    variables,
  )
  path = str(tmp_path / f'{family}.safetensors')
  pretrained_export.save(variables, model, path)
  loaded = pretrained.load(path, model, image_size=SIZE)
  jax.tree.map(np.testing.assert_array_equal, loaded, dict(variables))
  with pytest.raises(ValueError, match='safetensors only'):
    pretrained_export.save(variables, model, str(tmp_path / 'x.pth'))


def test_export_names_a_tree_of_another_model():
  variables = _model('vit', 4, False).init(
    jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)), train=False
  )
  deeper = _model('vit', 4, False, depth=1)
  with pytest.raises(ValueError, match='no timm name for .*encoderblock_1'):
    pretrained_export.to_timm_state_dict(variables, deeper)


# ---------------------------------------------------------------------------
# Against timm itself (needs torch and timm; skipped otherwise).
# ---------------------------------------------------------------------------


@pytest.mark.parametrize('family', sorted(TINY))
def test_control_equals_timm(family):
  torch = pytest.importorskip('torch')
  timm = pytest.importorskip('timm')
  _, _, timm_name, timm_options = TINY[family]
  torch.manual_seed(0)
  net = (
    timm.create_model(
      timm_name, pretrained=False, num_classes=5, img_size=SIZE, **timm_options
    )
    if family == 'vit'
    else timm.create_model(
      timm_name, pretrained=False, num_classes=5, **timm_options
    )
  )
  with torch.no_grad():  # Non-trivial values everywhere (biases, norms, gamma).
    for tensor in net.state_dict().values():
      if tensor.is_floating_point():
        tensor.copy_(0.3 * torch.randn_like(tensor))
  net.eval()
  state_dict = {k: v.numpy() for k, v in net.state_dict().items()}
  images = np.random.default_rng(4).normal(size=(3, SIZE, SIZE, 3))
  images = images.astype(np.float32)
  with torch.no_grad():
    expected = net(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
  model = _model(family, 5, False)
  variables, report = pretrained_timm.convert(
    state_dict, model, image_size=SIZE
  )
  assert sorted(report.loaded) == sorted(state_dict)
  logits, maps = model.apply(variables, jnp.asarray(images), train=False)
  err = float(np.abs(np.asarray(logits) - expected).max())
  print(
    f'{family}: max |logits - timm| = {err:.2e} (|logits| <= '
    f'{np.abs(expected).max():.1f})'
  )
  assert err < 1e-4
  recon = maps.sum((1, 2)) + variables['params']['head']['bias']
  np.testing.assert_allclose(recon, logits, rtol=1e-5, atol=1e-5)
  # And back: the export loads strictly into timm and gives the same logits.
  exported = pretrained_export.to_timm_state_dict(variables, model)
  net.load_state_dict(
    {k: torch.from_numpy(v) for k, v in exported.items()}, strict=True
  )
  with torch.no_grad():
    again = net(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
  np.testing.assert_array_equal(again, expected)
