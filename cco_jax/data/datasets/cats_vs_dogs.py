"""Microsoft Cats-vs-Dogs as a TFDS builder that needs no TensorFlow.

Registered as ``cats_vs_dogs_ood`` (TFDS's own ``cats_vs_dogs`` is left alone).
The project uses it as an out-of-distribution test set for cat-vs-dog models
trained on Oxford-IIIT Pet; it has no masks.

Features of one example:
  image      uint8 (H, W, 3), JPEG, RGB.
  species    ClassLabel(['cat', 'dog']), from the folder (Cat = 0, Dog = 1).
  file_name  Text, e.g. 'Cat/10020.jpg'.

Single split 'train'. Source: with no manual directory the Microsoft archive
(`URL`, about 790 MB) is downloaded; a manual directory must hold
`PetImages/Cat/*.jpg` and `PetImages/Dog/*.jpg` (see `LAYOUT`).

The full release holds about 1,700 files that are empty or that Pillow cannot
decode. They are skipped; their number and names are logged and stored in
``builder.info.metadata['num_skipped_files']`` / ``['skipped_files']``. Decodable
files that are not RGB JPEGs are converted (``metadata['reencoded_images']``).
"""

from __future__ import annotations

import os
import re
import warnings

from absl import logging
from etils import epath
import tensorflow_datasets as tfds

from cco_jax import errors
from cco_jax.data.datasets.common import UNREADABLE as _UNREADABLE
from cco_jax.data.datasets.common import ProjectBuilder
from cco_jax.data.datasets.common import code_path_property
from cco_jax.data.datasets.common import download_and_extract
from cco_jax.data.datasets.common import manual_dir_or_none
from cco_jax.data.datasets.common import mirrored
from cco_jax.data.datasets.common import ordered_parallel_map
from cco_jax.data.datasets.common import rgb_jpeg_bytes

URL = (
  'https://download.microsoft.com/download/3/E/1/'
  '3E1C3F21-ECDB-4869-8368-6DEBA77B919F/kagglecatsanddogs_5340.zip'
)
CLASSES = ('Cat', 'Dog')  # Folder names; species labels 0 and 1.
SPECIES = ('cat', 'dog')
LAYOUT = (
  'DIR/PetImages/Cat/*.jpg and DIR/PetImages/Dog/*.jpg (the layout of '
  "Microsoft's kagglecatsanddogs_5340.zip)"
)
MANUAL_DIR_HINT = (
  'Set --manual_dir (python -m experiments.prepare --dataset=cats_vs_dogs) '
  'or config.data.ood_manual_dir to such a directory, or leave it empty to '
  'download the archive.'
)

_NUMBER = re.compile(r'\d+')


def find_pet_images(path: os.PathLike[str] | str) -> epath.Path:
  """Returns the `PetImages` directory under `path` (or `path` itself).

  Args:
    path: a directory that holds `PetImages/{Cat,Dog}/`, or `PetImages` itself.

  Raises:
    ValueError: naming the expected layout and the flag or config key to set.
  """
  root = epath.Path(path).expanduser()
  if not root.is_dir():
    raise errors.UserError(
      f'Cats-vs-Dogs manual directory {os.fspath(root)!r} does not exist. '
      f'Expected {LAYOUT}. {MANUAL_DIR_HINT}'
    )
  for candidate in (root / 'PetImages', root):
    if all((candidate / c).is_dir() for c in CLASSES):
      return candidate
  raise errors.UserError(
    f'Cats-vs-Dogs manual directory {os.fspath(root)!r} lacks PetImages/Cat '
    f'and PetImages/Dog. Expected {LAYOUT}. {MANUAL_DIR_HINT}'
  )


def check_manual_dir(path: os.PathLike[str] | str) -> epath.Path:
  """Returns `path` if it holds the Microsoft layout, else raises ValueError."""
  find_pet_images(path)
  return epath.Path(path).expanduser()


def list_files(pet_images: epath.Path) -> list[tuple[int, epath.Path]]:
  """(species, path) of every `*.jpg`, cats first, in numeric file order."""

  def order(path: epath.Path):
    match = _NUMBER.search(path.stem)
    return (int(match.group()) if match else -1, path.name)

  return [
    (species, path)
    for species, folder in enumerate(CLASSES)
    for path in sorted((pet_images / folder).glob('*.jpg'), key=order)
  ]


def _read(item: tuple[int, epath.Path]):
  """(species, path, jpeg bytes or None when unreadable, re-encoded?)."""
  species, path = item
  try:
    data = path.read_bytes()
    if not data:
      return species, path, None, False
    jpeg, reencoded = rgb_jpeg_bytes(data)
  except _UNREADABLE:
    return species, path, None, False
  return species, path, jpeg, reencoded


class CatsVsDogsOod(ProjectBuilder):
  """Microsoft Cats-vs-Dogs, undecodable files skipped; no TensorFlow needed."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release (cco-jax).'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    f'Optional. Place the extracted archive in the manual directory: '
    f'{LAYOUT}. Without it the archive is downloaded.'
  )
  MANUAL_DIR_HINT = MANUAL_DIR_HINT
  code_path = code_path_property

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=(
        'Microsoft Research Cats-vs-Dogs (Asirra) images with a cat/dog '
        'label. Files that are empty or that Pillow cannot decode (about '
        '1,700 in the full release) are skipped; their count is in '
        'metadata["num_skipped_files"].'
      ),
      features=tfds.features.FeaturesDict(
        {
          'image': self.image_feature(),
          'species': tfds.features.ClassLabel(names=SPECIES),
          'file_name': tfds.features.Text(),
        }
      ),
      supervised_keys=('image', 'species'),
      homepage='https://www.microsoft.com/en-us/download/details.aspx?id=54765',
      metadata=tfds.core.MetadataDict(),
      disable_shuffling=True,  # Records in file order: Cat/0.jpg first.
    )

  def _pet_images(
    self, dl_manager: tfds.download.DownloadManager
  ) -> epath.Path:
    """`PetImages` of a non-empty manual directory, else of the download."""
    manual_dir = manual_dir_or_none(dl_manager)
    if manual_dir is not None:
      pet_images = find_pet_images(manual_dir)
      self.info.metadata['source'] = os.fspath(epath.Path(manual_dir).resolve())
      return pet_images
    self.info.metadata['source'] = 'download'
    return find_pet_images(
      download_and_extract(
        dl_manager, mirrored(URL, self.options.download_mirror)
      )
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    return {'train': self._generate_examples(self._pet_images(dl_manager))}

  def _generate_examples(self, pet_images: epath.Path):
    """Yields ('Cat/123.jpg', example) for each decodable file."""
    files = list_files(pet_images)

    def read(item):
      species, path, jpeg, was_reencoded = _read(item)
      if jpeg is not None:
        jpeg = self.stored(jpeg)[0]
      return species, path, jpeg, was_reencoded

    skipped, reencoded = [], []
    with warnings.catch_warnings():
      # Pillow warns about the many broken EXIF blocks of this release.
      warnings.simplefilter('ignore', UserWarning)
      for species, path, jpeg, was_reencoded in ordered_parallel_map(
        read, files
      ):
        file_name = f'{CLASSES[species]}/{path.name}'
        if jpeg is None:
          skipped.append(file_name)
          continue
        if was_reencoded:
          reencoded.append(file_name)
        yield (
          file_name,
          {'image': jpeg, 'species': species, 'file_name': file_name},
        )
    logging.warning(
      'Cats-vs-Dogs: skipped %d of %d files (empty or not decodable by '
      'Pillow); re-encoded %d as RGB JPEGs.',
      len(skipped),
      len(files),
      len(reencoded),
    )
    self.info.metadata.update(
      num_files=len(files),
      num_skipped_files=len(skipped),
      skipped_files=skipped,
      reencoded_images=reencoded,
    )
