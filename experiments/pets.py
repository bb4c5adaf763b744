r"""Trains a contrastive (or cross-entropy control) classifier on Oxford-IIIT Pet.

  python -m experiments.pets --config=experiments/configs/pets.py:cpu \
      --workdir=/tmp/pets_cpu \
      --config.data.manual_dir=../shared/data/oxford-iiit-pet-sample \
      --config.data.ood_manual_dir=../shared/data/cats-vs-dogs-sample

Running again with the same --workdir resumes from its last checkpoint.
SIGTERM (a scheduler's preemption notice) or Ctrl-C saves a checkpoint at the
next step and exits with status 143 (130 for Ctrl-C); see docs/faults.md.
On CPU, `cco_jax.runtime` adds an XLA flag that keeps convolutions off
YNNPACK (about 2x faster steps with jaxlib 0.10.2; same numerics, see
docs/benchmarks/training.md); set CCO_CPU_XLA_TUNING=0 to run without it.
On several hosts, start the same command on each with
--coordinator_address=HOST0:PORT --num_processes=N --process_id=I (or set
JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID); every host
needs the same --workdir on shared storage. On CPU the processes' collectives
go over gloo. On Cloud TPU pods --jax_distributed alone suffices.

One run per workdir: a second process on the same --workdir stops at once
("workdir in use by PID ... on host ..."). Flag and config mistakes (a
misspelt key or config file, num_train_steps=0, ...) end with one line.
"""

import os
import re
import sys

from cco_jax import runtime

# XLA reads XLA_FLAGS once, when JAX starts its backends: set them first.
_CPU_XLA_FLAGS = runtime.apply()
_GPU_XLA_FLAGS = runtime.apply_gpu()

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
import jax  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from cco_jax import configuration  # noqa: E402
from cco_jax import preemption  # noqa: E402
from cco_jax import train  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string(
  'workdir', None, 'Directory for checkpoints, metrics and figures.'
)
flags.DEFINE_bool(
  'jax_distributed',
  False,
  'Call jax.distributed.initialize() (multi-host runs; alone on Cloud TPU).',
)
flags.DEFINE_string(
  'coordinator_address',
  None,
  f'HOST:PORT of process 0 (default: ${runtime.ENV_COORDINATOR}).',
)
flags.DEFINE_integer(
  'num_processes',
  None,
  f'Processes of a multi-host run (default: ${runtime.ENV_NUM_PROCESSES}).',
)
flags.DEFINE_integer(
  'process_id',
  None,
  f'This process, 0..num_processes-1 (default: ${runtime.ENV_PROCESS_ID}).',
)
config_flags.DEFINE_config_file(
  'config', None, 'Training configuration file.', lock_config=True
)
flags.mark_flags_as_required(['config', 'workdir'])


def one_line(error: BaseException) -> str:
  """The message of a flag or config error on one line, without escapes."""
  while error.args and isinstance(error.args[0], BaseException):
    error = error.args[0]
  text = str(error.args[0]) if error.args else str(error)
  missing = re.search(r"No such file or directory: '([^']+)'", text)
  if missing:
    return (
      f'config file {missing.group(1)} does not exist (--config=FILE:VARIANT, '
      'e.g. experiments/configs/pets.py:cpu).'
    )
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  if 'Traceback (most recent call last)' in text:
    # A config file's own error: keep its last line, the exception.
    lines = [re.sub(r'^\w+(Error|Exception): ', '', lines[-1])]
  if isinstance(error, KeyError):
    lines[0] = f'no config field {lines[0]}.'
  return ' '.join(lines)


def parse_flags(argv: list[str]) -> list[str]:
  """Parses flags and loads the config; a mistake ends with one line."""
  try:
    args = FLAGS(argv)
    if FLAGS.config is not None:
      FLAGS.config.keys()  # Loads the config file (lazily loaded otherwise).
      configuration.check_training_config(FLAGS.config)
  except (flags.Error, KeyError, AttributeError, OSError, ValueError) as e:
    sys.exit(f'{os.path.basename(argv[0])}: error: {one_line(e)}')
  return args


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  runtime.quiet_library_logs()
  try:
    runtime.initialize_distributed(
      FLAGS.jax_distributed,
      FLAGS.coordinator_address,
      FLAGS.num_processes,
      FLAGS.process_id,
    )
  except ValueError as e:
    sys.exit(f'error: {e}')
  logging.info(
    'JAX process %d/%d, local devices: %s',
    jax.process_index(),
    jax.process_count(),
    jax.local_devices(),
  )
  cache = runtime.enable_compilation_cache()  # $CCO_COMPILATION_CACHE.
  logging.info(
    'XLA_FLAGS=%r (added for CPU: %r, for GPU: %r); compilation cache: %r.',
    os.environ.get('XLA_FLAGS', ''),
    _CPU_XLA_FLAGS,
    _GPU_XLA_FLAGS,
    cache or 'off',
  )
  try:
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except runtime.WorkdirInUse as e:
    sys.exit(f'error: {e}')
  except preemption.Preempted as e:  # SIGTERM/SIGINT: saved, then stopped.
    logging.warning('%s', e)
    sys.exit(e.exit_code)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
