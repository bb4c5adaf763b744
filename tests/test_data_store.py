"""data.store_size: images stored pre-squashed (JPEG or raw pixels)."""

import numpy as np
import pytest

from cco_jax import data as data_lib

CAM = (4, 4)


def _eval_batches(config):
  return list(
    data_lib.create_eval_iterator(
      config,
      'test',
      cam_size=CAM,
      global_batch_size=8,
      num_devices=2,
      with_pixel_mask=True,
    )
  )


@pytest.mark.parametrize('store_format', ['raw', 'jpeg'])
def test_stored_copies_read_like_the_original(
  synthetic_config, tmp_path, store_format
):
  plain = synthetic_config()
  stored = synthetic_config(
    store_size=plain.image_size, store_format=store_format
  )
  stored.tfds_data_dir = str(tmp_path)
  builder = data_lib.prepare_from_config(stored)
  assert f'stored_{plain.image_size}' in str(builder.data_dir)
  record = builder.as_data_source('test')[0]
  if store_format == 'raw':
    assert record['image'].shape == (32, 32, 3)
    assert record['segmentation_mask'].shape == (32, 32, 1)
  a, b = _eval_batches(plain), _eval_batches(stored)
  assert len(a) == len(b)
  for x, y in zip(a, b):
    for key in ('label', 'group', 'index', 'weight'):
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)
    error = np.abs(x['image'] - y['image']).mean()
    if store_format == 'raw':
      # The same squash as the pipeline's, stored without loss.
      np.testing.assert_array_equal(x['image'], y['image'])
    else:
      assert error < 0.02, error  # One more JPEG encoding.
    # Masks go through one more nearest resize: nearly the same foreground.
    assert np.mean(x['pixel_mask'] != y['pixel_mask']) < 0.05
  # Training batches read from it too.
  batch = next(
    data_lib.create_train_iterator(
      stored, cam_size=CAM, global_batch_size=4, num_devices=1, seed=0
    )
  )
  assert batch['image'].shape == (1, 4, 32, 32, 3)
