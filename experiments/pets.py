r"""The generic trainer: trains any configured dataset and objective.

  python -m experiments.pets --config=experiments/configs/pets.py:cpu \
      --workdir=/tmp/pets_cpu \
      --config.data.manual_dir=../shared/data/oxford-iiit-pet-sample \
      --config.data.ood_manual_dir=../shared/data/cats-vs-dogs-sample

Every config of `experiments/configs/` trains with it (`folder.py`,
`waterbirds.py`, `isic.py`, `spurious.py`, ...); the name is the project's
first dataset. Running again with the same --workdir resumes from its last
checkpoint. SIGTERM (a scheduler's preemption notice) or Ctrl-C saves a
checkpoint at the next step and exits with status 143 (130 for Ctrl-C); see
docs/faults.md. On CPU an XLA flag keeps convolutions off YNNPACK (about 2x
faster steps with jaxlib 0.10.2; same numerics, `cco_jax.runtime.xla_cpu`);
set CCO_CPU_XLA_TUNING=0 to run without it. On several hosts, start the same
command on each with --coordinator_address=HOST0:PORT --num_processes=N
--process_id=I (or set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
JAX_PROCESS_ID); every host needs the same --workdir on shared storage. On
CPU the processes' collectives go over gloo. On Cloud TPU pods
--jax_distributed alone suffices.

One run per workdir: a second process on the same --workdir stops at once
("workdir in use by PID ... on host ..."). Flag and config mistakes (a
misspelt key or config file, num_train_steps=0, ...) end with one line
(`experiments.cli`; --verbose shows the traceback).
"""

from absl import flags
from absl import logging

from experiments import cli

FLAGS = flags.FLAGS


def define_flags() -> None:
  cli.define_config_flags('Directory for checkpoints, metrics and figures.')
  cli.define_distributed_flags()


def summary_lines(metrics: dict, workdir: str) -> list[str]:
  """One screen at the end of training: the final accuracies, where the
  outputs are and the next commands."""
  lines = [f'Trained {workdir} to step {metrics.get("step")}.']
  for split in ('validation', 'test', 'ood'):
    if f'{split}_accuracy' in metrics:
      lines.append(
        f'  {split:<10} accuracy {metrics[f"{split}_accuracy"]:.3f} '
        f'({metrics.get(f"{split}_count")} examples)'
      )
  lines += [
    f'  outputs: {workdir}/final_metrics.json, metrics.jsonl, figures/, '
    'checkpoints/, tensorboard/ (tensorboard --logdir '
    f'{workdir}/tensorboard)',
    f'  next: python -m experiments.evaluate --workdir={workdir}',
    f'        python -m experiments.explain --workdir={workdir} '
    f'--out={workdir}/why IMAGE...',
  ]
  return lines


def main(argv: list[str]) -> None:
  cli.no_arguments(argv)
  # Imported here, after the flags and the config are checked, so that a
  # mistyped flag or config key is reported at once (cli), not after the
  # seconds JAX, TFDS, orbax and matplotlib take to import.
  import jax  # pylint: disable=g-import-not-at-top

  from cco_jax import preemption  # pylint: disable=g-import-not-at-top
  from cco_jax import train  # pylint: disable=g-import-not-at-top

  try:
    metrics = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except preemption.Preempted as e:  # SIGTERM/SIGINT: saved, then stopped.
    logging.warning('%s', e)
    raise SystemExit(e.exit_code) from None
  if jax.process_index() == 0 and isinstance(metrics, dict):
    print('\n'.join(summary_lines(metrics, FLAGS.workdir)), flush=True)


if __name__ == '__main__':
  define_flags()
  cli.run(main)
