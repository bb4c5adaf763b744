r"""Prepares a dataset once, TF-free, and prints its split sizes as JSON.

    python -m experiments.prepare --dataset=oxford_iiit_pet \
        [--manual_dir=DIR] [--data_dir=DIR] [--validation_fraction=0.1]
    python -m experiments.prepare --dataset=cats_vs_dogs [--manual_dir=DIR]
    python -m experiments.prepare --dataset=folder --manual_dir=ROOT \
        [--missing_masks=error|all_ones|drop] [--resize_masks] \
        [--skip_bad_images]
    python -m experiments.prepare --dataset=waterbirds [--manual_dir=DIR]

Without --manual_dir the official archives are downloaded through TFDS (from
--download_mirror/<official file name> when given). With it, DIR must hold
the dataset's layout (docs/data.md). --store_size=S stores images squashed to
(S, S) (--store_format=jpeg, or raw pixels).

The options given here are recorded with the prepared data
(`cco_jax.data.prepare_record`: DATA_DIR/prepare_records/) and training takes
each one its config leaves at the default from there, so the train command
needs none of them again (an option the config sets otherwise wins).

The last line on stdout is a JSON object of split sizes as the input pipeline
sees them: {"train", "validation"[, "test"]} (validation carved from train
with --validation_fraction when the dataset has no validation split, the same
carve as training uses), and the single TFDS split {"train"} for Cats-vs-Dogs
(the pipeline's 'ood' split).
"""

import json

from absl import flags

from cco_jax import data as data_lib
from cco_jax.data import config as config_lib
from cco_jax.data import prepare_record
from cco_jax.data.datasets import DATASETS
from experiments import cli

_DEFAULTS = config_lib.default_config()
_DATASET = flags.DEFINE_enum(
  'dataset', 'oxford_iiit_pet', list(DATASETS), 'Dataset to prepare.'
)
_MANUAL_DIR = flags.DEFINE_string(
  'manual_dir', '', 'Local copy in the dataset layout; empty = download.'
)
_DATA_DIR = flags.DEFINE_string(
  'data_dir', '', 'TFDS data directory; empty = the TFDS default.'
)
_VALIDATION_FRACTION = flags.DEFINE_float(
  'validation_fraction',
  _DEFAULTS.validation_fraction,
  'Share of train held out for validation when the dataset has none.',
)
_STORE_SIZE = flags.DEFINE_integer(
  'store_size', 0, 'Store images squashed to (S, S); 0 = as they are.'
)
_STORE_FORMAT = flags.DEFINE_enum(
  'store_format',
  _DEFAULTS.store_format,
  list(config_lib.STORE_FORMATS),
  'With --store_size: JPEG (smaller) or raw uint8 pixels (fastest to read).',
)
_MISSING_MASKS = flags.DEFINE_enum(
  'missing_masks',
  _DEFAULTS.missing_masks,
  list(config_lib.MISSING_MASK_POLICIES),
  'folder: what a row without a mask file gets.',
)
_RESIZE_MASKS = flags.DEFINE_bool(
  'resize_masks', False, 'folder: resize masks of another size than the image.'
)
_SKIP_BAD_IMAGES = flags.DEFINE_bool(
  'skip_bad_images', False, 'folder: skip unreadable images (and count them).'
)
_DOWNLOAD_MIRROR = flags.DEFINE_string(
  'download_mirror', '', 'Base URL serving the official archive names.'
)


def split_sizes(
  dataset: str,
  *,
  manual_dir: str,
  data_dir: str,
  validation_fraction: float,
  **options,
) -> dict[str, int]:
  """Prepares `dataset` if needed and returns its split sizes.

  `options` are further `config.data` fields (store_size, missing_masks, ...).
  """
  config = config_lib.default_config()
  config.update(
    dict(
      name=dataset,
      manual_dir=manual_dir,
      tfds_data_dir=data_dir,
      validation_fraction=validation_fraction,
      task=next(iter(DATASETS[dataset].tasks)),
      **options,
    )
  )
  builder = data_lib.prepare_from_config(config)
  record = prepare_record.write(config)  # Training takes these options.
  print(
    f'Prepared {dataset} in {builder.data_dir}; options recorded in {record}'
    ' (training uses them).',
    flush=True,
  )
  if dataset == data_lib.OOD_DATASET:
    return {
      name: split.num_examples for name, split in builder.info.splits.items()
    }
  return data_lib.split_sizes(config)


def main(argv):
  cli.no_arguments(argv)
  sizes = split_sizes(
    _DATASET.value,
    manual_dir=_MANUAL_DIR.value,
    data_dir=_DATA_DIR.value,
    validation_fraction=_VALIDATION_FRACTION.value,
    store_size=_STORE_SIZE.value,
    store_format=_STORE_FORMAT.value,
    missing_masks=_MISSING_MASKS.value,
    resize_masks=_RESIZE_MASKS.value,
    skip_bad_images=_SKIP_BAD_IMAGES.value,
    download_mirror=_DOWNLOAD_MIRROR.value,
  )
  print(json.dumps(sizes), flush=True)


if __name__ == '__main__':
  cli.run(main)
