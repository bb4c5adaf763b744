"""Your own masked images as a TFDS builder ('folder'), no TensorFlow needed.

Layout of ROOT (`config.data.manual_dir`, `experiments.prepare --manual_dir`):

    ROOT/labels.csv             header: image,label,split[,group][,labels]
    ROOT/images/<path>          .jpg/.jpeg/.png, any sub-folders
    ROOT/masks/<path stem>.png  8-bit, same size as the image:
                                0 = background, > 0 = object

`label` is a class name: the classes are the sorted unique names (recorded in
``metadata['class_names']``, so the number of classes comes from the data).
Multi-label data adds a `labels` column: the `;`-separated names of every
class present in the image (`label`, the primary class that softmax
objectives, the validation carve and class balance read, is always present
and may be listed or not; an empty cell = the primary class alone). The
classes are then the names of both columns, and each split's multi-hot
targets are recorded as class-index lists in
``metadata['splits'][split]['targets']``, which batches carry as 'targets'
float32 `(C,)` (read by the sigmoid objectives `bce`, `ace_bce`).
`split` is 'train', 'validation' or 'test' (without validation rows the
pipeline carves validation from train, as for Pets). `group` is an optional
string (an attribute or environment); every batch carries its index into
``metadata['group_names']`` (sorted unique names; ('all',) without the column).

Masks are stored in the Pets trimap convention (1 = object, 2 = background)
so the pipeline treats every dataset alike. A mask of any 8-bit PNG mode is
read (`common.decode_mask_png`). Options (`PrepareOptions`, from
`config.data`): `missing_masks` 'error' | 'all_ones' (the whole image is
object) | 'drop' (the row is left out), counted in
``metadata['num_missing_masks']``; `resize_masks` resizes (nearest) a mask of
another size than its image, which is otherwise an error naming both sizes;
`skip_bad_images` skips unreadable images (counted in
``metadata['skipped_images']``) instead of failing.

Every row is checked before anything is written: one UserError lists every
bad row (up to `MAX_LISTED`, then a count) with its line, file and reason.
Records are in labels.csv order.
"""

from __future__ import annotations

import dataclasses
import errno
import os

from absl import logging
from etils import epath
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from cco_jax import errors
from cco_jax.data.datasets import common
from cco_jax.data.datasets import labels_csv
from cco_jax.data.datasets.labels_csv import REQUIRED_COLUMNS  # noqa: F401
from cco_jax.data.datasets.labels_csv import Row
from cco_jax.data.datasets.oxford_iiit_pet import TRIMAP_BACKGROUND
from cco_jax.data.datasets.oxford_iiit_pet import TRIMAP_PET

LABELS_FILE = 'labels.csv'
SPLITS = ('train', 'validation', 'test')
IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png')
# Smaller images carry no object to find (a 1x1 'image' is a broken export).
MIN_IMAGE_SIDE = 8
MAX_LISTED = 20
LAYOUT = (
  'ROOT/labels.csv (header image,label,split[,group][,labels]; split is '
  'train, '
  'validation or test), ROOT/images/<image> and ROOT/masks/<image stem>.png '
  '(8-bit, 0 = background, > 0 = object, same size as the image)'
)
HINT = (
  'Set --manual_dir (python -m experiments.prepare --dataset=folder) or '
  'config.data.manual_dir to such a directory.'
)


def check_manual_dir(path: os.PathLike[str] | str) -> epath.Path:
  """Returns ROOT if it has labels.csv with the required header."""
  root = epath.Path(path).expanduser()
  if not root.is_dir():
    raise errors.UserError(
      f'Folder dataset {os.fspath(root)!r} does not exist. Expected {LAYOUT}. '
      f'{HINT}'
    )
  if not (root / LABELS_FILE).is_file():
    raise errors.UserError(
      f'Folder dataset {os.fspath(root)!r} has no {LABELS_FILE}. Expected '
      f'{LAYOUT}. {HINT}'
    )
  read_rows(root)
  return root


def read_rows(root: epath.Path) -> tuple[list[Row], bool]:
  """(rows of ROOT/labels.csv, whether it has a group column); see
  `labels_csv.read_rows` for the encodings and line endings it reads.

  Raises:
    errors.UserError: the file cannot be read as labels.csv (names it).
  """
  return labels_csv.read_rows(root / LABELS_FILE)


def has_labels_column(root: epath.Path) -> bool:
  """Whether labels.csv has the multi-label `labels` column."""
  return labels_csv.has_column(root / LABELS_FILE, 'labels')


def mask_path(root: epath.Path, image: str) -> epath.Path:
  """ROOT/masks/<image path without its suffix>.png."""
  return root / 'masks' / f'{os.path.splitext(image)[0]}.png'


def _trimap_png(values: np.ndarray) -> bytes:
  """A binary mask (> 0 = object) in the Pets trimap convention, as PNG."""
  trimap = np.where(values > 0, TRIMAP_PET, TRIMAP_BACKGROUND)
  return common.png_bytes(trimap.astype(np.uint8))


@dataclasses.dataclass(frozen=True)
class _Checked:
  """The outcome of reading one row: an example, a skip, or an error."""

  row: Row
  image: bytes | None = None
  mask: bytes | None = None
  error: str = ''
  skipped_image: bool = False
  missing_mask: bool = False
  resized_mask: bool = False


def _check_row(
  row: Row, root: epath.Path, options: common.PrepareOptions
) -> _Checked:
  """Reads and converts one row (image JPEG, mask trimap PNG)."""
  if row.split not in SPLITS:
    return _Checked(
      row, error=f'unknown split {row.split!r} (expected one of {SPLITS})'
    )
  if not row.label:
    return _Checked(row, error='empty label')
  image_path = root / 'images' / row.image
  if not row.image or not image_path.is_file():
    return _Checked(row, error=_not_a_file(image_path, 'image'))
  if not row.image.lower().endswith(IMAGE_SUFFIXES):
    return _Checked(row, error=f'not a {"/".join(IMAGE_SUFFIXES)} file')
  try:
    data = image_path.read_bytes()
    if not data:
      raise ValueError('empty (0-byte) file')
    jpeg, _ = common.rgb_jpeg_bytes(data)
    size = common.image_size(jpeg)
    if min(size) < MIN_IMAGE_SIDE:
      raise ValueError(
        f'{size[0]}x{size[1]} pixels, smaller than {MIN_IMAGE_SIDE} on a side'
      )
  except common.UNREADABLE as error:
    if options.skip_bad_images:
      return _Checked(row, skipped_image=True)
    return _Checked(
      row,
      error=f'unreadable image {os.fspath(image_path)} ({error}); fix or '
      'remove it, or pass --skip_bad_images to experiments.prepare',
    )
  path = mask_path(root, row.image)
  if not path.is_file():
    if options.missing_masks == 'error':
      return _Checked(
        row,
        error=f'missing mask {os.fspath(path)}; add it, or pass '
        '--missing_masks=all_ones (or drop) to experiments.prepare',
      )
    if options.missing_masks == 'drop':
      return _Checked(row, missing_mask=True)
    values = np.ones(size[::-1], np.uint8)
    image, mask = jpeg, _trimap_png(values)
    return _Checked(row, *common.store(options, image, mask), missing_mask=True)
  try:
    values = common.decode_mask_png(path.read_bytes())
  except common.UNREADABLE as error:
    return _Checked(row, error=f'unreadable mask {os.fspath(path)} ({error})')
  resized = False
  if values.shape[::-1] != size:
    if not options.resize_masks:
      return _Checked(
        row,
        error=f'mask {os.fspath(path)} is {values.shape[1]}x{values.shape[0]}'
        f' but its image is {size[0]}x{size[1]} (width x height); fix it '
        'or pass --resize_masks to experiments.prepare',
      )
    values = np.asarray(
      Image.fromarray(values).resize(size, Image.Resampling.NEAREST)
    )
    resized = True
  return _Checked(
    row,
    *common.store(options, jpeg, _trimap_png(values)),
    resized_mask=resized,
  )


def _not_a_file(path: epath.Path, what: str) -> str:
  """Why `path` is not a readable file: missing, a symlink loop, a link to
  nowhere, or a directory."""
  name = os.fspath(path)
  if os.path.islink(name):
    try:
      os.stat(name)
    except OSError as error:
      if error.errno == errno.ELOOP:
        return f'{what} {name} is a symlink loop; point the link at a file'
      return (
        f'{what} {name} is a symlink to a missing file '
        f'({os.readlink(name)}); fix the link'
      )
  if os.path.isdir(name):
    return f'{what} {name} is a directory, not a file'
  return f'missing {what} file {name}'


def _duplicates(rows: list[Row]) -> dict[int, str]:
  """{line: reason} of rows whose image path appeared on an earlier line."""
  first, duplicates = {}, {}
  for row in rows:
    key = os.path.normpath(row.image)
    if key in first:
      duplicates[row.line] = f'duplicate path (also on line {first[key]})'
    else:
      first[key] = row.line
  return duplicates


def bad_rows_error(path: str, bad: list[tuple[Row, str]]) -> errors.UserError:
  """One error listing bad rows (up to `MAX_LISTED`, then a count)."""
  lines = [
    f'  line {row.line}: {row.image!r}: {reason}'
    for row, reason in bad[:MAX_LISTED]
  ]
  if len(bad) > MAX_LISTED:
    lines.append(f'  ... and {len(bad) - MAX_LISTED} more bad rows.')
  return errors.UserError(
    f'{path}: {len(bad)} bad rows; nothing was written. Fix them and prepare '
    f'again. Expected {LAYOUT}.\n' + '\n'.join(lines)
  )


def _names(root: str) -> tuple[list[str], list[str]]:
  """(sorted class names, sorted group names or ['all']) of labels.csv."""
  rows, has_group = read_rows(epath.Path(root))
  classes = sorted({name for r in rows for name in r.present})
  groups = sorted({r.group for r in rows}) if has_group else ['all']
  return classes, groups


class FolderDataset(common.ProjectBuilder):
  """Images, masks, labels and groups from ROOT/labels.csv (module doc)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release (cco-jax).'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = f'Required: {LAYOUT}.'
  code_path = common.code_path_property

  def __init__(self, *, root: str = '', **kwargs):
    self.root = root
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    try:
      classes, _ = _names(self.root)
      label = tfds.features.ClassLabel(names=classes)
    except (OSError, ValueError):  # ROOT gone: names are in the metadata.
      label = tfds.features.Scalar(dtype=np.int64)
    return tfds.core.DatasetInfo(
      builder=self,
      description='Images with object masks from a labels.csv folder.',
      features=tfds.features.FeaturesDict(
        {
          'image': self.image_feature(),
          'segmentation_mask': self.mask_feature(),
          'label': label,
          'file_name': tfds.features.Text(),
        }
      ),
      metadata=tfds.core.MetadataDict(),
      disable_shuffling=True,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    manual_dir = common.manual_dir_or_none(dl_manager)
    if manual_dir is None:
      raise errors.UserError(f'The folder dataset needs a directory: {HINT}')
    root = check_manual_dir(manual_dir)
    rows, has_group = read_rows(root)
    classes, groups = _names(os.fspath(root))
    multi_label = has_labels_column(root)
    duplicates = _duplicates(rows)
    checked = list(
      common.ordered_parallel_map(
        lambda row: _check_row(row, root, self.options), rows
      )
    )
    bad = [
      (c.row, duplicates.get(c.row.line) or c.error)
      for c in checked
      if c.error or c.row.line in duplicates
    ]
    if bad:
      raise bad_rows_error(os.fspath(root / LABELS_FILE), bad)
    skipped = [c.row.image for c in checked if c.skipped_image]
    missing = [c.row.image for c in checked if c.missing_mask]
    resized = [c.row.image for c in checked if c.resized_mask]
    logging.warning(
      'Folder %s: %d rows; %d unreadable images skipped; %d missing masks '
      '(missing_masks=%r); %d masks resized.',
      os.fspath(root),
      len(rows),
      len(skipped),
      len(missing),
      self.options.missing_masks,
      len(resized),
    )
    kept = [c.row for c in checked if c.image is not None]
    del checked  # Examples are read again, split by split, when written.
    self.info.metadata.update(
      source=os.fspath(root.resolve()),
      class_names=classes,
      group_names=groups,
      num_rows=len(rows),
      num_skipped_images=len(skipped),
      skipped_images=skipped,
      num_missing_masks=len(missing),
      missing_masks=missing,
      missing_masks_policy=self.options.missing_masks,
      multi_label=multi_label,
      resized_masks=resized,
      splits={},
    )
    splits = {}
    for split in SPLITS:
      members = [row for row in kept if row.split == split]
      if not members:
        continue
      self.info.metadata['splits'][split] = {
        'file_names': [r.image for r in members],
        'labels': [classes.index(r.label) for r in members],
        'groups': [groups.index(r.group) if has_group else 0 for r in members],
      }
      if multi_label:
        self.info.metadata['splits'][split]['targets'] = [
          [classes.index(name) for name in r.present] for r in members
        ]
      splits[split] = self._generate_examples(root, members, classes)
    return splits

  def _generate_examples(
    self, root: epath.Path, rows: list[Row], classes: list[str]
  ):
    """Yields (image path, example) in labels.csv order."""
    for checked in common.ordered_parallel_map(
      lambda row: _check_row(row, root, self.options), rows
    ):
      yield (
        checked.row.image,
        {
          'image': checked.image,
          'segmentation_mask': checked.mask,
          'label': classes.index(checked.row.label),
          'file_name': checked.row.image,
        },
      )
