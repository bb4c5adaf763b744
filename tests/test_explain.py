"""Explanations of any image: identity, channel maps, autodiff equality, files,
masks."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest
from test_models import random_variables

from cco_jax import explain as explain_lib
from cco_jax import models

SIZE = 16


def _model(classes=5, cam_faithful=True, seed=0, batch=3):
  model = models.create_model(
    'resnet18',
    classes,
    cam_faithful=cam_faithful,
    num_filters=4,
    stem='strided',
    stage_sizes=(1, 1),
  )
  variables = random_variables(model, (batch, SIZE, SIZE, 3), seed)
  return model, variables


def _images(batch, seed=0):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(batch, SIZE, SIZE, 3)).astype(np.float32)


@pytest.mark.parametrize('cam_faithful,batch', [(True, 3), (False, 5)])
def test_identity_and_contrastive_maps(cam_faithful, batch):
  model, variables = _model(cam_faithful=cam_faithful, seed=batch)
  explainer = explain_lib.Explainer(model, variables, batch_size=4)
  result = explainer.explain(_images(batch, seed=batch))
  logits, _ = model.apply(variables, _images(batch, seed=batch), train=False)
  np.testing.assert_allclose(result.logits, logits, rtol=1e-5, atol=1e-5)
  grid = models.cam_size(model, SIZE)
  assert grid == ((8, 8) if cam_faithful else (4, 4))
  assert result.cams.shape == (batch, *grid, 5)
  np.testing.assert_allclose(
    result.map_sums + result.bias, result.logits, rtol=1e-4, atol=1e-4
  )
  assert result.identity_error.shape == (batch,)
  assert np.all(result.identity_error <= 1e-4 * (1 + np.abs(logits).max()))
  if not cam_faithful:
    assert np.abs(result.bias).max() > 0.1  # the bias matters
  np.testing.assert_array_equal(result.target, np.argmax(logits, -1))
  np.testing.assert_allclose(result.probabilities.sum(-1), 1, rtol=1e-5)
  # Contrastive maps against the target: zero at the target, differences of
  # logits (minus biases) elsewhere.
  t = result.target
  rows = np.arange(batch)
  assert np.all(result.contrastive[rows, ..., t] == 0)
  expected = (logits - result.bias)[rows, t][:, None] - (logits - result.bias)
  np.testing.assert_allclose(
    result.contrastive.sum((1, 2)), expected, rtol=1e-4, atol=1e-4
  )
  # A given target.
  given = explainer.explain(_images(batch, seed=batch), targets=2)
  assert np.all(given.contrastive[..., 2] == 0)
  np.testing.assert_allclose(
    given.contrastive, given.cams[..., 2:3] - given.cams, atol=1e-6
  )
  with pytest.raises(ValueError, match=r'targets must be class indices'):
    explainer.explain(_images(batch), targets=7)
  with pytest.raises(ValueError, match=r'\(B, S, S, 3\)'):
    explainer.explain(_images(1)[0])


@pytest.mark.parametrize('against', [None, 1])
def test_channel_maps_sum_to_the_class_map(against):
  model, variables = _model(seed=3)
  explainer = explain_lib.Explainer(model, variables)
  images = _images(2, seed=4)
  result = explainer.explain(images, targets=against)
  decomposition = explainer.channels(images, 3, k=3, against=against)
  assert decomposition.maps.shape == (2, 8, 8, 3)
  np.testing.assert_allclose(
    decomposition.maps.sum(-1) + decomposition.rest,
    decomposition.class_map,
    atol=1e-6,
  )
  if against is None:
    expected = result.cams[..., 3]
  else:  # M_3 - M_1 = -K[..., 3] with K taken against class 1.
    expected = -result.contrastive[..., 3]
  np.testing.assert_allclose(decomposition.class_map, expected, atol=1e-5)
  np.testing.assert_allclose(
    decomposition.contributions, decomposition.maps.sum((1, 2)), atol=1e-6
  )
  # The k channels are the largest by |contribution|, in decreasing order.
  everything = explainer.channels(images, 3, k=1000, against=against)
  assert everything.maps.shape[-1] == 4 * 2  # all channels of the last stage
  np.testing.assert_allclose(everything.rest, 0, atol=1e-6)
  magnitudes = np.abs(everything.contributions)
  assert np.all(np.diff(magnitudes, axis=-1) <= 0)
  np.testing.assert_array_equal(
    decomposition.channels, everything.channels[:, :3]
  )


def _autodiff_hirescam(model, variables, images, class_index):
  """HiResCAM the textbook way: d logit / d A times A, summed over channels,
  with the gradient taken through the real head by autodiff."""

  def logit_of_delta(delta):
    def interceptor(next_fun, args, kwargs, context):
      if isinstance(context.module, models.CamHead):
        args = (args[0] + delta,)
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
      logits, _ = model.apply(variables, images, train=False)
    return logits[:, class_index].sum()

  features = explain_lib.forward_with_features(model, variables, images)[2]
  grads = jax.grad(logit_of_delta)(jnp.zeros_like(features))
  return np.asarray((grads * features).sum(-1))


def test_maps_equal_autodiff_hirescam():
  model, variables = _model(classes=4, cam_faithful=False, seed=7)
  images = _images(3, seed=8)
  result = explain_lib.explain(model, variables, images)
  for c in range(4):
    np.testing.assert_allclose(
      result.cams[..., c],
      _autodiff_hirescam(model, variables, images, c),
      rtol=1e-4,
      atol=1e-6,
    )


def _write_image(path, seed, size=(23, 19)):
  rng = np.random.default_rng(seed)
  pixels = rng.integers(0, 256, size[::-1] + (3,), dtype=np.uint8)
  Image.fromarray(pixels).save(path)
  return pixels


@pytest.mark.parametrize('normalize', [False, True])
def test_file_paths_get_the_evaluation_preprocessing(tmp_path, normalize):
  model, variables = _model(seed=1)
  paths = []
  expected = []
  for i in range(3):
    path = tmp_path / f'image_{i}.png'
    pixels = _write_image(path, i)
    paths.append(str(path))
    squashed = np.asarray(
      Image.fromarray(pixels).resize((SIZE, SIZE), Image.Resampling.BILINEAR),
      np.float32,
    )
    squashed = squashed / 255
    if normalize:
      squashed = (squashed - np.array([0.485, 0.456, 0.406])) / np.array(
        [0.229, 0.224, 0.225]
      )
    expected.append(squashed.astype(np.float32))
  explainer = explain_lib.Explainer(
    model, variables, image_size=SIZE, normalize=normalize
  )
  from_files = explainer.explain(paths)
  from_arrays = explainer.explain(np.stack(expected))
  np.testing.assert_allclose(from_files.images, np.stack(expected), atol=1e-5)
  np.testing.assert_allclose(from_files.logits, from_arrays.logits, atol=1e-5)
  assert from_files.paths == paths
  one = explainer.explain(paths[1])
  np.testing.assert_allclose(one.logits[0], from_arrays.logits[1], atol=1e-5)

  corrupt = tmp_path / 'corrupt.jpg'
  corrupt.write_bytes(b'not an image at all')
  with pytest.raises(ValueError, match=r'corrupt\.jpg: not a readable image'):
    explainer.explain([paths[0], str(corrupt)])
  with pytest.raises(ValueError, match=r'image_size'):
    explain_lib.Explainer(model, variables).explain(paths)


def test_mask_influence(tmp_path):
  model, variables = _model(seed=2)
  images = _images(2, seed=5)
  rng = np.random.default_rng(0)
  # Masks constant on each CAM cell (2 x 2 pixels per cell of an 8 x 8 grid).
  cells = (rng.random((2, 8, 8)) < 0.5).astype(np.float32)
  masks = np.kron(cells, np.ones((2, 2), np.float32))
  explainer = explain_lib.Explainer(model, variables, image_size=SIZE)
  result = explainer.explain(images, masks=masks)
  magnitude = np.abs(result.contrastive.astype(np.float64)).sum(-1)
  np.testing.assert_allclose(result.cam_masks, cells)
  np.testing.assert_allclose(
    result.influence['fg'], (magnitude * cells).sum((1, 2)), rtol=1e-5
  )
  np.testing.assert_allclose(
    result.influence['bg'], (magnitude * (1 - cells)).sum((1, 2)), rtol=1e-5
  )
  np.testing.assert_allclose(
    result.influence['fg'] + result.influence['bg'],
    result.influence['net'],
    rtol=1e-5,
  )
  # The same masks as Pets trimaps on disk (1 = pet, 2 = background).
  paths = []
  for i, mask in enumerate(masks):
    path = tmp_path / f'trimap_{i}.png'
    Image.fromarray(np.where(mask > 0, 1, 2).astype(np.uint8)).save(path)
    paths.append(str(path))
  from_files = explainer.explain(images, masks=paths)
  for key in ('fg', 'bg', 'net'):
    np.testing.assert_allclose(
      from_files.influence[key], result.influence[key], rtol=1e-6
    )
  with pytest.raises(ValueError, match=r'masks must be \(2, S, S\)'):
    explainer.explain(images, masks=masks[:1])
