"""`cco_jax.pretrained`: torchvision-named ResNet state dicts in and out.

State dicts are generated here with numpy from torchvision's architecture
(`torchvision_state_dict`, written from torchvision's `resnet.py`, not from
`pretrained.torch_names`), and the loaded models are compared with an
independent NCHW forward of torchvision's ResNet (`torchvision_forward`, built
on `lax.conv_general_dilated` with torchvision's explicit padding). Where torch
and torchvision are importable, `TorchvisionTest` compares with torchvision
itself at 224 px (ResNet-18 and ResNet-50, random weights and BatchNorm
statistics); elsewhere it is skipped.
"""

from __future__ import annotations

import math
import os
import tempfile

from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cco_jax import model_config
from cco_jax import models
from cco_jax import pretrained
from cco_jax import pretrained_export

LAYERS = {
  'resnet18': (2, 2, 2, 2),
  'resnet34': (3, 4, 6, 3),
  'resnet50': (3, 4, 6, 3),
  'resnet101': (3, 4, 23, 3),
  'resnet152': (3, 8, 36, 3),
}


def torchvision_shapes(name, *, width=64, layers=None, num_classes=1000):
  """Key -> shape of torchvision's `resnetXX(num_classes)` (`width` scaled)."""
  layers = layers or LAYERS[name]
  bottleneck = name in ('resnet50', 'resnet101', 'resnet152')
  expansion = 4 if bottleneck else 1
  shapes = {}

  def conv(key, out, inp, k):
    shapes[f'{key}.weight'] = (out, inp, k, k)

  def bn(key, c):
    for suffix in ('weight', 'bias', 'running_mean', 'running_var'):
      shapes[f'{key}.{suffix}'] = (c,)
    shapes[f'{key}.num_batches_tracked'] = ()

  conv('conv1', width, 3, 7)
  bn('bn1', width)
  inplanes = width
  for i, blocks in enumerate(layers):
    planes, stride = width * 2**i, 1 if i == 0 else 2
    for j in range(blocks):
      p = f'layer{i + 1}.{j}'
      if bottleneck:
        conv(f'{p}.conv1', planes, inplanes, 1)
        bn(f'{p}.bn1', planes)
        conv(f'{p}.conv2', planes, planes, 3)
        bn(f'{p}.bn2', planes)
        conv(f'{p}.conv3', planes * 4, planes, 1)
        bn(f'{p}.bn3', planes * 4)
      else:
        conv(f'{p}.conv1', planes, inplanes, 3)
        bn(f'{p}.bn1', planes)
        conv(f'{p}.conv2', planes, planes, 3)
        bn(f'{p}.bn2', planes)
      if j == 0 and (stride != 1 or inplanes != planes * expansion):
        conv(f'{p}.downsample.0', planes * expansion, inplanes, 1)
        bn(f'{p}.downsample.1', planes * expansion)
      inplanes = planes * expansion
  shapes['fc.weight'] = (num_classes, inplanes)
  shapes['fc.bias'] = (num_classes,)
  return shapes


def torchvision_state_dict(name, seed, **kwargs):
  """Random, non-trivial values for every tensor of `torchvision_shapes`."""
  rng = np.random.default_rng(seed)
  out = {}
  for key, shape in torchvision_shapes(name, **kwargs).items():
    if key.endswith('num_batches_tracked'):
      value = np.asarray(rng.integers(0, 1000), np.int64)
    elif key.endswith('running_var') or (
      key.endswith('.weight') and len(shape) == 1
    ):
      value = rng.uniform(0.5, 1.5, size=shape).astype(np.float32)
    elif len(shape) == 4 or key == 'fc.weight':
      fan_in = math.prod(shape[1:])
      value = (rng.normal(size=shape) / math.sqrt(fan_in)).astype(np.float32)
    else:  # BatchNorm shift, running mean, fc bias.
      value = (0.1 * rng.normal(size=shape)).astype(np.float32)
    out[key] = value
  return out


def torchvision_forward(sd, images_nchw, name, *, faithful=False, layers=None):
  """torchvision's eval-mode `ResNet.forward` in NCHW with `lax`.

  `faithful` applies the method's changes the way the paper describes them:
  layer4 without stride, and its last block without bn_last and final ReLU;
  the head without bias.
  """
  layers = layers or LAYERS[name]
  bottleneck = name in ('resnet50', 'resnet101', 'resnet152')
  hi = jax.lax.Precision.HIGHEST

  def conv(x, key, stride=1, pad=0):
    return jax.lax.conv_general_dilated(
      x,
      jnp.asarray(sd[f'{key}.weight']),
      (stride, stride),
      [(pad, pad), (pad, pad)],
      dimension_numbers=('NCHW', 'OIHW', 'NCHW'),
      precision=hi,
    )

  def bn(x, key):
    c = lambda s: jnp.asarray(sd[f'{key}.{s}'])[None, :, None, None]
    return (x - c('running_mean')) / jnp.sqrt(c('running_var') + 1e-5) * c(
      'weight'
    ) + c('bias')

  x = jax.nn.relu(bn(conv(images_nchw, 'conv1', 2, 3), 'bn1'))
  x = jax.lax.reduce_window(
    x,
    -jnp.inf,
    jax.lax.max,
    (1, 1, 3, 3),
    (1, 1, 2, 2),
    [(0, 0)] * 2 + [(1, 1)] * 2,
  )
  for i, blocks in enumerate(layers):
    for j in range(blocks):
      p = f'layer{i + 1}.{j}'
      stride = 2 if (i > 0 and j == 0) else 1
      if faithful and i == 3:
        stride = 1
      last = faithful and i == 3 and j == blocks - 1
      if bottleneck:
        y = jax.nn.relu(bn(conv(x, f'{p}.conv1'), f'{p}.bn1'))
        y = jax.nn.relu(bn(conv(y, f'{p}.conv2', stride, 1), f'{p}.bn2'))
        y = conv(y, f'{p}.conv3')
        y = y if last else bn(y, f'{p}.bn3')
      else:
        y = jax.nn.relu(bn(conv(x, f'{p}.conv1', stride, 1), f'{p}.bn1'))
        y = conv(y, f'{p}.conv2', 1, 1)
        y = y if last else bn(y, f'{p}.bn2')
      if f'{p}.downsample.0.weight' in sd:
        x = bn(conv(x, f'{p}.downsample.0', stride), f'{p}.downsample.1')
      x = y + x if last else jax.nn.relu(y + x)
  pooled = x.mean((2, 3))
  logits = jnp.dot(pooled, jnp.asarray(sd['fc.weight']).T, precision=hi)
  return logits if faithful else logits + jnp.asarray(sd['fc.bias'])


def relative_error(actual, expected) -> float:
  """max |actual - expected| / max |expected|."""
  actual, expected = np.asarray(actual), np.asarray(expected)
  return float(np.abs(actual - expected).max() / np.abs(expected).max())


def logit_sum_gap(variables, logits, cams) -> float:
  """max |logits - (sum of maps + bias)| relative to max |logits|."""
  bias = models.head_bias(variables)
  sums = np.asarray(cams).sum((1, 2)) + (0 if bias is None else bias)
  return relative_error(sums, logits)


def _model(name, num_classes, faithful, **kwargs):
  return models.create_model(name, num_classes, cam_faithful=faithful, **kwargs)


def _apply(model, variables, images):
  return jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)


def _block_name(name):
  return 'layer4.{}.bn{}'.format(
    LAYERS[name][3] - 1,
    3 if name in ('resnet50', 'resnet101', 'resnet152') else 2,
  )


# ---------------------------------------------------------------------------
# Key mapping
# ---------------------------------------------------------------------------


class KeyMappingTest(parameterized.TestCase):
  """Every tensor of each depth lands in exactly one place of the flax tree."""

  @parameterized.product(name=sorted(LAYERS), faithful=[False, True])
  def test_every_key_mapped(self, name, faithful):
    shapes = torchvision_shapes(name)
    # Each tensor is a distinct constant (broadcast: no memory, no compute),
    # so every leaf's value says which file tensor it came from.
    codes = {k: float(i + 1) for i, k in enumerate(sorted(shapes))}
    sd = {
      k: np.broadcast_to(np.float32(codes[k]), s) for k, s in shapes.items()
    }
    model = _model(name, 1000, faithful)
    variables, report = pretrained.convert(sd, model)
    leaves = jax.tree_util.tree_leaves_with_path(variables)
    seen = {}
    for path, leaf in leaves:
      self.assertEqual(leaf.min(), leaf.max(), msg=str(path))
      seen.setdefault(float(leaf.min()), []).append(path)
    # Injective: no tensor went to two leaves, no leaf is left unfilled.
    self.assertTrue(all(len(p) == 1 for p in seen.values()), seen)
    by_code = {v: k for k, v in codes.items()}
    used = {by_code[c] for c in seen}
    self.assertEqual(used, set(report.loaded))
    bookkeeping = {k for k in shapes if k.endswith('num_batches_tracked')}
    self.assertEqual(set(report.ignored), bookkeeping)
    expected_dropped = set()
    if faithful:
      bn = _block_name(name)
      expected_dropped = {'fc.bias'} | {
        f'{bn}.{s}' for s in ('weight', 'bias', 'running_mean', 'running_var')
      }
    self.assertEqual(set(report.dropped), expected_dropped)
    self.assertEqual(set(shapes), used | bookkeeping | expected_dropped)
    self.assertEqual(report.fresh, [])
    # Names: BatchNorm statistics are batch_stats, weights are params.
    for path, _ in leaves:
      collection, leaf = path[0].key, path[-1].key
      self.assertEqual(collection == 'batch_stats', leaf in ('mean', 'var'))

  @parameterized.parameters('resnet18', 'resnet50')
  def test_layouts_of_known_tensors(self, name):
    sd = torchvision_state_dict(name, 1, width=8, layers=(1, 1, 1, 1))
    model = _model(name, 1000, False, num_filters=8, stage_sizes=(1, 1, 1, 1))
    variables, _ = pretrained.convert(sd, model)
    params, stats = variables['params'], variables['batch_stats']
    np.testing.assert_array_equal(
      params['conv_init']['kernel'], sd['conv1.weight'].transpose(2, 3, 1, 0)
    )
    np.testing.assert_array_equal(params['head']['kernel'], sd['fc.weight'].T)
    np.testing.assert_array_equal(params['head']['bias'], sd['fc.bias'])
    block = 'BottleneckBlock_3' if name == 'resnet50' else 'ResidualBlock_3'
    np.testing.assert_array_equal(
      params[block]['Conv_1']['kernel'],
      sd['layer4.0.conv2.weight'].transpose(2, 3, 1, 0),
    )
    np.testing.assert_array_equal(
      stats[block]['norm_proj']['var'], sd['layer4.0.downsample.1.running_var']
    )
    np.testing.assert_array_equal(params['bn_init']['scale'], sd['bn1.weight'])


# ---------------------------------------------------------------------------
# Function: equal to torchvision's forward; the surgery keeps the identity
# ---------------------------------------------------------------------------


class ForwardTest(parameterized.TestCase):
  """Loaded models compute torchvision's function (independent lax forward)."""

  @parameterized.parameters(
    ('resnet18', 64, 10), ('resnet18', 57, 3), ('resnet50', 48, 5)
  )
  def test_control_equals_torchvision_forward(self, name, size, classes):
    layers = (1, 2, 1, 1)
    sd = torchvision_state_dict(
      name, size, width=8, layers=layers, num_classes=classes
    )
    model = _model(name, classes, False, num_filters=8, stage_sizes=layers)
    variables, _ = pretrained.convert(sd, model)
    images = np.random.default_rng(size).normal(size=(2, 3, size, size))
    images = images.astype(np.float32)
    expected = jax.jit(
      lambda x: torchvision_forward(sd, x, name, layers=layers)
    )(images)
    logits, cams = _apply(model, variables, images.transpose(0, 2, 3, 1))
    self.assertLess(relative_error(logits, expected), 1e-5)
    self.assertLess(logit_sum_gap(variables, logits, cams), 1e-5)

  @parameterized.parameters(('resnet18', 64), ('resnet50', 40))
  def test_surgery_is_the_faithful_network_and_keeps_identity(self, name, size):
    layers = (1, 1, 1, 2)
    sd = torchvision_state_dict(name, size, width=8, layers=layers)
    model = _model(name, 1000, True, num_filters=8, stage_sizes=layers)
    variables, report = pretrained.convert(sd, model)
    self.assertIsNone(models.head_bias(variables))
    self.assertIn('fc.bias', report.dropped)
    self.assertTrue(any('stride 1' in n for n in report.notes))
    images = np.random.default_rng(size).normal(size=(2, 3, size, size))
    images = images.astype(np.float32)
    logits, cams = _apply(model, variables, images.transpose(0, 2, 3, 1))
    expected = jax.jit(
      lambda x: torchvision_forward(sd, x, name, faithful=True, layers=layers)
    )(images)
    self.assertLess(relative_error(logits, expected), 1e-5)
    self.assertEqual(cams.shape[1:3], (size // 16 + (size % 16 > 0),) * 2)
    self.assertLess(logit_sum_gap(variables, logits, cams), 1e-5)

  def test_fresh_head_from_rng(self):
    sd = torchvision_state_dict('resnet18', 3, width=8, layers=(1, 1, 1, 1))
    model = _model('resnet18', 2, True, num_filters=8, stage_sizes=(1, 1, 1, 1))
    variables, report = pretrained.convert(sd, model, rng=jax.random.key(1))
    self.assertEqual(report.fresh, ['params/head/kernel'])
    self.assertEqual(
      set(report.dropped),
      {
        'fc.weight',
        'fc.bias',
        *[
          f'layer4.0.bn2.{s}'
          for s in ('weight', 'bias', 'running_mean', 'running_var')
        ],
      },
    )
    kernel = np.asarray(variables['params']['head']['kernel'])
    self.assertEqual(kernel.shape, (64, 2))
    # LeCun normal over 64 inputs: std 1/8; the file's head was not copied.
    self.assertBetween(kernel.std(), 0.05, 0.25)
    again, _ = pretrained.convert(sd, model, rng=jax.random.key(1))
    np.testing.assert_array_equal(again['params']['head']['kernel'], kernel)
    other, _ = pretrained.convert(sd, model, rng=jax.random.key(2))
    self.assertFalse(np.array_equal(other['params']['head']['kernel'], kernel))
    headless = {k: v for k, v in sd.items() if not k.startswith('fc.')}
    default, report = pretrained.convert(headless, model)
    self.assertIn('key 0', str(report))
    self.assertIn('no head', str(report))
    self.assertEqual(report.fresh, ['params/head/kernel'])
    np.testing.assert_array_equal(
      default['params']['head']['kernel'],
      pretrained.convert(sd, model, rng=jax.random.key(0))[0]['params']['head'][
        'kernel'
      ],
    )
    images = np.random.default_rng(0).normal(size=(2, 32, 32, 3))
    logits, cams = _apply(model, variables, images.astype(np.float32))
    self.assertLess(logit_sum_gap(variables, logits, cams), 1e-5)


# ---------------------------------------------------------------------------
# Files: formats, export round trip, errors
# ---------------------------------------------------------------------------


def _random_variables(model, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(
    lambda s: jnp.asarray(rng.uniform(0.5, 1.5, size=s.shape), s.dtype),
    pretrained.variable_shapes(model),
  )


class FileTest(parameterized.TestCase):
  @parameterized.product(
    name=['resnet18', 'resnet50'], faithful=[False, True], classes=[2, 7]
  )
  def test_export_load_round_trip_is_exact(self, name, faithful, classes):
    pytest.importorskip('safetensors')
    model = _model(
      name, classes, faithful, num_filters=4, stage_sizes=(1, 2, 1, 2)
    )
    variables = _random_variables(model, classes)
    path = os.path.join(
      self.enter_context(tempfile.TemporaryDirectory()), 'w.safetensors'
    )
    pretrained_export.save_resnet(variables, path)
    loaded = pretrained.load_resnet(path, model)
    self.assertEqual(jax.tree.structure(loaded), jax.tree.structure(variables))
    jax.tree.map(np.testing.assert_array_equal, loaded, variables)
    # The file is in torchvision's naming: the control's has every key.
    written = pretrained.read_state_dict(path)
    shapes = torchvision_shapes(
      name, width=4, layers=(1, 2, 1, 2), num_classes=classes
    )
    if faithful:
      bn = f'layer4.1.bn{3 if name == "resnet50" else 2}'
      shapes = {k: s for k, s in shapes.items() if not k.startswith(f'{bn}.')}
      del shapes['fc.bias']
    self.assertEqual({k: v.shape for k, v in written.items()}, shapes)

  def test_npz_and_prefixed_keys(self):
    sd = torchvision_state_dict('resnet18', 4, width=4, layers=(1, 1, 1, 1))
    model = _model('resnet18', 1000, False, num_filters=4, stage_sizes=(1,) * 4)
    expected, _ = pretrained.convert(sd, model)
    path = os.path.join(
      self.enter_context(tempfile.TemporaryDirectory()), 'w.npz'
    )
    np.savez(path, **{f'module.{k}': v for k, v in sd.items()})
    loaded = pretrained.load_resnet(path, model)
    jax.tree.map(np.testing.assert_array_equal, loaded, expected)

  def test_problems_are_listed_by_name(self):
    model = _model('resnet18', 1000, False, num_filters=4, stage_sizes=(1,) * 4)
    sd = torchvision_state_dict('resnet18', 5, width=4, layers=(1, 1, 1, 1))
    del sd['layer2.0.bn1.running_var']
    sd['layer3.0.se.fc.weight'] = np.zeros(3, np.float32)
    sd['layer1.0.conv2.weight'] = np.zeros((4, 4, 1, 1), np.float32)
    with self.assertRaises(ValueError) as caught:
      pretrained.convert(sd, model, source='w.safetensors')
    message = str(caught.exception)
    self.assertIn('w.safetensors', message)
    self.assertIn('1 missing keys: layer2.0.bn1.running_var', message)
    self.assertIn('1 unexpected keys: layer3.0.se.fc.weight', message)
    self.assertIn('layer1.0.conv2.weight: file (4, 4, 1, 1)', message)
    self.assertIn('model (3, 3, 4, 4)', message)

  def test_wrong_depth_and_width(self):
    model = _model('resnet18', 1000, False)
    deeper = torchvision_shapes('resnet34')
    sd = {k: np.broadcast_to(np.float32(0), s) for k, s in deeper.items()}
    with self.assertRaisesRegex(ValueError, r'unexpected keys: .*layer1\.2\.'):
      pretrained.convert(sd, model)
    narrow = _model('resnet18', 1000, False, num_filters=32)
    sd = {
      k: np.broadcast_to(np.float32(0), s)
      for k, s in torchvision_shapes('resnet18').items()
    }
    with self.assertRaisesRegex(ValueError, r'\d+ shape mismatches: conv1'):
      pretrained.convert(sd, narrow)

  def test_other_stem_is_refused(self):
    model = _model('resnet18', 2, True, stem='small')
    with self.assertRaisesRegex(ValueError, "stem='imagenet'"):
      pretrained.convert({}, model)

  def test_file_errors(self):
    model = _model('resnet18', 2, True)
    with self.assertRaisesRegex(FileNotFoundError, 'model.init_from'):
      pretrained.load_resnet('/nonexistent/r18.safetensors', model)
    path = os.path.join(
      self.enter_context(tempfile.TemporaryDirectory()), 'w.bin'
    )
    open(path, 'wb').close()
    with self.assertRaisesRegex(ValueError, r'\.safetensors, \.npz'):
      pretrained.load_resnet(path, model)
    torch_path = path[:-4] + '.pth'
    open(torch_path, 'wb').close()
    try:
      import torch  # noqa: F401
    except ImportError:
      with self.assertRaisesRegex(ImportError, 'safetensors'):
        pretrained.load_resnet(torch_path, model)


# ---------------------------------------------------------------------------
# Training: config.model.init_from
# ---------------------------------------------------------------------------


class TrainingTest(parameterized.TestCase):
  def test_init_train_state(self):
    pytest.importorskip('safetensors')
    import optax

    from cco_jax import train_step as step_lib

    model = _model('resnet18', 3, True, num_filters=4, stage_sizes=(1,) * 4)
    variables = _random_variables(model, 0)
    state = step_lib.TrainState.create(
      apply_fn=model.apply,
      params=variables['params'],
      batch_stats=variables['batch_stats'],
      tx=optax.adam(1e-3),
    )
    self.assertIs(
      pretrained.init_train_state(state, model, '', jax.random.key(1)), state
    )
    sd = torchvision_state_dict('resnet18', 7, width=4, layers=(1,) * 4)
    path = os.path.join(self.enter_context(tempfile.TemporaryDirectory()), 'f')
    np.savez(path + '.npz', **sd)
    loaded = pretrained.init_train_state(
      state, model, path + '.npz', jax.random.key(1)
    )
    expected, _ = pretrained.convert(sd, model, rng=jax.random.key(1))
    jax.tree.map(
      np.testing.assert_array_equal, loaded.params, expected['params']
    )
    jax.tree.map(
      np.testing.assert_array_equal,
      loaded.batch_stats,
      expected['batch_stats'],
    )
    self.assertEqual(
      jax.tree.structure(loaded.opt_state), jax.tree.structure(state.opt_state)
    )
    zeros = jax.tree.map(jnp.zeros_like, loaded.params)
    jax.tree.map(np.testing.assert_array_equal, loaded.opt_state[0].mu, zeros)

  @parameterized.parameters(
    ('binary_finetune', 2), ('breeds_finetune', 37), ('cpu_finetune', 2)
  )
  def test_finetune_variants_take_torchvision_weights(self, variant, classes):
    from experiments.configs import pets

    config = pets.get_config(variant)
    model = model_config.create_model(config, classes)
    sd = {
      k: np.broadcast_to(np.float32(1), s)
      for k, s in torchvision_shapes(config.model.name).items()
    }
    _, report = pretrained.convert(sd, model)
    self.assertEqual(report.fresh, ['params/head/kernel'])
    self.assertTrue(config.data.normalize)  # ImageNet statistics.
    with self.assertRaisesRegex(FileNotFoundError, 'init_from=PATH'):
      pretrained.init_train_state(
        None, model, config.model.init_from, jax.random.key(0)
      )


# ---------------------------------------------------------------------------
# torchvision itself (only where torch and torchvision are installed)
# ---------------------------------------------------------------------------


def compare_with_torchvision(name: str, size: int = 224, batch: int = 2):
  """Measures load_resnet against torchvision (random weights and BN stats).

  Returns `(control_error, faithful_identity_gap, export_error)`: the relative
  error of the 1,000-class control's logits against torchvision's eval-mode
  logits; the logit-sum gap of the same file loaded into a faithful 2-class
  model; and the largest difference of torchvision's logits after a round
  trip of the weights through `save_resnet` and a strict `load_state_dict`.
  """
  from safetensors import torch as st_torch
  import torch
  import torchvision

  torch.manual_seed(0)
  net = getattr(torchvision.models, name)(weights=None).eval()
  with torch.no_grad():
    for module in net.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        module.weight.uniform_(0.5, 1.5)
        module.bias.normal_(0, 0.1)
        module.running_mean.normal_(0, 0.1)
        module.running_var.uniform_(0.5, 1.5)
    images = torch.randn(batch, 3, size, size)
    expected = net(images).numpy()
  with tempfile.TemporaryDirectory() as directory:
    path = os.path.join(directory, f'{name}.safetensors')
    st_torch.save_file(
      {k: v.contiguous() for k, v in net.state_dict().items()}, path
    )
    nhwc = images.numpy().transpose(0, 2, 3, 1)
    control = _model(name, 1000, False)
    control_variables = pretrained.load_resnet(path, control)
    logits, _ = _apply(control, control_variables, nhwc)
    faithful = _model(name, 2, True)
    variables = pretrained.load_resnet(path, faithful, rng=jax.random.key(0))
    f_logits, f_cams = _apply(faithful, variables, nhwc)
    exported = os.path.join(directory, 'exported.safetensors')
    pretrained_export.save_resnet(control_variables, exported)
    again = getattr(torchvision.models, name)(weights=None).eval()
    again.load_state_dict(st_torch.load_file(exported), strict=True)
    with torch.no_grad():
      export_error = float(np.abs(again(images).numpy() - expected).max())
  return (
    relative_error(logits, expected),
    logit_sum_gap(variables, f_logits, f_cams),
    export_error,
  )


class TorchvisionTest(parameterized.TestCase):
  def test_pth_files(self):
    torch = pytest.importorskip('torch')
    sd = torchvision_state_dict('resnet18', 6, width=4, layers=(1, 1, 1, 1))
    model = _model('resnet18', 1000, False, num_filters=4, stage_sizes=(1,) * 4)
    expected, _ = pretrained.convert(sd, model)
    tensors = {k: torch.from_numpy(np.array(v)) for k, v in sd.items()}
    directory = self.enter_context(tempfile.TemporaryDirectory())
    for name, content in (
      ('plain.pth', tensors),
      ('checkpoint.pt', {'state_dict': tensors, 'epoch': 3}),
    ):
      path = os.path.join(directory, name)
      torch.save(content, path)
      loaded = pretrained.load_resnet(path, model)
      jax.tree.map(np.testing.assert_array_equal, loaded, expected)

  @parameterized.parameters('resnet18', 'resnet50')
  def test_equals_torchvision_eval(self, name):
    pytest.importorskip('torch')
    pytest.importorskip('torchvision')
    pytest.importorskip('safetensors')
    error, gap, export_error = compare_with_torchvision(name)
    print(
      f'{name}: control relative error {error:.2e}, faithful gap {gap:.2e}, '
      f'export {export_error:.1e}'
    )
    self.assertLess(error, 1e-4)
    self.assertLess(gap, 1e-5)
    self.assertEqual(export_error, 0.0)
