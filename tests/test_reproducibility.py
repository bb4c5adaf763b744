"""CCO_DETERMINISTIC: runs that repeat whatever CPUs the machine offers.

Real processes: the same short training started with different CPU sets
(two CPUs, one CPU) gives identical losses under CCO_DETERMINISTIC=1, and
each run records what it ran on in environment.json. The option's checks
(bad values, too few CPUs, conflicting XLA_FLAGS) each give one line.
"""

import json
import os
from pathlib import Path
import subprocess
import sys

import pytest

from cco_jax import errors
from cco_jax.data import spurious_groups
from cco_jax.runtime import deterministic
from cco_jax.runtime import environment

REPO = Path(__file__).resolve().parents[1]
CPUS = sorted(os.sched_getaffinity(0))


def _train(workdir, data_dir, cpus, env):
  overrides = {
    'data.manual_dir': data_dir,
    'data.tfds_data_dir': f'{data_dir}/tfds',
    'data.image_size': 32,
    'model.num_filters': 8,
    'batch_size': 8,
    'eval_batch_size': 8,
    'num_train_steps': 6,
    'eval_every_steps': 3,
    'log_every_steps': 1,
  }
  argv = [
    sys.executable,
    '-m',
    'experiments.pets',
    '--config=experiments/configs/spurious.py:ace',
    f'--workdir={workdir}',
  ] + [f'--config.{k}={v}' for k, v in overrides.items()]
  result = subprocess.run(
    deterministic.offered_cpus(cpus, argv),
    cwd=REPO,
    env={**os.environ, **env},
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  losses = [
    (r['step'], r['train_loss'])
    for r in map(
      json.loads, (workdir / 'metrics.jsonl').read_text().splitlines()
    )
    if 'train_loss' in r
  ]
  return losses, environment.read(workdir)


@pytest.mark.skipif(len(CPUS) < 2, reason='needs two CPUs')
def test_same_losses_on_two_cpus_and_on_one(tmp_path, synthetic_pets_dir):
  data_dir = tmp_path / 'bench'
  spurious_groups.make_group_benchmark(
    str(synthetic_pets_dir), str(data_dir), correlation=0.9, val_per_group=2,
    test_per_group=2,
  )  # fmt: skip
  # The first run prepares the data (TFDS), the second reads it.
  env = {deterministic.ENV: '1'}
  two, env_two = _train(tmp_path / 'two', str(data_dir), CPUS[:2], env)
  one, env_one = _train(tmp_path / 'one', str(data_dir), CPUS[1:2], env)
  assert len(two) == 6 and two == one
  for entries in (env_two, env_one):
    (entry,) = entries
    assert entry['deterministic_threads'] == 1
    assert entry['cpu']['usable_cpus'] == 1
    for flag in deterministic.XLA_FLAGS:
      assert flag in entry['xla_flags'].split()
    assert entry['versions']['jax'] and entry['cpu']['vector_flags'] is not None


def test_apply_pins_affinity_and_flags(monkeypatch):
  before = os.sched_getaffinity(0)
  monkeypatch.setenv(deterministic.ENV, '1')
  monkeypatch.setenv('XLA_FLAGS', '--xla_cpu_max_isa=AVX2')
  try:
    added = deterministic.apply()
    assert len(os.sched_getaffinity(0)) == 1
    assert added == '--xla_cpu_experimental_ynn_fusion_type='
    assert os.environ['XLA_FLAGS'].split() == [
      '--xla_cpu_max_isa=AVX2',
      '--xla_cpu_experimental_ynn_fusion_type=',
    ]
  finally:
    os.sched_setaffinity(0, before)


@pytest.mark.parametrize(
  'value, xla_flags, message',
  [
    ('two', '', 'CCO_DETERMINISTIC=.two.: give the number'),
    ('-1', '', 'give the number of CPU threads'),
    (str(len(CPUS) + 1), '', 'may use .* CPUs'),
    ('1', '--xla_cpu_max_isa=AVX512', 'XLA_FLAGS sets --xla_cpu_max_isa'),
  ],
)
def test_bad_settings_are_one_line(monkeypatch, value, xla_flags, message):
  monkeypatch.setenv(deterministic.ENV, value)
  monkeypatch.setenv('XLA_FLAGS', xla_flags)
  with pytest.raises(errors.UserError, match=message) as caught:
    deterministic.apply()
  assert '\n' not in str(caught.value)
  assert os.sched_getaffinity(0) == set(CPUS)


def test_off_when_unset_or_zero(monkeypatch):
  for value in (None, '', '0'):
    if value is None:
      monkeypatch.delenv(deterministic.ENV, raising=False)
    else:
      monkeypatch.setenv(deterministic.ENV, value)
    monkeypatch.setenv('XLA_FLAGS', '')
    assert deterministic.apply() == ''
    assert os.environ['XLA_FLAGS'] == ''
