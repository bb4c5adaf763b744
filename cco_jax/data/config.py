"""The one schema of `config.data`: its fields, their defaults and checks.

`default_config()` is owned by the library; `experiments/configs/*` start from
it and change only what their protocol needs. Fields:

  name                    a key of `cco_jax.data.datasets.DATASETS`:
                          'oxford_iiit_pet', 'cats_vs_dogs', 'folder',
                          'waterbirds'.
  manual_dir              local copy in the dataset's layout; '' = download.
  ood_manual_dir          local Cats-vs-Dogs (`PetImages/{Cat,Dog}`); '' = download.
  tfds_data_dir           where prepared data lives; '' = the TFDS default
                          (``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).
  task                    which label to learn: 'species' (2 classes) or
                          'breed' (37) for Pets; 'label' (the dataset's own
                          classes) for 'folder' and 'waterbirds'.
  image_size              S: images are squashed to (S, S).
  validation_fraction     share of each class of trainval held out, in [0, 1).
  boundary_is_foreground  Pets: count trimap value 3 (boundary) as foreground.
  mask_resize             'nearest' or 'area'.
  empty_mask_policy       'all_ones' or 'drop'.
  normalize               subtract the ImageNet mean and divide by its std.
  augment_flip            random horizontal flips (training only).
  augment_crop            random resized crops, area in `CROP_AREA_RANGE`,
                          aspect in `CROP_ASPECT_RANGE` (training only).
  num_workers             Grain worker processes; 0 = in this process.
  prefetch                batches prepared ahead (and concurrently, by
                          threads) by each reader; 0 = synchronous.
  shuffle_seed_offset     added to the seed of the shuffle and augmentations.
  sampling                'natural' (each epoch a permutation of the
                          training split) or 'class_balanced' (each epoch as
                          many draws, the classes of `task` equally often,
                          each class's examples in permutations of their own:
                          minorities repeat, majorities are subsampled;
                          `order.balanced_epoch_order`).
  cache_decoded           decode and squash each training example once and
                          keep it in RAM (about 200 kB per example at
                          S = 224); augmentations then act on the (S, S) copy.
                          Needs num_workers == 0.
  device_preprocessing    training images leave the host as uint8 (the
                          squashed crop, unflipped) with a 'flip' bit per
                          example; the train step scales, normalises and
                          flips images and masks on the device
                          (`cco_jax.data.device_transforms`). The same
                          examples, crops and flips either way; False =
                          float32 images finished and flipped on the host.
  pixel_masks             training batches also carry 'pixel_mask' float32
                          (D, b, S, S) in {0, 1}: the foreground at image
                          resolution (for input-gradient objectives).
  store_size              0 = store images as they are; S > 0 = store them
                          squashed to (S, S) when preparing (masks too,
                          nearest), so decoding is cheap. Prepared copies with
                          another store_size live apart
                          (`preparation.prepared_data_dir`).
  store_format            with store_size: 'jpeg' (quality 95, ~7x smaller)
                          or 'raw' uint8 pixels (no decoding at all).
  missing_masks           'folder': a row without a mask file is an 'error',
                          gets an 'all_ones' mask, or is 'drop'ped.
  resize_masks            'folder': resize (nearest) a mask whose size differs
                          from its image's instead of failing.
  skip_bad_images         'folder': skip (and count) unreadable images instead
                          of failing.
  download_mirror         '' = official URLs; else a base URL serving the
                          official archive names (URL/<file name>).
"""

from __future__ import annotations

import types

import ml_collections
import numpy as np

from cco_jax import errors

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
CROP_AREA_RANGE = (0.35, 1.0)
CROP_ASPECT_RANGE = (3 / 4, 4 / 3)
MASK_RESIZE = ('nearest', 'area')
EMPTY_MASK_POLICIES = ('all_ones', 'drop')
MISSING_MASK_POLICIES = ('error', 'all_ones', 'drop')
STORE_FORMATS = ('jpeg', 'raw')
SAMPLING = ('natural', 'class_balanced')
# Fields of config.data that change what a training batch contains (the rest,
# e.g. num_workers or where the data lives, do not).
CONTENT_FIELDS = (
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
# Content fields added later: in a fingerprint only when not at their default,
# so that runs saved before they existed still resume.
LATER_CONTENT_FIELDS = ('pixel_masks', 'store_size', 'store_format', 'sampling')
# Fields that change what preparing a dataset writes.
PREPARE_FIELDS = (
  'store_size',
  'store_format',
  'missing_masks',
  'resize_masks',
  'skip_bad_images',
)
_DEFAULTS = types.MappingProxyType(
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
    sampling='natural',
    cache_decoded=False,
    device_preprocessing=True,
    pixel_masks=False,
    store_size=0,
    store_format='jpeg',
    missing_masks='error',
    resize_masks=False,
    skip_bad_images=False,
    download_mirror='',
  )
)


def default_config() -> ml_collections.ConfigDict:
  """The `config.data` defaults (docs/method.md: preprocessing)."""
  return ml_collections.ConfigDict(dict(_DEFAULTS))


def fingerprint_fields(data_config: ml_collections.ConfigDict) -> dict:
  """The content fields of `config.data` that identify a training stream."""
  fields = {key: data_config[key] for key in CONTENT_FIELDS}
  for key in LATER_CONTENT_FIELDS:
    if data_config.get(key, _DEFAULTS[key]) != _DEFAULTS[key]:
      fields[key] = data_config[key]
  return fields


def check_config(
  data_config: ml_collections.ConfigDict, tasks: tuple[str, ...]
) -> None:
  """Raises ValueError on a field value the pipeline does not support.

  Args:
    data_config: `config.data`.
    tasks: the tasks the dataset `data_config.name` offers.
  """
  choices = {
    'task': tasks,
    'mask_resize': MASK_RESIZE,
    'empty_mask_policy': EMPTY_MASK_POLICIES,
    'missing_masks': MISSING_MASK_POLICIES,
    'store_format': STORE_FORMATS,
    'sampling': SAMPLING,
  }
  for key, allowed in choices.items():
    if data_config.get(key, _DEFAULTS[key]) not in allowed:
      raise errors.UserError(
        f'config.data.{key}={data_config[key]!r}; expected one of '
        f'{allowed} (dataset {data_config.name!r}).'
      )
  if not 0 <= data_config.validation_fraction < 1:
    raise errors.UserError(
      'config.data.validation_fraction must be in [0, 1), got '
      f'{data_config.validation_fraction}.'
    )
  if data_config.image_size < 1:
    raise errors.UserError(
      f'config.data.image_size={data_config.image_size}: must be positive '
      '(e.g. --config.data.image_size=64).'
    )
  for key in ('num_workers', 'prefetch', 'store_size'):
    if data_config[key] < 0:
      raise errors.UserError(
        f'config.data.{key}={data_config[key]}: must be >= 0 '
        f'(--config.data.{key}=0 is the default).'
      )
  if data_config.cache_decoded and data_config.num_workers:
    raise errors.UserError(
      'config.data.cache_decoded keeps decoded images in this '
      'process; it needs config.data.num_workers = 0.'
    )
