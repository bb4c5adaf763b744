r"""Writes the run record of a training run made before run records.

    python -m experiments.run_record --workdir=/tmp/pets_cpu [--force]

Derives `WORKDIR/run.json` (`cco_jax.run_record`) from `WORKDIR/config.json`,
opening the run's data once, so that restoring, evaluating and explaining the
run never open the data to learn what it is. An existing `run.json` is kept
unless `--force`. Prints the file's path.
"""

import os

from absl import app
from absl import flags

from cco_jax import restore
from cco_jax import run_record
from experiments import cli


def define_flags() -> None:
  """The entry point's flags (defined only when run)."""
  cli.define_workdir_flag()
  flags.DEFINE_bool('force', False, 'Replace an existing run.json.')


def write(workdir: str, force: bool = False) -> str:
  """Writes `workdir/run.json` derived from its config; returns its path."""
  path = run_record.path_of(workdir)
  if os.path.exists(path) and not force:
    raise app.UsageError(f'{path} exists; pass --force to write it again.')
  run_record.derive(restore.load_config(workdir)).save(path)
  return path


def main(argv):
  cli.no_arguments(argv)
  print(write(flags.FLAGS.workdir, flags.FLAGS.force), flush=True)


if __name__ == '__main__':
  define_flags()
  cli.run(main)
