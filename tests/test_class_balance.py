"""Imbalance: class-balanced sampling (`config.data.sampling`) and the class
counts that inverse-frequency weights read (`loss.class_weights`)."""

import numpy as np
import pytest
import synthetic_data as df
from test_data_multilabel import ROWS
from test_data_multilabel import write_folder

from cco_jax import configuration
from cco_jax import data as data_lib
from cco_jax import errors
from cco_jax import train_setup
from cco_jax.data import order
from experiments.configs import pets as pets_config

LABELS = np.repeat([0, 1, 2, 4], [70, 20, 9, 1])  # Class 3 absent.


def test_every_epoch_draws_the_classes_equally_often():
  key = order.labels_key(LABELS)
  n = len(LABELS)
  stream = order.stream_positions(np.arange(40 * n), n, 7, key)
  drawn = LABELS[stream]
  for epoch in range(40):
    counts = np.bincount(drawn[epoch * n : (epoch + 1) * n], minlength=5)
    # 100 draws over 4 classes present: exactly 25 each; none of class 3.
    np.testing.assert_array_equal(counts, [25, 25, 25, 0, 25])
  # Within an epoch, a majority class draws without repeats and a minority
  # class cycles through all its examples before repeating any.
  first = stream[:n]
  nevi = first[LABELS[first] == 0]
  assert len(set(nevi.tolist())) == 25
  rare = first[LABELS[first] == 2]
  assert set(rare[:9].tolist()) == set(np.flatnonzero(LABELS == 2).tolist())
  # Over the long stream every majority example is seen.
  assert set(stream[LABELS[stream] == 0].tolist()) == set(range(70))


def test_balanced_order_is_a_pure_function_of_the_seed():
  key = order.labels_key(LABELS)
  a = order.stream_positions(np.arange(500), 100, 3, key)
  b = order.stream_positions(np.arange(500)[::-1], 100, 3, key)[::-1]
  c = order.stream_positions(np.arange(500), 100, 4, key)
  np.testing.assert_array_equal(a, b)
  assert (a != c).any()
  natural = order.stream_positions(np.arange(100), 100, 3)
  np.testing.assert_array_equal(np.sort(natural), np.arange(100))
  assert len(set(a[:100].tolist())) < 100  # Balanced: repeats, omissions.


@pytest.fixture(scope='module')
def imbalanced(tmp_path_factory):
  root = tmp_path_factory.mktemp('imbalanced')
  write_folder(root / 'root')
  return df.data_config(
    name='folder',
    task='label',
    manual_dir=str(root / 'root'),
    tfds_data_dir=str(root / 'tfds'),
    validation_fraction=0.0,
    image_size=16,
    sampling='class_balanced',
  )


def _indices(config, num_batches, seed=0):
  iterator = data_lib.create_train_iterator(
    config,
    cam_size=(2, 2),
    global_batch_size=6,
    num_devices=1,
    seed=seed,
    with_index=True,
  )
  try:
    return np.concatenate(
      [next(iterator)['index'].reshape(-1) for _ in range(num_batches)]
    ), iterator
  finally:
    iterator.close()


@pytest.mark.parametrize('cache_decoded', [False, True])
def test_training_stream_is_class_balanced_and_reproducible(
  imbalanced, cache_decoded
):
  config = imbalanced.copy_and_resolve_references()
  config.cache_decoded = cache_decoded
  train_labels = np.array(['abc'.index(r[0]) for r in ROWS if r[2] == 'train'])
  # Natural counts are 3, 2, 1; 20 batches of 6 = 20 epochs of 6 draws.
  indices, _ = _indices(config, 20)
  counts = np.bincount(train_labels[indices], minlength=3)
  np.testing.assert_array_equal(counts, [40, 40, 40])
  again, _ = _indices(config, 20)
  np.testing.assert_array_equal(indices, again)
  other, _ = _indices(config, 20, seed=1)
  assert (other != indices).any()


def test_the_pillow_and_cache_paths_draw_the_same_stream(imbalanced):
  cached = imbalanced.copy_and_resolve_references()
  cached.cache_decoded = True
  np.testing.assert_array_equal(
    _indices(imbalanced, 5)[0], _indices(cached, 5)[0]
  )


def test_sampling_is_checked_and_in_the_fingerprint(imbalanced):
  bad = imbalanced.copy_and_resolve_references()
  bad.sampling = 'balanced'
  with pytest.raises(ValueError, match=r"sampling='balanced'"):
    data_lib.check_config(bad)
  _, iterator = _indices(imbalanced, 1)
  assert b'class_balanced' in iterator.get_state()


def test_class_counts_filled_from_the_training_split(imbalanced):
  config = pets_config.get_config('cpu')
  with config.unlocked():
    config.data = imbalanced.copy_and_resolve_references()
  config = configuration.apply_overrides(
    config, {'loss.name': 'ce', 'loss.class_weights': 'inverse_frequency'}
  )
  filled = train_setup.with_data_fields(config)
  assert tuple(filled.loss.class_counts) == (3, 2, 1)
  config = configuration.apply_overrides(config, {'loss.class_weights': 'none'})
  assert tuple(train_setup.with_data_fields(config).loss.class_counts) == ()


@pytest.mark.parametrize(
  'overrides, field',
  [
    ({'loss.class_weights': 'inverse_frequency'}, 'loss.class_weights'),
    ({'loss.name': 'ce_reweighted'}, 'data.sampling'),
  ],
)
def test_balancing_twice_is_refused_in_one_line(overrides, field):
  """Class-balanced sampling with a static reweighting that already
  includes the class share would count the imbalance twice."""
  config = pets_config.get_config('cpu')
  config = configuration.apply_overrides(
    config, {'data.sampling': 'class_balanced', **overrides}
  )
  with pytest.raises(errors.UserError, match=rf'^config\.{field}=') as e:
    configuration.check_training_config(config)
  assert '\n' not in str(e.value) and 'natural' in str(e.value)
  # Either alone is accepted.
  for alone in ({'data.sampling': 'natural'}, overrides):
    ok = configuration.apply_overrides(
      pets_config.get_config('cpu'), {**overrides, **alone}
    )
    configuration.check_training_config(ok)
