"""Training images finished on the device equal those finished on the host.

The host path (`transforms.finish_image` after a host flip) and the device
path (uint8 + 'flip' -> `device_transforms.finish_batch`) must give the same
float32 images and the same masks, from single examples up to whole
iterators and a whole train step.
"""

from flax import linen as nn
import jax
import numpy as np
import optax
import pytest

from cco_jax import data as ip
from cco_jax import objectives
from cco_jax import train_step as step_lib
from cco_jax.data import cache as cache_lib
from cco_jax.data import device_transforms as dt
from cco_jax.data import transforms

# float32 rounding of (x / 255 - mean) / std, |x| <= ~2.7: a few ulp.
TOL = dict(rtol=1e-6, atol=2e-6)


def _host_finish(batch, normalize):
  """The host path, example by example: flip, then `finish_image`."""
  flip = batch.get('flip')
  out = {}
  for key in ('image', 'mask', 'pixel_mask'):
    if key not in batch:
      continue
    x = batch[key]
    lead = flip.shape if flip is not None else x.shape[:1]
    rows = x.reshape((-1,) + x.shape[len(lead) :])
    if flip is not None:
      rows = np.stack(
        [r[:, ::-1] if f else r for r, f in zip(rows, flip.ravel())]
      )
    if key == 'image':
      rows = transforms.finish_image(rows, normalize=normalize)
    out[key] = rows.reshape(x.shape)
  return out


def _random_batch(rng, lead, size, cam):
  return {
    'image': rng.integers(0, 256, lead + (size, size, 3), dtype=np.uint8),
    'mask': rng.uniform(0, 1, lead + cam).astype(np.float32),
    'pixel_mask': (rng.uniform(0, 1, lead + (size, size)) > 0.5).astype(
      np.float32
    ),
    'flip': rng.uniform(0, 1, lead) < 0.5,
  }


@pytest.mark.parametrize(
  'lead,size,cam',
  [
    ((1,), 1, (1, 1)),
    ((5,), 7, (3, 2)),
    ((2, 3), 16, (4, 4)),
    ((4,), 33, (5, 7)),
  ],
)
@pytest.mark.parametrize('normalize', [False, True])
def test_device_finish_equals_host_finish(lead, size, cam, normalize):
  rng = np.random.default_rng(size)
  batch = _random_batch(rng, lead, size, cam)
  expected = _host_finish(batch, normalize)
  got = jax.jit(lambda b: dt.finish_batch(b, normalize=normalize))(batch)
  assert set(got) == {'image', 'mask', 'pixel_mask'}  # 'flip' is consumed.
  assert got['image'].dtype == np.float32
  np.testing.assert_allclose(got['image'], expected['image'], **TOL)
  for key in ('mask', 'pixel_mask'):  # Moved, not computed: exact.
    np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
  # The image alone, and without flips.
  np.testing.assert_allclose(
    dt.finish_on_device(batch['image'], batch['flip'], normalize=normalize),
    expected['image'],
    **TOL,
  )
  np.testing.assert_allclose(
    dt.finish_on_device(batch['image'], None, normalize=normalize),
    transforms.finish_image(batch['image'], normalize=normalize),
    **TOL,
  )


def test_flip_where_mirrors_only_flagged_examples():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(6, 4, 5, 2)).astype(np.float32)
  flip = np.array([1, 0, 0, 1, 1, 0], np.int8)
  y = np.asarray(dt.flip_where(x, flip))
  for i in range(6):
    np.testing.assert_array_equal(y[i], x[i][:, ::-1] if flip[i] else x[i])
  np.testing.assert_array_equal(dt.flip_where(y, flip), x)  # An involution.
  with pytest.raises(ValueError, match='does not lead'):
    dt.flip_where(x, flip[:5])


def test_bad_inputs_are_errors():
  images = np.zeros((2, 4, 4, 3), np.uint8)
  with pytest.raises(ValueError, match='config.data.normalize'):
    dt.finish_batch(
      {'image': images, 'mask': np.zeros((2, 1, 1))}, normalize=None
    )
  with pytest.raises(ValueError, match='uint8'):
    dt.finish_on_device(images.astype(np.float32), None, normalize=False)


def test_host_finished_batches_pass_through():
  rng = np.random.default_rng(1)
  batch = {
    'image': rng.uniform(size=(3, 4, 4, 3)).astype(np.float32),
    'mask': rng.uniform(size=(3, 2, 2)).astype(np.float32),
  }
  got = dt.finish_batch(batch, normalize=None)
  for key in batch:
    assert got[key] is batch[key]


@pytest.mark.parametrize('normalize', [False, True])
def test_cached_batches_on_device_equal_host_batches(normalize):
  rng = np.random.default_rng(2)
  n, size, cam = 7, 12, (3, 3)
  cached = cache_lib.Cached(
    images=rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
    fgs=None,
    masks=rng.uniform(size=(n,) + cam).astype(np.float32),
    pixel_masks=rng.uniform(size=(n, size, size)).astype(np.float32),
    labels=np.arange(n, dtype=np.int32) % 2,
    indices=np.arange(n, dtype=np.int32),
    groups=np.zeros(n, np.int32),
    file_names=tuple(f'{i}' for i in range(n)),
  )
  keys = ('image', 'mask', 'pixel_mask', 'label', 'index', 'group')

  def make(on_device):
    return cache_lib.CachedBatches(
      cached,
      batch_size=6,
      num_devices=2,
      shuffle_seed=3,
      augment_seed=4,
      flip=True,
      normalize=normalize,
      keys=keys + ('flip',) * on_device,
      device_preprocessing=on_device,
    )

  host, device = make(False), make(True)
  flips = 0
  for k in range(4):
    a, b = host[k], device[k]
    assert b['image'].dtype == np.uint8 and b['flip'].shape == (2, 3)
    flips += b['flip'].sum()
    finished = dt.finish_batch(b, normalize=normalize)
    for key in keys:
      np.testing.assert_allclose(finished[key], a[key], err_msg=key, **TOL)
  assert 0 < flips < 24


TRAIN_PATHS = pytest.mark.parametrize(
  'path',
  [dict(augment_crop=True), dict(cache_decoded=True, augment_crop=False)],
  ids=['per_example', 'cached_batches'],
)


@TRAIN_PATHS
def test_iterators_give_the_same_training_batches(synthetic_config, path):
  # device_preprocessing changes where images are finished, not which
  # examples, crops or flips a batch holds; resuming across it is exact.
  def make(on_device):
    config = synthetic_config(
      augment_flip=True,
      normalize=True,
      pixel_masks=True,
      device_preprocessing=on_device,
      **path,
    )
    return ip.create_train_iterator(
      config,
      cam_size=(4, 4),
      global_batch_size=8,
      num_devices=2,
      seed=11,
      with_index=True,
    )

  host, device = make(False), make(True)
  flips = 0
  for _ in range(4):
    a, b = next(host), next(device)
    assert a['image'].dtype == np.float32 and 'flip' not in a
    assert b['image'].dtype == np.uint8 and b['flip'].dtype == bool
    assert set(b) == set(a) | {'flip'}
    flips += int(b['flip'].sum())
    finished = dt.finish_batch(b, normalize=True)
    for key in a:
      np.testing.assert_allclose(finished[key], a[key], err_msg=key, **TOL)
  assert 0 < flips < 32
  assert host.get_state() == device.get_state()


class _TinyCamNet(nn.Module):
  """Per-cell maps of pooled pixels, BatchNorm and a position bias: a model
  whose step compiles in seconds and is not flip-equivariant."""

  num_classes: int
  cam: tuple[int, int]

  @nn.compact
  def __call__(self, images, train: bool):
    size = images.shape[1]
    window = (size // self.cam[0], size // self.cam[1])
    x = nn.avg_pool(images, window, strides=window)
    x = nn.BatchNorm(
      use_running_average=not train, axis_name=step_lib.AXIS_NAME
    )(x)
    position = self.param(
      'position',
      nn.initializers.normal(1.0),
      self.cam + (self.num_classes,),
    )
    cams = nn.Dense(self.num_classes)(x) + position
    return cams.sum((1, 2)), cams


def test_train_step_on_uint8_equals_host_finished_batch():
  size, cam = 16, (4, 4)
  model = _TinyCamNet(3, cam)
  state = step_lib.create_train_state(
    jax.random.key(0), model, size, optax.sgd(0.1)
  )
  rng = np.random.default_rng(3)
  batch = _random_batch(rng, (4, 2), size, cam)
  batch['label'] = rng.integers(0, 3, (4, 2)).astype(np.int32)
  host = {
    **_host_finish(batch, normalize=True),
    'label': batch['label'],
  }
  step = step_lib.pmapped_train_step(
    objectives.create({'name': 'ace_kld'}), normalize=True
  )
  new_device, m_device = step(step_lib.replicate(state), step_lib.shard(batch))
  new_host, m_host = step(step_lib.replicate(state), step_lib.shard(host))
  leaves = [
    jax.tree.leaves(step_lib.unreplicate(s)) for s in (new_device, new_host)
  ]
  assert len(leaves[0]) == len(leaves[1]) > 3
  for a, b in zip(*leaves):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  for key in ('loss', 'ce', 'ace', 'kld', 'accuracy'):
    np.testing.assert_allclose(
      m_device[key][0], m_host[key][0], rtol=1e-5, atol=1e-7
    )
  # The flips matter: the unflipped batch gives another step.
  unflipped = dict(batch, flip=np.zeros_like(batch['flip']))
  _, m_other = step(step_lib.replicate(state), step_lib.shard(unflipped))
  assert not np.allclose(m_other['loss'][0], m_host['loss'][0], rtol=1e-5)
