"""The numbers, table, curves and maps figure of `experiments.compare`. Not an
entry point.

A run record holds, for the checkpoint chosen on validation worst-group
accuracy ('best') and the last one ('last'), the test split's average
accuracy, worst-group accuracy, minority-group accuracy (the mean over the two
groups whose background disagrees with the label: the old reversed test),
background share of influence and the flip rate under background noise; and
the run's median training steps per second and its loss curve.
"""

from __future__ import annotations

import json
import os

import numpy as np

from cco_jax import metric_writers
from cco_jax import objectives
from cco_jax.data import spurious_groups
from experiments import results_tables
from experiments.configs import spurious as spurious_configs

CHECKPOINTS = ('best', 'last')
MEASURES = (
  ('accuracy', 'avg acc'),
  ('worst_group_accuracy', 'worst-group acc'),
  ('minority_accuracy', 'minority acc'),
  ('bg_share', 'bg share'),
  ('bg_noise_flip', 'bg-noise flip'),
)
# Compared with ACE: higher is better for the first three, lower for the rest.
COMPARED = ('accuracy', 'worst_group_accuracy', 'minority_accuracy')
LABELS = {
  'ce_control': 'CE control (unfaithful arch.)',
  'ce': 'CE',
  'ace': 'ACE',
  'ace_kld': 'ACE + divergence',
  'ace_swd': 'ACE + SWD',
  'ace_cutmix': 'ACE + contrastive CutMix',
  'rrr': 'RRR',
  'ce_bg_cam': 'CE + background-CAM penalty',
  'energy': 'CE + Energy loss',
  'group_dro': 'Group DRO',
  'ce_reweighted': 'CE reweighted by group',
}


SCORE = 'best val worst-group acc, val acc there, mean val worst-group acc'


def validation_score(workdir: str) -> tuple[float, float, float]:
  """A grid run's score, compared in order: its highest validation
  worst-group accuracy; the validation accuracy at that evaluation (the
  highest, if several tie), which breaks the ties that 20 images per group
  make common and ranks a run collapsed to chance (accuracy 0.5) below a
  working one with the same worst group; the mean worst-group accuracy over
  its evaluations."""
  evaluations = [
    r
    for r in metric_writers.read_metrics(workdir)
    if 'eval_worst_group_accuracy' in r
  ]
  if not evaluations:
    raise ValueError(f'{workdir}: no validation worst-group accuracy recorded.')
  worst = [r['eval_worst_group_accuracy'] for r in evaluations]
  best = max(worst)
  accuracy = max(
    r['eval_accuracy']
    for r in evaluations
    if r['eval_worst_group_accuracy'] == best
  )
  return float(best), float(accuracy), float(np.mean(worst))


def checkpoint_numbers(report: dict) -> dict:
  """The table's measures of one evaluation report (test split)."""
  minority = [
    report.get(f'group_accuracy/{g}') for g in spurious_groups.MINORITY_GROUPS
  ]
  minority = [m for m in minority if m is not None]
  return {
    'step': report['step'],
    'validation_worst_group_accuracy': report['checkpoint_metrics'].get(
      'eval_worst_group_accuracy'
    ),
    'accuracy': report['accuracy'],
    'worst_group_accuracy': report['worst_group_accuracy'],
    'average_group_accuracy': report['average_group_accuracy'],
    'minority_accuracy': float(np.mean(minority)) if minority else None,
    'bg_share': report['bg_share'],
    'bg_noise_flip': report['perturbations']['background_noise']['flip_rate'],
    'groups': {
      k.split('/', 1)[1]: v
      for k, v in report.items()
      if k.startswith('group_accuracy/')
    },
  }


def run_record(workdir, correlation, variant, value, seed, reports) -> dict:
  """Everything the table needs of one run."""
  records = metric_writers.read_metrics(workdir)
  curve = [(r['step'], r['train_loss']) for r in records if 'train_loss' in r]
  speeds = [
    r['train_steps_per_second']
    for r in records
    if 'train_steps_per_second' in r
  ]
  return {
    'workdir': workdir,
    'correlation': correlation,
    'variant': variant,
    'value': value,
    'seed': seed,
    'steps_per_second': float(np.median(speeds[1:] or speeds)),
    'loss_curve': curve,
    'loss_late_fall': late_fall(curve),
    **{which: checkpoint_numbers(reports[which]) for which in CHECKPOINTS},
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


def differs(a: dict | None, b: dict | None) -> bool:
  """Whether two seed means differ by more than twice their standard error
  (Welch: `|m_a - m_b| > 2 sqrt(s_a^2 / n_a + s_b^2 / n_b)`)."""
  if not a or not b or a['n'] < 2 or b['n'] < 2:
    return False
  error = np.sqrt(a['std'] ** 2 / a['n'] + b['std'] ** 2 / b['n'])
  return bool(abs(a['mean'] - b['mean']) > 2 * error)


def aggregate(records: list[dict]) -> list[dict]:
  """Per (correlation, variant): seed statistics of every measure."""
  rows = []
  keys = sorted({(r['correlation'], r['variant']) for r in records})
  order = list(LABELS)
  keys.sort(key=lambda k: (k[0], order.index(k[1]) if k[1] in order else 99))
  for correlation, variant in keys:
    runs = [
      r
      for r in records
      if r['correlation'] == correlation and r['variant'] == variant
    ]
    ce = [
      r['steps_per_second']
      for r in records
      if r['correlation'] == correlation and r['variant'] == 'ce'
    ]
    row = {
      'correlation': correlation,
      'variant': variant,
      'value': runs[0]['value'],
      'seeds': [r['seed'] for r in runs],
      'step_time_vs_ce': (
        float(np.median(ce) / np.median([r['steps_per_second'] for r in runs]))
        if ce
        else None
      ),
      'loss_late_fall': results_tables.seed_stat(
        [r.get('loss_late_fall') for r in runs]
      ),
    }
    for which in CHECKPOINTS:
      row[which] = {
        key: results_tables.seed_stat([r[which][key] for r in runs])
        for key, _ in MEASURES
      }
    rows.append(row)
  for row in rows:
    ace = next(
      (
        r
        for r in rows
        if r['correlation'] == row['correlation'] and r['variant'] == 'ace'
      ),
      None,
    )
    row['differs_from_ace'] = {
      which: {
        key: ace is not None
        and row['variant'] != 'ace'
        and differs(row[which][key], ace[which][key])
        for key in COMPARED
      }
      for which in CHECKPOINTS
    }
  return rows


def supervision(variant: str) -> str:
  config = spurious_configs.get_config(variant)
  needs = objectives.supervision(config.loss.name)
  if 'group' in needs:
    return 'groups'
  if 'pixel_mask' in needs:
    return 'pixel masks'
  return 'masks' if 'mask' in needs else 'none'


def markdown(rows: list[dict], which: str) -> str:
  """One markdown table per correlation for checkpoint `which`."""
  lines = []
  for correlation in sorted({r['correlation'] for r in rows}):
    lines += [
      f'\n**Train correlation {correlation:g}, {which} checkpoint**\n',
      '| method | supervision | coefficient | '
      + ' | '.join(label for _, label in MEASURES)
      + ' | step time / CE | loss fall in last third |',
      '|---|---|---|' + '---|' * (len(MEASURES) + 2),
    ]
    for row in rows:
      if row['correlation'] != correlation:
        continue
      cells = []
      for key, _ in MEASURES:
        text = results_tables.cell(row[which][key], key)
        if row['differs_from_ace'][which].get(key):
          text += ' *'
        cells.append(text)
      field = spurious_configs.GRIDS.get(row['variant'], ('',))[0]
      coefficient = f'{field.split(".")[-1]}={row["value"]}' if field else '—'
      ratio = row['step_time_vs_ce']
      lines.append(
        f'| {LABELS.get(row["variant"], row["variant"])} | '
        f'{supervision(row["variant"])} | {coefficient} | '
        + ' | '.join(cells)
        + f' | {"—" if ratio is None else f"{ratio:.2f}"} | '
        + results_tables.cell(row['loss_late_fall'], 'loss_late_fall')
        + ' |'
      )
  return '\n'.join(lines) + '\n'


def grid_markdown(out: str) -> str:
  """The coefficients searched, their validation scores and the choice, from
  every OUT/c<corr>/grid.json."""
  lines = []
  for name in sorted(os.listdir(out)):
    path = os.path.join(out, name, 'grid.json')
    if not os.path.exists(path):
      continue
    with open(path) as f:
      grid = json.load(f)
    scores = grid['scores']
    if not scores:
      continue
    lines += [
      f'\n**Grid at {name}, one seed; scores: {grid["score"]}**\n',
      '| method | field | value: score | chosen |',
      '|---|---|---|---|',
    ]
    for variant, values in scores.items():
      cells = ', '.join(
        f'{v}: ' + ' / '.join(f'{x:.3g}' for x in score)
        for v, score in values.items()
      )
      lines.append(
        f'| {LABELS.get(variant, variant)} | `{grid["field"][variant]}` | '
        f'{cells} | {grid["chosen"][variant]} |'
      )
  return '\n'.join(lines) + '\n'


def save_curves(path: str, records: list[dict], correlation: float) -> None:
  """Training loss against step, mean over seeds, one line per variant."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, (ax, linear) = plt.subplots(1, 2, figsize=(11, 4.2))
  for variant in LABELS:
    curves = [
      dict(r['loss_curve'])
      for r in records
      if r['correlation'] == correlation and r['variant'] == variant
    ]
    if not curves:
      continue
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    mean = [np.mean([c[s] for c in curves]) for s in steps]
    ax.plot(steps, mean, label=LABELS[variant])
    linear.plot(steps, mean)
  ax.set_yscale('log')
  linear.set_ylim(0, 1.5)
  for axis, scale in ((ax, 'log scale'), (linear, 'linear scale')):
    axis.set_xlabel('step')
    axis.set_ylabel('training loss (mean over seeds)')
    axis.set_title(f'Train correlation {correlation:g}, {scale}')
  ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write_outputs(out: str, records: list[dict]) -> None:
  """OUT/table.json, OUT/table.md and OUT/curves_c<corr>.png."""
  rows = aggregate(records)
  machine = results_tables.machine_info()
  with open(os.path.join(out, 'table.json'), 'w') as f:
    json.dump({'rows': rows, 'runs': records, 'machine': machine}, f, indent=1)
  text = ['# Grouped spurious-background benchmark\n']
  for which in CHECKPOINTS:
    text.append(markdown(rows, which))
  text.append(grid_markdown(out))
  text.append(
    '\nMeans ± sample std over seeds. * = differs from ACE by more than '
    'twice the standard error of the difference (Welch). best = the '
    'checkpoint with the highest validation worst-group accuracy; last = '
    f'the final step. Machine: {machine["platform"]}, '
    f'{machine["cpu_count"]} CPUs, JAX {machine["jax"]}.\n'
  )
  with open(os.path.join(out, 'table.md'), 'w') as f:
    f.write('\n'.join(text))
  for correlation in sorted({r['correlation'] for r in records}):
    name = f'curves_c{round(correlation * 100):03d}.png'
    save_curves(os.path.join(out, name), records, correlation)


def save_maps_figure(
  path: str, data_dir: str, workdirs: dict, per_group: int = 3
) -> None:
  """Test images of the minority groups explained by each run in `workdirs`
  ({label: workdir}, best checkpoints), on one colour scale."""
  import csv  # pylint: disable=g-import-not-at-top

  from cco_jax import explain  # pylint: disable=g-import-not-at-top
  from cco_jax import figures  # pylint: disable=g-import-not-at-top

  with open(os.path.join(data_dir, 'labels.csv')) as f:
    test = sorted(
      (r for r in csv.DictReader(f) if r['split'] == 'test'),
      key=lambda r: r['image'],
    )
  chosen = [
    r
    for group in spurious_groups.MINORITY_GROUPS
    for r in [t for t in test if t['group'] == group][:per_group]
  ]
  paths = [os.path.join(data_dir, 'images', r['image']) for r in chosen]
  masks = [
    os.path.join(data_dir, 'masks', os.path.splitext(r['image'])[0] + '.png')
    for r in chosen
  ]
  cams, predictions, first = {}, {}, None
  for label, workdir in workdirs.items():
    explainer = explain.Explainer.from_workdir(workdir, step='best')
    labels = [explainer.class_names.index(r['label']) for r in chosen]
    result = explainer.explain(paths, targets=labels, masks=masks)
    cams[label], predictions[label] = result.cams, result.predicted
    first = first or (result, labels, explainer.class_names)
  result, labels, class_names = first
  figures.save_method_comparison(
    path,
    result.images,
    result.cam_masks,
    labels,
    cams,
    predictions,
    class_names,
    title='Minority-group test images (background disagrees with the label)',
  )
