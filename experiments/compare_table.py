"""The records, tables, curves and maps figure of `experiments.compare`. Not
an entry point.

Three tables per correlation, one per way of choosing coefficients and
checkpoints (`TABLES`): with group labels (the grid and the checkpoint chosen
on validation worst-group accuracy; DFR, which refits the head on the
group-labelled validation set, belongs here), and without them (chosen on
validation accuracy; the checkpoint at the best validation accuracy, or the
last one). A user without group labels gets the second or the third.

Each row: mean ± sample std over seeds of average, worst-group and
minority-group accuracy (the mean over the two groups whose background
disagrees with the label), background share of influence and the flip rate
under background noise; the worst-group accuracy's 95 % interval over seeds
and test images; against ACE, the paired difference in worst-group accuracy
with its interval, the paired t-test's p-value after Holm's correction over
the table's rows, and wins / ties / losses by seed
(`experiments/compare_stats.py`).
"""

from __future__ import annotations

import json
import os

import numpy as np

from cco_jax import metric_writers
from cco_jax import objectives
from cco_jax.evaluation import auc
from experiments import compare_figures
from experiments import compare_runs
from experiments import compare_stats
from experiments import results_tables

MEASURES = (
  ('accuracy', 'avg acc'),
  ('worst_group_accuracy', 'worst-group acc'),
  ('minority_accuracy', 'minority acc'),
  ('auc', 'AUC'),
  ('counterfactual_flip', 'counterfactual flip'),
  ('bg_share', 'bg share'),
  ('bg_noise_flip', 'bg-noise flip'),
)
# table -> (grid protocol, checkpoint rule, what a user needs, title)
TABLES = {
  'groups': (
    'worst_group',
    'worst_group',
    'group labels on validation',
    'coefficients and checkpoint chosen on validation worst-group accuracy',
  ),
  'labels': (
    'accuracy',
    'accuracy',
    'class labels only',
    'coefficients and checkpoint chosen on validation accuracy',
  ),
  'labels_last': (
    'accuracy',
    'last',
    'class labels only',
    'coefficients chosen on validation accuracy, last checkpoint',
  ),
}
REFERENCE = 'ace'  # A plug-in's REFERENCE replaces it.
DFR_SUFFIX = '+dfr'
LABELS = compare_runs.LABELS


def reference() -> str:
  """The method every row is compared with: the plug-in's REFERENCE, else
  ACE."""
  return getattr(compare_runs.benchmark(), 'REFERENCE', REFERENCE)


def label(method: str) -> str:
  names = compare_runs.labels()
  if method.endswith(DFR_SUFFIX):
    return names.get(method[: -len(DFR_SUFFIX)], method) + ' + DFR'
  return names.get(method, method)


def checkpoint_numbers(report: dict) -> dict:
  """The table's measures of one evaluation report (test split), with the
  per-example correctness as a '0'/'1' string in split order."""
  minority = [
    report.get(f'group_accuracy/{g}')
    for g in compare_runs.benchmark().MINORITY_GROUPS
  ]
  minority = [m for m in minority if m is not None]
  rows = report.get('per_example')
  numbers = {
    'step': report['step'],
    'validation_worst_group_accuracy': report['checkpoint_metrics'].get(
      'eval_worst_group_accuracy'
    ),
    'validation_accuracy': report['checkpoint_metrics'].get('eval_accuracy'),
    'accuracy': report['accuracy'],
    'worst_group_accuracy': report['worst_group_accuracy'],
    'average_group_accuracy': report['average_group_accuracy'],
    'minority_accuracy': float(np.mean(minority)) if minority else None,
    'bg_share': report['bg_share'],
    'bg_noise_flip': report['perturbations']['background_noise']['flip_rate'],
    'counterfactual_flip': (report.get('counterfactual') or {}).get(
      'flip_rate'
    ),
    'groups': {
      k.split('/', 1)[1]: v
      for k, v in report.items()
      if k.startswith('group_accuracy/')
    },
  }
  numbers['auc'] = None
  if rows is not None:
    correct = np.asarray(rows['prediction']) == np.asarray(rows['label'])
    numbers['correct'] = ''.join('1' if c else '0' for c in correct)
    numbers['auc'] = binary_auc(rows, report.get('class_names') or ())
  if 'dfr' in report:
    numbers['dfr'] = report['dfr']
  return numbers


def binary_auc(rows: dict, class_names) -> float | None:
  """ROC AUC of a two-class benchmark from the per-example probabilities of
  its positive class (the plug-in's POSITIVE_CLASS, else the second class);
  None for more classes."""
  if len(class_names) != 2:
    return None
  positive = getattr(compare_runs.benchmark(), 'POSITIVE_CLASS', None)
  index = list(class_names).index(positive) if positive else 1
  scores = np.asarray(rows['probabilities'], np.float64)[:, index]
  return auc.roc_auc(scores, np.asarray(rows['label']) == index)


def collect(out, chosen_at, seeds, steps, dfr_variants) -> dict:
  """{'runs': [...], 'test': {corr: {'index','group','label'}}}: every run's
  numbers under every rule (and DFR), read from its cached evaluations."""
  records, test = [], {}
  for correlation, chosen in chosen_at.items():
    for variant, by_protocol in chosen.items():
      settings = {}
      for protocol, setting in by_protocol.items():
        settings.setdefault(setting, []).append(protocol)
      for setting, protocols in settings.items():
        for seed in seeds:
          workdir = compare_runs.run_dir(
            out, correlation, variant, setting, seed, steps
          )
          if not os.path.exists(os.path.join(workdir, 'final_metrics.json')):
            continue
          reports = compare_runs.evaluations(workdir, variant, dfr_variants)
          first = next(iter(reports.values()))['per_example']
          test.setdefault(
            correlation,
            {k: first[k] for k in ('index', 'group', 'label')},
          )
          records.append(
            run_record(
              workdir, correlation, variant, setting, protocols, seed, reports
            )
          )
  return {'runs': records, 'test': test}


def run_record(
  workdir, correlation, variant, setting, protocols, seed, reports
):
  """Everything the tables need of one run."""
  records = metric_writers.read_metrics(workdir)
  curve = [(r['step'], r['train_loss']) for r in records if 'train_loss' in r]
  speeds = [
    r['train_steps_per_second']
    for r in records
    if 'train_steps_per_second' in r
  ]
  from cco_jax.runtime import environment  # pylint: disable=g-import-not-at-top

  return {
    'workdir': workdir,
    'correlation': correlation,
    'variant': variant,
    'setting': [list(x) for x in setting],
    'value': compare_runs.value_name(setting),
    'protocols': protocols,
    'seed': seed,
    'steps_per_second': float(np.median(speeds[1:] or speeds)),
    'loss_curve': curve,
    'loss_late_fall': late_fall(curve),
    'environment': environment.read(workdir),
    'rules': {rule: checkpoint_numbers(r) for rule, r in reports.items()},
  }


def late_fall(curve: list[tuple[int, float]]) -> float | None:
  """The share of the training loss's fall (first logged value to last) that
  came in the last third of the steps: near 0 when the loss has flattened.

  Args:
    curve: (step, training loss) pairs in step order.
  """
  if len(curve) < 3:
    return None
  steps = np.array([s for s, _ in curve], float)
  loss = np.array([v for _, v in curve], float)
  at_two_thirds = np.interp(
    steps[0] + (steps[-1] - steps[0]) * 2 / 3, steps, loss
  )
  total = loss[0] - loss[-1]
  return float((at_two_thirds - loss[-1]) / total) if total > 0 else None


def table_rows(
  collected: dict, correlation: float, table: str, machine_sd: float = 0.0
) -> list[dict]:
  """The rows of one table: per method, seed statistics and the comparison
  with ACE (`compare_stats.compare_rows`; `machine_sd` widens the intervals
  by a run's cross-machine spread)."""
  protocol, rule, _, _ = TABLES[table]
  test = collected['test'][correlation]
  by_method = {}
  for r in collected['runs']:
    if r['correlation'] != correlation or protocol not in r['protocols']:
      continue
    by_method.setdefault(r['variant'], []).append((r, rule))
    if table == 'groups' and compare_runs.DFR in r['rules']:
      by_method.setdefault(r['variant'] + DFR_SUFFIX, []).append(
        (r, compare_runs.DFR)
      )
  order = list(compare_runs.labels())
  methods = sorted(
    by_method,
    key=lambda m: (
      order.index(m.split('+')[0]) if m.split('+')[0] in order else 99,
      m,
    ),
  )
  correct = {
    m: {
      r['seed']: np.array([c == '1' for c in r['rules'][which]['correct']])
      for r, which in by_method[m]
    }
    for m in methods
  }
  stats = compare_stats.compare_rows(
    correct, test['group'], reference(), machine_sd=machine_sd
  )
  rows = []
  for m in methods:
    runs = by_method[m]
    numbers = [r['rules'][which] for r, which in runs]
    rows.append(
      {
        'method': m,
        'value': runs[0][0]['value'],
        'seeds': [r['seed'] for r, _ in runs],
        'steps': [n['step'] for n in numbers],
        **{
          key: results_tables.seed_stat([n[key] for n in numbers])
          for key, _ in MEASURES
        },
        'loss_late_fall': results_tables.seed_stat(
          [r['loss_late_fall'] for r, _ in runs]
        ),
        'steps_per_second': float(
          np.median([r['steps_per_second'] for r, _ in runs])
        ),
        **stats[m],
      }
    )
  return rows


def supervision(variant: str) -> str:
  config = compare_runs.benchmark().get_config(variant)
  needs = objectives.supervision(config.loss.name)
  if 'group' in needs:
    return 'groups'
  if 'pixel_mask' in needs:
    return 'pixel masks'
  return 'masks' if 'mask' in needs else 'none'


def _p(value) -> str:
  if value is None:
    return '—'
  return '< 0.001' if value < 0.001 else f'{value:.3f}'


def markdown(rows: list[dict], correlation: float, table: str) -> str:
  """One table (TABLES[table]) at `correlation`."""
  _, _, needs, title = TABLES[table]
  # A measure the benchmark does not have (no counterfactual test, more than
  # two classes for AUC) is left out rather than shown as a column of dashes.
  measures = [m for m in MEASURES if any(r[m[0]] is not None for r in rows)]
  versus = label(reference())
  lines = [
    f'\n**Train correlation {correlation:g}: {title}** (needs {needs})\n',
    '| method | supervision | coefficients | '
    + ' | '.join(name for _, name in measures)
    + f' | worst-group 95 % CI | Δ worst-group vs {versus} [95 % CI] '
    f'| p (Holm) | W/T/L vs {versus} |',
    '|---|---|---|' + '---|' * (len(measures) + 4),
  ]
  for row in rows:
    base = row['method'].split('+')[0]
    cells = [results_tables.cell(row[key], key) for key, _ in measures]
    low, high = row['worst_group']['ci']
    versus = row['versus']
    if versus is None:
      delta, p, wtl = '—', '—', '—'
    else:
      delta = (
        f'{versus["mean_difference"]:+.3f} '
        f'[{versus["ci"][0]:+.3f}, {versus["ci"][1]:+.3f}]'
      )
      p = _p(versus.get('p_holm'))
      wtl = f'{versus["wins"]}/{versus["ties"]}/{versus["losses"]}'
    supervised = supervision(base) + (
      ' + val. groups' if row['method'].endswith(DFR_SUFFIX) else ''
    )
    lines.append(
      f'| {label(row["method"])} | {supervised} | {row["value"]} | '
      + ' | '.join(cells)
      + f' | [{low:.3f}, {high:.3f}] | {delta} | {p} | {wtl} |'
    )
  return '\n'.join(lines) + '\n'


def grid_markdown(out: str) -> str:
  """The coefficients searched, their validation scores and both choices,
  from every OUT/c<corr>/grid.json."""
  lines = []
  for name in sorted(os.listdir(out)):
    path = os.path.join(out, name, 'grid.json')
    if not os.path.exists(path):
      continue
    with open(path) as f:
      grid = json.load(f)
    lines += [
      f'\n**Grid at {name}, one seed.** Scores: with groups '
      f'({grid["protocols"]["worst_group"]}); without '
      f'({grid["protocols"]["accuracy"]}).\n',
      '| method | fields | value: score with groups / without | chosen with '
      'groups | chosen without | still on an edge | widened |',
      '|---|---|---|---|---|---|---|',
    ]
    for variant, r in grid['variants'].items():
      cells = ', '.join(
        f'{v}: '
        + '/'.join(f'{x:.3g}' for x in r['scores']['worst_group'][v][:2])
        + ' / '
        + '/'.join(f'{x:.3g}' for x in r['scores']['accuracy'][v][:1])
        for v in r['scores']['worst_group']
      )
      edge = '; '.join(
        f'{p}: {", ".join(f)}' for p, f in r['on_edge'].items() if f
      )
      widened = ', '.join(f'{f}={v:g}' for f, v in r['widened'])
      lines.append(
        f'| {label(variant)} | {", ".join(f"`{f}`" for f in r["fields"])} | '
        f'{cells} | {r["chosen"]["worst_group"]} | {r["chosen"]["accuracy"]} '
        f'| {edge or "no"} | {widened or "—"} |'
      )
  return '\n'.join(lines) + '\n'


def write_outputs(
  out, collected, chosen_at, figure_variants, machine_sd: float = 0.0
) -> None:
  """OUT/table.json, OUT/table.md, OUT/curves_c<corr>.png, OUT/maps_*.png."""
  tables = {}
  plugin = compare_runs.benchmark()
  text = [f'# {plugin.__doc__.strip().splitlines()[0].rstrip(".")}\n']
  for correlation in sorted(collected['test'], reverse=True):
    for table in TABLES:
      rows = table_rows(collected, correlation, table, machine_sd)
      tables[f'{correlation:g}/{table}'] = rows
      text.append(markdown(rows, correlation, table))
  text.append(grid_markdown(out))
  machine = results_tables.machine_info()
  spread = (
    f' and, per run, a cross-machine deviation N(0, {machine_sd:g}) (a '
    "run's spread on a CPU of another vendor)"
    if machine_sd
    else ' (one machine: no cross-machine spread)'
  )
  text.append(
    '\nMeans ± sample std over seeds. Intervals: 95 %, bootstrap '
    f'({compare_stats.NUM_RESAMPLES} draws of seeds and, within each group, '
    f'test images{spread}). p: paired t-test over seeds against ACE, '
    f"Holm-adjusted over each table's rows. Machine: {machine['platform']}, "
    f'{machine["cpu_count"]} CPUs, JAX {machine["jax"]}.\n'
  )
  with open(os.path.join(out, 'table.json'), 'w') as f:
    json.dump(
      {
        'tables': tables,
        'runs': collected['runs'],
        'test': {f'{c:g}': t for c, t in collected['test'].items()},
        'machine': machine,
        'machine_sd': machine_sd,
      },
      f,
    )
  with open(os.path.join(out, 'table.md'), 'w') as f:
    f.write('\n'.join(text))
  for correlation in collected['test']:
    name = compare_runs.corr_name(correlation)
    compare_figures.save_curves(
      os.path.join(out, f'curves_{name}.png'), collected['runs'], correlation
    )
    chosen = chosen_at.get(correlation, {})
    workdirs = {}
    for v in figure_variants:
      match = [
        r['workdir']
        for r in collected['runs']
        if r['correlation'] == correlation
        and r['variant'] == v
        and 'worst_group' in r['protocols']
      ]
      if v in chosen and match:
        workdirs[label(v)] = sorted(match)[0]
    if workdirs:
      compare_figures.save_maps_figure(
        os.path.join(out, f'maps_{name}.png'),
        os.path.join(out, name, 'data'),
        workdirs,
      )
