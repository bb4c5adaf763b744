"""Training runs of the results drivers (`reproduce`, `isic`, `compare`).

Each run is one `python -m <entry point>` subprocess in its own workdir, so a
crash or a kill loses only that run: a run whose workdir holds
`final_metrics.json` is finished and skipped, any other one resumes from its
last checkpoint when started again. Its output is appended to
WORKDIR/train.log and its wall time written to WORKDIR/wall_time.json.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
import concurrent.futures
import json
import os
import subprocess
import sys
import time

from absl import logging

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOG = 'train.log'
WALL_TIME = 'wall_time.json'


def command(
  module: str,
  config: str,
  variant: str,
  workdir: str,
  seed: int,
  overrides: Iterable[str] = (),
) -> list[str]:
  """The command line of one run.

  Args:
    module: the entry point, e.g. 'experiments.pets'.
    config: the config file relative to the repository root.
    variant: the config's variant (`get_config` argument).
    workdir: the run's directory.
    seed: `config.seed`.
    overrides: more 'field=value' settings, each passed as --config.field.
  """
  return [
    sys.executable,
    '-m',
    module,
    f'--config={config}:{variant}',
    f'--workdir={workdir}',
    f'--config.seed={seed}',
  ] + [f'--config.{item}' for item in overrides]


def finished(workdir: str) -> bool:
  return os.path.exists(os.path.join(workdir, 'final_metrics.json'))


def train(
  workdir: str, argv: list[str], env: Mapping[str, str] | None = None
) -> float | None:
  """Runs `argv` (from the repository root) unless the run finished.

  Returns:
    The wall time in seconds, or None when the run had finished before.

  Raises:
    RuntimeError: the process failed; the message names its log.
  """
  if finished(workdir):
    return None
  os.makedirs(workdir, exist_ok=True)
  logging.info('Training: %s', ' '.join(argv))
  start = time.time()
  with open(os.path.join(workdir, LOG), 'a') as log:
    result = subprocess.run(
      argv,
      cwd=REPO,
      stdout=log,
      stderr=subprocess.STDOUT,
      check=False,
      env=None if env is None else {**os.environ, **env},
    )
  seconds = time.time() - start
  if result.returncode:
    raise RuntimeError(
      f'Training {workdir} failed (exit {result.returncode}); see '
      f'{os.path.join(workdir, LOG)}. Rerun to resume.'
    )
  with open(os.path.join(workdir, WALL_TIME), 'w') as f:
    json.dump({'train_seconds': seconds}, f)
  return seconds


def train_seconds(workdir: str) -> float | None:
  """The wall time `train` recorded, or None (never trained by it)."""
  path = os.path.join(workdir, WALL_TIME)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)['train_seconds']


def train_all(
  jobs: Iterable[tuple[str, list[str]]],
  parallel: int = 1,
  env: Mapping[str, str] | None = None,
  after: Callable[[str], object] | None = None,
) -> None:
  """Trains the `(workdir, argv)` jobs, `parallel` at a time.

  `after(workdir)` runs here for each run that has finished (trained now or
  before), while the others train. A failure does not stop the other runs;
  all failures are raised together, as one RuntimeError, at the end.
  """
  with concurrent.futures.ThreadPoolExecutor(max(1, parallel)) as pool:
    futures = {
      pool.submit(train, workdir, argv, env): workdir for workdir, argv in jobs
    }
    errors = []
    for future in concurrent.futures.as_completed(futures):
      workdir = futures[future]
      try:
        seconds = future.result()
        if seconds is not None:
          logging.info('Trained %s in %.0f s.', workdir, seconds)
        if after is not None:
          after(workdir)
      except RuntimeError as e:
        errors.append(str(e))
  if errors:
    raise RuntimeError(' '.join(errors))
