"""The figures of a training run: a CAM grid of validation examples and the
learning curves, written at evaluations (`train.Run.save_figures` runs the
prediction on every process; the chief draws here)."""

from __future__ import annotations

from etils import epath
import numpy as np

from cco_jax import figures
from cco_jax import metric_writers


def save(
  figure_dir: epath.Path,
  workdir: epath.Path,
  writer,
  batch: dict,
  logits,
  cams,
  *,
  class_names,
  num_examples: int,
  step: int,
) -> None:
  """Writes `cams_step_<step>.png` (up to `num_examples` real examples of the
  stacked validation `batch`, spread over the classes; also to TensorBoard as
  'validation_cams') and `learning_curves.png` from metrics.jsonl."""
  flat = lambda x: np.asarray(x).reshape((-1,) + np.shape(x)[2:])
  real = np.flatnonzero(flat(batch['weight']) > 0)
  chosen = real[
    figures.examples_per_class(flat(batch['label'])[real], num_examples)
  ]
  pick = lambda x: flat(x)[chosen]
  grid = figures.save_cam_grid(
    str(figure_dir / f'cams_step_{step:07d}.png'),
    pick(batch['image']),
    pick(batch['mask']),
    pick(cams),
    pick(batch['label']),
    predictions=pick(logits).argmax(-1),
    class_names=class_names,
    step=step,
  )
  writer.write_image('validation_cams', grid, step)
  figures.save_learning_curves(
    str(figure_dir / 'learning_curves.png'),
    metric_writers.read_metrics(workdir),
  )
