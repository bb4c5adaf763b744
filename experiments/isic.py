r"""The ISIC table: six objectives scored by the challenge's AUCs, seeds, figures.

    python -m experiments.isic --out=/tmp/isic \
        --data_dir=../shared/data/isic-2017-sample

For each variant in --variants (of experiments/configs/isic.py; default the
six CPU objectives: CE control, CE, ACE, ACE + divergence, BCE and ablated
BCE) and each seed in --seeds it
  1. prepares the data once into OUT/tfds (`experiments.prepare`, images
     stored at the config's data.store_size);
  2. trains `python -m experiments.pets --config=...isic.py:VARIANT` into
     OUT/<variant>_s<seed> (log in train.log, wall time in wall_time.json),
     --parallel runs at a time, unless final_metrics.json exists (an
     unfinished run resumes from its last checkpoint);
  3. evaluates the best checkpoint (the config's best_metric: validation mean
     AUC of the two challenge tasks) on the test split into
     OUT/<run>/evaluation/report_isic.json, unless it exists (--reevaluate):
     ROC AUC per task with bootstrap intervals (`cco_jax.evaluation.auc`),
     classification, interventions (flip rates, background swap),
     localisation (`cco_jax.evaluation`) and class-wise recall and balanced
     accuracy, clean and under background swap
     (`cco_jax.evaluation.classwise`);
  4. writes OUT/table.md and OUT/table.json (mean, sample std (ddof=1) and a
     95 % t interval over seeds; each run's bootstrap intervals over test
     images in table.json) and, with --figures, OUT/figures/isic_<variant>.png
     (the test images at --figure_positions with their lesion masks and the
     true class's evidence map of the first seed's model, one colour scale
     shared by all variants) and OUT/figures/isic_curves.png (validation mean
     AUC of every run against steps, its best step marked).

--epochs and --override (`KEY=VALUE`, no "config.") change training, e.g.
`--override=data.image_size=32` for a smoke run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from absl import app
from absl import flags
from absl import logging
import numpy as np
from scipy import stats

from experiments import cli
from experiments import isic_figures
from experiments import results_tables
from experiments import runs

CONFIG = 'experiments/configs/isic.py'
LABELS = {
  'cpu_ce': 'CE control',
  'cpu_ce_faithful': 'CE',
  'cpu_ace': 'ACE',
  'cpu': 'ACE + divergence',
  'cpu_bce': 'BCE (two tasks)',
  'cpu_ace_bce': 'ablated BCE (two tasks)',
  'default_ce': 'CE control (ResNet-50)',
  'default_ace': 'ACE (ResNet-50)',
  'default': 'ACE + divergence (ResNet-50)',
  'default_bce': 'BCE (ResNet-50)',
  'default_ace_bce': 'ablated BCE (ResNet-50)',
}
DEFAULT_VARIANTS = (
  'cpu_ce',
  'cpu_ce_faithful',
  'cpu_ace',
  'cpu',
  'cpu_bce',
  'cpu_ace_bce',
)
REPORT = 'report_isic.json'
CLASSES = ('melanoma', 'nevus', 'seborrheic_keratosis')
# Test-split positions (labels.csv order of the sample's test rows) shown in
# the figures, chosen by eye: melanoma in dark vignetting (0), nevi beside an
# orange / a blue adhesive patch (75, 84), a plain nevus (139), seborrheic
# keratoses with a blue patch and a ruler (156) and with ink marks and a ruler
# (172), melanomas with a ruler (208, 278).
FIGURE_POSITIONS = (0, 75, 84, 139, 156, 172, 208, 278)


def define_flags() -> None:
  """The runner's flags (defined only when run, so tests can import it)."""
  flags.DEFINE_string('out', None, 'Output directory (runs, table).')
  flags.DEFINE_string(
    'data_dir',
    '../shared/data/isic-2017-sample',
    'ISIC in the folder layout (labels.csv, images/, masks/).',
  )
  flags.DEFINE_list('seeds', ['0', '1', '2'], 'Training seeds.')
  flags.DEFINE_list(
    'variants',
    list(DEFAULT_VARIANTS),
    f'Variants of {CONFIG}, among {sorted(LABELS)}.',
  )
  flags.DEFINE_float('epochs', None, 'Override num_epochs.')
  flags.DEFINE_multi_string(
    'override', [], 'Extra training config overrides KEY=VALUE.'
  )
  flags.DEFINE_integer('parallel', 3, 'Training runs at a time (subprocesses).')
  flags.DEFINE_bool(
    'reevaluate', False, 'Evaluate again even where a report exists.'
  )
  flags.DEFINE_bool('figures', True, 'Write the map figures.')
  flags.DEFINE_bool(
    'train',
    True,
    'Train unfinished runs; --notrain evaluates and tabulates the checkpoints '
    'already in OUT (e.g. runs stopped after their last evaluation).',
  )
  flags.DEFINE_list(
    'figure_positions',
    [str(p) for p in FIGURE_POSITIONS],
    'Test-split positions of the figure images.',
  )
  flags.mark_flags_as_required(['out'])


def run_name(variant: str, seed: int) -> str:
  return f'{variant}_s{seed}'


def train_command(
  variant: str,
  seed: int,
  workdir: str,
  *,
  data_dir: str,
  tfds_dir: str,
  epochs: float | None = None,
  overrides: tuple[str, ...] = (),
) -> list[str]:
  """The `python -m experiments.pets` command line of one run."""
  settings = [
    f'data.manual_dir={os.path.abspath(data_dir)}',
    f'data.tfds_data_dir={tfds_dir}',
  ]
  if epochs is not None:
    settings.append(f'num_epochs={epochs}')
  return runs.command(
    'experiments.pets', CONFIG, variant, workdir, seed, settings + [*overrides]
  )


def prepare(data_dir: str, tfds_dir: str, variant: str) -> None:
  """Prepares the folder dataset once, as the variant stores it (training
  processes started together would otherwise race to prepare it)."""
  from experiments.configs import isic  # pylint: disable=g-import-not-at-top

  store_size = isic.get_config(variant).data.store_size
  subprocess.run(
    [
      sys.executable,
      '-m',
      'experiments.prepare',
      '--dataset=folder',
      f'--manual_dir={os.path.abspath(data_dir)}',
      f'--data_dir={tfds_dir}',
      f'--store_size={store_size}',
    ],
    cwd=runs.REPO,
    check=True,
  )


def evaluate(workdir: str, reevaluate: bool = False) -> dict:
  """The test-split report of the run's best checkpoint (cached)."""
  # pylint: disable=g-import-not-at-top
  import dataclasses

  from cco_jax import evaluation
  from cco_jax import restore
  from cco_jax.data import sources
  from cco_jax.evaluation import classwise
  from cco_jax.evaluation import interventions
  from cco_jax.evaluation import report as report_lib

  out = os.path.join(workdir, evaluation.EVALUATION_DIR)
  path = os.path.join(out, REPORT)
  if os.path.exists(path) and not reevaluate:
    with open(path) as f:
      return json.load(f)
  os.makedirs(out, exist_ok=True)
  start = time.time()
  config = evaluation.default_config()
  config.split = 'test'
  config.ood = False
  config.evaluators = ('classification', 'auc', 'interventions', 'localisation')
  report = evaluation.evaluate_checkpoint(workdir, config).report
  run = restore.restore_model(workdir, step='best')
  data = report_lib.resolved_data(run.config, None, out)
  test = sources.load_split_sources(data, ['test'])['test']
  reader = interventions.SplitReader(data, test, cam_size=run.cam_size)
  context = dataclasses.replace(
    interventions.Context(
      normalize=data.normalize, seed=config.seed, noise_std=config.noise_std
    ),
    donors=lambda where: reader.donors(where, seed=config.seed),
  )
  evaluator = classwise.ClasswiseEvaluator(
    run.predict_fn(),
    class_names=run.class_names,
    perturbations=('background_swap',),
    context=context,
  )
  batches = report_lib.split_batches(
    data, test, cam_size=run.cam_size, batch_size=config.batch_size
  )
  report.update(report_lib.json_safe(dict(evaluator.run(batches))))
  report['evaluation_seconds'] = time.time() - start
  with open(path, 'w') as f:
    json.dump(report, f, indent=2)
  return report


def _training_curve(workdir: str) -> dict:
  """Validation mean AUC by step, the last step trained and whether early
  stopping ended the run, from WORKDIR/metrics.jsonl."""
  steps, values, last, stopped = [], [], 0, False
  path = os.path.join(workdir, 'metrics.jsonl')
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        record = json.loads(line)
        last = max(last, int(record.get('step', 0)))
        stopped = stopped or bool(record.get('early_stopped'))
        if record.get('eval_mean_auc') is not None:
          steps.append(int(record['step']))
          values.append(float(record['eval_mean_auc']))
  return {'steps': steps, 'mean_auc': values, 'last': last, 'stopped': stopped}


def run_record(variant: str, seed: int, workdir: str, report: dict) -> dict:
  """The table's numbers of one run."""
  clean = report['classwise']['clean']
  swap = report['classwise']['background_swap']
  perturbations = report['perturbations']
  scores = report['auc']
  curve = _training_curve(workdir)
  record = {
    'run': run_name(variant, seed),
    'variant': variant,
    'seed': seed,
    'step': report['step'],
    'steps_trained': curve['last'],
    'early_stopped': curve['stopped'],
    'validation_mean_auc': report['checkpoint_metrics'].get('eval_mean_auc'),
    'mean_auc': scores['mean_auc'],
    'mean_auc_interval': scores['mean_auc_interval'],
    'accuracy': clean['accuracy'],
    'balanced_accuracy': clean['balanced_accuracy'],
    'bg_share': report['bg_share'],
    'background_noise_flip': perturbations['background_noise']['flip_rate'],
    'background_swap_flip': perturbations['background_swap']['flip_rate'],
    'background_swap_accuracy': swap['accuracy'],
    'background_swap_balanced_accuracy': swap['balanced_accuracy'],
    'pointing_game': report.get('pointing_game'),
    'train_seconds': runs.train_seconds(workdir),
    'evaluation_seconds': report.get('evaluation_seconds'),
  }
  for task, values in scores['tasks'].items():
    record[f'auc/{task}'] = values['auc']
    record[f'auc_interval/{task}'] = values['auc_interval']
    for specificity in (0.8, 0.9):
      key = f'sensitivity_at_specificity_{specificity}'
      record[f'{key}/{task}'] = values[key]
  for name, value in clean['recall'].items():
    record[f'recall/{name}'] = value
  return record


TASKS = ('melanoma', 'seborrheic_keratosis')
COLUMNS = (
  ('mean_auc', 'test mean AUC'),
  *((f'auc/{t}', f'AUC {t.replace("_", " ")}') for t in TASKS),
  *(
    (f'sensitivity_at_specificity_0.8/{t}', f'sens. @ spec. 0.8, {t[:3]}')
    for t in TASKS
  ),
  ('balanced_accuracy', 'balanced acc'),
  *((f'recall/{c}', f'recall {c.replace("_", " ")}') for c in CLASSES),
  ('bg_share', 'bg share of influence'),
  ('background_swap_flip', 'bg-swap flip'),
  ('pointing_game', 'pointing game'),
  ('validation_mean_auc', 'valid mean AUC'),
  ('step', 'best step'),
  ('steps_trained', 'steps trained'),
  ('train_seconds', 'train time (s)'),
)


def aggregate(records: list[dict]) -> list[dict]:
  """Mean and sample std (ddof=1; 0 for one seed) per variant."""
  rows = []
  for variant in dict.fromkeys(r['variant'] for r in records):
    group = [r for r in records if r['variant'] == variant]
    row = {
      'variant': variant,
      'objective': LABELS[variant],
      'seeds': [r['seed'] for r in group],
    }
    for key, _ in COLUMNS:
      row[key] = results_tables.seed_stat(r.get(key) for r in group)
    row['mean_auc_t_interval'] = t_interval([r.get('mean_auc') for r in group])
    rows.append(row)
  return rows


def t_interval(values, level: float = 0.95) -> list[float] | None:
  """The `level` Student-t interval of the mean over seeds (None below two)."""
  values = np.array([v for v in values if v is not None], np.float64)
  if len(values) < 2:
    return None
  half = stats.t.ppf(0.5 + level / 2, len(values) - 1) * values.std(ddof=1)
  half /= np.sqrt(len(values))
  return [float(values.mean() - half), float(values.mean() + half)]


def markdown_table(rows: list[dict]) -> str:
  header = ['objective', 'seeds', 'test mean AUC, 95 % t interval']
  header += [title for _, title in COLUMNS]
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  for row in rows:
    interval = row.get('mean_auc_t_interval')
    cells = [row['objective'], str(len(row['seeds']))]
    cells.append(
      '—' if interval is None else f'[{interval[0]:.3f}, {interval[1]:.3f}]'
    )
    cells += [results_tables.cell(row[key], key) for key, _ in COLUMNS]
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def main(argv):
  cli.no_arguments(argv)
  unknown = set(flags.FLAGS.variants) - set(LABELS)
  if unknown:
    raise app.UsageError(
      f'--variants names {sorted(unknown)}; choose among {sorted(LABELS)}.'
    )
  out = os.path.abspath(flags.FLAGS.out)
  tfds_dir = os.path.join(out, 'tfds')
  seeds = [int(s) for s in flags.FLAGS.seeds]
  specs = [(v, s) for s in seeds for v in flags.FLAGS.variants]
  start = time.time()
  if flags.FLAGS.train:
    prepare(flags.FLAGS.data_dir, tfds_dir, flags.FLAGS.variants[0])
  jobs = []
  for variant, seed in specs:
    workdir = os.path.join(out, run_name(variant, seed))
    jobs.append(
      (
        workdir,
        train_command(
          variant,
          seed,
          workdir,
          data_dir=flags.FLAGS.data_dir,
          tfds_dir=tfds_dir,
          epochs=flags.FLAGS.epochs,
          overrides=tuple(flags.FLAGS.override),
        ),
      )
    )
  if flags.FLAGS.train:
    runs.train_all(jobs, flags.FLAGS.parallel)
  records = []
  for variant, seed in specs:
    workdir = os.path.join(out, run_name(variant, seed))
    records.append(
      run_record(
        variant, seed, workdir, evaluate(workdir, flags.FLAGS.reevaluate)
      )
    )
    logging.info('%s', json.dumps(records[-1]))
  rows = aggregate(records)
  machine = results_tables.machine_info()
  wall = time.time() - start
  with open(os.path.join(out, 'table.json'), 'w') as f:
    json.dump(
      {
        'rows': rows,
        'runs': records,
        'machine': machine,
        'wall_seconds_this_invocation': wall,
        'argv': sys.argv,
      },
      f,
      indent=2,
    )
  table = markdown_table(rows)
  with open(os.path.join(out, 'table.md'), 'w') as f:
    f.write(table)
  print(table, flush=True)
  if flags.FLAGS.figures:
    positions = [int(p) for p in flags.FLAGS.figure_positions]
    figure_dir = os.path.join(out, 'figures')
    os.makedirs(figure_dir, exist_ok=True)
    maps = {
      v: isic_figures.figure_maps(
        os.path.join(out, run_name(v, seeds[0])), positions
      )
      for v in flags.FLAGS.variants
    }
    paths = isic_figures.save_figures(maps, figure_dir, LABELS)
    curves = {
      (v, s): _training_curve(os.path.join(out, run_name(v, s)))
      for v, s in specs
    }
    best = {(r['variant'], r['seed']): r['step'] for r in records}
    paths.append(isic_figures.save_curves(curves, best, figure_dir, LABELS))
    for path in paths:
      print(path, flush=True)


if __name__ == '__main__':
  define_flags()
  cli.run(main)
