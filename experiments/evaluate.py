r"""Evaluates a training run: interventions, pixel influence, OOD accuracy.

    python -m experiments.evaluate --workdir=/tmp/pets_cpu [--split=test] \
        [--manual_dir=DIR] [--ood_manual_dir=DIR] [--tfds_data_dir=DIR] \
        [--max_examples=N]

Restores the best checkpoint of `--workdir` (see `cco_jax.evaluation` for every
definition) and writes, under `WORKDIR/evaluation/`:
  report.json              the full report (`evaluation.evaluate_checkpoint`);
  cams_<split>.png         image / mask / target contrastive map grid;
  perturbations_<split>.png  each example clean and under every intervention,
                           titled with the prediction;
  influence_map_<split>.png  the average normalised influence map beside the
                           average foreground mask.
Then prints a short summary and, as the last line, the report's path.

Data flags override the run's `config.data`. A Pets or Cats-vs-Dogs directory
other than the one a data dir was prepared from (e.g. `--ood_manual_dir` with
other Cats-vs-Dogs images, or `--manual_dir` of the spurious benchmark) is
prepared under `WORKDIR/evaluation/tfds_<hash>` instead of being refused.
"""

import json
import os

from absl import app
from absl import flags
import matplotlib.pyplot as plt  # pylint: disable=g-bad-import-order  (Agg set by figures)
import numpy as np

from cco_jax import evaluation
from cco_jax import figures

_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory of a training run.')
_SPLIT = flags.DEFINE_enum(
  'split', 'test', ['test', 'validation', 'train'], 'Split to evaluate.'
)
_MANUAL_DIR = flags.DEFINE_string(
  'manual_dir', None, 'Pets in the official layout; default: as trained.'
)
_OOD_MANUAL_DIR = flags.DEFINE_string(
  'ood_manual_dir', None, 'Cats-vs-Dogs (PetImages/); default: as trained.'
)
_TFDS_DATA_DIR = flags.DEFINE_string(
  'tfds_data_dir', None, 'TFDS data dir; default: as trained.'
)
_MAX_EXAMPLES = flags.DEFINE_integer(
  'max_examples',
  None,
  'Evaluate this many evenly spaced examples of the split '
  '(and of Cats-vs-Dogs); default: all.',
)
_NUM_FIGURE_EXAMPLES = flags.DEFINE_integer(
  'num_figure_examples', 6, 'Rows of the figures.'
)
_SEED = flags.DEFINE_integer(
  'seed',
  evaluation.DEFAULT_SEED,
  'Seed of the noise and the background donors.',
)
_NO_OOD = flags.DEFINE_bool('no_ood', False, 'Skip Cats-vs-Dogs.')
flags.mark_flags_as_required(['workdir'])


def save_perturbation_grid(
  path: str, examples: dict, names, class_names, *, normalize: bool
) -> str:
  """Rows: examples; columns: clean, then each intervention; titles: predictions."""
  columns = [('clean', 'image', 'prediction')] + [
    (name, f'image_{name}', f'prediction_{name}') for name in names
  ]
  rows = len(examples['label'])
  fig, axes = plt.subplots(
    rows, len(columns), figsize=(2.2 * len(columns), 2.3 * rows), squeeze=False
  )
  for i in range(rows):
    for j, (title, image_key, prediction_key) in enumerate(columns):
      image = evaluation.to_pixel_space(
        examples[image_key][i], normalize=normalize
      )
      axes[i, j].imshow(np.clip(image, 0, 1))
      prediction = class_names[int(examples[prediction_key][i])]
      label = class_names[int(examples['label'][i])]
      axes[i, j].set_title(
        f'{title}\npred {prediction} (label {label})', fontsize=7
      )
      axes[i, j].axis('off')
  fig.tight_layout()
  return _save(fig, path)


def save_influence_map(
  path: str, influence_map: np.ndarray, mean_mask: np.ndarray
) -> str:
  """The average normalised influence map beside the average CAM-resolution mask."""
  fig, axes = plt.subplots(1, 2, figsize=(6.4, 3))
  shown = axes[0].imshow(influence_map, cmap='magma')
  axes[0].set_title('mean normalised |K| (sum over classes)', fontsize=8)
  fig.colorbar(shown, ax=axes[0], fraction=0.046)
  shown = axes[1].imshow(mean_mask, cmap='gray', vmin=0, vmax=1)
  axes[1].set_title('mean foreground mask', fontsize=8)
  fig.colorbar(shown, ax=axes[1], fraction=0.046)
  for ax in axes:
    ax.axis('off')
  fig.tight_layout()
  return _save(fig, path)


def _save(fig, path: str) -> str:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fig.savefig(path, dpi=80)
  plt.close(fig)
  return path


def summary_lines(report: dict) -> list[str]:
  """A few human-readable lines of a report."""
  lines = [
    f'{report["workdir"]}: step {report["step"]} ({report["checkpoint"]} '
    f'checkpoint), split {report["split"]!r}, {report["count"]} examples',
    f'  accuracy {report["accuracy"]:.3f}  ce {report["ce"]:.3f}',
  ]
  for name, values in report['perturbations'].items():
    lines.append(
      f'  {name:<17} accuracy {values["accuracy"]:.3f}  '
      f'flip rate {values["flip_rate"]:.3f}'
    )
  rfs = report.get('relative_foreground_sensitivity')
  if 'relative_foreground_sensitivity' in report:
    lines.append(
      '  relative foreground sensitivity '
      + ('n/a (nothing flips)' if rfs is None else f'{rfs:.3f}')
    )
  influence = report.get('influence')
  if influence:
    share = influence['bg_share_mean']
    lines.append(
      f'  influence net {influence["net"]:.3g} fg {influence["fg"]:.3g} '
      f'bg {influence["bg"]:.3g}; background share: mean of images '
      + ('n/a' if share is None else f'{share:.3f}')
      + f', of sums {influence["bg_share_of_sums"] or 0:.3f}'
    )
  if report.get('ood'):
    lines.append(
      f'  Cats-vs-Dogs accuracy {report["ood"]["accuracy"]:.3f} '
      f'({report["ood"]["count"]} images)'
    )
  return lines


def write_outputs(
  workdir: str, result: evaluation.CheckpointEvaluation, *, normalize: bool
) -> str:
  """Writes report.json and the figures under `workdir/evaluation`; returns the
  report's path."""
  out = os.path.join(workdir, evaluation.EVALUATION_DIR)
  os.makedirs(out, exist_ok=True)
  report, ev = result.report, result.evaluation
  split = report['split']
  examples = ev.examples
  if examples:
    figures.save_cam_grid(
      os.path.join(out, f'cams_{split}.png'),
      evaluation.to_pixel_space(examples['image'], normalize=normalize),
      examples['mask'],
      examples['cams'],
      examples['label'],
      predictions=examples['prediction'],
      class_names=result.class_names,
    )
    save_perturbation_grid(
      os.path.join(out, f'perturbations_{split}.png'),
      examples,
      list(report['perturbations']),
      result.class_names,
      normalize=normalize,
    )
  if ev.influence_map is not None:
    save_influence_map(
      os.path.join(out, f'influence_map_{split}.png'),
      ev.influence_map,
      ev.mean_mask,
    )
  path = os.path.join(out, 'report.json')
  with open(path, 'w') as f:
    json.dump(report, f, indent=2)
  return path


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  workdir = _WORKDIR.value
  result = evaluation.run_checkpoint_evaluation(
    workdir,
    split=_SPLIT.value,
    manual_dir=_MANUAL_DIR.value,
    ood_manual_dir=_OOD_MANUAL_DIR.value,
    tfds_data_dir=_TFDS_DATA_DIR.value,
    num_examples=_MAX_EXAMPLES.value,
    with_ood=not _NO_OOD.value,
    seed=_SEED.value,
    keep_examples=_NUM_FIGURE_EXAMPLES.value,
  )
  normalize = evaluation.load_config(workdir).data.normalize
  path = write_outputs(workdir, result, normalize=normalize)
  print('\n'.join(summary_lines(result.report)), flush=True)
  print(path, flush=True)


if __name__ == '__main__':
  app.run(main)
