"""Oxford-IIIT Pet with pixel trimaps, as a TFDS builder that needs no TensorFlow.

Registered as ``oxford_iiit_pet_masks`` (TFDS's own ``oxford_iiit_pet`` is left
alone). Prepared in the ArrayRecord format for random access from Grain:

    builder = OxfordIiitPetMasks(data_dir=..., file_format='array_record')
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=...))

Features of one example:
  image              uint8 (H, W, 3), JPEG, RGB.
  segmentation_mask  uint8 (H, W, 1), PNG, the official trimap:
                     1 = pet, 2 = background, 3 = boundary (not classified).
  label              ClassLabel(37): the breed, CLASS-ID - 1 (names in `BREEDS`).
  species            ClassLabel(['cat', 'dog']): SPECIES - 1.
  file_name          Text, e.g. 'Abyssinian_100.jpg'.

Splits: 'train' = `annotations/trainval.txt`, 'test' = `annotations/test.txt`,
stored in list order (no TFDS shuffling: record i is line i of the list, and
``info.metadata['splits'][split]`` holds the file names and breed labels in that
order). A validation set is carved from 'train' by the input pipeline, not here.

Source: with no manual directory the official archives are downloaded
(`IMAGES_URL`, `ANNOTATIONS_URL`, about 800 MB). A manual directory must hold the
official layout (see `LAYOUT`).

Known defects of the official release, handled while preparing:
  * `Abyssinian_34.jpg` is a GIF (in no split; converted if a list names it);
  * `Abyssinian_5.jpg` is an RGBA PNG; a few other files are PNG, CMYK or
    greyscale JPEGs.
An image that is a decodable RGB JPEG is stored byte for byte (no second lossy
compression); anything else is decoded, converted to RGB and re-encoded as a JPEG
(quality `JPEG_QUALITY`) with Pillow. Their names are recorded in
``builder.info.metadata['reencoded_images']``.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os

from absl import logging
from etils import epath
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from cco_jax import errors
from cco_jax.data.datasets.common import JPEG_QUALITY  # noqa: F401
from cco_jax.data.datasets.common import UNREADABLE
from cco_jax.data.datasets.common import ProjectBuilder
from cco_jax.data.datasets.common import code_path_property
from cco_jax.data.datasets.common import download_and_extract
from cco_jax.data.datasets.common import image_size as _image_size
from cco_jax.data.datasets.common import manual_dir_or_none
from cco_jax.data.datasets.common import mirrored
from cco_jax.data.datasets.common import ordered_parallel_map
from cco_jax.data.datasets.common import rgb_jpeg_bytes

IMAGES_URL = 'https://thor.robots.ox.ac.uk/~vgg/data/pets/images.tar.gz'
ANNOTATIONS_URL = (
  'https://thor.robots.ox.ac.uk/~vgg/data/pets/annotations.tar.gz'
)

# Breed names in CLASS-ID order (CLASS-ID 1 is BREEDS[0]); the image-name prefixes.
BREEDS = (
  'Abyssinian',
  'american_bulldog',
  'american_pit_bull_terrier',
  'basset_hound',
  'beagle',
  'Bengal',
  'Birman',
  'Bombay',
  'boxer',
  'British_Shorthair',
  'chihuahua',
  'Egyptian_Mau',
  'english_cocker_spaniel',
  'english_setter',
  'german_shorthaired',
  'great_pyrenees',
  'havanese',
  'japanese_chin',
  'keeshond',
  'leonberger',
  'Maine_Coon',
  'miniature_pinscher',
  'newfoundland',
  'Persian',
  'pomeranian',
  'pug',
  'Ragdoll',
  'Russian_Blue',
  'saint_bernard',
  'samoyed',
  'scottish_terrier',
  'shiba_inu',
  'Siamese',
  'Sphynx',
  'staffordshire_bull_terrier',
  'wheaten_terrier',
  'yorkshire_terrier',
)
SPECIES = ('cat', 'dog')

# Trimap pixel values.
TRIMAP_PET, TRIMAP_BACKGROUND, TRIMAP_BOUNDARY = 1, 2, 3

LAYOUT = (
  'DIR/images/<NAME>.jpg, DIR/annotations/trimaps/<NAME>.png and the split '
  'lists DIR/annotations/trainval.txt and DIR/annotations/test.txt (lines '
  '"NAME CLASS-ID SPECIES BREED-ID"), as in the official images.tar.gz and '
  'annotations.tar.gz'
)
MANUAL_DIR_HINT = (
  'Set --manual_dir (python -m experiments.prepare '
  '--dataset=oxford_iiit_pet) or config.data.manual_dir to such a directory, '
  'or leave it empty to download the official archives.'
)
# The spurious-background benchmark's groups (species x background kind).
SPURIOUS_METADATA = 'spurious.json'
SPURIOUS_KINDS = ('smooth', 'textured')
SPURIOUS_GROUP_NAMES = tuple(
  f'{species}/{kind}' for species in SPECIES for kind in SPURIOUS_KINDS
)
SPLIT_FILES = {'train': 'trainval.txt', 'test': 'test.txt'}


@dataclasses.dataclass(frozen=True)
class ListEntry:
  """One line of an official split list.

  Attributes:
    name: image name without extension, e.g. 'Abyssinian_100'.
    label: breed, 0-based (CLASS-ID - 1).
    species: 0 = cat, 1 = dog (SPECIES - 1).
  """

  name: str
  label: int
  species: int


def check_manual_dir(path: os.PathLike[str] | str) -> epath.Path:
  """Returns `path` if it holds the official layout, else raises ValueError.

  Args:
    path: directory that should contain `images/` and `annotations/`.

  Returns:
    The directory as an `epath.Path`.

  Raises:
    ValueError: naming the missing part, the expected layout and the flag or
      config key to set.
  """
  root = epath.Path(path).expanduser()
  required = [
    root / 'images',
    root / 'annotations' / 'trimaps',
    *(root / 'annotations' / f for f in SPLIT_FILES.values()),
  ]
  if not root.is_dir():
    raise errors.UserError(
      f'Oxford-IIIT Pet manual directory {os.fspath(root)!r} does not exist. '
      f'Expected the official layout: {LAYOUT}. {MANUAL_DIR_HINT}'
    )
  missing = [os.fspath(p.relative_to(root)) for p in required if not p.exists()]
  if missing:
    raise errors.UserError(
      f'Oxford-IIIT Pet manual directory {os.fspath(root)!r} lacks '
      f'{", ".join(missing)}. Expected the official layout: {LAYOUT}. '
      f'{MANUAL_DIR_HINT}'
    )
  return root


def spurious_kinds(root: epath.Path) -> dict[str, str] | None:
  """{image name: background kind} of a spurious-background benchmark.

  `root/spurious.json` is written by `cco_jax.data.spurious.make_benchmark`;
  None when `root` has none (the plain Pets release).
  """
  path = root / SPURIOUS_METADATA
  if not path.exists():
    return None
  return json.loads(path.read_text())['kinds']


def spurious_group(entry: ListEntry, kinds: dict[str, str]) -> int:
  """species x background kind -> an index into `SPURIOUS_GROUP_NAMES`."""
  return 2 * entry.species + SPURIOUS_KINDS.index(kinds[entry.name])


def read_split_list(path: os.PathLike[str] | str) -> list[ListEntry]:
  """Parses an official split list, skipping blank lines and '#' comments.

  Args:
    path: `annotations/trainval.txt`, `test.txt` or `list.txt`.

  Returns:
    The entries in file order.

  Raises:
    ValueError: on a line that is not 'NAME CLASS-ID SPECIES BREED-ID' with
      CLASS-ID in 1..37 and SPECIES in {1, 2}, or a name listed twice.
  """
  path = epath.Path(path)
  entries, first_line = [], {}
  for line_number, line in enumerate(path.read_text().splitlines(), start=1):
    line = line.strip()
    if not line or line.startswith('#'):
      continue
    entry = _parse_line(line)
    if entry is None:
      raise errors.UserError(
        f'{os.fspath(path)}:{line_number}: expected "NAME CLASS-ID SPECIES '
        f'BREED-ID" with CLASS-ID in 1..{len(BREEDS)} and SPECIES in 1..2, '
        f'got {line!r}. Expected the official layout: {LAYOUT}.'
      )
    if entry.name in first_line:
      raise errors.UserError(
        f'{os.fspath(path)}:{line_number}: {entry.name} is listed twice '
        f'(first on line {first_line[entry.name]}); remove the duplicate.'
      )
    first_line[entry.name] = line_number
    entries.append(entry)
  return entries


def _parse_line(line: str) -> ListEntry | None:
  """'NAME CLASS-ID SPECIES BREED-ID' -> ListEntry, or None if malformed."""
  try:
    name, class_id, species, _ = line.split()
    class_id, species = int(class_id), int(species)
  except ValueError:
    return None
  if not 1 <= class_id <= len(BREEDS) or species not in (1, 2):
    return None
  return ListEntry(name=name, label=class_id - 1, species=species - 1)


def trimap_png_bytes(data: bytes, size: tuple[int, int]) -> tuple[bytes, bool]:
  """Returns a trimap as single-channel PNG bytes of the image's `size`.

  Args:
    data: bytes of the official trimap PNG (mode 'L' or palette 'P' whose
      indices are the values 1, 2, 3).
    size: (width, height) of the matching image.

  Returns:
    (png_bytes, changed): `changed` is True when the trimap had to be
    re-encoded to mode 'L' or resized (nearest) to the image size.

  Raises:
    ValueError: a value outside {1, 2, 3}.
  """
  with Image.open(io.BytesIO(data)) as trimap:
    trimap.load()
    values = np.asarray(
      trimap if trimap.mode in ('L', 'P') else trimap.convert('L')
    )
    if values.min() < TRIMAP_PET or values.max() > TRIMAP_BOUNDARY:
      bad = sorted(set(np.unique(values).tolist()) - {1, 2, 3})
      raise ValueError(
        f'trimap values {bad[:10]} outside {{1, 2, 3}} (1 = pet, '
        '2 = background, 3 = boundary)'
      )
    if trimap.mode == 'L' and trimap.size == size:
      return data, False
  fixed = Image.fromarray(values.astype(np.uint8), mode='L')
  if fixed.size != size:
    fixed = fixed.resize(size, Image.Resampling.NEAREST)
  buffer = io.BytesIO()
  fixed.save(buffer, format='PNG')
  return buffer.getvalue(), True


class OxfordIiitPetMasks(ProjectBuilder):
  """Oxford-IIIT Pet: images, trimaps, breed and species; no TensorFlow needed."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release (cco-jax).'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    f'Optional. Place the extracted official archives in the manual '
    f'directory: {LAYOUT}. Without it the archives are downloaded.'
  )
  # Where users set the manual directory; quoted in error messages.
  MANUAL_DIR_HINT = MANUAL_DIR_HINT
  code_path = code_path_property

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=(
        'The Oxford-IIIT Pet dataset (37 breeds, 12 cat and 25 dog) with '
        'its pixel trimaps (1 = pet, 2 = background, 3 = boundary). '
        'Images are RGB JPEGs; non-JPEG or non-RGB files of the official '
        'release are converted (names in metadata["reencoded_images"]).'
      ),
      features=tfds.features.FeaturesDict(
        {
          'image': self.image_feature(),
          'segmentation_mask': self.mask_feature(),
          'label': tfds.features.ClassLabel(names=BREEDS),
          'species': tfds.features.ClassLabel(names=SPECIES),
          'file_name': tfds.features.Text(),
        }
      ),
      supervised_keys=('image', 'label'),
      homepage='https://www.robots.ox.ac.uk/~vgg/data/pets/',
      citation=(
        '@InProceedings{parkhi12a, author = {Parkhi, O. M. and Vedaldi, A. '
        'and Zisserman, A. and Jawahar, C. V.}, title = {Cats and Dogs}, '
        'booktitle = {IEEE Conference on Computer Vision and Pattern '
        'Recognition}, year = {2012}}'
      ),
      metadata=tfds.core.MetadataDict(),
      disable_shuffling=True,
    )

  def _source_dirs(
    self, dl_manager: tfds.download.DownloadManager
  ) -> tuple[epath.Path, epath.Path]:
    """(images_dir, annotations_dir) of a non-empty manual dir, else downloads."""
    manual_dir = manual_dir_or_none(dl_manager)
    if manual_dir is not None:
      root = check_manual_dir(manual_dir)
      self.info.metadata['source'] = os.fspath(root.resolve())
      return root / 'images', root / 'annotations'
    paths = download_and_extract(
      dl_manager,
      {
        'images': mirrored(IMAGES_URL, self.options.download_mirror),
        'annotations': mirrored(ANNOTATIONS_URL, self.options.download_mirror),
      },
    )
    self.info.metadata['source'] = 'download'
    return (
      epath.Path(paths['images']) / 'images',
      epath.Path(paths['annotations']) / 'annotations',
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    images_dir, annotations_dir = self._source_dirs(dl_manager)
    self.info.metadata['reencoded_images'] = []
    self.info.metadata['fixed_trimaps'] = []
    self.info.metadata['splits'] = {}
    kinds = spurious_kinds(annotations_dir.parent)
    if kinds is not None:
      self.info.metadata['group_names'] = list(SPURIOUS_GROUP_NAMES)
    splits = {}
    for split, list_file in SPLIT_FILES.items():
      entries = read_split_list(annotations_dir / list_file)
      self.info.metadata['splits'][split] = {
        'file_names': [f'{e.name}.jpg' for e in entries],
        'labels': [e.label for e in entries],
      }
      if kinds is not None:
        self.info.metadata['splits'][split]['groups'] = [
          spurious_group(e, kinds) for e in entries
        ]
      splits[split] = self._generate_examples(
        images_dir, annotations_dir / 'trimaps', entries
      )
    return splits

  def _generate_examples(
    self,
    images_dir: epath.Path,
    trimaps_dir: epath.Path,
    entries: list[ListEntry],
  ):
    """Yields (name, example) for each list entry, in list order."""

    def read(entry: ListEntry):
      image_path = images_dir / f'{entry.name}.jpg'
      trimap_path = trimaps_dir / f'{entry.name}.png'
      for path in (image_path, trimap_path):
        if not path.exists():
          raise errors.UserError(
            f'{os.fspath(path)} is listed in a split but missing. Expected '
            f'the official layout: {LAYOUT}. {MANUAL_DIR_HINT}'
          )
      try:
        image, reencoded = rgb_jpeg_bytes(image_path.read_bytes())
      except UNREADABLE as error:
        raise errors.UserError(
          f'{os.fspath(image_path)}: unreadable image ({error}): empty, '
          'truncated or not an image; replace it with the official file.'
        ) from error
      try:
        trimap, fixed = trimap_png_bytes(
          trimap_path.read_bytes(), _image_size(image)
        )
      except (*UNREADABLE, ValueError) as error:
        raise errors.UserError(
          f'{os.fspath(trimap_path)}: bad trimap ({error}); replace it with '
          'the official file.'
        ) from error
      image, trimap = self.stored(image, trimap)
      return entry, image, reencoded, trimap, fixed

    for entry, image, reencoded, trimap, fixed in ordered_parallel_map(
      read, entries
    ):
      file_name = f'{entry.name}.jpg'
      if reencoded:
        logging.info(
          'Oxford-IIIT Pet: re-encoded %s as an RGB JPEG.', file_name
        )
        self.info.metadata['reencoded_images'].append(file_name)
      if fixed:
        # Another size than the image (resized, nearest) or not mode 'L'.
        logging.warning(
          'Oxford-IIIT Pet: trimap of %s re-encoded or resized to its image '
          '(%d so far; names in metadata["fixed_trimaps"]).',
          file_name,
          len(self.info.metadata['fixed_trimaps']) + 1,
        )
        self.info.metadata['fixed_trimaps'].append(file_name)
      yield (
        entry.name,
        {
          'image': image,
          'segmentation_mask': trimap,
          'label': entry.label,
          'species': entry.species,
          'file_name': file_name,
        },
      )
