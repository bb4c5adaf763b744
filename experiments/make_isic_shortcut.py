r"""Writes the ISIC shortcut benchmark (cco_jax/data/isic_shortcut.py).

    python -m experiments.make_isic_shortcut \
        --isic_dir=../shared/data/isic-2017-sample \
        --out_dir=/tmp/isic_shortcut90 [--correlation=0.9] [--test=reversed]

Melanoma vs benign with a coloured adhesive patch pasted on the skin outside
the lesion of `correlation` of the benign training images and `1 -
correlation` of the melanomas; validation balanced; test reversed or
balanced; groups = diagnosis x patch. Train on it as on any grouped folder
(docs/data.md), choosing on validation worst-group accuracy:

    python -m experiments.pets --config=experiments/configs/spurious.py:ace \
        --workdir=/tmp/isic_shortcut90_ace \
        --config.data.manual_dir=/tmp/isic_shortcut90 \
        --config.data.tfds_data_dir=/tmp/tfds_isic_shortcut

The same flags write byte-identical files. The last line on stdout is a JSON
summary: counts per split and group, and the settings.
"""

import json

from absl import flags

from cco_jax.data import isic_shortcut
from experiments import cli

_ISIC_DIR = flags.DEFINE_string(
  'isic_dir',
  None,
  'The ISIC sample in the folder layout (labels.csv image,label,split; '
  'images/; masks/).',
)
_OUT_DIR = flags.DEFINE_string('out_dir', None, 'Where to write the benchmark.')
_CORRELATION = flags.DEFINE_float(
  'correlation',
  0.9,
  'Share of the benign training images with a patch (and of the melanomas '
  'without one), in [0.5, 1].',
)
_TEST = flags.DEFINE_enum(
  'test',
  'reversed',
  list(isic_shortcut.TEST_MODES),
  'Test split: the correlation reversed, or half of each diagnosis patched.',
)
_VALIDATION_FRACTION = flags.DEFINE_float(
  'validation_fraction',
  0.15,
  'Share of each diagnosis of the source train split held out (balanced).',
)
_SEED = flags.DEFINE_integer('seed', 0, 'Seeds the carve and every patch.')
_OVERWRITE = flags.DEFINE_bool(
  'overwrite', False, 'Replace the contents of a non-empty --out_dir.'
)
flags.mark_flags_as_required(['isic_dir', 'out_dir'])


def main(argv):
  cli.no_arguments(argv)
  metadata = isic_shortcut.make_benchmark(
    _ISIC_DIR.value,
    _OUT_DIR.value,
    correlation=_CORRELATION.value,
    test=_TEST.value,
    validation_fraction=_VALIDATION_FRACTION.value,
    seed=_SEED.value,
    overwrite=_OVERWRITE.value,
  )
  keys = ('counts', 'correlation', 'test', 'seed', 'patch_touches_lesion')
  print(json.dumps({k: metadata[k] for k in keys}), flush=True)


if __name__ == '__main__':
  cli.run(main)
