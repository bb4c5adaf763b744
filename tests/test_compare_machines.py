"""experiments.compare_machines: two tables of the same comparison, paired
run by run, against quantities computed directly from the runs."""

import copy
import json
import subprocess
import sys

import numpy as np
import pytest

from experiments import compare_machines

REPO = compare_machines.__file__.rsplit('/experiments/', 1)[0]


def _table(rng, n_test=40, seeds=(0, 1, 2)):
  groups = np.repeat(np.arange(4), n_test // 4)
  runs = []
  for variant in ('ace', 'ce'):
    for seed in seeds:
      curve = [[s, float(rng.uniform())] for s in (20, 40, 60)]
      rules = {}
      for rule in ('worst_group', 'accuracy', 'last'):
        correct = ''.join(
          '1' if c else '0' for c in rng.uniform(size=n_test) < 0.7
        )
        rules[rule] = {
          'step': int(rng.choice([20, 40, 60])),
          'correct': correct,
        }
      runs.append({
        'correlation': 1.0,
        'variant': variant,
        'value': 'default',
        'seed': seed,
        'loss_curve': curve,
        'environment': [{'cpu': {'model': 'X', 'usable_cpus': 2}}],
        'rules': rules,
      })  # fmt: skip
  test = {'1': {'group': groups.tolist(), 'index': [], 'label': []}}
  return {'runs': runs, 'test': test}


def _worst(correct, groups):
  c = np.array([x == '1' for x in correct])
  return min(c[groups == g].mean() for g in np.unique(groups))


@pytest.mark.parametrize('seed', [0, 1])
def test_pairs_and_summary_match_the_runs(seed):
  rng = np.random.default_rng(seed)
  a = _table(rng)
  b = copy.deepcopy(a)
  del b['runs'][5]  # Runs present in one table only are not paired.
  moved = b['runs'][1]  # ace s1: the loss differs from step 40 on, and
  moved['loss_curve'][1][1] += 1e-7  # the worst_group rule chose another
  moved['rules']['worst_group']['step'] += 20  # checkpoint with other
  flipped = ''.join('1' if x == '0' else '0' for x in moved['rules'][
    'worst_group']['correct'][:10])  # fmt: skip
  moved['rules']['worst_group']['correct'] = (
    flipped + moved['rules']['worst_group']['correct'][10:]
  )
  entries = compare_machines.pairs(a, b)
  assert len(entries) == 5
  firsts = {e['key'][1:]: e['first_difference'] for e in entries}
  assert firsts[('ace', 'default', 1)] == 40
  assert sum(v is None for v in firsts.values()) == 4
  result = compare_machines.summary(entries, a)
  groups = np.asarray(a['test']['1']['group'])
  wg = result['rules']['worst_group']
  assert wg['pairs'] == 5 and wg['same_step'] == 4
  expected = _worst(moved['rules']['worst_group']['correct'], groups) - _worst(
    a['runs'][1]['rules']['worst_group']['correct'], groups
  )
  assert wg['mean_delta'] == pytest.approx(expected / 5)
  assert wg['mean_abs_delta'] == pytest.approx(abs(expected) / 5)
  assert wg['correctness_differs'] == pytest.approx(10 / 40 / 5)
  assert result['rules']['last']['mean_abs_delta'] == 0.0
  # The seed sd: within each variant over seeds, averaged over variants.
  per_variant = [
    np.std(
      [
        _worst(r['rules']['accuracy']['correct'], groups)
        for r in a['runs']
        if r['variant'] == v
      ],
      ddof=1,
    )
    for v in ('ace', 'ce')
  ]
  assert result['rules']['accuracy']['seed_sd'] == pytest.approx(
    np.mean(per_variant)
  )
  text = compare_machines.markdown(entries, result, ('I', 'A'))
  assert (
    '| worst_group | 5 | 4 |' in text and 'ace default s1 (c1) | 40' in text
  )


def test_tables_of_different_test_sets_are_refused(tmp_path):
  rng = np.random.default_rng(3)
  a = _table(rng)
  b = copy.deepcopy(a)
  b['test']['1']['group'] = b['test']['1']['group'][::-1]
  paths = []
  for name, table in (('a', a), ('b', b)):
    paths.append(tmp_path / f'{name}.json')
    paths[-1].write_text(json.dumps(table))
  result = subprocess.run(
    [
      sys.executable,
      '-m',
      'experiments.compare_machines',
      f'--a={paths[0]}',
      f'--b={paths[1]}',
    ],
    capture_output=True,
    text=True,
    cwd=REPO,
    check=False,
  )
  assert result.returncode != 0 and 'Traceback' not in result.stderr
  assert 'different test sets' in result.stderr


def test_environment_records_the_cpu_caches(tmp_path):
  """Cache sizes, read from a Linux-style sysfs tree (and the real one)."""
  from cco_jax.runtime import environment  # pylint: disable=g-import-not-at-top

  for index, (level, kind, size) in enumerate(
    [
      ('1', 'Data', '32K'),
      ('1', 'Instruction', '32K'),
      ('2', 'Unified', '1024K'),
    ]
  ):
    entry = tmp_path / f'index{index}'
    entry.mkdir()
    for name, value in (('level', level), ('type', kind), ('size', size)):
      (entry / name).write_text(value + '\n')
  (tmp_path / 'uevent').write_text('')
  assert environment.caches(str(tmp_path)) == {
    'L1 Data': '32K',
    'L1 Instruction': '32K',
    'L2 Unified': '1024K',
  }
  assert environment.caches(str(tmp_path / 'missing')) == {}
  assert isinstance(environment.describe()['cpu']['caches'], dict)
