"""Input pipeline: prepared TFDS data -> per-device NumPy batches, no TensorFlow.

One example travels as follows (NumPy and Pillow inside Grain):

    ArrayRecord record (JPEG image, PNG trimap, labels)
      -> decode with Pillow                 image uint8 (H, W, 3), fg uint8 (H', W')
      -> [random resized crop, flip]        the same box and flip for image and fg
      -> squash to (S, S)                   bilinear; no aspect-preserving crop
      -> image float32 (S, S, 3) in [0, 1]  [ImageNet mean/std when `normalize`]
         mask  float32 (h, w) in [0, 1]     fg resized to the CAM grid
    and examples are batched as (num_devices, per_device_batch, ...) for pmap.

The foreground is `trimap == 1` (pet), or `trimap != 2` (pet or boundary) when
`boundary_is_foreground`. The CAM mask is the foreground resized to (h, w) by
'nearest' (binary) or 'area' (soft: the fraction of foreground pixels in each
CAM cell). An example whose CAM mask is empty gets an all-ones mask, for which
ablated CE equals CE; with `empty_mask_policy='drop'` such examples are instead
left out of the training split (evaluation always covers the whole split). The
number of empty masks is counted and logged when a train iterator is built.
Cats-vs-Dogs has no masks: its mask is all ones.

Splits seen by the pipeline:
  'train', 'validation'  a deterministic carve of the official trainval list
                         (`carve_validation`), independent of the training seed;
  'test'                 the official test list;
  'ood'                  Microsoft Cats-vs-Dogs (species task only).

`data_config` (``config.data``) is an `ml_collections.ConfigDict` with fields
(see `default_config`):
  name                    'oxford_iiit_pet' (a key of `cco_jax.datasets.DATASETS`).
  manual_dir              local copy in the official layout; '' = download.
  ood_manual_dir          local Cats-vs-Dogs (`PetImages/{Cat,Dog}`); '' = download.
  tfds_data_dir           where prepared data lives; '' = the TFDS default
                          (``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).
  task                    'species' (2 classes) or 'breed' (37 classes).
  image_size              S: images are squashed to (S, S).
  validation_fraction     share of each breed of trainval held out, in [0, 1).
  boundary_is_foreground  count trimap value 3 (boundary) as foreground.
  mask_resize             'nearest' or 'area'.
  empty_mask_policy       'all_ones' or 'drop'.
  normalize               subtract the ImageNet mean and divide by its std.
  augment_flip            random horizontal flips (training only).
  augment_crop            random resized crops, area in `CROP_AREA_RANGE`, aspect
                          in `CROP_ASPECT_RANGE` (training only).
  num_workers             Grain worker processes; 0 = in this process.
  prefetch                batches prepared ahead (and concurrently, by threads)
                          by each reader; 0 = synchronous.
  shuffle_seed_offset     optional, added to the seed of the shuffle and the
                          augmentations.
  cache_decoded           optional: decode and squash each training example
                          once and keep it in RAM (about 200 kB per example at
                          S = 224); augmentations then act on the (S, S) copy.
                          Needs num_workers == 0.

Determinism: a train iterator is a pure function of (data, data_config, seed,
batch geometry, process_index/count): the k-th batch does not depend on the
number of workers or threads, and `TrainIterator.get_state()` records k, so a
restored iterator continues with exactly the remaining batches. Epochs are
reshuffled (a different permutation per epoch, within this host's shard
process_index::process_count), follow each other without a gap (a batch may
straddle two epochs) and augmentations are drawn per example and epoch.

Worker processes (num_workers > 0) are spawned by Grain and read absl flags;
outside an absl app the flags are marked parsed so that defaults apply.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
import dataclasses
import functools
import hashlib
import io
import json
import math
import os
import types
from typing import Any

from absl import flags
from absl import logging
import grain
import ml_collections
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from cco_jax.datasets import DATASETS
from cco_jax.datasets import DatasetEntry
from cco_jax.datasets import oxford_iiit_pet

Batch = dict[str, np.ndarray]
# Length of an endless Grain source (batches are drawn lazily by index).
_ENDLESS = 2**62
Example = dict[str, Any]

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
CROP_AREA_RANGE = (0.35, 1.0)
CROP_ASPECT_RANGE = (3 / 4, 4 / 3)
# task -> the feature that holds its label, and the class names.
TASKS = types.MappingProxyType({'species': 'species', 'breed': 'label'})
CLASS_NAMES = types.MappingProxyType(
  {'species': oxford_iiit_pet.SPECIES, 'breed': oxford_iiit_pet.BREEDS}
)
OOD_DATASET = 'cats_vs_dogs'
SPLITS = ('train', 'validation', 'test', 'ood')
# Changing the salt changes every validation carve: keep it fixed.
VALIDATION_SALT = 'cco-jax/validation/v1'
_MASK_RESIZE = types.MappingProxyType(
  {'nearest': Image.Resampling.NEAREST, 'area': Image.Resampling.BOX}
)
_EMPTY_MASK_POLICIES = ('all_ones', 'drop')
_SKIP_DECODING = tfds.decode.SkipDecoding
# Fields of config.data that change what a training batch contains (the rest,
# e.g. num_workers or where the data lives, do not).
_CONTENT_FIELDS = (
  'name',
  'task',
  'image_size',
  'validation_fraction',
  'boundary_is_foreground',
  'mask_resize',
  'empty_mask_policy',
  'normalize',
  'augment_flip',
  'augment_crop',
  'shuffle_seed_offset',
  'cache_decoded',
)
# Threads that decode masks or fill the cache (Pillow releases the GIL).
_SCAN_THREADS = 8


def default_config() -> ml_collections.ConfigDict:
  """The `config.data` defaults: the seed's preprocessing (METHOD.md §6)."""
  return ml_collections.ConfigDict(
    dict(
      name='oxford_iiit_pet',
      manual_dir='',
      ood_manual_dir='',
      tfds_data_dir='',
      task='species',
      image_size=224,
      validation_fraction=0.1,
      boundary_is_foreground=False,
      mask_resize='nearest',
      empty_mask_policy='all_ones',
      normalize=False,
      augment_flip=False,
      augment_crop=False,
      num_workers=0,
      prefetch=2,
      shuffle_seed_offset=0,
      cache_decoded=False,
    )
  )


def check_config(data_config: ml_collections.ConfigDict) -> None:
  """Raises ValueError on a field value the pipeline does not support."""
  choices = {
    'name': tuple(DATASETS),
    'task': tuple(TASKS),
    'mask_resize': tuple(_MASK_RESIZE),
    'empty_mask_policy': _EMPTY_MASK_POLICIES,
  }
  for key, allowed in choices.items():
    if data_config[key] not in allowed:
      raise ValueError(
        f'config.data.{key}={data_config[key]!r}; expected one of {allowed}.'
      )
  if not 0 <= data_config.validation_fraction < 1:
    raise ValueError(
      'config.data.validation_fraction must be in [0, 1), got '
      f'{data_config.validation_fraction}.'
    )
  for key in ('image_size',):
    if data_config[key] < 1:
      raise ValueError(f'config.data.{key} must be positive.')
  for key in ('num_workers', 'prefetch'):
    if data_config[key] < 0:
      raise ValueError(f'config.data.{key} must be >= 0.')
  if data_config.get('cache_decoded', False) and data_config.num_workers:
    raise ValueError(
      'config.data.cache_decoded keeps decoded images in this '
      'process; it needs config.data.num_workers = 0.'
    )


# ----------------------------------------------------------------------------
# Preparing and opening the data.
# ----------------------------------------------------------------------------


def _dataset_entry(name: str) -> DatasetEntry:
  if name not in DATASETS:
    raise ValueError(
      f'Unknown dataset {name!r}; expected one of {tuple(DATASETS)}.'
    )
  return DATASETS[name]


def _recorded_source(builder: tfds.core.DatasetBuilder) -> str:
  try:
    return builder.info.metadata['source']
  except (KeyError, TypeError):
    return 'unknown'


def prepare_dataset(
  name: str, *, manual_dir: str = '', data_dir: str = ''
) -> tfds.core.DatasetBuilder:
  """Prepares a dataset once (ArrayRecord) and returns its TFDS builder.

  Args:
    name: a key of `cco_jax.datasets.DATASETS` ('oxford_iiit_pet',
      'cats_vs_dogs').
    manual_dir: local copy in the official layout; '' downloads the official
      archives (or uses TFDS's default manual dir, `DATA_DIR/downloads/manual`,
      when it is not empty).
    data_dir: TFDS data directory; '' = the TFDS default.

  Returns:
    The prepared builder; read it with `builder.as_data_source(split)`.

  Raises:
    ValueError: `manual_dir` is missing or lacks the expected layout, or
      `data_dir` already holds this dataset prepared from another directory.
  """
  entry = _dataset_entry(name)
  if manual_dir:
    entry.check_manual_dir(manual_dir)
  builder = entry.builder_cls(
    data_dir=data_dir or None, file_format='array_record'
  )
  if not builder.is_prepared():
    builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(
        manual_dir=manual_dir or None
      )
    )
    return builder
  recorded = _recorded_source(builder)
  same = lambda a, b: os.path.realpath(
    os.path.expanduser(a)
  ) == os.path.realpath(os.path.expanduser(b))
  if manual_dir and not same(recorded, manual_dir):
    raise ValueError(
      f'{builder.data_dir} already holds {builder.name} prepared from '
      f'{recorded!r}, not from manual_dir {manual_dir!r}. Use another data '
      'dir (--data_dir / config.data.tfds_data_dir) or delete that one.'
    )
  logging.info(
    'Using %s at %s (prepared from %s).',
    builder.name,
    builder.data_dir,
    recorded,
  )
  return builder


def carve_validation(
  file_names: Sequence[str], labels: Sequence[int], fraction: float
) -> tuple[np.ndarray, np.ndarray]:
  """Splits trainval into train and validation, deterministically.

  Within each label, examples are ordered by SHA-256 of `VALIDATION_SALT` and
  the file name, and the first `round(fraction * count)` go to validation. The
  carve depends only on the file names, labels and `fraction`: not on record
  order, TFDS version or the training seed.

  Args:
    file_names: (N,) names, unique.
    labels: (N,) ints to stratify by (the breed for Pets).
    fraction: share held out, in [0, 1).

  Returns:
    (train_indices, validation_indices): sorted int64 arrays into the inputs.
  """

  def key(i: int) -> str:
    return hashlib.sha256(
      f'{VALIDATION_SALT}/{file_names[i]}'.encode()
    ).hexdigest()

  validation = []
  labels = np.asarray(labels)
  for label in np.unique(labels):
    members = sorted(np.flatnonzero(labels == label), key=key)
    validation.extend(members[: math.floor(fraction * len(members) + 0.5)])
  is_validation = np.zeros(len(labels), bool)
  is_validation[np.asarray(validation, np.int64)] = True
  return np.flatnonzero(~is_validation), np.flatnonzero(is_validation)


@dataclasses.dataclass(frozen=True)
class SplitSource:
  """Random access to the records of one pipeline split.

  Attributes:
    name: the pipeline split ('train', 'validation', 'test', 'ood').
    records: TFDS data source of the underlying TFDS split; image and mask
      fields are left as encoded bytes.
    indices: (N,) int64 record ids that make up this split.
    has_masks: whether records carry a 'segmentation_mask'.
    positions: (N,) int64 position of each example in the full pipeline split
      (returned as 'index'); None = 0..N-1.
  """

  name: str
  records: Sequence[Mapping[str, Any]]
  indices: np.ndarray
  has_masks: bool
  positions: np.ndarray | None = None

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, i: int) -> Example:
    record = dict(self.records[int(self.indices[i])])
    record['index'] = int(i if self.positions is None else self.positions[i])
    return record

  def subset(self, which: np.ndarray) -> SplitSource:
    """The examples at `which` (positions in this source), keeping 'index'."""
    positions = (
      np.arange(len(self)) if self.positions is None else self.positions
    )
    return dataclasses.replace(
      self, indices=self.indices[which], positions=positions[which]
    )


def _as_str(value: str | bytes) -> str:
  return value.decode() if isinstance(value, bytes) else value


def _data_source(
  builder: tfds.core.DatasetBuilder, split: str, has_masks: bool
):
  decoders = {'image': _SKIP_DECODING()}
  if has_masks:
    decoders['segmentation_mask'] = _SKIP_DECODING()
  return builder.as_data_source(split, decoders=decoders)


def _names_and_labels(
  builder: tfds.core.DatasetBuilder,
  records: Sequence[Mapping[str, Any]],
  split: str,
) -> tuple[list[str], list[int]]:
  """File names and stratification labels of a TFDS split, in record order.

  Uses the lists the builder stores in its metadata when they match the
  records (checked at a few places); otherwise reads every record.
  """
  try:
    listed = builder.info.metadata['splits'][split]
  except (KeyError, TypeError):
    listed = None
  if listed is not None and len(listed['file_names']) == len(records):
    probes = sorted({0, len(records) // 2, len(records) - 1})
    if all(
      _as_str(records[i]['file_name']) == listed['file_names'][i]
      for i in probes
    ):
      return listed['file_names'], listed['labels']
  stratify = 'label' if 'label' in builder.info.features else 'species'
  names, labels = [], []
  for i in range(len(records)):
    record = records[i]
    names.append(_as_str(record['file_name']))
    labels.append(int(record[stratify]))
  return names, labels


def _carved_trainval(
  data_config: ml_collections.ConfigDict,
  builder: tfds.core.DatasetBuilder,
  entry: DatasetEntry,
) -> dict[str, SplitSource]:
  records = _data_source(builder, 'train', entry.has_masks)
  names, labels = _names_and_labels(builder, records, 'train')
  train, validation = carve_validation(
    names, labels, data_config.validation_fraction
  )
  return {
    split: SplitSource(split, records, indices, entry.has_masks)
    for split, indices in (('train', train), ('validation', validation))
  }


def load_split_sources(
  data_config: ml_collections.ConfigDict,
  splits: Sequence[str] = ('train', 'validation', 'test'),
) -> dict[str, SplitSource]:
  """Opens pipeline splits, preparing the data first if needed.

  Args:
    data_config: `config.data` (see the module docstring).
    splits: any of 'train', 'validation', 'test', 'ood'.

  Returns:
    {split: SplitSource}.

  Raises:
    ValueError: an unknown split, a split the dataset lacks, or a bad config.
  """
  check_config(data_config)
  unknown = set(splits) - set(SPLITS)
  if unknown:
    raise ValueError(f'Unknown splits {sorted(unknown)}; expected {SPLITS}.')
  entry = _dataset_entry(data_config.name)
  sources = {}
  if {'train', 'validation', 'test'} & set(splits):
    builder = prepare_dataset(
      data_config.name,
      manual_dir=data_config.manual_dir,
      data_dir=data_config.tfds_data_dir,
    )
    if {'train', 'validation'} & set(splits):
      sources.update(_carved_trainval(data_config, builder, entry))
    if 'test' in splits:
      if 'test' not in entry.splits:
        raise ValueError(f'{data_config.name} has no test split.')
      records = _data_source(builder, 'test', entry.has_masks)
      sources['test'] = SplitSource(
        'test', records, np.arange(len(records)), entry.has_masks
      )
  if 'ood' in splits:
    if data_config.task != 'species':
      raise ValueError(
        "The 'ood' split (Cats-vs-Dogs) needs config.data.task='species'."
      )
    ood = _dataset_entry(OOD_DATASET)
    builder = prepare_dataset(
      OOD_DATASET,
      manual_dir=data_config.ood_manual_dir,
      data_dir=data_config.tfds_data_dir,
    )
    records = _data_source(builder, 'train', ood.has_masks)
    sources['ood'] = SplitSource(
      'ood', records, np.arange(len(records)), ood.has_masks
    )
  return {split: sources[split] for split in splits}


def split_sizes(data_config: ml_collections.ConfigDict) -> dict[str, int]:
  """{'train': N1, 'validation': N2, 'test': N3} of the primary dataset."""
  splits = ['train', 'validation']
  if 'test' in _dataset_entry(data_config.name).splits:
    splits.append('test')
  return {
    split: len(source)
    for split, source in load_split_sources(data_config, splits).items()
  }


def num_examples(data_config: ml_collections.ConfigDict, split: str) -> int:
  """Number of examples of a pipeline split (before any 'drop' policy)."""
  return len(load_split_sources(data_config, [split])[split])


def class_names(data_config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """('cat', 'dog') for task 'species', the 37 breed names for 'breed'."""
  check_config(data_config)
  return CLASS_NAMES[data_config.task]


def num_classes(data_config: ml_collections.ConfigDict) -> int:
  """2 for task 'species', 37 for 'breed'."""
  return len(class_names(data_config))


# ----------------------------------------------------------------------------
# Per-example transforms. An `Example` holds Pillow images until the end:
# cropping, squashing and resizing to the CAM grid are one `resize(box=...)`
# each, straight from the decoded resolution.
# ----------------------------------------------------------------------------

# A box is (left, top, right, bottom) as fractions of the image's width/height.
Box = tuple[float, float, float, float]
FULL_BOX: Box = (0.0, 0.0, 1.0, 1.0)


def foreground(
  trimap: Image.Image, *, boundary_is_foreground: bool
) -> Image.Image:
  """Mode 'L' image: 1 where `trimap == 1` (or `trimap != 2`), else 0."""
  if boundary_is_foreground:
    lut = [int(v != oxford_iiit_pet.TRIMAP_BACKGROUND) for v in range(256)]
  else:
    lut = [int(v == oxford_iiit_pet.TRIMAP_PET) for v in range(256)]
  if trimap.mode != 'L':
    trimap = Image.fromarray(
      np.asarray(trimap).astype(np.uint8).reshape(trimap.size[::-1])
    )
  return trimap.point(lut)


def decode(
  record: Mapping[str, Any],
  *,
  task: str,
  boundary_is_foreground: bool,
  draft_size: int | None = None,
) -> Example:
  """Opens a record's image (and trimap) with Pillow.

  Args:
    record: a `SplitSource` item (encoded 'image', optional
      'segmentation_mask', labels, 'index', 'file_name').
    task: 'species' or 'breed': which label to keep.
    boundary_is_foreground: count trimap value 3 as foreground.
    draft_size: when given, JPEG decoding may downscale by 2, 4 or 8 in the DCT
      (much faster) as long as both sides stay >= draft_size.

  Returns:
    {'image': RGB Image, 'fg': 'L' Image in {0, 1} over the same field of view
    (None without a trimap), 'label': int, 'index': int, 'file_name': str}.
  """
  image = Image.open(io.BytesIO(record['image']))
  if draft_size:
    image.draft('RGB', (draft_size, draft_size))
  if image.mode != 'RGB':
    image = image.convert('RGB')
  fg = None
  if 'segmentation_mask' in record:
    fg = foreground(
      Image.open(io.BytesIO(record['segmentation_mask'])),
      boundary_is_foreground=boundary_is_foreground,
    )
  return {
    'image': image,
    'fg': fg,
    'label': int(record[TASKS[task]]),
    'index': int(record['index']),
    'file_name': _as_str(record['file_name']),
  }


def resize(
  image: Image.Image,
  size: tuple[int, int],
  resample: Image.Resampling,
  box: Box = FULL_BOX,
) -> np.ndarray:
  """Crops the relative `box` of `image` and resizes it to `size` = (h, w).

  Returns:
    An array (h, w) or (h, w, C) of the image's dtype.
  """
  width, height = image.size
  left, top, right, bottom = box
  if box == FULL_BOX and image.size == (size[1], size[0]):
    return np.asarray(image)
  return np.asarray(
    image.resize(
      (size[1], size[0]),
      resample,
      box=(left * width, top * height, right * width, bottom * height),
    )
  )


def random_crop_box(width: int, height: int, rng: np.random.Generator) -> Box:
  """A random resized-crop box (relative) for an image of this size.

  Its area is a uniform fraction in `CROP_AREA_RANGE` of the image's and its
  aspect ratio (in pixels) log-uniform in `CROP_ASPECT_RANGE`, clipped to fit.
  """
  area = rng.uniform(*CROP_AREA_RANGE) * width * height
  aspect = math.exp(rng.uniform(*np.log(CROP_ASPECT_RANGE)))
  crop_w = min(width, max(1, round(math.sqrt(area * aspect))))
  crop_h = min(height, max(1, round(math.sqrt(area / aspect))))
  left = int(rng.integers(0, width - crop_w + 1))
  top = int(rng.integers(0, height - crop_h + 1))
  return (
    left / width,
    top / height,
    (left + crop_w) / width,
    (top + crop_h) / height,
  )


def cam_mask(
  fg: Image.Image | None,
  cam_size: tuple[int, int],
  method: str,
  box: Box = FULL_BOX,
) -> np.ndarray:
  """Foreground ('L', {0, 1}) -> float32 (h, w) mask on the CAM grid.

  'nearest' samples the foreground at each cell's centre (binary); 'area'
  averages it over each cell (the fraction of foreground pixels). Without a
  foreground (no trimap) the mask is all ones.
  """
  if fg is None:
    return np.ones(cam_size, np.float32)
  if method == 'area':
    return resize(fg.convert('F'), cam_size, _MASK_RESIZE['area'], box)
  return resize(fg, cam_size, _MASK_RESIZE['nearest'], box).astype(np.float32)


def to_model_input(
  example: Example,
  *,
  image_size: int,
  cam_size: tuple[int, int],
  mask_resize: str,
  normalize: bool,
  with_pixel_mask: bool,
  box: Box = FULL_BOX,
  flip: bool = False,
) -> Example:
  """Crops `box`, squashes to (S, S), flips, and converts to float arrays.

  Returns:
    {'image': float32 (S, S, 3) in [0, 1] (or normalised), 'mask': float32
    (h, w), 'label': int32 (), 'index': int32 (), 'file_name': str} and, with
    `with_pixel_mask`, 'pixel_mask': float32 (S, S) (nearest). An empty CAM
    mask becomes all ones.
  """
  size = (image_size, image_size)
  image = resize(example['image'], size, Image.Resampling.BILINEAR, box)
  mask = cam_mask(example['fg'], cam_size, mask_resize, box)
  if not mask.any():
    mask = np.ones_like(mask)
  out = {
    'label': np.int32(example['label']),
    'index': np.int32(example['index']),
    'file_name': example['file_name'],
  }
  if with_pixel_mask:
    out['pixel_mask'] = (
      np.ones(size, np.float32)
      if example['fg'] is None
      else resize(example['fg'], size, Image.Resampling.NEAREST, box).astype(
        np.float32
      )
    )
  if flip:
    image, mask = image[:, ::-1], mask[:, ::-1]
    if with_pixel_mask:
      out['pixel_mask'] = out['pixel_mask'][:, ::-1]
  image = image.astype(np.float32) * np.float32(1 / 255)
  if normalize:
    image = (image - IMAGENET_MEAN) / IMAGENET_STD
  out['image'], out['mask'] = image, np.ascontiguousarray(mask)
  return out


# ----------------------------------------------------------------------------
# Sources of decoded examples, padding and batching.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Decoded:
  """Decodes the records of a `SplitSource` on access (a Grain source)."""

  source: SplitSource
  task: str
  boundary_is_foreground: bool
  draft_size: int | None = None

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, i: int) -> Example:
    return decode(
      self.source[i],
      task=self.task,
      boundary_is_foreground=self.boundary_is_foreground,
      draft_size=self.draft_size,
    )


@dataclasses.dataclass(frozen=True)
class _Cached:
  """Examples decoded and squashed once, held as arrays (a Grain source).

  Items carry the arrays themselves ('image_array', 'fg_array') and the CAM
  mask of the whole image ('cam_mask', empty masks already all ones), so an
  uncropped training example needs no Pillow work at all (`_train_example`);
  a cropped one is rendered from the (S, S) copies as usual.
  """

  images: np.ndarray  # uint8 (N, S, S, 3)
  fgs: np.ndarray | None  # uint8 (N, S, S) in {0, 1}; None without masks.
  cam_masks: np.ndarray  # float32 (N, h, w): `cam_mask` of the full image.
  labels: np.ndarray  # int32 (N,)
  indices: np.ndarray  # int32 (N,): positions in the pipeline split.
  file_names: tuple[str, ...]

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, i: int) -> Example:
    return {
      'image_array': self.images[i],
      'fg_array': None if self.fgs is None else self.fgs[i],
      'cam_mask': self.cam_masks[i],
      'label': int(self.labels[i]),
      'index': int(self.indices[i]),
      'file_name': self.file_names[i],
    }


def _as_images(example: Example) -> Example:
  """A `_Cached` item as `decode` returns examples (Pillow images)."""
  fg = example['fg_array']
  return {
    'image': Image.fromarray(example['image_array']),
    'fg': None if fg is None else Image.fromarray(fg),
    'label': example['label'],
    'index': example['index'],
    'file_name': example['file_name'],
  }


def _cached_model_input(
  example: Example, *, normalize: bool, flip: bool
) -> Example:
  """`to_model_input` of an uncropped `_Cached` item, by array operations only.

  Equal, bit for bit, to rendering `_as_images(example)` with the full box:
  the cached image already has the model's size and the CAM mask was made from
  the same cached foreground.
  """
  image, mask = example['image_array'], example['cam_mask']
  if flip:
    image, mask = image[:, ::-1], mask[:, ::-1]
  image = image.astype(np.float32) * np.float32(1 / 255)
  if normalize:
    image = (image - IMAGENET_MEAN) / IMAGENET_STD
  return {
    'image': image,
    'mask': np.ascontiguousarray(mask),
    'label': np.int32(example['label']),
    'index': np.int32(example['index']),
    'file_name': example['file_name'],
  }


@dataclasses.dataclass(frozen=True)
class _CachedBatches:
  """Uncropped training batches from a `_Cached` source, one array gather each.

  Batch k (a Grain source of endless length) holds examples
  k*b .. (k+1)*b - 1 of the stream of epochs, epoch e being the permutation
  `default_rng([shuffle_seed, e]).permutation(n)` of the cache, and its flips
  come from `default_rng([augment_seed, k])`: a pure function of k, so resuming
  at batch k needs nothing else. Rendering is `_cached_model_input`'s
  arithmetic on the whole batch at once (no per-example Python work), which
  keeps the input's share of a 2-core CPU small (docs/benchmarks/training.md).
  """

  cached: _Cached
  batch_size: int  # Examples per host and batch.
  num_devices: int
  shuffle_seed: int
  augment_seed: int
  flip: bool
  normalize: bool
  keys: tuple[str, ...]

  def __len__(self) -> int:
    return _ENDLESS

  def positions(self, k: int) -> np.ndarray:
    """Positions in the cache of batch k's examples, int64 (b,)."""
    n = len(self.cached)
    stream = np.arange(k * self.batch_size, (k + 1) * self.batch_size)
    epochs = stream // n
    positions = np.empty(self.batch_size, np.int64)
    for epoch in np.unique(epochs):
      chosen = epochs == epoch
      order = np.random.default_rng(
        [self.shuffle_seed, int(epoch)]
      ).permutation(n)
      positions[chosen] = order[stream[chosen] % n]
    return positions

  def __getitem__(self, k: int) -> Batch:
    positions = self.positions(k)
    images = self.cached.images[positions]
    masks = self.cached.cam_masks[positions]
    if self.flip:
      flips = (
        np.random.default_rng([self.augment_seed, k]).random(self.batch_size)
        < 0.5
      )
      images[flips] = images[flips, :, ::-1]
      masks[flips] = masks[flips, :, ::-1]
    images = images.astype(np.float32) * np.float32(1 / 255)
    if self.normalize:
      images = (images - IMAGENET_MEAN) / IMAGENET_STD
    batch = {
      'image': images,
      'mask': masks,
      'label': self.cached.labels[positions],
      'index': self.cached.indices[positions],
    }
    return {
      key: batch[key].reshape(self.num_devices, -1, *batch[key].shape[1:])
      for key in self.keys
    }


def _read_options(prefetch: int) -> grain.ReadOptions:
  return grain.ReadOptions(num_threads=prefetch, prefetch_buffer_size=prefetch)


def _squash_to_arrays(example: Example, *, size: int) -> Example:
  fg = example['fg']
  return {
    **example,
    'image': resize(example['image'], (size, size), Image.Resampling.BILINEAR),
    'fg': None
    if fg is None
    else resize(fg, (size, size), Image.Resampling.NEAREST),
  }


def _cache(
  decoded: _Decoded,
  image_size: int,
  *,
  cam_size: tuple[int, int],
  mask_resize: str,
) -> _Cached:
  """Decodes and squashes every example once (in order, with threads)."""
  squashed = grain.MapDataset.source(decoded).map(
    functools.partial(_squash_to_arrays, size=image_size)
  )
  examples = list(squashed.to_iter_dataset(_read_options(_SCAN_THREADS)))
  logging.info(
    'Cached %d decoded examples (%.0f MB).',
    len(examples),
    len(examples) * image_size**2 * 4 / 1e6,
  )
  has_fg = examples[0]['fg'] is not None
  cam_masks = []
  for e in examples:
    mask = cam_mask(
      None if e['fg'] is None else Image.fromarray(e['fg']),
      cam_size,
      mask_resize,
    )
    cam_masks.append(mask if mask.any() else np.ones_like(mask))
  return _Cached(
    images=np.stack([e['image'] for e in examples]),
    fgs=np.stack([e['fg'] for e in examples]) if has_fg else None,
    cam_masks=np.stack(cam_masks),
    labels=np.array([e['label'] for e in examples], np.int32),
    indices=np.array([e['index'] for e in examples], np.int32),
    file_names=tuple(e['file_name'] for e in examples),
  )


def _per_device_batch_size(
  global_batch_size: int, num_devices: int, process_count: int
) -> int:
  if num_devices < 1 or process_count < 1 or global_batch_size < 1:
    raise ValueError(
      'global_batch_size, num_devices and process_count must be positive.'
    )
  if global_batch_size % (num_devices * process_count):
    raise ValueError(
      f'global_batch_size={global_batch_size} is not divisible by '
      f'num_devices * process_count = {num_devices} * {process_count}.'
    )
  return global_batch_size // (num_devices * process_count)


def _stack_for_devices(
  examples: Sequence[Example], *, num_devices: int, keys: tuple[str, ...]
) -> Batch:
  """Stacks examples and splits the batch axis: (D * b, ...) -> (D, b, ...)."""
  batch = {}
  for key in keys:
    stacked = np.stack([np.asarray(e[key]) for e in examples])
    batch[key] = stacked.reshape(num_devices, -1, *stacked.shape[1:])
  return batch


def _check_cam_size(cam_size: tuple[int, int]) -> tuple[int, int]:
  cam_size = tuple(int(n) for n in cam_size)
  if len(cam_size) != 2 or min(cam_size) < 1:
    raise ValueError(f'cam_size must be (h, w) with h, w >= 1; got {cam_size}.')
  return cam_size


def _iterate(
  batches: grain.MapDataset, num_workers: int, prefetch: int
) -> grain.DatasetIterator:
  """Runs a batched MapDataset with threads or worker processes."""
  dataset = batches.to_iter_dataset(_read_options(prefetch))
  if num_workers:
    if not flags.FLAGS.is_parsed():
      # Grain's worker processes read absl flags. Outside an absl app (tests,
      # notebooks) nothing parses them; their defaults are what we want.
      flags.FLAGS.mark_as_parsed()
    dataset = dataset.mp_prefetch(
      grain.MultiprocessingOptions(
        num_workers=num_workers, per_worker_buffer_size=max(prefetch, 1)
      )
    )
  return iter(dataset)


# ----------------------------------------------------------------------------
# Training.
# ----------------------------------------------------------------------------


def empty_mask_positions(
  source: SplitSource,
  data_config: ml_collections.ConfigDict,
  *,
  cam_size: tuple[int, int],
) -> np.ndarray:
  """Positions in `source` whose (unaugmented) CAM mask is empty.

  Decodes only the trimaps. Returns a sorted int64 array.
  """
  if not source.has_masks:
    return np.zeros(0, np.int64)

  def is_empty(record: Example) -> bool:
    fg = foreground(
      Image.open(io.BytesIO(record['segmentation_mask'])),
      boundary_is_foreground=data_config.boundary_is_foreground,
    )
    return not cam_mask(fg, cam_size, data_config.mask_resize).any()

  empty = (
    grain.MapDataset.source(source)
    .map(is_empty)
    .to_iter_dataset(_read_options(_SCAN_THREADS))
  )
  return np.flatnonzero(np.fromiter(empty, bool, count=len(source)))


def _train_example(
  example: Example,
  rng: np.random.Generator,
  *,
  data_config: ml_collections.ConfigDict,
  cam_size: tuple[int, int],
) -> Example:
  """Draws this example's crop box and flip, then renders it."""
  cached = 'image_array' in example
  if cached:
    height, width = example['image_array'].shape[:2]
  else:
    width, height = example['image'].size
  box = (
    random_crop_box(width, height, rng)
    if data_config.augment_crop
    else FULL_BOX
  )
  flip = bool(data_config.augment_flip and rng.random() < 0.5)
  if cached and box == FULL_BOX:
    return _cached_model_input(
      example, normalize=data_config.normalize, flip=flip
    )
  return to_model_input(
    _as_images(example) if cached else example,
    image_size=data_config.image_size,
    cam_size=cam_size,
    mask_resize=data_config.mask_resize,
    normalize=data_config.normalize,
    with_pixel_mask=False,
    box=box,
    flip=flip,
  )


class TrainIterator(Iterator[Batch]):
  """Endless iterator over training batches whose position can be saved.

  Each batch is {'image': float32 (D, b, S, S, 3), 'mask': float32 (D, b, h, w),
  'label': int32 (D, b)}. `get_state()` returns JSON bytes with the number of
  batches consumed and a fingerprint of the pipeline; `set_state()` checks the
  fingerprint and continues from there.
  """

  def __init__(
    self,
    batches: grain.MapDataset,
    *,
    num_workers: int,
    prefetch: int,
    fingerprint: Mapping[str, Any],
  ):
    self._batches = batches
    self._num_workers = num_workers
    self._prefetch = prefetch
    self._fingerprint = dict(fingerprint)
    self._next_batch = 0
    self._iterator: grain.DatasetIterator | None = None

  def __next__(self) -> Batch:
    if self._iterator is None:
      self._iterator = _iterate(
        self._batches[self._next_batch :], self._num_workers, self._prefetch
      )
    batch = next(self._iterator)
    self._next_batch += 1
    return batch

  def get_state(self) -> bytes:
    """JSON bytes: {'next_batch': int, 'fingerprint': {...}}."""
    return json.dumps(
      {'next_batch': self._next_batch, 'fingerprint': self._fingerprint},
      sort_keys=True,
    ).encode()

  def set_state(self, state: bytes | str) -> None:
    """Continues after the batches counted in `state` (from `get_state`)."""
    state = json.loads(state)
    if state['fingerprint'] != self._fingerprint:
      raise ValueError(
        'The saved input-pipeline state belongs to another pipeline: saved '
        f'{state["fingerprint"]}, this one {self._fingerprint}.'
      )
    self.close()
    self._next_batch = int(state['next_batch'])

  def close(self) -> None:
    """Stops prefetch threads and worker processes (restarted on demand)."""
    if self._iterator is not None and hasattr(self._iterator, 'close'):
      self._iterator.close()
    self._iterator = None


def _draft_size(
  data_config: ml_collections.ConfigDict, *, training: bool
) -> int:
  """Smallest decoded side that still leaves every crop >= image_size."""
  if (
    training
    and data_config.augment_crop
    and not data_config.get('cache_decoded', False)
  ):
    smallest = CROP_AREA_RANGE[0] * CROP_ASPECT_RANGE[0]
    return math.ceil(data_config.image_size / math.sqrt(smallest))
  return data_config.image_size


def _derived_seeds(seed: int, offset: int) -> tuple[int, int]:
  """Independent 32-bit seeds for the shuffle and the augmentations."""
  shuffle_seed, augment_seed = np.random.SeedSequence(
    [seed % 2**32, offset % 2**32]
  ).generate_state(2)
  return int(shuffle_seed), int(augment_seed)


def create_train_iterator(
  data_config: ml_collections.ConfigDict,
  *,
  cam_size: tuple[int, int],
  global_batch_size: int,
  num_devices: int,
  seed: int,
  process_index: int = 0,
  process_count: int = 1,
  with_index: bool = False,
) -> TrainIterator:
  """Endless, shuffled, deterministic training batches for this host.

  Args:
    data_config: `config.data` (see the module docstring).
    cam_size: (h, w) of the CAM grid, e.g. (14, 14) for 224 px inputs.
    global_batch_size: examples per step over all hosts and devices.
    num_devices: local devices D of this host.
    seed: training seed (shuffle order and augmentations).
    process_index: this host; it reads examples process_index::process_count.
    process_count: number of hosts.
    with_index: also yield 'index' int32 (D, b), each example's position in
      the training split (for debugging and tests).

  Returns:
    A `TrainIterator` of {'image': float32 (D, b, S, S, 3), 'mask': float32
    (D, b, h, w), 'label': int32 (D, b)}, b = global_batch_size //
    (num_devices * process_count).

  Raises:
    ValueError: indivisible batch size, a bad config, or a training split
      smaller than one batch.
  """
  cam_size = _check_cam_size(cam_size)
  per_device = _per_device_batch_size(
    global_batch_size, num_devices, process_count
  )
  source = load_split_sources(data_config, ['train'])['train']
  empty = empty_mask_positions(source, data_config, cam_size=cam_size)
  logging.info(
    '%d of %d training examples have an empty mask at CAM size %s; '
    'empty_mask_policy=%r.',
    len(empty),
    len(source),
    cam_size,
    data_config.empty_mask_policy,
  )
  if data_config.empty_mask_policy == 'drop':
    source = source.subset(np.setdiff1d(np.arange(len(source)), empty))
  source = source.subset(np.arange(len(source))[process_index::process_count])
  per_host = per_device * num_devices
  if len(source) < per_host:
    raise ValueError(
      f'The training split has {len(source)} examples on this '
      f'host, fewer than one batch ({per_host}).'
    )
  decoded = _Decoded(
    source,
    data_config.task,
    data_config.boundary_is_foreground,
    draft_size=_draft_size(data_config, training=True),
  )
  if data_config.get('cache_decoded', False):
    decoded = _cache(
      decoded,
      data_config.image_size,
      cam_size=cam_size,
      mask_resize=data_config.mask_resize,
    )
  shuffle_seed, augment_seed = _derived_seeds(
    seed, data_config.get('shuffle_seed_offset', 0)
  )
  keys = ('image', 'mask', 'label') + ('index',) * with_index
  if isinstance(decoded, _Cached) and not data_config.augment_crop:
    batches = grain.MapDataset.source(
      _CachedBatches(
        decoded,
        batch_size=per_host,
        num_devices=num_devices,
        shuffle_seed=shuffle_seed,
        augment_seed=augment_seed,
        flip=data_config.augment_flip,
        normalize=data_config.normalize,
        keys=keys,
      )
    )
  else:
    batches = (
      grain.MapDataset.source(decoded)
      .shuffle(seed=shuffle_seed)
      .repeat()  # Endless; each epoch is shuffled with a new permutation.
      .random_map(
        functools.partial(
          _train_example, data_config=data_config, cam_size=cam_size
        ),
        seed=augment_seed,
      )
      .batch(
        per_host,
        drop_remainder=True,
        batch_fn=functools.partial(
          _stack_for_devices, num_devices=num_devices, keys=keys
        ),
      )
    )
  fingerprint = {
    'num_examples': len(source),
    # Not num_devices: batch k holds the same examples however many local
    # devices split it, so a checkpoint restores on another device count.
    'global_batch_size': global_batch_size,
    'process_index': process_index,
    'process_count': process_count,
    'seed': seed,
    'cam_size': list(cam_size),
    **{key: data_config.get(key) for key in _CONTENT_FIELDS},
  }
  return TrainIterator(
    batches,
    num_workers=data_config.num_workers,
    prefetch=data_config.prefetch,
    fingerprint=fingerprint,
  )


# ----------------------------------------------------------------------------
# Evaluation.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Padded:
  """A host's share of a split, padded with placeholders (a Grain source)."""

  decoded: _Decoded
  positions: np.ndarray  # int64 (P,): position in the split, -1 = padding.

  def __len__(self) -> int:
    return len(self.positions)

  def __getitem__(self, i: int) -> Example:
    position = int(self.positions[i])
    return {'padding': True} if position < 0 else self.decoded[position]


def _eval_example(
  example: Example,
  *,
  data_config: ml_collections.ConfigDict,
  cam_size: tuple[int, int],
  with_pixel_mask: bool,
) -> Example:
  size = data_config.image_size
  if example.get('padding'):
    out = {
      'image': np.zeros((size, size, 3), np.float32),
      'mask': np.zeros(cam_size, np.float32),
      'label': np.int32(0),
      'index': np.int32(-1),
      'file_name': '',
      'weight': np.float32(0),
    }
    if with_pixel_mask:
      out['pixel_mask'] = np.zeros((size, size), np.float32)
    return out
  out = to_model_input(
    example,
    image_size=size,
    cam_size=cam_size,
    mask_resize=data_config.mask_resize,
    normalize=data_config.normalize,
    with_pixel_mask=with_pixel_mask,
  )
  out['weight'] = np.float32(1)
  return out


def eval_positions(
  num: int, *, per_host_batch: int, process_index: int, process_count: int
) -> np.ndarray:
  """This host's split positions, padded with -1 to whole batches.

  Every host gets the same number of batches, ceil(ceil(num / process_count) /
  per_host_batch), so that pmapped evaluation steps stay in lockstep.
  """
  per_host = -(-num // process_count)
  num_batches = -(-per_host // per_host_batch)
  mine = np.arange(num)[process_index::process_count]
  padded = np.full(num_batches * per_host_batch, -1, np.int64)
  padded[: len(mine)] = mine
  return padded


def create_eval_iterator(
  data_config: ml_collections.ConfigDict,
  split: str,
  *,
  cam_size: tuple[int, int],
  global_batch_size: int,
  num_devices: int,
  process_index: int = 0,
  process_count: int = 1,
  with_pixel_mask: bool = False,
  with_file_name: bool = False,
) -> Iterator[Batch]:
  """One pass over a split, every example exactly once across all hosts.

  Args:
    data_config: `config.data` (see the module docstring).
    split: 'train' (unaugmented), 'validation', 'test' or 'ood'.
    cam_size: (h, w) of the CAM grid.
    global_batch_size: examples per step over all hosts and devices.
    num_devices: local devices D of this host.
    process_index: this host; it reads positions process_index::process_count.
    process_count: number of hosts.
    with_pixel_mask: also yield 'pixel_mask' float32 (D, b, S, S), the
      foreground at image resolution (nearest).
    with_file_name: also yield 'file_name', a str array (D, b) ('' = padding);
      drop it before handing the batch to jax.

  Returns:
    An iterator of {'image': float32 (D, b, S, S, 3), 'mask': float32
    (D, b, h, w), 'label': int32 (D, b), 'weight': float32 (D, b) (1 = real
    example, 0 = padding), 'index': int32 (D, b) (position in the split, -1 =
    padding)}, with the optional keys above. Padding examples are zeros.

  Raises:
    ValueError: indivisible batch size, an empty split or a bad config.
  """
  cam_size = _check_cam_size(cam_size)
  per_device = _per_device_batch_size(
    global_batch_size, num_devices, process_count
  )
  source = load_split_sources(data_config, [split])[split]
  if not len(source):
    raise ValueError(
      f'Split {split!r} is empty (validation_fraction='
      f'{data_config.validation_fraction}).'
    )
  positions = eval_positions(
    len(source),
    per_host_batch=per_device * num_devices,
    process_index=process_index,
    process_count=process_count,
  )
  decoded = _Decoded(
    source,
    data_config.task,
    data_config.boundary_is_foreground,
    draft_size=_draft_size(data_config, training=False),
  )
  keys = ('image', 'mask', 'label', 'weight', 'index')
  keys += ('pixel_mask',) * with_pixel_mask + ('file_name',) * with_file_name
  batches = (
    grain.MapDataset.source(_Padded(decoded, positions))
    .map(
      functools.partial(
        _eval_example,
        data_config=data_config,
        cam_size=cam_size,
        with_pixel_mask=with_pixel_mask,
      )
    )
    .batch(
      per_device * num_devices,
      batch_fn=functools.partial(
        _stack_for_devices, num_devices=num_devices, keys=keys
      ),
    )
  )
  return _iterate(batches, data_config.num_workers, data_config.prefetch)
