"""The ISIC table's figures: evidence maps of the same test images under
every objective on one colour scale, and the validation curves. Not an entry
point (`experiments.isic` draws them)."""

from __future__ import annotations

import os

import numpy as np


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


def save_figures(maps: dict, out: str, labels: dict) -> list[str]:
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
      f'{labels[variant]}: lesion outline (top); true-class evidence, one '
      f'colour scale for all methods ({figures.MAP_LEGEND})',
      fontsize=7,
    )
    path = os.path.join(out, f'isic_{variant}.png')
    fig.savefig(path, dpi=90, bbox_inches='tight')
    plt.close(fig)
    paths.append(path)
  return paths


def save_curves(curves: dict, best: dict, out: str, labels: dict) -> str:
  """OUT/isic_curves.png: validation mean AUC against steps, one line per
  run (`curves[(variant, seed)]` = {'steps', 'mean_auc'}), one colour per
  variant, each run's chosen (best) step marked."""
  # pylint: disable=g-import-not-at-top
  from cco_jax import figures

  plt = figures.plt
  fig, ax = plt.subplots(figsize=(7.5, 4.2))
  variants = list(dict.fromkeys(v for v, _ in curves))
  colours = plt.get_cmap('tab10')
  for (variant, seed), curve in curves.items():
    colour = colours(variants.index(variant) % 10)
    first = seed == min(s for v, s in curves if v == variant)
    ax.plot(
      curve['steps'],
      curve['mean_auc'],
      color=colour,
      lw=1.0,
      alpha=0.8,
      label=labels.get(variant, variant) if first else None,
    )
    step = best.get((variant, seed))
    if step in curve['steps']:
      value = curve['mean_auc'][curve['steps'].index(step)]
      ax.plot([step], [value], 'o', color=colour, ms=4)
  ax.set_xlabel('training step')
  ax.set_ylabel('validation mean AUC (2 tasks)')
  ax.set_title(
    'Validation mean AUC of every run (dot: the chosen checkpoint)', fontsize=9
  )
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc='lower right')
  path = os.path.join(out, 'isic_curves.png')
  fig.savefig(path, dpi=100, bbox_inches='tight')
  plt.close(fig)
  return path
