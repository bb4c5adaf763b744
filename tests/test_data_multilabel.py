"""Multi-label folder data: the `labels` column becomes multi-hot 'targets'
in every batch (training, cached training, evaluation), in row order."""

import csv
from pathlib import Path

import numpy as np
from PIL import Image
import pytest
import synthetic_data as df

from cco_jax import configuration
from cco_jax import data as data_lib
from cco_jax import metric_writers
from cco_jax import train
from cco_jax.data.datasets import folder
from experiments.configs import folder as folder_config

# (label, labels cell, split): the primary class and the others present.
ROWS = (
  ('a', 'a;c', 'train'),
  ('b', '', 'train'),
  ('a', 'b', 'train'),
  ('c', 'c;a;b', 'train'),
  ('b', ' c ;', 'train'),
  ('a', '', 'train'),
  ('c', 'a', 'test'),
  ('b', 'b', 'test'),
  ('a', 'c', 'test'),
)
CLASSES = ('a', 'b', 'c')


def expected_targets(row) -> np.ndarray:
  label, cell, _ = row
  present = {label} | {n.strip() for n in cell.split(';') if n.strip()}
  return np.array([float(c in present) for c in CLASSES], np.float32)


def write_folder(root: Path) -> list[str]:
  (root / 'images').mkdir(parents=True)
  (root / 'masks').mkdir(parents=True)
  names = []
  with open(root / 'labels.csv', 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(['image', 'label', 'split', 'labels'])
    for i, (label, cell, split) in enumerate(ROWS):
      name = f'img{i}.png'
      pixels = np.random.default_rng(i).integers(0, 255, (20, 20, 3))
      Image.fromarray(pixels.astype(np.uint8)).save(root / 'images' / name)
      mask = np.zeros((20, 20), np.uint8)
      mask[:, :10] = 255
      Image.fromarray(mask).save(root / 'masks' / name)
      writer.writerow([name, label, split, cell])
      names.append(name)
  return names


@pytest.fixture(scope='module')
def multilabel(tmp_path_factory):
  root = tmp_path_factory.mktemp('multilabel')
  names = write_folder(root / 'root')
  config = df.data_config(
    name='folder',
    task='label',
    manual_dir=str(root / 'root'),
    tfds_data_dir=str(root / 'tfds'),
    validation_fraction=0.0,
    image_size=16,
  )
  return config, names


def test_rows_read_the_labels_column(tmp_path):
  write_folder(tmp_path)
  rows, _ = folder.read_rows(tmp_path)
  assert rows[3].present == ('a', 'b', 'c')
  assert rows[4].present == ('b', 'c')
  assert rows[1].present == ('b',)
  assert folder.has_labels_column(tmp_path)


def test_sources_carry_multi_hot_targets(multilabel):
  config, names = multilabel
  assert data_lib.class_names(config) == CLASSES
  sources = data_lib.load_split_sources(config, ['train', 'test'])
  for split, source in sources.items():
    rows = [r for r in ROWS if r[2] == split]
    for i in range(len(source)):
      record = source[i]
      row = rows[i]
      np.testing.assert_array_equal(record['targets'], expected_targets(row))
      assert CLASSES[int(record['label'])] == row[0]


@pytest.mark.parametrize('cache_decoded', [False, True])
def test_training_batches_carry_the_targets_of_their_examples(
  multilabel, cache_decoded
):
  config, _ = multilabel
  config = config.copy_and_resolve_references()
  config.cache_decoded = cache_decoded
  config.augment_crop = False
  train_rows = [r for r in ROWS if r[2] == 'train']
  iterator = data_lib.create_train_iterator(
    config,
    cam_size=(2, 2),
    global_batch_size=4,
    num_devices=2,
    seed=0,
    with_index=True,
  )
  for _ in range(3):
    batch = next(iterator)
    assert batch['targets'].shape == (2, 2, 3)
    assert batch['targets'].dtype == np.float32
    for index, targets in zip(
      batch['index'].reshape(-1), batch['targets'].reshape(-1, 3)
    ):
      np.testing.assert_array_equal(
        targets, expected_targets(train_rows[index])
      )
  iterator.close()


def test_evaluation_batches_carry_targets_and_zero_padding(multilabel):
  config, _ = multilabel
  test_rows = [r for r in ROWS if r[2] == 'test']
  batches = list(
    data_lib.create_eval_iterator(
      config, 'test', cam_size=(2, 2), global_batch_size=4, num_devices=1
    )
  )
  targets = np.concatenate([b['targets'].reshape(-1, 3) for b in batches])
  weight = np.concatenate([b['weight'].reshape(-1) for b in batches])
  np.testing.assert_array_equal(
    targets[: len(test_rows)], [expected_targets(r) for r in test_rows]
  )
  assert not targets[weight == 0].any()


def test_single_label_folders_have_no_targets(tmp_path):
  root = tmp_path / 'root'
  write_folder(root)
  text = (root / 'labels.csv').read_text().splitlines()
  single = [','.join(line.split(',')[:3]) for line in text]
  (root / 'labels.csv').write_text('\n'.join(single) + '\n')
  config = df.data_config(
    name='folder',
    task='label',
    manual_dir=str(root),
    tfds_data_dir=str(tmp_path / 'tfds'),
    validation_fraction=0.0,
    image_size=16,
  )
  source = data_lib.load_split_sources(config, ['test'])['test']
  assert source.targets is None and 'targets' not in source[0]
  batch = next(
    data_lib.create_eval_iterator(
      config, 'test', cam_size=(2, 2), global_batch_size=4, num_devices=1
    )
  )
  assert 'targets' not in batch


def test_multi_label_training_scores_validation_auc_from_the_targets(tmp_path):
  """A few steps of `ace_bce` through the real loop: the batches' targets
  reach the objective, and validation AUC reads them (class 'c' is present
  in images whose primary class is another)."""
  write_folder(tmp_path / 'root')
  config = folder_config.get_config('cpu')
  with config.unlocked():
    config.data.manual_dir = str(tmp_path / 'root')
    config.data.tfds_data_dir = str(tmp_path / 'tfds')
    config.data.image_size = 32
    config.model.num_filters = 4
    config.batch_size = 4
    config.eval_batch_size = 4
    config.num_figure_examples = 0
  config = configuration.apply_overrides(
    config,
    {
      'loss.name': 'ace_bce',
      'num_train_steps': 3,
      'eval_every_steps': 3,
      'auc_tasks': ('c',),
      'eval_ood': False,
    },
  )
  # Validation rows (the builder's split, no carve): the last two test rows,
  # where 'c' is present only as a secondary class: by the labels alone the
  # task would have no positive (AUC undefined).
  path = tmp_path / 'root' / 'labels.csv'
  lines = path.read_text().splitlines()
  lines[-2:] = [line.replace(',test,', ',validation,') for line in lines[-2:]]
  path.write_text('\n'.join(lines) + '\n')
  final = train.train_and_evaluate(config, str(tmp_path / 'run'))
  records = metric_writers.read_metrics(tmp_path / 'run')
  assert [r['step'] for r in records if 'train_ace_bce' in r] == [3]
  validation = [r for r in ROWS if r[2] == 'test'][1:]
  assert [expected_targets(r)[2] for r in validation] == [0.0, 1.0]
  assert [r[0] for r in validation] == ['b', 'a']
  assert 0.0 <= final['validation_auc_c'] <= 1.0
  assert final['validation_mean_auc'] == final['validation_auc_c']
