r"""Trains a classifier on any configured dataset (same entry as `pets`).

  python -m experiments.train --config=experiments/configs/folder.py:cpu \
      --workdir=/tmp/folder_cpu --config.data.manual_dir=ROOT

Flags and behaviour are those of `experiments.pets` (resuming, several
hosts); only the name is neutral.
"""

from absl import app

from experiments import pets

if __name__ == '__main__':
  app.run(pets.main, flags_parser=pets.parse_flags)
