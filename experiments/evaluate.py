r"""Evaluates one checkpoint of a training run.

    python -m experiments.evaluate --workdir=/tmp/pets_cpu [--split=test] \
        [--step=best|last|N] [--evaluators=classification,...] \
        [--manual_dir=DIR] [--ood_manual_dir=DIR] [--tfds_data_dir=DIR] \
        [--max_examples=N]

Restores the checkpoint (default: the best by validation accuracy; the step
used is printed), runs the evaluators of `cco_jax.evaluation` (accuracy,
context contribution, per-group and worst-group accuracy, interventions and
RFS, pointing game and top-20% IoU, deletion / insertion AUC of our maps and
of Grad-CAM; see each function's docstring for its definition and source)
and writes, under `WORKDIR/evaluation/`:
  report_<step>.json               the full report (one file per step;
                                   every key: docs/evaluation_report.md);
  report_<step>.html               one self-contained page: tables and
                                   figures (`cco_jax.html_report`);
  cams_<split>_<step>.png          examples of every class with their maps;
  perturbations_<split>_<step>.png each example under every intervention;
  influence_map_<split>_<step>.png where the evidence lies on average.
The figures also go to TensorBoard's Images tab
(`figures/evaluation/<name>_<split>`). Then prints a short summary and, as the
last line, the report's path.

Data flags override the run's `config.data`. A Pets or Cats-vs-Dogs directory
other than the one a data dir was prepared from is prepared under
`WORKDIR/evaluation/tfds_<hash>` instead of being refused.
"""

import math
import os
import textwrap

from absl import flags
import matplotlib.pyplot as plt  # pylint: disable=g-bad-import-order  (Agg set by figures)
import numpy as np

from cco_jax import errors
from cco_jax import evaluation
from cco_jax import figures
from cco_jax import html_report
from cco_jax import metric_writers
from experiments import cli


def define_flags() -> None:
  """The entry point's flags (defined only when run, so that tests can import
  several entry points)."""
  cli.define_workdir_flag()
  cli.define_step_flag()
  flags.DEFINE_enum(
    'split', 'test', ['test', 'validation', 'train'], 'Split to evaluate.'
  )
  flags.DEFINE_list(
    'evaluators',
    list(evaluation.default_config().evaluators),
    f'Which evaluators run, from {sorted(evaluation.EVALUATORS)}.',
  )
  flags.DEFINE_string(
    'manual_dir', None, 'The dataset in its layout; default: as trained.'
  )
  flags.DEFINE_string(
    'ood_manual_dir', None, 'Cats-vs-Dogs (PetImages/); default: as trained.'
  )
  flags.DEFINE_string(
    'tfds_data_dir', None, 'TFDS data dir; default: as trained.'
  )
  flags.DEFINE_integer(
    'max_examples', 0, 'Evaluate this many evenly spaced examples (0 = all).'
  )
  flags.DEFINE_integer('num_figure_examples', 6, 'Rows of the figures.')
  flags.DEFINE_integer(
    'seed', 0, 'Seed of the noise and the background donors.'
  )
  flags.DEFINE_bool('no_ood', False, 'Skip Cats-vs-Dogs.')


def save_perturbation_grid(
  path: str, examples: dict, names, class_names, *, normalize: bool
) -> str:
  """Rows: examples; columns: clean, then each intervention; titles: what the
  model predicts."""
  columns = [('original', 'image', 'prediction')] + [
    (name.replace('_', ' '), f'image_{name}', f'prediction_{name}')
    for name in names
    if f'image_{name}' in examples
  ]
  rows = len(examples['label'])
  fig, axes = plt.subplots(
    rows, len(columns), figsize=(2.2 * len(columns), 2.6 * rows), squeeze=False
  )
  for i in range(rows):
    for j, (title, image_key, prediction_key) in enumerate(columns):
      image = evaluation.to_pixel_space(
        examples[image_key][i], normalize=normalize
      )
      axes[i, j].imshow(np.clip(image, 0, 1))
      prediction = class_names[int(examples[prediction_key][i])]
      label = class_names[int(examples['label'][i])]
      axes[i, j].set_title(  # Wrapped: long class names must not overlap.
        '\n'.join(
          [title]
          + textwrap.wrap(f'says {prediction}', 24)
          + textwrap.wrap(f'(true {label})', 24)
        ),
        fontsize=7,
      )
      axes[i, j].axis('off')
  fig.suptitle('What the model predicts when a region is changed', fontsize=9)
  fig.tight_layout()
  return figures._save(fig, path)  # pylint: disable=protected-access


def _undefined(value) -> bool:
  """NaN in a report in memory, None once written as JSON."""
  return value is None or (isinstance(value, float) and math.isnan(value))


def _fmt(value, spec='.3f') -> str:
  return 'n/a' if _undefined(value) else format(value, spec)


def summary_lines(report: dict) -> list[str]:
  """A few human-readable lines of a report."""
  lines = [
    f'{report["workdir"]}: step {report["step"]} ({report["checkpoint"]} '
    f'checkpoint), split {report["split"]!r}, {report.get("count")} examples'
  ]
  if 'accuracy' in report:
    lines.append(
      f'  accuracy {report["accuracy"]:.3f}  ce {report["ce"]:.3f}  '
      f'background share of evidence {_fmt(report.get("bg_share"))}'
    )
  per_class = report.get('per_class')
  if per_class:
    recalls = ', '.join(
      f'{name} {_fmt(r, ".3f")}' for name, r in per_class['recall'].items()
    )
    lines.append(
      f'  balanced accuracy {_fmt(per_class["balanced_accuracy"])}; '
      f'per-class accuracy: {recalls}'
      if len(per_class['recall']) <= 12
      else f'  balanced accuracy {_fmt(per_class["balanced_accuracy"])} '
      f'({len(per_class["recall"])} classes: per_class in the report)'
    )
  scores = report.get('auc')
  if scores:
    interval = scores.get('mean_auc_interval')
    tasks = ', '.join(
      f'{task} {_fmt(t["auc"])}'
      # Undefined (NaN, None in the JSON) where a split lacks one side.
      + (
        f' ({t["num_positives"]} positive, {t["num_negatives"]} negative '
        'images)'
        if _undefined(t['auc'])
        else ''
      )
      for task, t in scores['tasks'].items()
    )
    lines.append(
      f'  mean AUC {_fmt(scores["mean_auc"])}'
      + (f' [{_fmt(interval[0])}, {_fmt(interval[1])}]' if interval else '')
      + f'; AUC per task: {tasks}'
    )
  if 'worst_group_accuracy' in report:
    lines.append(
      f'  worst-group accuracy {report["worst_group_accuracy"]:.3f} '
      f'({report["worst_group"]}), average-group '
      f'{report["average_group_accuracy"]:.3f}'
    )
  for name, values in report.get('perturbations', {}).items():
    lines.append(
      f'  {name:<17} accuracy {values["accuracy"]:.3f}  '
      f'flip rate {values["flip_rate"]:.3f}'
    )
  if 'relative_foreground_sensitivity' in report:
    lines.append(
      '  relative foreground sensitivity '
      + _fmt(report['relative_foreground_sensitivity'])
    )
  if 'pointing_game' in report:
    iou = next((k for k in report if k.startswith('top_')), None)
    lines.append(
      f'  pointing game {_fmt(report["pointing_game"])}  '
      f'{iou} {_fmt(report.get(iou))}'
    )
  for name, values in (report.get('deletion_insertion') or {}).items():
    lines.append(
      f'  {name:<9} deletion AUC {values["deletion_auc"]:.3f}  '
      f'insertion AUC {values["insertion_auc"]:.3f}'
    )
  if report.get('ood'):
    lines.append(
      f'  Cats-vs-Dogs accuracy {report["ood"]["accuracy"]:.3f} '
      f'({report["ood"]["count"]} images)'
    )
  elif report.get('ood_note'):
    lines.append(f'  {report["ood_note"]}')
  return lines


def write_outputs(workdir: str, result) -> str:
  """Writes the report and figures under `workdir/evaluation`; returns the
  report's path."""
  report, arrays = result.report, result.arrays
  out = os.path.join(workdir, evaluation.EVALUATION_DIR)
  tag = f'{report["split"]}_{report["step"]}'
  examples = arrays.get('examples') or {}
  names = list(result.class_names)
  if 'cams' in examples:
    figures.save_cam_grid(
      os.path.join(out, f'cams_{tag}.png'),
      evaluation.to_pixel_space(examples['image'], normalize=result.normalize),
      examples['mask'],
      examples['cams'],
      examples['label'],
      predictions=examples['prediction'],
      class_names=names,
      step=report['step'],
    )
  if any(k.startswith('image_') for k in examples):
    save_perturbation_grid(
      os.path.join(out, f'perturbations_{tag}.png'),
      examples,
      list(report.get('perturbations', {})),
      names,
      normalize=result.normalize,
    )
  if arrays.get('influence_map') is not None:
    figures.save_average_influence(
      os.path.join(out, f'influence_map_{tag}.png'),
      arrays['influence_map'],
      arrays['mean_mask'],
    )
  _to_tensorboard(workdir, out, tag, report['step'])
  path = evaluation.write_report(workdir, report)
  html_report.write(
    os.path.splitext(path)[0] + '.html',
    html_report.evaluation_page(
      report,
      {
        'Examples of every class and where the model finds evidence': (
          os.path.join(out, f'cams_{tag}.png')
        ),
        'What the model predicts when a region is changed': os.path.join(
          out, f'perturbations_{tag}.png'
        ),
        'Where the evidence lies on average': os.path.join(
          out, f'influence_map_{tag}.png'
        ),
      },
    ),
  )
  return path


def _to_tensorboard(workdir: str, out: str, tag: str, step: int) -> None:
  """The evaluation's figures, also in TensorBoard's Images tab
  (`figures/evaluation/<name>_<split>`, at the checkpoint's step)."""
  writer = metric_writers.MetricWriter(workdir)
  try:
    for name in ('cams', 'perturbations', 'influence_map'):
      path = os.path.join(out, f'{name}_{tag}.png')
      if os.path.exists(path):
        split = tag.rsplit('_', 1)[0]
        writer.write_image(f'evaluation/{name}_{split}', path, step)
  finally:
    writer.close()


def main(argv):
  cli.no_arguments(argv)
  f = flags.FLAGS
  unknown = [n for n in f.evaluators if n not in evaluation.EVALUATORS]
  if unknown:  # Before the checkpoint and the data are opened.
    raise errors.UserError(
      f'--evaluators: unknown {unknown}; choose from '
      f'{sorted(evaluation.EVALUATORS)} (comma-separated).'
    )
  config = evaluation.default_config()
  config.split = f.split
  config.evaluators = tuple(f.evaluators)
  config.num_examples = f.max_examples
  config.seed = f.seed
  config.ood = not f.no_ood
  config.keep_examples = f.num_figure_examples
  result = evaluation.evaluate_checkpoint(
    f.workdir,
    config,
    step=f.step,
    data_overrides={
      'manual_dir': f.manual_dir,
      'tfds_data_dir': f.tfds_data_dir,
    },
    ood_overrides={
      'ood_manual_dir': f.ood_manual_dir,
      'tfds_data_dir': f.tfds_data_dir,
    },
  )
  print(
    f'Evaluated step {result.report["step"]} '
    f'({result.report["checkpoint"]} checkpoint).',
    flush=True,
  )
  path = write_outputs(f.workdir, result)
  print('\n'.join(summary_lines(result.report)), flush=True)
  print(f'  page: {os.path.splitext(path)[0]}.html', flush=True)
  print(path, flush=True)


if __name__ == '__main__':
  define_flags()
  cli.run(main)
