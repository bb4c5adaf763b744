r"""Which settings change a training run's numbers, and what pinning them costs.

    python -m experiments.make_spurious --grouped --correlation=1.0 \
        --pets_dir=../shared/data/oxford-iiit-pet-sample --out_dir=/tmp/sp100
    python -m experiments.benchmarks.reproducibility --data_dir=/tmp/sp100 \
        --out=/tmp/reproducibility

Trains the same run (`experiments/configs/spurious.py:ace`, --steps steps,
seed 0) once per setting in `SETTINGS`, one at a time, each in its own
process: what differs between two machines of one kind (the CPUs a process
may use, the instruction set XLA compiles for, YNNPACK's kernels) emulated on
this one by CPU affinity and XLA flags, and `CCO_DETERMINISTIC`
(`cco_jax/runtime/deterministic.py`) under two CPU sets. For each it records
the first logged step whose training loss differs from the reference
setting's (the first one) and from its own group's reference, the final
loss, the median training steps per second and the load average; writes
OUT/reproducibility.json and prints a markdown table. Expected on the
project's 2-core machine (docs/reproducibility.md): one CPU instead of two
changes the loss from step 20 with or without YNNPACK; the ISA changes it
once YNNPACK is off; both `CCO_DETERMINISTIC=1` runs agree.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from absl import app
from absl import flags

from cco_jax.runtime import deterministic
from experiments import cli

_DATA_DIR = flags.DEFINE_string('data_dir', None, 'A grouped benchmark.')
_OUT = flags.DEFINE_string('out', None, 'Where the runs and results go.')
_STEPS = flags.DEFINE_integer('steps', 120, 'Training steps per run.')
flags.mark_flags_as_required(['data_dir', 'out'])

YNN_OFF = '--xla_cpu_experimental_ynn_fusion_type='
# name -> (group, CPUs (None = all), environment). A group's first setting
# is its reference.
SETTINGS = {
  'default': ('default', None, {}),
  'default, again': ('default', None, {}),
  'one CPU': ('default', 1, {}),
  'max ISA AVX2': ('default', None, {'XLA_FLAGS': '--xla_cpu_max_isa=AVX2'}),
  'YNNPACK off': ('ynn off', None, {'XLA_FLAGS': YNN_OFF}),
  'YNNPACK off, one CPU': ('ynn off', 1, {'XLA_FLAGS': YNN_OFF}),
  'YNNPACK off, AVX2': (
    'ynn off',
    None,
    {'XLA_FLAGS': f'{YNN_OFF} --xla_cpu_max_isa=AVX2'},
  ),
  'CCO_DETERMINISTIC=1, all CPUs': (
    'deterministic',
    None,
    {'CCO_DETERMINISTIC': '1'},
  ),
  'CCO_DETERMINISTIC=1, one CPU': (
    'deterministic',
    1,
    {'CCO_DETERMINISTIC': '1'},
  ),
  'CCO_DETERMINISTIC=2': ('deterministic 2', None, {'CCO_DETERMINISTIC': '2'}),
}


def _train(workdir: str, cpus: int | None, env: dict) -> dict:
  argv = [
    sys.executable,
    '-m',
    'experiments.pets',
    '--config=experiments/configs/spurious.py:ace',
    f'--workdir={workdir}',
    f'--config.data.manual_dir={_DATA_DIR.value}',
    f'--config.data.tfds_data_dir={_DATA_DIR.value}/tfds',
    f'--config.num_train_steps={_STEPS.value}',
  ]
  allowed = sorted(os.sched_getaffinity(0))
  chosen = allowed if cpus is None else allowed[:cpus]
  base = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  base['CCO_CPU_XLA_TUNING'] = '1'
  with open(f'{workdir}.log', 'w') as log:
    subprocess.run(
      deterministic.offered_cpus(chosen, argv),
      env={**base, **env},
      stdout=log,
      stderr=subprocess.STDOUT,
      check=True,
      cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
    )
  losses, speeds = {}, []
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    for line in f:
      record = json.loads(line)
      if 'train_loss' in record:
        losses[record['step']] = record['train_loss']
      if 'train_steps_per_second' in record:
        speeds.append(record['train_steps_per_second'])
  return {
    'losses': losses,
    'steps_per_second': sorted(speeds[1:] or speeds)[
      len(speeds[1:] or speeds) // 2
    ],
    'load_average': os.getloadavg(),
    'cpus': len(chosen),
  }


def _first_difference(a: dict, b: dict) -> int | None:
  return next((s for s in sorted(a) if a[s] != b.get(s)), None)


def main(argv):
  cli.no_arguments(argv)
  os.makedirs(_OUT.value, exist_ok=True)
  results, reference = {}, {}
  for name, (group, cpus, env) in SETTINGS.items():
    workdir = os.path.join(_OUT.value, name.replace(' ', '_').replace(',', ''))
    if os.path.exists(workdir):
      raise app.UsageError(f'{workdir} exists; give a new --out.')
    results[name] = {'group': group, 'env': env, **_train(workdir, cpus, env)}
    reference.setdefault(group, name)
  lines = [
    '| setting | CPUs | first step differing from default | from its group'
    "'s first | final loss | steps/s | load (1 min) |",
    '|---|---|---|---|---|---|---|',
  ]
  for name, r in results.items():
    versus_default = _first_difference(
      r['losses'], results['default']['losses']
    )
    versus_group = _first_difference(
      r['losses'], results[reference[r['group']]]['losses']
    )
    r['first_difference'] = {'default': versus_default, 'group': versus_group}
    last = max(r['losses'])
    lines.append(
      f'| {name} | {r["cpus"]} | {versus_default or "none"} | '
      f'{versus_group or "none"} | {r["losses"][last]:.6f} | '
      f'{r["steps_per_second"]:.2f} | {r["load_average"][0]:.2f} |'
    )
  with open(os.path.join(_OUT.value, 'reproducibility.json'), 'w') as f:
    json.dump(results, f, indent=1)
  print('\n'.join(lines))


if __name__ == '__main__':
  cli.run(main)
