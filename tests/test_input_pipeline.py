"""Input pipeline: shapes, masks, alignment, determinism, resumption, padding."""

import json

import numpy as np
from PIL import Image
import pytest
import synthetic_data as df

from cco_jax import data as ip
from cco_jax.data import cache as cache_lib
from cco_jax.data import device_transforms
from cco_jax.data import pipeline
from cco_jax.data import sources

CAM = (4, 4)
# The two ways training batches are rendered.
TRAIN_PATHS = pytest.mark.parametrize(
  'path',
  [
    dict(augment_crop=True),  # Per-example rendering (Pillow).
    dict(
      cache_decoded=True, augment_crop=False
    ),  # Whole-batch gathers (cache.CachedBatches).
  ],
  ids=['per_example', 'cached_batches'],
)
NUM_TRAIN = df.NUM_TRAINVAL - len(
  df.SYNTHETIC_BREEDS
)  # One per breed held out.


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _finished(batch, normalize=False):
  """A training batch as the train step sees it (float32, flips applied)."""
  finished = device_transforms.finish_batch(batch, normalize=normalize)
  return {key: np.asarray(value) for key, value in finished.items()}


def _fg_fraction(images: np.ndarray, cam_size) -> np.ndarray:
  """Fraction of foreground pixels per CAM cell: (..., S, S, 3) -> (..., h, w)."""
  red = df.is_foreground_pixel(images).astype(np.float32)
  *lead, size, _ = red.shape
  h, w = cam_size
  return red.reshape(*lead, h, size // h, w, size // w).mean(axis=(-3, -1))


# ----------------------------------------------------------------------------
# Configuration, sizes and the validation carve.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
  'key,value',
  [
    ('task', 'colour'),
    ('mask_resize', 'bilinear'),
    ('name', 'imagenet'),
    ('empty_mask_policy', 'skip'),
    ('validation_fraction', 1.0),
    ('num_workers', -1),
  ],
)
def test_bad_config_values_are_errors(key, value):
  config = ip.default_config()
  config[key] = value
  with pytest.raises(ValueError, match=key):
    ip.check_config(config)


def test_cache_needs_in_process_reading():
  config = ip.default_config()
  config.update(dict(cache_decoded=True, num_workers=2))
  with pytest.raises(ValueError, match='num_workers'):
    ip.check_config(config)


def test_num_classes_and_names():
  config = ip.default_config()
  assert ip.num_classes(config) == 2
  assert ip.class_names(config) == ('cat', 'dog')
  config.task = 'breed'
  assert ip.num_classes(config) == 37
  assert ip.class_names(config)[:2] == ('Abyssinian', 'american_bulldog')


def test_carve_is_stratified_deterministic_and_order_free():
  rng = np.random.default_rng(0)
  names = [f'pet_{i}' for i in range(500)]
  labels = rng.integers(0, 5, 500)
  train, validation = ip.carve_validation(names, labels, 0.2)
  assert len(np.intersect1d(train, validation)) == 0
  assert len(train) + len(validation) == 500
  for label in range(5):
    count = np.sum(labels == label)
    assert np.sum(labels[validation] == label) == round(0.2 * count)
  order = rng.permutation(500)
  _, shuffled = ip.carve_validation(
    [names[i] for i in order], labels[order], 0.2
  )
  assert sorted(names[i] for i in validation) == sorted(
    names[order[i]] for i in shuffled
  )
  assert len(ip.carve_validation(names, labels, 0.0)[1]) == 0


def test_split_sizes_of_synthetic_pets(synthetic_config):
  config = synthetic_config()
  assert ip.split_sizes(config) == {
    'train': NUM_TRAIN,
    'validation': len(df.SYNTHETIC_BREEDS),
    'test': df.NUM_TEST,
  }
  assert ip.num_examples(config, 'ood') == df.NUM_CVD_DECODABLE


# ----------------------------------------------------------------------------
# Training batches.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize('on_device', [True, False])
def test_train_batch_shapes_dtypes_and_ranges(synthetic_config, on_device):
  iterator = ip.create_train_iterator(
    synthetic_config(device_preprocessing=on_device),
    cam_size=CAM,
    global_batch_size=8,
    num_devices=4,
    seed=0,
  )
  batch = next(iterator)
  assert set(batch) == {'image', 'mask', 'label', 'group'}
  if on_device:  # uint8 images, finished by the train step.
    assert batch['image'].dtype == np.uint8
    batch = _finished(batch)
  # Pets without a spurious benchmark has one group: every example is 0.
  assert batch['group'].dtype == np.int32 and not batch['group'].any()
  assert batch['image'].shape == (4, 2, 32, 32, 3)
  assert batch['mask'].shape == (4, 2, *CAM)
  assert batch['label'].shape == (4, 2)
  assert (batch['image'].dtype, batch['mask'].dtype, batch['label'].dtype) == (
    np.float32,
    np.float32,
    np.int32,
  )
  assert 0 <= batch['image'].min() and batch['image'].max() <= 1
  assert set(np.unique(batch['mask'])) <= {0.0, 1.0}
  assert set(np.unique(batch['label'])) <= {0, 1}


def test_batches_split_across_hosts(synthetic_config):
  with pytest.raises(ValueError, match='not divisible'):
    ip.create_train_iterator(
      synthetic_config(),
      cam_size=CAM,
      global_batch_size=10,
      num_devices=4,
      seed=0,
    )
  shards = [
    ip.create_train_iterator(
      synthetic_config(),
      cam_size=CAM,
      global_batch_size=8,
      num_devices=2,
      seed=0,
      process_index=p,
      process_count=2,
      with_index=True,
    )
    for p in range(2)
  ]
  batches = [next(shard) for shard in shards]
  assert batches[0]['image'].shape == (2, 2, 32, 32, 3)
  first, second = (set(b['index'].ravel()) for b in batches)
  assert all(i % 2 == 0 for i in first) and all(i % 2 == 1 for i in second)


def test_normalize_uses_imagenet_statistics(synthetic_config):
  kwargs = dict(cam_size=CAM, global_batch_size=4, num_devices=1, seed=3)
  host = synthetic_config(device_preprocessing=False)
  plain = next(ip.create_train_iterator(host, **kwargs))
  normal = next(
    ip.create_train_iterator(
      synthetic_config(normalize=True, device_preprocessing=False), **kwargs
    )
  )
  np.testing.assert_allclose(
    normal['image'],
    (plain['image'] - ip.IMAGENET_MEAN) / ip.IMAGENET_STD,
    rtol=1e-5,
    atol=1e-5,
  )


@TRAIN_PATHS
def test_same_seed_same_batches_and_epochs_reshuffled(synthetic_config, path):
  config = synthetic_config(augment_flip=True, **path)
  # 24 = 8 batches of 3 examples = almost one epoch of NUM_TRAIN = 27.
  make = lambda seed: ip.create_train_iterator(
    config,
    cam_size=CAM,
    global_batch_size=9,
    num_devices=3,
    seed=seed,
    with_index=True,
  )
  first, again, other = make(0), make(0), make(1)
  for a, b in zip(_take(first, 2), _take(again, 2)):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  epochs = [np.concatenate([b['index'].ravel() for b in _take(make(0), 6)])]
  epochs = np.split(epochs[0], 2)  # 6 batches of 9 = two epochs of 27.
  for epoch in epochs:
    np.testing.assert_array_equal(np.sort(epoch), np.arange(NUM_TRAIN))
  assert not np.array_equal(epochs[0], epochs[1])
  other_indices = np.concatenate([b['index'].ravel() for b in _take(other, 3)])
  assert not np.array_equal(other_indices, epochs[0])


@TRAIN_PATHS
def test_state_restores_mid_epoch_exactly(synthetic_config, path):
  config = synthetic_config(augment_flip=True, **path)
  make = lambda: ip.create_train_iterator(
    config, cam_size=CAM, global_batch_size=8, num_devices=2, seed=5
  )
  original = make()
  _take(original, 2)
  state = original.get_state()
  assert json.loads(state)['next_batch'] == 2
  expected = _take(original, 4)  # Crosses the epoch boundary (27 examples).
  restored = make()
  restored.set_state(state)
  for a, b in zip(expected, _take(restored, 4)):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  different = ip.create_train_iterator(
    config, cam_size=CAM, global_batch_size=8, num_devices=2, seed=6
  )
  with pytest.raises(ValueError, match='another pipeline'):
    different.set_state(state)


def test_worker_processes_give_the_same_batches(synthetic_config):
  kwargs = dict(cam_size=CAM, global_batch_size=4, num_devices=2, seed=2)
  in_process = ip.create_train_iterator(
    synthetic_config(augment_flip=True), **kwargs
  )
  workers = ip.create_train_iterator(
    synthetic_config(augment_flip=True, num_workers=2, prefetch=1), **kwargs
  )
  try:
    for a, b in zip(_take(in_process, 3), _take(workers, 3)):
      for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    state = workers.get_state()
    in_process.set_state(state)  # Worker count is not part of the state.
    np.testing.assert_array_equal(
      next(in_process)['image'], next(workers)['image']
    )
  finally:
    workers.close()


@pytest.mark.parametrize('crop', [True, False])
def test_cache_decoded_matches_shapes_and_is_deterministic(
  synthetic_config, crop
):
  make = lambda: ip.create_train_iterator(
    synthetic_config(
      cache_decoded=True,
      augment_flip=True,
      augment_crop=crop,
      mask_resize='area',
    ),
    cam_size=CAM,
    global_batch_size=4,
    num_devices=1,
    seed=0,
    with_index=True,
  )
  a, b = _take(make(), 2), _take(make(), 2)
  for x, y in zip(a, b):
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])
  assert a[0]['image'].shape == (1, 4, 32, 32, 3)
  _check_alignment([_finished(batch) for batch in a])


@pytest.mark.parametrize('mask_resize', ['nearest', 'area'])
@pytest.mark.parametrize('size,cam', [(32, (4, 4)), (24, (3, 5))])
def test_cached_array_path_equals_the_pillow_path(mask_resize, size, cam):
  # The uncropped cached path skips Pillow; it must render exactly what
  # `to_model_input` renders from the same cached copy, flipped or not.
  rng = np.random.default_rng(size)
  n = 6
  fgs = np.zeros((n, size, size), np.uint8)
  for i in range(n - 1):  # The last foreground stays empty: its mask -> ones.
    top, left = rng.integers(0, size // 2, 2)
    fgs[
      i,
      top : top + rng.integers(2, size // 2),
      left : left + rng.integers(2, size // 2),
    ] = 1
  images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
  source = [
    {
      'image': Image.fromarray(images[i]),
      'fg': Image.fromarray(fgs[i]),
      'label': i % 2,
      'index': i,
      'group': i % 3,
      'file_name': f'{i}.jpg',
    }
    for i in range(n)
  ]

  class _List:
    def __len__(self):
      return n

    def __getitem__(self, i):
      return source[i]

  cached = cache_lib.build_cache(
    _List(), size, cam_size=cam, mask_resize=mask_resize, with_pixel_mask=True
  )
  assert cached.masks.shape == (n, *cam)
  np.testing.assert_array_equal(cached.masks[-1], np.ones(cam, np.float32))
  for i in range(n):
    item = cached[i]
    for flip in (False, True):
      for normalize in (False, True):
        fast = cache_lib.cached_model_input(
          item, normalize=normalize, flip=flip
        )
        slow = ip.to_model_input(
          cache_lib.as_images(item),
          image_size=size,
          cam_size=cam,
          mask_resize=mask_resize,
          normalize=normalize,
          with_pixel_mask=True,
          pixel_mask_empty_as_ones=True,
          flip=flip,
        )
        keys = ('image', 'mask', 'pixel_mask', 'label', 'index', 'group')
        assert set(keys) <= set(fast)
        for key in keys:
          assert fast[key].dtype == slow[key].dtype, key
          np.testing.assert_array_equal(fast[key], slow[key], err_msg=key)
  # Whole batches render each example as `_cached_model_input` does.
  batches = cache_lib.CachedBatches(
    cached,
    batch_size=4,
    num_devices=2,
    shuffle_seed=3,
    augment_seed=4,
    flip=True,
    normalize=True,
    keys=('image', 'mask', 'pixel_mask', 'label', 'index', 'group'),
  )
  flipped = 0
  for k in range(5):  # 20 examples: three epochs of 6 and part of a fourth.
    batch = batches[k]
    assert batch['image'].shape == (2, 2, size, size, 3)
    positions = batches.positions(k)
    for row, position in enumerate(positions):
      got = {
        key: value.reshape(4, *value.shape[2:])[row]
        for key, value in batch.items()
      }
      candidates = [
        cache_lib.cached_model_input(cached[position], normalize=True, flip=f)
        for f in (False, True)
      ]
      matches = [
        all(np.array_equal(got[key], c[key]) for key in got) for c in candidates
      ]
      assert any(matches), (k, row)
      flipped += matches[1] and not matches[0]
  assert 0 < flipped < 20
  stream = np.concatenate(
    [batches.positions(k) for k in range(3)]
  )  # Two epochs.
  for epoch in np.split(stream, 2):
    np.testing.assert_array_equal(np.sort(epoch), np.arange(n))


@pytest.mark.parametrize('policy', ['all_ones', 'drop'])
@pytest.mark.parametrize('mask_resize', ['nearest', 'area'])
def test_cached_and_uncached_paths_give_identical_batches(
  synthetic_config, policy, mask_resize
):
  # Same examples, order, flips, images and masks (CAM and pixel), whether
  # decoded per example or gathered from the RAM cache; the empty-mask policy
  # is applied the same way (decided on the full-resolution foreground).
  def batches(cache):
    config = synthetic_config(
      cache_decoded=cache,
      augment_flip=True,
      empty_mask_policy=policy,
      mask_resize=mask_resize,
      pixel_masks=True,
    )
    iterator = ip.create_train_iterator(
      config,
      cam_size=(3, 5),
      global_batch_size=10,
      num_devices=2,
      seed=7,
      with_index=True,
    )
    return _take(iterator, 6)  # Two epochs and more.

  pillow, cached = batches(False), batches(True)
  for x, y in zip(pillow, cached):
    assert (
      set(x)
      == set(y)
      == {'image', 'mask', 'pixel_mask', 'label', 'group', 'index', 'flip'}
    )
    for key in x:
      assert x[key].dtype == y[key].dtype, key
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)
  config = synthetic_config(mask_resize=mask_resize)
  source = ip.load_split_sources(config, ['train'])['train']
  empty = set(pipeline.empty_mask_positions(source, config, cam_size=(3, 5)))
  assert len(empty) == df.NUM_EMPTY_DEFAULT
  seen = {}
  for batch in pillow:
    for i, mask, pixel in zip(
      batch['index'].ravel(),
      batch['mask'].reshape(-1, 3, 5),
      batch['pixel_mask'].reshape(-1, 32, 32),
    ):
      seen[int(i)] = (mask, pixel)
  if policy == 'drop':
    assert not empty & set(seen)
    assert len(seen) == NUM_TRAIN - len(empty)
  else:
    assert empty <= set(seen)
    for i in empty:
      np.testing.assert_array_equal(seen[i][0], np.ones((3, 5)))
      np.testing.assert_array_equal(seen[i][1], np.ones((32, 32)))
  flipped = [
    np.array_equal(pixel[:, ::-1], pixel) for _, pixel in seen.values()
  ]
  assert not all(flipped)  # Foregrounds are not symmetric.


# ----------------------------------------------------------------------------
# Masks.
# ----------------------------------------------------------------------------


def _check_alignment(batches):
  """The area mask equals the foreground fraction of each CAM cell."""
  real = 0
  for batch in batches:
    redness = _fg_fraction(batch['image'], CAM)
    for red, mask in zip(
      redness.reshape(-1, *CAM), batch['mask'].reshape(-1, *CAM)
    ):
      if mask.min() == 1:  # An empty mask replaced by ones.
        continue
      real += 1
      assert np.abs(red - mask).mean() < 0.1, (red, mask)
  assert real > 0


def test_flips_and_crops_move_image_and_mask_together(synthetic_config):
  iterator = ip.create_train_iterator(
    synthetic_config(augment_flip=True, augment_crop=True, mask_resize='area'),
    cam_size=CAM,
    global_batch_size=9,
    num_devices=1,
    seed=0,
  )
  batches = [_finished(batch) for batch in _take(iterator, 3)]
  _check_alignment(batches)
  # The pet starts in the left half; flipped examples have it on the right.
  images = np.concatenate([b['image'][0] for b in batches])
  red_columns = df.is_foreground_pixel(images).mean(axis=1)  # (N, S)
  centre = (red_columns * np.arange(32)).sum(1) / np.maximum(
    red_columns.sum(1), 1e-6
  )
  assert (centre < 14).any() and (centre > 18).any()


def test_nearest_masks_are_binary_and_area_masks_soft(synthetic_config):
  kwargs = dict(cam_size=(5, 5), global_batch_size=15, num_devices=1)
  nearest = next(ip.create_eval_iterator(synthetic_config(), 'test', **kwargs))
  area = next(
    ip.create_eval_iterator(
      synthetic_config(mask_resize='area'), 'test', **kwargs
    )
  )
  assert set(np.unique(nearest['mask'])) <= {0.0, 1.0}
  soft = area['mask'][(area['mask'] > 0) & (area['mask'] < 1)]
  assert soft.size > 0
  # Both describe the same foreground: cells all in (or out) agree.
  assert (nearest['mask'][area['mask'] > 0.99] == 1).all()
  assert (nearest['mask'][area['mask'] < 0.01] == 0).all()


def test_empty_masks_become_ones_or_are_dropped(synthetic_config):
  config = synthetic_config()
  source = ip.load_split_sources(config, ['train'])['train']
  empty = pipeline.empty_mask_positions(source, config, cam_size=CAM)
  names = {sources.as_str(source[int(i)]['file_name']) for i in empty}
  assert names == {f'{df.EMPTY_TRIMAP}.jpg', f'{df.BOUNDARY_ONLY}.jpg'}
  with_boundary = synthetic_config(boundary_is_foreground=True)
  assert [
    sources.as_str(source[int(i)]['file_name'])
    for i in pipeline.empty_mask_positions(source, with_boundary, cam_size=CAM)
  ] == [f'{df.EMPTY_TRIMAP}.jpg']

  def seen(config):
    iterator = ip.create_train_iterator(
      config,
      cam_size=CAM,
      global_batch_size=NUM_TRAIN - 2,
      num_devices=1,
      seed=0,
      with_index=True,
    )
    batch = next(iterator)
    return dict(zip(batch['index'].ravel(), batch['mask'][0]))

  masks = seen(config)
  for i in empty:
    if i in masks:
      np.testing.assert_array_equal(masks[i], np.ones(CAM))
  dropped = seen(synthetic_config(empty_mask_policy='drop'))
  assert not set(dropped) & set(empty)
  assert len(dropped) == NUM_TRAIN - 2


# ----------------------------------------------------------------------------
# Evaluation.
# ----------------------------------------------------------------------------


def test_eval_pads_last_batch_and_covers_each_example_once(synthetic_config):
  batches = list(
    ip.create_eval_iterator(
      synthetic_config(),
      'test',
      cam_size=CAM,
      global_batch_size=8,
      num_devices=4,
      with_pixel_mask=True,
      with_file_name=True,
    )
  )
  assert len(batches) == 2  # 12 examples, 16 slots.
  weight = np.concatenate([b['weight'].ravel() for b in batches])
  index = np.concatenate([b['index'].ravel() for b in batches])
  assert weight.sum() == df.NUM_TEST
  np.testing.assert_array_equal(
    np.sort(index[weight == 1]), np.arange(df.NUM_TEST)
  )
  assert (index[weight == 0] == -1).all()
  last = batches[-1]
  assert last['pixel_mask'].shape == (4, 2, 32, 32)
  padding = last['weight'] == 0
  assert not last['image'][padding].any() and not last['mask'][padding].any()
  names = np.concatenate([b['file_name'].ravel() for b in batches])
  assert all(n.endswith('.jpg') for n in names[weight == 1])
  assert (names[weight == 0] == '').all()
  # The pixel mask is the foreground at image resolution.
  for batch in batches:
    real = batch['weight'] == 1
    red = df.is_foreground_pixel(batch['image'])
    assert (red[real] == (batch['pixel_mask'][real] == 1)).mean() > 0.95


def test_eval_over_several_hosts_covers_each_example_once(synthetic_config):
  per_host = [
    list(
      ip.create_eval_iterator(
        synthetic_config(),
        'test',
        cam_size=CAM,
        global_batch_size=10,
        num_devices=1,
        process_index=p,
        process_count=2,
      )
    )
    for p in range(2)
  ]
  assert len(per_host[0]) == len(per_host[1]) == 2  # Hosts stay in lockstep.
  seen = [
    i
    for batches in per_host
    for b in batches
    for i, w in zip(b['index'].ravel(), b['weight'].ravel())
    if w
  ]
  assert sorted(seen) == list(range(df.NUM_TEST))


def test_ood_split_has_full_masks_and_species_labels(synthetic_config):
  batches = list(
    ip.create_eval_iterator(
      synthetic_config(),
      'ood',
      cam_size=CAM,
      global_batch_size=8,
      num_devices=2,
      with_pixel_mask=True,
    )
  )
  weight = np.concatenate([b['weight'].ravel() for b in batches])
  labels = np.concatenate([b['label'].ravel() for b in batches])[weight == 1]
  assert weight.sum() == df.NUM_CVD_DECODABLE
  assert labels.sum() == 7 and len(labels) - labels.sum() == 6
  for batch in batches:
    real = batch['weight'] == 1
    assert (batch['mask'][real] == 1).all()
    assert (batch['pixel_mask'][real] == 1).all()
  with pytest.raises(ValueError, match="task='species'"):
    ip.create_eval_iterator(
      synthetic_config(task='breed'),
      'ood',
      cam_size=CAM,
      global_batch_size=8,
      num_devices=2,
    )


def test_empty_validation_split_is_an_error(synthetic_config):
  with pytest.raises(ValueError, match='empty'):
    ip.create_eval_iterator(
      synthetic_config(validation_fraction=0.0),
      'validation',
      cam_size=CAM,
      global_batch_size=2,
      num_devices=1,
    )


# ----------------------------------------------------------------------------
# The real samples (skipped when shared/data is absent).
# ----------------------------------------------------------------------------


def test_real_pets_masks_and_labels(real_config):
  config = real_config(task='breed', image_size=64)
  assert ip.split_sizes(config) == {'train': 270, 'validation': 30, 'test': 391}
  batches = list(
    ip.create_eval_iterator(
      config, 'validation', cam_size=(8, 8), global_batch_size=16, num_devices=2
    )
  )
  weight = np.concatenate([b['weight'].ravel() for b in batches])
  labels = np.concatenate([b['label'].ravel() for b in batches])[weight == 1]
  masks = np.concatenate([b['mask'].reshape(-1, 8, 8) for b in batches])[
    weight == 1
  ]
  assert weight.sum() == 30
  assert set(labels) == {0, 1, 5}  # Abyssinian, american_bulldog, Bengal.
  np.testing.assert_array_equal(np.bincount(labels), [10, 10, 0, 0, 0, 10])
  fractions = masks.mean(axis=(1, 2))
  assert 0.05 < fractions.mean() < 0.95
  assert (fractions > 0.02).all()
  train = next(
    ip.create_train_iterator(
      real_config(image_size=64, augment_flip=True),
      cam_size=(8, 8),
      global_batch_size=16,
      num_devices=2,
      seed=0,
    )
  )
  assert set(np.unique(train['label'])) <= {0, 1}
  assert 0.05 < train['mask'].mean() < 0.95


def test_real_cats_vs_dogs_covers_all_2000(real_config):
  batches = ip.create_eval_iterator(
    real_config(image_size=32),
    'ood',
    cam_size=(4, 4),
    global_batch_size=300,
    num_devices=1,
  )
  weight, labels = [], []
  for batch in batches:
    weight.append(batch['weight'].ravel())
    labels.append(batch['label'].ravel())
  weight, labels = np.concatenate(weight), np.concatenate(labels)
  assert weight.sum() == 2000
  np.testing.assert_array_equal(np.bincount(labels[weight == 1]), [1000, 1000])
