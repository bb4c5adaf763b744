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

With --grouped, the benchmark with groups (species x background kind) in the
'folder' layout (cco_jax/data/spurious_groups.py, docs/spurious.md): train at
--correlation (default 0.95), validation and test with the four groups in
equal numbers:

    python -m experiments.make_spurious --grouped \
        --pets_dir=../shared/data/oxford-iiit-pet-sample \
        --out_dir=/tmp/spurious95 --correlation=0.95
    python -m experiments.pets --config=experiments/configs/spurious.py:ace \
        --workdir=/tmp/spurious95_ace --config.data.manual_dir=/tmp/spurious95

The last line on stdout is a JSON summary: counts per split, species and
background kind, and the share of images on their species' aligned kind.
"""

import json

from absl import flags

from cco_jax.data import spurious
from cco_jax.data import spurious_groups
from experiments import cli

_PETS_DIR = flags.DEFINE_string(
  'pets_dir',
  None,
  'Oxford-IIIT Pet in the official layout (images/, '
  'annotations/trimaps/, annotations/{trainval,test}.txt).',
)
_OUT_DIR = flags.DEFINE_string('out_dir', None, 'Where to write the benchmark.')
_CORRELATION = flags.DEFINE_float(
  'correlation',
  None,
  'Share of each species in trainval (train with --grouped) on its aligned '
  'background kind (cats: smooth, dogs: textured); the test is reversed '
  '(balanced over the four groups with --grouped). Default 0.9 (0.95 with '
  '--grouped).',
)
_GROUPED = flags.DEFINE_bool(
  'grouped', False, "The benchmark with groups, in the 'folder' layout."
)
_VAL_PER_GROUP = flags.DEFINE_integer(
  'val_per_group', 50, 'With --grouped: validation images per group.'
)
_TEST_PER_GROUP = flags.DEFINE_integer(
  'test_per_group', 80, 'With --grouped: test images per group.'
)
_HELD_OUT = flags.DEFINE_enum(
  'held_out',
  'paired',
  ['paired', 'split'],
  'With --grouped: render each held-out pet on both background kinds '
  "('paired') or once ('split', the first benchmark: use with "
  '--val_per_group=20 --test_per_group=40).',
)
_SEED = flags.DEFINE_integer('seed', 0, 'Seeds the assignment and backgrounds.')
_OVERWRITE = flags.DEFINE_bool(
  'overwrite', False, 'Replace the contents of a non-empty --out_dir.'
)
flags.mark_flags_as_required(['pets_dir', 'out_dir'])


def main(argv):
  cli.no_arguments(argv)
  correlation = _CORRELATION.value
  if _GROUPED.value:
    metadata = spurious_groups.make_group_benchmark(
      _PETS_DIR.value,
      _OUT_DIR.value,
      correlation=0.95 if correlation is None else correlation,
      val_per_group=_VAL_PER_GROUP.value,
      test_per_group=_TEST_PER_GROUP.value,
      held_out=_HELD_OUT.value,
      seed=_SEED.value,
      overwrite=_OVERWRITE.value,
    )
    keys = ('counts', 'correlation', 'seed')
  else:
    metadata = spurious.make_benchmark(
      _PETS_DIR.value,
      _OUT_DIR.value,
      correlation=0.9 if correlation is None else correlation,
      seed=_SEED.value,
      overwrite=_OVERWRITE.value,
    )
    keys = ('counts', 'aligned_share', 'correlation', 'seed')
  summary = {k: metadata[k] for k in keys}
  print(json.dumps(summary), flush=True)


if __name__ == '__main__':
  cli.run(main)
