r"""The ISIC table: CE control vs ACE vs ACE + divergence, seeds, figures.

    python -m experiments.isic --out=/tmp/isic \
        --data_dir=../shared/data/isic-2017-sample

For each variant in --variants (of experiments/configs/isic.py; default the
CPU trio cpu_ce, cpu_ace, cpu) and each seed in --seeds it
  1. prepares the data once into OUT/tfds (`experiments.prepare`, images
     stored at the config's data.store_size);
  2. trains `python -m experiments.pets --config=...isic.py:VARIANT` into
     OUT/<variant>_s<seed> (log in train.log, wall time in wall_time.json),
     --parallel runs at a time, unless final_metrics.json exists (an
     unfinished run resumes from its last checkpoint);
  3. evaluates the best checkpoint (by validation accuracy) on the test split
     into OUT/<run>/evaluation/report_isic.json, unless it exists
     (--reevaluate): classification, interventions (flip rates, background
     swap), localisation (`cco_jax.evaluation`) and class-wise recall and
     balanced accuracy, clean and under background swap
     (`cco_jax.evaluation.classwise`);
  4. writes OUT/table.md and OUT/table.json (mean and sample std, ddof=1, over
     seeds) and, with --figures, OUT/figures/isic_<variant>.png: the test
     images at --figure_positions with their lesion masks and the true
     class's evidence map of the first seed's model, one colour scale shared
     by all variants.

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

from experiments import cli
from experiments import results_tables
from experiments import runs

CONFIG = 'experiments/configs/isic.py'
LABELS = {
  'cpu_ce': 'CE control',
  'cpu_ace': 'ACE',
  'cpu': 'ACE + divergence',
  'default_ce': 'CE control (ResNet-50)',
  'default_ace': 'ACE (ResNet-50)',
  'default': 'ACE + divergence (ResNet-50)',
}
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
    ['cpu_ce', 'cpu_ace', 'cpu'],
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
  config.evaluators = ('classification', 'interventions', 'localisation')
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


def run_record(variant: str, seed: int, workdir: str, report: dict) -> dict:
  """The table's numbers of one run."""
  clean = report['classwise']['clean']
  swap = report['classwise']['background_swap']
  perturbations = report['perturbations']
  record = {
    'run': run_name(variant, seed),
    'variant': variant,
    'seed': seed,
    'step': report['step'],
    'validation_accuracy': report['checkpoint_metrics'].get('eval_accuracy'),
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
  for name, value in clean['recall'].items():
    record[f'recall/{name}'] = value
  return record


COLUMNS = (
  ('accuracy', 'test acc'),
  ('balanced_accuracy', 'balanced acc'),
  *((f'recall/{c}', f'recall {c.replace("_", " ")}') for c in CLASSES),
  ('bg_share', 'bg share of influence'),
  ('background_noise_flip', 'bg-noise flip'),
  ('background_swap_flip', 'bg-swap flip'),
  ('background_swap_accuracy', 'acc, bg swapped'),
  ('background_swap_balanced_accuracy', 'balanced acc, bg swapped'),
  ('pointing_game', 'pointing game'),
  ('validation_accuracy', 'valid acc'),
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
    rows.append(row)
  return rows


def markdown_table(rows: list[dict]) -> str:
  header = ['objective', 'seeds'] + [title for _, title in COLUMNS]
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  for row in rows:
    cells = [row['objective'], str(len(row['seeds']))]
    cells += [results_tables.cell(row[key], key) for key, _ in COLUMNS]
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def figure_maps(workdir: str, positions: list[int]) -> dict:
  """Images, pixel masks, labels, predictions and true-class evidence maps
  (`figures.evidence`) of the test positions, by the run's best checkpoint."""
  # pylint: disable=g-import-not-at-top
  from cco_jax import figures
  from cco_jax import restore
  from cco_jax.data import sources
  from cco_jax.evaluation import interventions
  from cco_jax.evaluation import report as report_lib

  run = restore.restore_model(workdir, step='best')
  scratch = os.path.join(workdir, 'evaluation')
  data = report_lib.resolved_data(run.config, None, scratch)
  test = sources.load_split_sources(data, ['test'])['test']
  reader = interventions.SplitReader(data, test, cam_size=run.cam_size)
  examples = [reader.example(p) for p in positions]
  images = np.stack([e['image'] for e in examples])
  labels = np.array([int(e['label']) for e in examples])
  logits, cams = (np.asarray(x) for x in run.predict_fn()(images))
  return {
    'image': images,
    'pixel_mask': np.stack([e['pixel_mask'] for e in examples]),
    'label': labels,
    'prediction': logits.argmax(-1),
    'map': figures.evidence(cams, labels),
    'class_names': run.class_names,
  }


def save_figures(maps: dict, out: str) -> list[str]:
  """One PNG per variant (rows: image with the lesion outline, evidence map
  of the true class), all on the colour scale of the largest |map|."""
  # pylint: disable=g-import-not-at-top
  from cco_jax import figures

  plt = figures.plt
  limit = max(float(np.abs(m['map']).max()) for m in maps.values()) or 1.0
  paths = []
  for variant, m in maps.items():
    count = len(m['label'])
    fig, axes = plt.subplots(2, count, figsize=(1.45 * count + 0.8, 3.4))
    axes = np.asarray(axes).reshape(2, count)
    for i in range(count):
      image = figures.displayable(m['image'][i])
      ax = axes[0, i]
      ax.imshow(image)
      ax.contour(
        m['pixel_mask'][i], levels=[0.5], colors='yellow', linewidths=0.8
      )
      names = m['class_names']
      ax.set_title(
        f'{names[m["label"][i]][:10]}\npred {names[m["prediction"][i]][:10]}',
        fontsize=6,
      )
      ax.axis('off')
      artist = figures.overlay(axes[1, i], image, m['map'][i], limit)
      axes[1, i].contour(
        m['pixel_mask'][i], levels=[0.5], colors='black', linewidths=0.5
      )
    colorbar = fig.colorbar(
      artist, ax=axes[1].tolist(), fraction=0.02, pad=0.01
    )
    colorbar.set_label('evidence (logits per cell)', fontsize=6)
    colorbar.ax.tick_params(labelsize=6)
    fig.suptitle(
      f'{LABELS[variant]}: lesion outline (top); true-class evidence, one '
      f'colour scale for all methods ({figures.MAP_LEGEND})',
      fontsize=7,
    )
    path = os.path.join(out, f'isic_{variant}.png')
    fig.savefig(path, dpi=90, bbox_inches='tight')
    plt.close(fig)
    paths.append(path)
  return paths


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
    maps = {
      v: figure_maps(os.path.join(out, run_name(v, seeds[0])), positions)
      for v in flags.FLAGS.variants
    }
    figure_dir = os.path.join(out, 'figures')
    os.makedirs(figure_dir, exist_ok=True)
    for path in save_figures(maps, figure_dir):
      print(path, flush=True)


if __name__ == '__main__':
  define_flags()
  cli.run(main)
