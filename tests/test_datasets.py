"""TFDS builders: layouts, splits, labels, corrupt files and clear errors."""

import io
import json
import os
from pathlib import Path
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
from PIL import Image
import pytest
import synthetic_data as df
import tensorflow_datasets as tfds

from cco_jax import data as data_lib
from cco_jax.data.datasets import cats_vs_dogs
from cco_jax.data.datasets import downloads
from cco_jax.data.datasets import oxford_iiit_pet

REPO = Path(__file__).resolve().parents[1]


def _builder(name, manual_dir, data_dir):
  return data_lib.prepare_dataset(
    name, manual_dir=str(manual_dir), data_dir=str(data_dir)
  )


def _jpeg(image: Image.Image, **kwargs) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, **kwargs)
  return buffer.getvalue()


# ----------------------------------------------------------------------------
# Helpers.
# ----------------------------------------------------------------------------


def test_read_split_list_skips_comments_and_converts_ids(tmp_path):
  path = tmp_path / 'list.txt'
  path.write_text(
    '#Image CLASS-ID SPECIES BREED ID\n\n'
    'Abyssinian_100 1 1 1\nyorkshire_terrier_9 37 2 25\n'
  )
  entries = oxford_iiit_pet.read_split_list(path)
  assert [(e.name, e.label, e.species) for e in entries] == [
    ('Abyssinian_100', 0, 0),
    ('yorkshire_terrier_9', 36, 1),
  ]
  assert oxford_iiit_pet.BREEDS[36] == 'yorkshire_terrier'


@pytest.mark.parametrize(
  'line',
  [
    'Abyssinian_1 1 1',
    'Abyssinian_1 38 1 1',
    'Abyssinian_1 1 3 1',
    'Abyssinian_1 x 1 1',
  ],
)
def test_read_split_list_rejects_malformed_lines(tmp_path, line):
  path = tmp_path / 'trainval.txt'
  path.write_text(f'{line}\n')
  with pytest.raises(ValueError, match=r'trainval\.txt:1.*CLASS-ID'):
    oxford_iiit_pet.read_split_list(path)


def test_rgb_jpeg_bytes_keeps_rgb_jpegs_and_converts_the_rest():
  image = Image.new('RGB', (8, 6), df.RED)
  jpeg = _jpeg(image, format='JPEG')
  assert oxford_iiit_pet.rgb_jpeg_bytes(jpeg) == (jpeg, False)
  for kwargs in ({'format': 'PNG'}, {'format': 'GIF'}):
    for mode in ('RGBA', 'L', 'P'):
      if kwargs['format'] == 'GIF' and mode == 'RGBA':
        continue
      data, converted = oxford_iiit_pet.rgb_jpeg_bytes(
        _jpeg(image.convert(mode), **kwargs)
      )
      assert converted
      with Image.open(io.BytesIO(data)) as decoded:
        assert (decoded.format, decoded.mode, decoded.size) == (
          'JPEG',
          'RGB',
          (8, 6),
        )
  with pytest.raises(OSError):
    oxford_iiit_pet.rgb_jpeg_bytes(b'')
  with pytest.raises(OSError):
    oxford_iiit_pet.rgb_jpeg_bytes(jpeg[: len(jpeg) // 2])  # Truncated.


# ----------------------------------------------------------------------------
# Oxford-IIIT Pet on synthetic data in the official layout.
# ----------------------------------------------------------------------------


def test_synthetic_pets_splits_labels_and_conversions(
  synthetic_pets_dir, synthetic_data_dir
):
  builder = _builder('oxford_iiit_pet', synthetic_pets_dir, synthetic_data_dir)
  assert builder.name == 'oxford_iiit_pet_masks'
  assert {k: v.num_examples for k, v in builder.info.splits.items()} == {
    'train': df.NUM_TRAINVAL,
    'test': df.NUM_TEST,
  }
  assert set(builder.info.metadata['reencoded_images']) == {
    f'{df.RGBA_PNG}.jpg',
    f'{df.LISTED_GIF}.jpg',
    f'{df.GREYSCALE}.jpg',
  }
  breeds = dict(df.SYNTHETIC_BREEDS)
  for split in ('train', 'test'):
    source = builder.as_data_source(split)  # TFDS's own Pillow decoding.
    names, labels = [], []
    for i in range(len(source)):
      example = source[i]
      name = example['file_name']
      name = name.decode() if isinstance(name, bytes) else name
      names.append(name)
      labels.append(example['label'])
      breed = name.rsplit('_', 1)[0]
      assert example['label'] == oxford_iiit_pet.BREEDS.index(breed)
      assert example['species'] == breeds[breed]
      image, trimap = example['image'], example['segmentation_mask']
      assert image.dtype == np.uint8 and image.shape[2] == 3
      assert trimap.shape == image.shape[:2] + (1,)
      assert set(np.unique(trimap)) <= {1, 2, 3}
    assert f'{df.UNLISTED_GIF}.jpg' not in names
    # Records keep list order, as listed in the metadata.
    assert builder.info.metadata['splits'][split] == {
      'file_names': names,
      'labels': labels,
    }
    list_file = {'train': 'trainval.txt', 'test': 'test.txt'}[split]
    assert names == [
      f'{e.name}.jpg'
      for e in oxford_iiit_pet.read_split_list(
        synthetic_pets_dir / 'annotations' / list_file
      )
    ]
  assert f'{df.RGBA_PNG}.jpg' in names  # The last split read is 'test'.


def test_missing_listed_file_is_a_clear_error(synthetic_pets_dir, tmp_path):
  manual = tmp_path / 'pets'
  shutil.copytree(synthetic_pets_dir, manual)
  (manual / 'images' / 'Bengal_2.jpg').unlink()
  with pytest.raises(ValueError, match=r'Bengal_2\.jpg.*missing.*manual_dir'):
    _builder('oxford_iiit_pet', manual, tmp_path / 'tfds')


@pytest.mark.parametrize(
  'corruption,message',
  [
    ('truncated', r'Bengal_2\.jpg: unreadable image'),
    ('empty', r'Bengal_2\.jpg: unreadable image'),
    ('trimap_values', r'Bengal_2\.png: bad trimap .*\[0, 7\] outside'),
    ('duplicate', r'trainval\.txt:\d+: Bengal_2 is listed twice'),
  ],
)
def test_corrupt_pets_files_are_errors_naming_them(
  synthetic_pets_dir, tmp_path, corruption, message
):
  manual = tmp_path / 'pets'
  shutil.copytree(synthetic_pets_dir, manual)
  image = manual / 'images' / 'Bengal_2.jpg'
  trimap = manual / 'annotations' / 'trimaps' / 'Bengal_2.png'
  if corruption == 'truncated':
    image.write_bytes(image.read_bytes()[:300])
  elif corruption == 'empty':
    image.write_bytes(b'')
  elif corruption == 'trimap_values':
    values = np.asarray(Image.open(trimap)).copy()
    values[0, 0], values[-1, -1] = 0, 7
    Image.fromarray(values).save(trimap)
  else:
    trainval = manual / 'annotations' / 'trainval.txt'
    line = next(
      x for x in trainval.read_text().splitlines() if x.startswith('Bengal_2 ')
    )
    trainval.write_text(trainval.read_text() + line + '\n')
  with pytest.raises(ValueError, match=message):
    _builder('oxford_iiit_pet', manual, tmp_path / 'tfds')


# ----------------------------------------------------------------------------
# Cats-vs-Dogs on synthetic data in the Microsoft layout.
# ----------------------------------------------------------------------------


def test_cats_vs_dogs_skips_and_counts_undecodable_files(
  synthetic_cvd_dir, synthetic_data_dir
):
  builder = _builder('cats_vs_dogs', synthetic_cvd_dir, synthetic_data_dir)
  assert builder.name == 'cats_vs_dogs_ood'
  assert builder.info.splits['train'].num_examples == df.NUM_CVD_DECODABLE
  metadata = builder.info.metadata
  assert metadata['num_skipped_files'] == df.NUM_CVD_SKIPPED
  assert sorted(metadata['skipped_files']) == ['Cat/666.jpg', 'Dog/11702.jpg']
  assert metadata['reencoded_images'] == ['Dog/7.jpg']
  assert 'num_skipped_files' in builder.info.description
  source = builder.as_data_source('train')
  labels = {}
  for i in range(len(source)):
    example = source[i]
    name = example['file_name']
    labels[name.decode() if isinstance(name, bytes) else name] = int(
      example['species']
    )
    assert example['image'].shape[2] == 3
  assert all(label == name.startswith('Dog/') for name, label in labels.items())
  assert sum(labels.values()) == 7


def test_cats_vs_dogs_accepts_the_pet_images_folder_itself(synthetic_cvd_dir):
  found = cats_vs_dogs.find_pet_images(synthetic_cvd_dir / 'PetImages')
  assert found == cats_vs_dogs.find_pet_images(synthetic_cvd_dir)


@pytest.mark.parametrize('name', ['oxford_iiit_pet', 'cats_vs_dogs'])
def test_without_manual_dir_the_official_archives_are_used(
  name, synthetic_pets_dir, synthetic_cvd_dir, tmp_path, monkeypatch
):
  """The download branch, with the download itself replaced by local dirs."""
  requested = []

  def fake_download(self, urls):
    # Already extracted directories: `common.download_and_extract` keeps them.
    del self
    requested.append(urls)
    if isinstance(urls, dict):  # Pets: each archive extracts to its own dir.
      return {key: synthetic_pets_dir for key in urls}
    return synthetic_cvd_dir

  monkeypatch.setattr(
    tfds.download.DownloadManager,
    'download',
    fake_download,
  )
  # No network here: the reachability probe (tested in test_input_cases.py)
  # is not what this test is about.
  monkeypatch.setattr(downloads, 'check_reachable', lambda urls: list(urls))
  builder = data_lib.prepare_dataset(name, data_dir=str(tmp_path))
  assert builder.info.metadata['source'] == 'download'
  if name == 'oxford_iiit_pet':
    assert requested == [
      {
        'images': oxford_iiit_pet.IMAGES_URL,
        'annotations': oxford_iiit_pet.ANNOTATIONS_URL,
      }
    ]
    assert builder.info.splits['test'].num_examples == df.NUM_TEST
  else:
    assert requested == [cats_vs_dogs.URL]
    assert builder.info.splits['train'].num_examples == df.NUM_CVD_DECODABLE


# ----------------------------------------------------------------------------
# Errors that name the layout and the setting to change.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
  'name,key,layout',
  [
    ('oxford_iiit_pet', 'config.data.manual_dir', 'annotations/trimaps'),
    ('cats_vs_dogs', 'config.data.ood_manual_dir', 'PetImages/Cat'),
  ],
)
def test_missing_manual_dir_error_names_layout_and_keys(
  tmp_path, name, key, layout
):
  with pytest.raises(ValueError) as error:
    _builder(name, tmp_path / 'nowhere', tmp_path / 'tfds')
  message = str(error.value)
  assert 'does not exist' in message
  for part in (layout, key, '--manual_dir'):
    assert part in message
  assert not (tmp_path / 'tfds').exists()


def test_malformed_pets_dir_names_what_is_missing(synthetic_pets_dir, tmp_path):
  manual = tmp_path / 'pets'
  shutil.copytree(synthetic_pets_dir / 'images', manual / 'images')
  (manual / 'annotations').mkdir()
  with pytest.raises(ValueError) as error:
    _builder('oxford_iiit_pet', manual, tmp_path / 'tfds')
  message = str(error.value)
  assert 'lacks annotations/trimaps' in message
  for part in (
    'annotations/trainval.txt',
    'config.data.manual_dir',
    '--manual_dir',
  ):
    assert part in message


def test_malformed_cats_vs_dogs_dir_names_what_is_missing(tmp_path):
  (tmp_path / 'cvd' / 'PetImages' / 'Cat').mkdir(parents=True)
  with pytest.raises(
    ValueError,
    match=r'lacks PetImages/Cat and PetImages/Dog'
    r'.*config\.data\.ood_manual_dir',
  ):
    _builder('cats_vs_dogs', tmp_path / 'cvd', tmp_path / 'tfds')


def test_data_dir_prepared_from_another_source_is_an_error(
  synthetic_pets_dir, synthetic_data_dir, tmp_path
):
  other = tmp_path / 'other_copy'
  shutil.copytree(synthetic_pets_dir, other)
  with pytest.raises(ValueError, match='already holds oxford_iiit_pet_masks'):
    _builder('oxford_iiit_pet', other, synthetic_data_dir)
  # Without a manual dir, the prepared data is used whatever its source.
  builder = data_lib.prepare_dataset(
    'oxford_iiit_pet', data_dir=str(synthetic_data_dir)
  )
  assert builder.info.metadata['source'] == os.path.realpath(synthetic_pets_dir)


# ----------------------------------------------------------------------------
# Several processes: process 0 prepares, the others wait.
# ----------------------------------------------------------------------------


def test_only_process_0_prepares_and_the_others_wait(
  synthetic_pets_dir, tmp_path
):
  data_dir = tmp_path / 'tfds'
  kwargs = dict(manual_dir=str(synthetic_pets_dir), data_dir=str(data_dir))
  seen = {}

  def process_1():
    try:
      seen['builder'] = data_lib.prepare_dataset(
        'oxford_iiit_pet', process=(1, 2), wait_s=300, **kwargs
      )
    except Exception as e:  # pylint: disable=broad-except
      seen['error'] = e

  waiter = threading.Thread(target=process_1)
  waiter.start()
  time.sleep(1.5)
  # Process 1 prepares nothing: it waits.
  assert waiter.is_alive(), seen
  assert not list(data_dir.rglob('dataset_info.json'))
  chief = data_lib.prepare_dataset('oxford_iiit_pet', process=(0, 2), **kwargs)
  waiter.join(300)
  assert not waiter.is_alive() and 'error' not in seen, seen
  other = seen['builder']
  assert other.is_prepared() and other.data_dir == chief.data_dir
  assert other.info.splits['test'].num_examples == df.NUM_TEST
  assert len(list(data_dir.rglob('dataset_info.json'))) == 1


def test_waiting_for_process_0_ends_with_a_clear_error(
  synthetic_pets_dir, tmp_path
):
  data_dir = tmp_path / 'tfds'
  start = time.monotonic()
  with pytest.raises(
    TimeoutError,
    match=r'Process 1 of 2 waited \d+ s for process 0 to prepare '
    r'oxford_iiit_pet.*tfds_data_dir.*every host',
  ):
    data_lib.prepare_dataset(
      'oxford_iiit_pet',
      manual_dir=str(synthetic_pets_dir),
      data_dir=str(data_dir),
      process=(1, 2),
      wait_s=0.5,
    )
  assert time.monotonic() - start < 30
  assert not list(data_dir.rglob('dataset_info.json'))


# ----------------------------------------------------------------------------
# The real samples (skipped when shared/data is absent).
# ----------------------------------------------------------------------------


def _prepare_cli(dataset, manual_dir, data_dir):
  result = subprocess.run(
    [
      sys.executable,
      '-m',
      'experiments.prepare',
      f'--dataset={dataset}',
      f'--manual_dir={manual_dir}',
      f'--data_dir={data_dir}',
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    check=False,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


def test_prepare_cli_prints_split_sizes_of_the_real_samples(real_data_dir):
  sizes = _prepare_cli('oxford_iiit_pet', df.REAL_PETS, real_data_dir)
  assert sizes == {'train': 270, 'validation': 30, 'test': 391}
  sizes = _prepare_cli('cats_vs_dogs', df.REAL_CATS_VS_DOGS, real_data_dir)
  assert sizes == {'train': 2000}


def test_real_pets_sample_labels_and_known_defects(real_data_dir):
  builder = _builder('oxford_iiit_pet', df.REAL_PETS, real_data_dir)
  assert builder.info.splits['train'].num_examples == 300
  assert builder.info.splits['test'].num_examples == 391
  assert 'Abyssinian_5.jpg' in builder.info.metadata['reencoded_images']
  source = builder.as_data_source(
    'test', decoders={'segmentation_mask': tfds.decode.SkipDecoding()}
  )
  labels, species = [], []
  for i in range(len(source)):
    example = source[i]
    name = example['file_name']
    name = name.decode() if isinstance(name, bytes) else name
    assert name != 'Abyssinian_34.jpg'
    if name == 'Abyssinian_5.jpg':
      assert example['image'].shape[2] == 3
    labels.append(example['label'])
    species.append(example['species'])
    breed = oxford_iiit_pet.BREEDS[example['label']]
    assert name.startswith(breed + '_')
    assert example['species'] == int(breed[0].islower())  # Dogs: lower case.
  assert 0 <= min(labels) and max(labels) <= 36 and len(set(labels)) == 32
  assert set(species) == {0, 1}
