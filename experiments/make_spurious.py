r"""Writes the spurious-background benchmark (docs/spurious.md) from Pets.

    python -m experiments.make_spurious \
        --pets_dir=../shared/data/oxford-iiit-pet-sample \
        --out_dir=/tmp/pets_spurious [--correlation=0.9] [--seed=0]

Train on it like on Pets, with its own TFDS data dir:

    python -m experiments.pets --config=experiments/configs/pets.py:cpu \
        --workdir=/tmp/spurious_cpu \
        --config.data.manual_dir=/tmp/pets_spurious \
        --config.data.tfds_data_dir=/tmp/tfds_spurious \
        --config.data.ood_manual_dir=../shared/data/cats-vs-dogs-sample

The last line on stdout is a JSON summary: counts per split, species and
background kind, and the share of images on their species' aligned kind.
"""

import json

from absl import app
from absl import flags

from cco_jax.data import spurious

_PETS_DIR = flags.DEFINE_string(
  'pets_dir',
  None,
  'Oxford-IIIT Pet in the official layout (images/, '
  'annotations/trimaps/, annotations/{trainval,test}.txt).',
)
_OUT_DIR = flags.DEFINE_string('out_dir', None, 'Where to write the benchmark.')
_CORRELATION = flags.DEFINE_float(
  'correlation',
  0.9,
  'Share of each species in trainval on its aligned '
  'background kind (cats: smooth, dogs: textured); test is reversed.',
)
_SEED = flags.DEFINE_integer('seed', 0, 'Seeds the assignment and backgrounds.')
_OVERWRITE = flags.DEFINE_bool(
  'overwrite', False, 'Replace the contents of a non-empty --out_dir.'
)
flags.mark_flags_as_required(['pets_dir', 'out_dir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  metadata = spurious.make_benchmark(
    _PETS_DIR.value,
    _OUT_DIR.value,
    correlation=_CORRELATION.value,
    seed=_SEED.value,
    overwrite=_OVERWRITE.value,
  )
  summary = {
    k: metadata[k] for k in ('counts', 'aligned_share', 'correlation', 'seed')
  }
  print(json.dumps(summary), flush=True)


if __name__ == '__main__':
  app.run(main)
