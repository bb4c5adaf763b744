r"""Trains a contrastive (or cross-entropy control) classifier on Oxford-IIIT Pet.

  python -m experiments.pets --config=experiments/configs/pets.py:cpu \
      --workdir=/tmp/pets_cpu \
      --config.data.manual_dir=../shared/data/oxford-iiit-pet-sample \
      --config.data.ood_manual_dir=../shared/data/cats-vs-dogs-sample

Running again with the same --workdir resumes from its last checkpoint.
On CPU, `cco_jax.runtime` adds an XLA flag that keeps convolutions off
YNNPACK (about 2x faster steps with jaxlib 0.10.2; same numerics, see
docs/benchmarks/training.md); set CCO_CPU_XLA_TUNING=0 to run without it.
On several hosts, start the same command on each with --jax_distributed (or
set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID); on Cloud
TPU pods --jax_distributed alone suffices.
"""

import logging as logging_lib
import os

from cco_jax import runtime

# XLA reads XLA_FLAGS once, when JAX starts its backends: set them first.
_CPU_XLA_FLAGS = runtime.apply()

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
import jax  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from cco_jax import train  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string(
  'workdir', None, 'Directory for checkpoints, metrics and figures.'
)
flags.DEFINE_bool(
  'jax_distributed',
  False,
  'Call jax.distributed.initialize() (multi-host runs).',
)
config_flags.DEFINE_config_file(
  'config', None, 'Training configuration file.', lock_config=True
)
flags.mark_flags_as_required(['config', 'workdir'])


class _QuietOrbax(logging_lib.Filter):
  """Drops Orbax's per-save INFO chatter; its warnings and errors still show."""

  def filter(self, record):
    return record.levelno > logging_lib.INFO or '/orbax/' not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().addFilter(_QuietOrbax())
  if FLAGS.jax_distributed or os.environ.get('JAX_COORDINATOR_ADDRESS'):
    jax.distributed.initialize()
  logging.info(
    'JAX process %d/%d, local devices: %s',
    jax.process_index(),
    jax.process_count(),
    jax.local_devices(),
  )
  logging.info(
    'XLA_FLAGS=%r (added for CPU: %r).',
    os.environ.get('XLA_FLAGS', ''),
    _CPU_XLA_FLAGS,
  )
  train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == '__main__':
  app.run(main)
