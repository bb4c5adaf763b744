"""Waterbirds: a miniature copy of both official layouts, prepared and trained."""

import csv
import io
import json

import numpy as np
from PIL import Image
import pytest

from cco_jax import configuration
from cco_jax import data as data_lib
from cco_jax import train
from cco_jax.data.datasets import waterbirds
from experiments.configs import waterbirds as waterbirds_config

# (CUB class folder, y): y 1 = waterbird.
BIRDS = (('001.Black_footed_Albatross', 1), ('010.Red_winged_Blackbird', 0))
PLACE_COLOURS = ((40, 140, 40), (30, 60, 200))  # land green, water blue.


def write_miniature(root, per_group_and_split: int = 2):
  """Both layouts: WATERBIRDS_DIR/metadata.csv + images, segmentations/."""
  images = root / waterbirds.WATERBIRDS_DIR
  rows, img_id = [], 0
  for split in (0, 1, 2):
    for folder, y in BIRDS:
      for place in (0, 1):
        for _ in range(per_group_and_split):
          img_id += 1
          name = f'{folder}/{folder.split(".")[1]}_{img_id:04d}_{img_id}.jpg'
          width, height = (48, 40) if img_id % 2 else (36, 44)
          pixels = np.empty((height, width, 3), np.uint8)
          pixels[:] = PLACE_COLOURS[place]
          top, left = height // 4, width // 4
          pixels[top : 3 * top, left : 3 * left] = (230, 220, 40)
          (images / folder).mkdir(parents=True, exist_ok=True)
          Image.fromarray(pixels).save(images / name, quality=95)
          # CUB-style soft segmentation: 204 on the bird, 51 around it.
          seg = np.zeros((height, width), np.uint8)
          seg[top - 2 : 3 * top + 2, left - 2 : 3 * left + 2] = 51
          seg[top : 3 * top, left : 3 * left] = 204
          (root / 'segmentations' / folder).mkdir(parents=True, exist_ok=True)
          Image.fromarray(seg).save(
            root / 'segmentations' / name.replace('.jpg', '.png')
          )
          rows.append([img_id, name, y, split, place, f'places/{img_id}.jpg'])
  with open(images / 'metadata.csv', 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(
      ['img_id', 'img_filename', 'y', 'split', 'place', 'place_filename']
    )
    writer.writerows(rows)
  return rows


@pytest.fixture(scope='module')
def miniature(tmp_path_factory):
  root = tmp_path_factory.mktemp('waterbirds_manual')
  rows = write_miniature(root)
  return root, rows, tmp_path_factory.mktemp('waterbirds_tfds')


def _config(root, data_dir):
  config = waterbirds_config.get_config('cpu')
  with config.unlocked():
    config.data.manual_dir = str(root)
    config.data.tfds_data_dir = str(data_dir)
    config.data.image_size = 32
    config.model.num_filters = 4
    config.batch_size = 8
    config.eval_batch_size = 8
    config.log_every_steps = 1
    config.eval_every_steps = 1000  # Only the final evaluation.
    config.num_figure_examples = 0
  return config


def test_prepared_groups_labels_and_thresholded_masks(miniature):
  root, rows, data_dir = miniature
  data = _config(root, data_dir).data
  assert data_lib.split_sizes(data) == {
    'train': 8,
    'validation': 8,
    'test': 8,
  }
  assert data_lib.class_names(data) == ('landbird', 'waterbird')
  assert data_lib.group_names(data) == waterbirds.GROUP_NAMES
  expected = {r[1]: (r[2], 2 * r[2] + r[4]) for r in rows}
  source = data_lib.load_split_sources(data, ['test'])['test']
  for i in range(len(source)):
    record = source[i]
    name = record['file_name'].decode()
    assert (int(record['label']), record['group']) == expected[name]
    seg = np.asarray(
      Image.open(root / 'segmentations' / name.replace('.jpg', '.png'))
    )
    stored = np.asarray(Image.open(io.BytesIO(record['segmentation_mask'])))
    np.testing.assert_array_equal(stored == 1, seg >= 128)
  batch = next(
    data_lib.create_eval_iterator(
      data, 'test', cam_size=(4, 4), global_batch_size=8, num_devices=2
    )
  )
  assert sorted(np.unique(batch['group'])) == [0, 1, 2, 3]


def test_trains_a_few_steps(miniature, tmp_path):
  root, _, data_dir = miniature
  config = configuration.apply_overrides(
    _config(root, data_dir), {'num_train_steps': 2}
  )
  train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert (tmp_path / 'run' / 'config.json').exists()
  saved = json.loads((tmp_path / 'run' / 'config.json').read_text())
  assert saved['data']['name'] == 'waterbirds'


def test_missing_layout_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match='segmentations'):
    waterbirds.check_manual_dir(tmp_path)
