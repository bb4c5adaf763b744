r"""Prepares a dataset once, TF-free, and prints its split sizes as JSON.

    python -m experiments.prepare --dataset=oxford_iiit_pet \
        [--manual_dir=DIR] [--data_dir=DIR] [--validation_fraction=0.1]
    python -m experiments.prepare --dataset=cats_vs_dogs [--manual_dir=DIR]

Without --manual_dir the official archives are downloaded through TFDS. With
it, DIR must hold the official layout (Pets: images/, annotations/trimaps/,
annotations/{trainval,test}.txt; Cats-vs-Dogs: PetImages/{Cat,Dog}/).

The last line on stdout is a JSON object of split sizes as the input pipeline
sees them: {"train", "validation", "test"} for Pets (validation carved from
trainval with --validation_fraction, the same carve as training uses), and the
single TFDS split {"train"} for Cats-vs-Dogs (the pipeline's 'ood' split).
"""

import json

from absl import app
from absl import flags

from cco_jax import input_pipeline

_DATASET = flags.DEFINE_enum(
  'dataset',
  'oxford_iiit_pet',
  ['oxford_iiit_pet', 'cats_vs_dogs'],
  'Dataset to prepare.',
)
_MANUAL_DIR = flags.DEFINE_string(
  'manual_dir', '', 'Local copy in the official layout; empty = download.'
)
_DATA_DIR = flags.DEFINE_string(
  'data_dir', '', 'TFDS data directory; empty = the TFDS default.'
)
_VALIDATION_FRACTION = flags.DEFINE_float(
  'validation_fraction',
  input_pipeline.default_config().validation_fraction,
  'Share of trainval held out for validation (Pets only).',
)


def split_sizes(
  dataset: str, *, manual_dir: str, data_dir: str, validation_fraction: float
) -> dict[str, int]:
  """Prepares `dataset` if needed and returns its split sizes."""
  builder = input_pipeline.prepare_dataset(
    dataset, manual_dir=manual_dir, data_dir=data_dir
  )
  if dataset == input_pipeline.OOD_DATASET:
    return {
      name: split.num_examples for name, split in builder.info.splits.items()
    }
  config = input_pipeline.default_config()
  config.update(
    dict(
      name=dataset,
      manual_dir=manual_dir,
      tfds_data_dir=data_dir,
      validation_fraction=validation_fraction,
    )
  )
  return input_pipeline.split_sizes(config)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  sizes = split_sizes(
    _DATASET.value,
    manual_dir=_MANUAL_DIR.value,
    data_dir=_DATA_DIR.value,
    validation_fraction=_VALIDATION_FRACTION.value,
  )
  print(json.dumps(sizes), flush=True)


if __name__ == '__main__':
  app.run(main)
