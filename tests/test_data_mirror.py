"""--download_mirror: the official archive names fetched from another URL."""

import functools
import http.server
import tarfile
import threading

import pytest
import synthetic_data as df

from cco_jax import data as data_lib
from cco_jax.data.datasets import oxford_iiit_pet
from cco_jax.data.datasets.common import PrepareOptions
from cco_jax.data.datasets.common import mirrored

NUM_PER_SPLIT = 6


def test_mirrored_keeps_the_official_file_name():
  assert mirrored(oxford_iiit_pet.IMAGES_URL, '') == oxford_iiit_pet.IMAGES_URL
  assert (
    mirrored(oxford_iiit_pet.ANNOTATIONS_URL, 'http://host:8/a/')
    == 'http://host:8/a/annotations.tar.gz'
  )


def _archives(out, sample):
  """images.tar.gz and annotations.tar.gz of a few sample images, in the
  official archives' layout (top folders images/ and annotations/)."""
  lines = {}
  for list_file in ('trainval.txt', 'test.txt'):
    text = (sample / 'annotations' / list_file).read_text().splitlines()
    lines[list_file] = [x for x in text if x and not x.startswith('#')][
      :NUM_PER_SPLIT
    ]
  names = [x.split()[0] for entries in lines.values() for x in entries]
  staging = out / 'staging'
  (staging / 'annotations').mkdir(parents=True)
  for list_file, entries in lines.items():
    (staging / 'annotations' / list_file).write_text('\n'.join(entries) + '\n')
  with tarfile.open(out / 'images.tar.gz', 'w:gz') as tar:
    for name in names:
      tar.add(sample / 'images' / f'{name}.jpg', f'images/{name}.jpg')
  with tarfile.open(out / 'annotations.tar.gz', 'w:gz') as tar:
    for list_file in lines:
      tar.add(staging / 'annotations' / list_file, f'annotations/{list_file}')
    for name in names:
      tar.add(
        sample / 'annotations' / 'trimaps' / f'{name}.png',
        f'annotations/trimaps/{name}.png',
      )


def test_pets_downloads_from_a_local_mirror(tmp_path):
  if not df.REAL_PETS.is_dir():
    pytest.skip(f'Pets sample not found under {df.SHARED_DATA}.')
  served = tmp_path / 'served'
  served.mkdir()
  _archives(served, df.REAL_PETS)
  handler = functools.partial(
    http.server.SimpleHTTPRequestHandler, directory=str(served)
  )
  server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    url = f'http://127.0.0.1:{server.server_address[1]}/'
    builder = data_lib.prepare_dataset(
      'oxford_iiit_pet',
      data_dir=str(tmp_path / 'tfds'),
      options=PrepareOptions(download_mirror=url),
    )
  finally:
    server.shutdown()
    server.server_close()
  assert builder.info.metadata['source'] == 'download'
  assert builder.info.splits['train'].num_examples == NUM_PER_SPLIT
  assert builder.info.splits['test'].num_examples == NUM_PER_SPLIT
