"""Waterbirds (Sagawa et al. 2020) with CUB-200-2011 masks, as a TFDS builder.

Sources, in their official layouts (a manual directory holds both, extracted;
without one both archives are downloaded):

    DIR/waterbird_complete95_forest2water2/metadata.csv
        columns img_id,img_filename,y,split,place[,place_filename]:
        y 0 = landbird, 1 = waterbird; split 0 = train, 1 = validation,
        2 = test; place 0 = land, 1 = water background
    DIR/waterbird_complete95_forest2water2/<img_filename>   the composites
    DIR/segmentations/<img_filename stem>.png               CUB-200-2011

Waterbirds keeps each bird at its CUB geometry, so the CUB segmentation of
the same file is the bird's mask. CUB segmentations are the mean of several
annotators (grey levels); the mask is `value >= SEGMENTATION_THRESHOLD`
(the majority), stored in the Pets trimap convention (1 = bird,
2 = background). A segmentation of another size than its image is resized
(nearest) and counted in ``metadata['resized_masks']``.

Label: `y` (class names 'landbird', 'waterbird'). Group: 2 * y + place,
names in `GROUP_NAMES` ('landbird/land', ...), recorded in the metadata; the
standard measure is worst-group test accuracy. Records are in metadata.csv
order within each split.
"""

from __future__ import annotations

import csv
import os

from absl import logging
from etils import epath
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from cco_jax import errors
from cco_jax.data.datasets import common
from cco_jax.data.datasets.oxford_iiit_pet import TRIMAP_BACKGROUND
from cco_jax.data.datasets.oxford_iiit_pet import TRIMAP_PET

WATERBIRDS_URL = (
  'https://nlp.stanford.edu/data/dro/waterbird_complete95_forest2water2.tar.gz'
)
SEGMENTATIONS_URL = (
  'https://data.caltech.edu/records/w9d68-gec53/files/segmentations.tgz'
)
WATERBIRDS_DIR = 'waterbird_complete95_forest2water2'
SEGMENTATIONS_DIR = 'segmentations'
CLASSES = ('landbird', 'waterbird')
PLACES = ('land', 'water')
GROUP_NAMES = tuple(f'{c}/{p}' for c in CLASSES for p in PLACES)
SPLITS = {0: 'train', 1: 'validation', 2: 'test'}
SEGMENTATION_THRESHOLD = 128
LAYOUT = (
  f'DIR/{WATERBIRDS_DIR}/metadata.csv (img_filename,y,split,place) with the '
  f'images below it, and DIR/{SEGMENTATIONS_DIR}/<img_filename stem>.png '
  '(the extracted waterbird_complete95_forest2water2.tar.gz and CUB-200-2011 '
  'segmentations.tgz)'
)
HINT = (
  'Set --manual_dir (python -m experiments.prepare --dataset=waterbirds) or '
  'config.data.manual_dir to such a directory, or leave it empty to download.'
)


def check_manual_dir(path: os.PathLike[str] | str) -> epath.Path:
  """Returns DIR if it holds both official layouts, else raises ValueError."""
  root = epath.Path(path).expanduser()
  required = [root / WATERBIRDS_DIR / 'metadata.csv', root / SEGMENTATIONS_DIR]
  missing = [os.fspath(p) for p in required if not p.exists()]
  if missing:
    raise errors.UserError(
      f'Waterbirds manual directory {os.fspath(root)!r} lacks {missing}. '
      f'Expected {LAYOUT}. {HINT}'
    )
  return root


def read_metadata(path: epath.Path) -> list[dict]:
  """Rows of metadata.csv as {'image', 'y', 'split', 'place'} (ints)."""
  rows = []
  with open(path, newline='') as f:
    for line, raw in enumerate(csv.DictReader(f), start=2):
      try:
        row = {
          'image': raw['img_filename'],
          'y': int(raw['y']),
          'split': SPLITS[int(raw['split'])],
          'place': int(raw['place']),
        }
      except (KeyError, ValueError, TypeError) as error:
        raise errors.UserError(
          f'{os.fspath(path)}:{line}: expected img_filename, y in 0..1, '
          f'split in 0..2 and place in 0..1 ({error!r}). Expected {LAYOUT}.'
        ) from error
      if row['y'] not in (0, 1) or row['place'] not in (0, 1):
        raise errors.UserError(
          f'{os.fspath(path)}:{line}: y and place must be 0 or 1.'
        )
      rows.append(row)
  return rows


def _read(row: dict, images: epath.Path, masks: epath.Path):
  """(row, JPEG bytes, trimap PNG bytes, resized?) of one metadata row."""
  image_path = images / row['image']
  mask_path = masks / f'{os.path.splitext(row["image"])[0]}.png'
  for path in (image_path, mask_path):
    if not path.is_file():
      raise errors.UserError(
        f'{os.fspath(path)} is listed in metadata.csv but missing. Expected '
        f'{LAYOUT}.'
      )
  try:
    jpeg, _ = common.rgb_jpeg_bytes(image_path.read_bytes())
    values = common.decode_mask_png(mask_path.read_bytes())
  except common.UNREADABLE as error:
    raise errors.UserError(
      f'{os.fspath(image_path)}: unreadable ({error}).'
    ) from error
  size = common.image_size(jpeg)
  resized = values.shape[::-1] != size
  if resized:
    values = np.asarray(
      Image.fromarray(values).resize(size, Image.Resampling.NEAREST)
    )
  trimap = np.where(
    values >= SEGMENTATION_THRESHOLD, TRIMAP_PET, TRIMAP_BACKGROUND
  )
  return row, jpeg, common.png_bytes(trimap.astype(np.uint8)), resized


class Waterbirds(common.ProjectBuilder):
  """Waterbirds images, CUB masks, bird type and (bird type x place) groups."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release (cco-jax).'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    f'Optional. Extract both official archives in the manual directory: '
    f'{LAYOUT}. Without it they are downloaded.'
  )
  code_path = common.code_path_property

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=(
        'Waterbirds (CUB birds on Places land/water backgrounds, 95% '
        'correlated in train) with CUB-200-2011 bird masks; groups are '
        'bird type x place.'
      ),
      features=tfds.features.FeaturesDict(
        {
          'image': self.image_feature(),
          'segmentation_mask': self.mask_feature(),
          'label': tfds.features.ClassLabel(names=CLASSES),
          'file_name': tfds.features.Text(),
        }
      ),
      homepage='https://github.com/kohpangwei/group_DRO',
      citation=(
        '@inproceedings{sagawa2020dro, title={Distributionally Robust '
        'Neural Networks}, author={Sagawa, Shiori and Koh, Pang Wei and '
        'Hashimoto, Tatsunori B. and Liang, Percy}, booktitle={ICLR}, '
        'year={2020}}'
      ),
      metadata=tfds.core.MetadataDict(),
      disable_shuffling=True,
    )

  def _roots(self, dl_manager) -> tuple[epath.Path, epath.Path]:
    manual_dir = common.manual_dir_or_none(dl_manager)
    if manual_dir is not None:
      root = check_manual_dir(manual_dir)
      self.info.metadata['source'] = os.fspath(root.resolve())
      return root / WATERBIRDS_DIR, root / SEGMENTATIONS_DIR
    mirror = self.options.download_mirror
    paths = common.download_and_extract(
      dl_manager,
      {
        'waterbirds': common.mirrored(WATERBIRDS_URL, mirror),
        'segmentations': common.mirrored(SEGMENTATIONS_URL, mirror),
      },
    )
    self.info.metadata['source'] = 'download'
    return (
      epath.Path(paths['waterbirds']) / WATERBIRDS_DIR,
      epath.Path(paths['segmentations']) / SEGMENTATIONS_DIR,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    images, masks = self._roots(dl_manager)
    rows = read_metadata(images / 'metadata.csv')
    self.info.metadata.update(
      class_names=list(CLASSES),
      group_names=list(GROUP_NAMES),
      resized_masks=[],
      splits={},
    )
    splits = {}
    for split in SPLITS.values():
      members = [r for r in rows if r['split'] == split]
      if not members:
        continue
      self.info.metadata['splits'][split] = {
        'file_names': [r['image'] for r in members],
        'labels': [r['y'] for r in members],
        'groups': [2 * r['y'] + r['place'] for r in members],
      }
      splits[split] = self._generate_examples(images, masks, members)
    return splits

  def _generate_examples(self, images, masks, rows):
    """Yields (img_filename, example) in metadata.csv order."""
    for row, jpeg, trimap, resized in common.ordered_parallel_map(
      lambda row: _read(row, images, masks), rows
    ):
      if resized:
        logging.info('Waterbirds: resized the mask of %s.', row['image'])
        self.info.metadata['resized_masks'].append(row['image'])
      jpeg, trimap = self.stored(jpeg, trimap)
      yield (
        row['image'],
        {
          'image': jpeg,
          'segmentation_mask': trimap,
          'label': row['y'],
          'file_name': row['image'],
        },
      )
