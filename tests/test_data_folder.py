"""The 'folder' dataset: layout, policies, errors, and equality with Pets."""

import csv
import io
from pathlib import Path
import shutil

import numpy as np
from PIL import Image
import pytest
import synthetic_data as df

from cco_jax import data as data_lib
from cco_jax.data.datasets import oxford_iiit_pet
from cco_jax.data.datasets.common import PrepareOptions

CAM = (4, 4)
ISIC = df.SHARED_DATA / 'isic-2017-sample'


def _write_labels(root: Path, rows, group=False):
  header = ['image', 'label', 'split'] + ['group'] * group
  with open(root / 'labels.csv', 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows(rows)


def pets_as_folder(pets: Path, root: Path) -> list[list[str]]:
  """Rewrites a Pets layout as a folder: species labels, breed groups,
  masks = (trimap == 1) as 0/255 PNGs (RGB, to exercise another mode)."""
  (root / 'images').mkdir(parents=True)
  (root / 'masks').mkdir()
  rows = []
  for split, list_file in (('train', 'trainval.txt'), ('test', 'test.txt')):
    entries = oxford_iiit_pet.read_split_list(pets / 'annotations' / list_file)
    for e in entries:
      image = f'{e.name}.jpg'
      shutil.copy(pets / 'images' / image, root / 'images' / image)
      trimap = np.asarray(
        Image.open(pets / 'annotations' / 'trimaps' / f'{e.name}.png')
      )
      mask = np.where(trimap == 1, 255, 0).astype(np.uint8)
      Image.fromarray(mask).convert('RGB').save(
        root / 'masks' / f'{e.name}.png'
      )
      breed = oxford_iiit_pet.BREEDS[e.label]
      rows.append([image, oxford_iiit_pet.SPECIES[e.species], split, breed])
  _write_labels(root, rows, group=True)
  return rows


def _config(root, data_dir, **overrides):
  config = df.data_config(
    name='folder',
    task='label',
    manual_dir=str(root),
    tfds_data_dir=str(data_dir),
  )
  config.update(overrides)
  return config


@pytest.fixture(scope='module')
def pets_folder(tmp_path_factory, synthetic_pets_dir):
  root = tmp_path_factory.mktemp('pets_folder')
  rows = pets_as_folder(synthetic_pets_dir, root)
  return root, rows


def test_folder_of_pets_gives_the_pets_test_batches(
  pets_folder, synthetic_config, tmp_path
):
  root, rows = pets_folder
  config = _config(root, tmp_path)
  assert data_lib.class_names(config) == ('cat', 'dog')
  breeds = sorted({r[3] for r in rows})
  assert data_lib.group_names(config) == tuple(breeds)
  sizes = data_lib.split_sizes(config)
  assert sizes['test'] == df.NUM_TEST
  assert sizes['train'] + sizes['validation'] == df.NUM_TRAINVAL
  kwargs = dict(cam_size=CAM, global_batch_size=6, num_devices=2)
  folder = list(
    data_lib.create_eval_iterator(
      config, 'test', with_pixel_mask=True, with_file_name=True, **kwargs
    )
  )
  pets = list(
    data_lib.create_eval_iterator(
      synthetic_config(),
      'test',
      with_pixel_mask=True,
      with_file_name=True,
      **kwargs,
    )
  )
  assert len(folder) == len(pets)
  for a, b in zip(folder, pets):
    for key in ('image', 'mask', 'pixel_mask', 'label', 'weight', 'index'):
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    np.testing.assert_array_equal(a['file_name'], b['file_name'])
    for name, group in zip(a['file_name'].ravel(), a['group'].ravel()):
      if name:
        assert breeds[group] == name.rsplit('_', 1)[0]
  # Training batches carry the groups too.
  batch = next(
    data_lib.create_train_iterator(
      config, cam_size=CAM, global_batch_size=8, num_devices=2, seed=0
    )
  )
  assert batch['group'].shape == (2, 4)
  assert set(np.unique(batch['group'])) <= set(range(len(breeds)))


def _small_folder(root: Path, n: int = 6, sizes=((40, 30), (24, 36))):
  """n images with masks (left half object), labels a/b, splits train/test."""
  (root / 'images' / 'sub').mkdir(parents=True)
  (root / 'masks' / 'sub').mkdir(parents=True)
  rows = []
  for i in range(n):
    width, height = sizes[i % len(sizes)]
    name = f'sub/img{i}.jpg' if i % 2 else f'img{i}.png'
    pixels = np.random.default_rng(i).integers(0, 255, (height, width, 3))
    Image.fromarray(pixels.astype(np.uint8)).save(root / 'images' / name)
    mask = np.zeros((height, width), np.uint8)
    mask[:, : width // 2] = 7  # Any value > 0 is object.
    mode = ('L', 'P', 'RGBA')[i % 3]
    Image.fromarray(mask).convert(mode).save(
      root / 'masks' / f'{name.rsplit(".", 1)[0]}.png'
    )
    rows.append([name, 'ab'[i % 2], 'train' if i < n - 2 else 'test'])
  _write_labels(root, rows)
  return rows


def _prepare(root, data_dir, **options):
  return data_lib.prepare_dataset(
    'folder',
    manual_dir=str(root),
    data_dir=str(data_dir),
    options=PrepareOptions(**options),
  )


def test_masks_of_any_mode_and_sub_folders(tmp_path):
  root = tmp_path / 'root'
  _small_folder(root, n=6)
  config = _config(root, tmp_path / 'tfds', validation_fraction=0.0)
  batch = next(
    data_lib.create_eval_iterator(
      config,
      'train',
      cam_size=(2, 2),
      global_batch_size=4,
      num_devices=1,
      with_pixel_mask=True,
    )
  )
  # Left half object, in every mask mode ('L', 'P', 'RGBA').
  np.testing.assert_array_equal(
    batch['mask'][0], np.tile([[1.0, 0.0], [1.0, 0.0]], (4, 1, 1))
  )
  assert data_lib.class_names(config) == ('a', 'b')
  assert data_lib.group_names(config) == ('all',)
  assert not batch['group'].any()


def _corrupt_all(root: Path):
  """Breaks the small folder in every way the builder must report."""
  (root / 'images' / 'img0.png').write_bytes(b'')  # 0-byte
  data = (root / 'images' / 'sub' / 'img1.jpg').read_bytes()
  (root / 'images' / 'sub' / 'img1.jpg').write_bytes(data[: len(data) // 2])
  (root / 'masks' / 'img2.png').unlink()  # missing mask
  Image.new('L', (5, 5)).save(root / 'masks' / 'sub' / 'img3.png')  # size
  rows = list(csv.reader(open(root / 'labels.csv')))
  rows[5][2] = 'holdout'  # unknown split (img4)
  rows.append(rows[6])  # duplicate path (img5)
  rows.append(['nowhere.jpg', 'a', 'train'])  # missing image
  _write_labels(root, rows[1:])


def test_bad_rows_are_one_error_naming_every_file(tmp_path):
  root = tmp_path / 'root'
  _small_folder(root, n=6)
  _corrupt_all(root)
  with pytest.raises(ValueError) as error:
    _prepare(root, tmp_path / 'tfds')
  message = str(error.value)
  assert '7 bad rows' in message and 'nothing was written' in message
  for expected in (
    "'img0.png': unreadable image",
    "'sub/img1.jpg': unreadable image",
    "'img2.png': missing mask",
    "'sub/img3.jpg': mask",
    'is 5x5 but its image is 24x36',
    "'img4.png': unknown split 'holdout'",
    'line 8',
    'duplicate path (also on line 7)',
    "'nowhere.jpg': missing image file",
  ):
    assert expected in message, (expected, message)
  assert not list((tmp_path / 'tfds').rglob('*.array_record*'))


def test_policies_skip_drop_fill_and_resize(tmp_path):
  root = tmp_path / 'root'
  _small_folder(root, n=8)
  (root / 'images' / 'img0.png').write_bytes(b'')
  (root / 'masks' / 'img2.png').unlink()
  Image.new('L', (5, 5), 1).save(root / 'masks' / 'sub' / 'img3.png')
  with pytest.raises(ValueError, match='2 bad rows'):
    _prepare(root, tmp_path / 'a', resize_masks=True)
  builder = _prepare(
    root,
    tmp_path / 'b',
    skip_bad_images=True,
    missing_masks='drop',
    resize_masks=True,
  )
  metadata = builder.info.metadata
  assert metadata['skipped_images'] == ['img0.png']
  assert metadata['missing_masks'] == ['img2.png']
  assert metadata['resized_masks'] == ['sub/img3.jpg']
  assert builder.info.splits['train'].num_examples == 4
  filled = _prepare(
    root,
    tmp_path / 'c',
    skip_bad_images=True,
    missing_masks='all_ones',
    resize_masks=True,
  )
  assert filled.info.splits['train'].num_examples == 5
  source = filled.as_data_source('train')
  names = [source[i]['file_name'].decode() for i in range(5)]
  full = source[names.index('img2.png')]['segmentation_mask']
  assert (full == 1).all()  # Object everywhere.
  resized = source[names.index('sub/img3.jpg')]['segmentation_mask']
  assert resized.shape[:2] == (36, 24) and (resized == 1).all()


def test_data_config_options_choose_the_prepared_copy(tmp_path):
  root = tmp_path / 'root'
  _small_folder(root, n=6)
  base = _config(root, tmp_path / 'tfds')
  stored = _config(root, tmp_path / 'tfds', store_size=16)
  a = data_lib.prepare_from_config(base)
  b = data_lib.prepare_from_config(stored)
  assert a.data_dir != b.data_dir
  assert b.as_data_source('train')[0]['image'].shape == (16, 16, 3)
  assert base.missing_masks == 'error'


def test_isic_sample_prepares(tmp_path):
  if not (ISIC / 'labels.csv').exists():
    pytest.skip(f'ISIC sample not found under {df.SHARED_DATA}.')
  # A subset (the first 40 rows of each split) keeps the test short.
  rows = list(csv.reader(open(ISIC / 'labels.csv')))[1:]
  subset = [r for r in rows if r[2] == 'train'][:40]
  subset += [r for r in rows if r[2] == 'test'][:40]
  root = tmp_path / 'isic'
  for part in ('images', 'masks'):
    (root / part).mkdir(parents=True)
  for image, _, _ in subset:
    stem = image.rsplit('.', 1)[0]
    (root / 'images' / image).symlink_to(ISIC / 'images' / image)
    (root / 'masks' / f'{stem}.png').symlink_to(ISIC / 'masks' / f'{stem}.png')
  _write_labels(root, subset)
  config = _config(root, tmp_path / 'tfds', image_size=64)
  labels = sorted({r[1] for r in subset})
  assert data_lib.class_names(config) == tuple(labels)
  sizes = data_lib.split_sizes(config)
  assert sizes['test'] == 40 and sizes['train'] + sizes['validation'] == 40
  source = data_lib.load_split_sources(config, ['test'])['test']
  for i in (0, 17, 39):
    record = source[i]
    name = record['file_name'].decode()
    original = np.asarray(
      Image.open(ISIC / 'masks' / f'{name.rsplit(".", 1)[0]}.png')
    )
    stored = np.asarray(Image.open(io.BytesIO(record['segmentation_mask'])))
    np.testing.assert_array_equal(stored == 1, original > 0)
    assert labels[int(record['label'])] == subset[40 + i][1]
