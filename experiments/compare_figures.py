"""The figures of `experiments.compare`: training curves and the maps of
minority-group test images. Not an entry point."""

from __future__ import annotations

import os

import numpy as np

from experiments import compare_runs


def save_curves(path: str, records: list[dict], correlation: float) -> None:
  """Training loss against step, mean over seeds, one line per variant."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, (ax, linear) = plt.subplots(1, 2, figsize=(11, 4.2))
  names = compare_runs.labels()
  for variant in names:
    curves = [
      dict(r['loss_curve'])
      for r in records
      if r['correlation'] == correlation and r['variant'] == variant
    ]
    if not curves:
      continue
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    mean = [np.mean([c[s] for c in curves]) for s in steps]
    ax.plot(steps, mean, label=names[variant])
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
    for group in compare_runs.benchmark().MINORITY_GROUPS
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
