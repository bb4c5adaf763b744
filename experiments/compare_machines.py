r"""The same comparison on two machines: how far do its runs move?

    python -m experiments.compare_machines \
        --a=docs/results_table.json --b=/tmp/compare/table.json \
        --names=Intel,AMD --out=/tmp/machines.md

Reads two tables written by `experiments.compare` (OUT/table.json; the
documented one is `docs/results_table.json`), pairs their runs by
(correlation, variant, coefficients, seed) and, for every pair, compares:

  * the training loss at every logged step, bit for bit: the first step
    where it differs (none = the run repeated exactly);
  * under each selection rule (`worst_group`, `accuracy`, `last`,
    `dfr_last`): the checkpoint chosen, the test worst-group accuracy and
    the share of test images whose correctness differs (the two tables must
    hold the same test set, checked).

The summary per rule: how many pairs chose the same checkpoint; the mean and
standard deviation of the difference in worst-group accuracy (b - a); and,
beside it, the seed standard deviation of the same measure (within a
variant, averaged over variants, on machine a). If the two machines'
floating-point differences act as independent noise of equal size on each
run, one run's cross-machine standard deviation is sd(b - a) / sqrt(2).
Each run's machine is read from its `environment.json` record.
"""

from __future__ import annotations

import json
import math

from absl import flags
import numpy as np

from cco_jax import errors
from experiments import cli

RULES = ('worst_group', 'accuracy', 'last', 'dfr_last')


def define_flags() -> None:
  flags.DEFINE_string('a', None, 'The first table.json.')
  flags.DEFINE_string('b', None, 'The second table.json.')
  flags.DEFINE_list('names', ['a', 'b'], 'Names of the two machines.')
  flags.DEFINE_string('out', '', 'Also write the markdown here.')
  flags.mark_flags_as_required(['a', 'b'])


def run_key(run: dict) -> tuple:
  return (run['correlation'], run['variant'], run['value'], run['seed'])


def first_difference(a: list, b: list) -> int | None:
  """The first logged step where two loss curves differ (None: identical
  over their common steps)."""
  for (step, x), (_, y) in zip(a, b):
    if x != y:
      return int(step)
  return None


def machine(run: dict) -> str:
  """'CPU model (usable CPUs), XLA flags' of a run's first start."""
  env = (run.get('environment') or [{}])[0]
  cpu = env.get('cpu', {})
  return (
    f'{cpu.get("model", "?")} ({cpu.get("usable_cpus", "?")} CPUs), '
    f'XLA_FLAGS "{env.get("xla_flags", "")}"'
  )


def _same_test(a: dict, b: dict) -> None:
  for corr, test in a['test'].items():
    other = b['test'].get(corr)
    if other is not None and other != test:
      raise errors.UserError(
        f'The two tables were evaluated on different test sets at '
        f'correlation {corr}: compare runs of the same benchmark (the same '
        '--data_seed and group sizes).'
      )


def worst_group(correct: list, groups: np.ndarray) -> float:
  c = np.asarray([x == '1' for x in correct])
  return float(min(c[groups == g].mean() for g in np.unique(groups)))


def pairs(a: dict, b: dict) -> list[dict]:
  """One entry per run present in both tables."""
  _same_test(a, b)
  by_key = {run_key(r): r for r in b['runs']}
  out = []
  for ra in a['runs']:
    rb = by_key.get(run_key(ra))
    if rb is None:
      continue
    corr = ra['correlation']
    test = a['test'].get(str(corr)) or a['test'].get(f'{corr:g}')
    groups = np.asarray(test['group'])
    entry = {
      'key': run_key(ra),
      'first_difference': first_difference(ra['loss_curve'], rb['loss_curve']),
      'machines': (machine(ra), machine(rb)),
      'rules': {},
    }
    for rule in RULES:
      if rule not in ra['rules'] or rule not in rb['rules']:
        continue
      na, nb = ra['rules'][rule], rb['rules'][rule]
      differ = np.mean(
        [x != y for x, y in zip(na['correct'], nb['correct'], strict=True)]
      )
      entry['rules'][rule] = {
        'steps': (na['step'], nb['step']),
        'worst_group': (
          worst_group(na['correct'], groups),
          worst_group(nb['correct'], groups),
        ),
        'correctness_differs': float(differ),
      }
    out.append(entry)
  return out


def seed_sd(table: dict, rule: str) -> float:
  """The standard deviation over seeds of test worst-group accuracy under
  `rule`, within each (correlation, variant, coefficients), averaged."""
  by_cell = {}
  for run in table['runs']:
    if rule not in run['rules']:
      continue
    corr = run['correlation']
    test = table['test'].get(str(corr)) or table['test'].get(f'{corr:g}')
    value = worst_group(
      run['rules'][rule]['correct'], np.asarray(test['group'])
    )
    by_cell.setdefault(run_key(run)[:3], []).append(value)
  sds = [np.std(v, ddof=1) for v in by_cell.values() if len(v) > 1]
  return float(np.mean(sds)) if sds else math.nan


def summary(entries: list[dict], a: dict) -> dict:
  out = {
    'pairs': len(entries),
    'identical_curves': sum(e['first_difference'] is None for e in entries),
    'first_difference_steps': sorted(
      {e['first_difference'] for e in entries} - {None}
    ),
    'rules': {},
  }
  for rule in RULES:
    found = [e['rules'][rule] for e in entries if rule in e['rules']]
    if not found:
      continue
    delta = np.array([r['worst_group'][1] - r['worst_group'][0] for r in found])
    out['rules'][rule] = {
      'pairs': len(found),
      'same_step': sum(r['steps'][0] == r['steps'][1] for r in found),
      'mean_delta': float(delta.mean()),
      'sd_delta': float(delta.std(ddof=1)) if len(delta) > 1 else math.nan,
      'mean_abs_delta': float(np.abs(delta).mean()),
      'correctness_differs': float(
        np.mean([r['correctness_differs'] for r in found])
      ),
      'seed_sd': seed_sd(a, rule),
    }
  return out


def markdown(entries: list[dict], result: dict, names) -> str:
  na, nb = names
  lines = [
    f'Runs on both machines: {result["pairs"]}; training losses identical '
    f'at every logged step: {result["identical_curves"]}; first differing '
    f'steps: {result["first_difference_steps"] or "none"}.',
    '',
  ]
  if entries:
    lines += [
      f'- {na}: {entries[0]["machines"][0]}',
      f'- {nb}: {entries[0]["machines"][1]}',
      '',
    ]
  lines += [
    f'| rule | pairs | same checkpoint | mean Δ worst-group ({nb} − {na}) '
    '| sd of Δ | mean abs Δ | test images judged differently | seed sd '
    f'({na}) |',
    '|---|---|---|---|---|---|---|---|',
  ]
  for rule, r in result['rules'].items():
    lines.append(
      f'| {rule} | {r["pairs"]} | {r["same_step"]} | {r["mean_delta"]:+.3f} '
      f'| {r["sd_delta"]:.3f} | {r["mean_abs_delta"]:.3f} '
      f'| {r["correctness_differs"]:.3f} | {r["seed_sd"]:.3f} |'
    )
  lines += [
    '',
    f'| run | first differing step | rule: step {na}/{nb}, worst-group '
    f'{na}/{nb} |',
    '|---|---|---|',
  ]
  for e in entries:
    corr, variant, value, seed = e['key']
    cells = '; '.join(
      f'{rule}: {r["steps"][0]}/{r["steps"][1]}, '
      f'{r["worst_group"][0]:.3f}/{r["worst_group"][1]:.3f}'
      for rule, r in e['rules'].items()
    )
    lines.append(
      f'| {variant} {value} s{seed} (c{corr:g}) | '
      f'{e["first_difference"] or "none"} | {cells} |'
    )
  return '\n'.join(lines) + '\n'


def main(argv):
  del argv
  f = flags.FLAGS
  if len(f.names) != 2:
    raise errors.UserError('--names: two names, e.g. --names=Intel,AMD.')
  tables = []
  for path in (f.a, f.b):
    try:
      with open(path) as fh:
        tables.append(json.load(fh))
    except (OSError, json.JSONDecodeError) as e:
      reason = e.strerror if isinstance(e, OSError) else f'not JSON: {e}'
      raise errors.UserError(
        f'{path}: not a readable table.json ({reason}); give the file that '
        'experiments.compare wrote (OUT/table.json).'
      ) from None
  entries = pairs(*tables)
  text = markdown(entries, summary(entries, tables[0]), f.names)
  print(text, end='')
  if f.out:
    with open(f.out, 'w') as fh:
      fh.write(text)


if __name__ == '__main__':
  define_flags()
  cli.run(main)
