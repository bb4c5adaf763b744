"""PNG figures: learning curves and image / mask / contrastive-map grids.

The grid is the seed's "before/after" picture: each row shows an image, its
foreground mask, and the target class's contrastive map
`M_y - mean_{c != y} M_c` (for two classes exactly `K[..., other]`), which is
positive where the pixel argues for the label. Uses matplotlib's Agg backend.
"""

from __future__ import annotations

import os

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np


def target_contrast(cams: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """`(B, H, W)`: the label's map minus the mean of the other classes' maps."""
  cams = np.asarray(cams, np.float32)
  num_classes = cams.shape[-1]
  target = np.take_along_axis(cams, labels[:, None, None, None], -1)[..., 0]
  others = (cams.sum(-1) - target) / max(num_classes - 1, 1)
  return target - others


def save_cam_grid(
  path: str, images, masks, cams, labels, predictions=None, class_names=None
) -> str:
  """Writes a grid (rows: examples; columns: image, mask, contrastive map)."""
  images, masks = np.asarray(images), np.asarray(masks)
  labels = np.asarray(labels)
  contrast = target_contrast(cams, labels)
  rows = len(images)
  fig, axes = plt.subplots(rows, 3, figsize=(7.5, 2.4 * rows), squeeze=False)
  for i in range(rows):
    image = (
      np.clip(images[i], 0, 1)
      if images[i].min() >= 0
      else ((images[i] - images[i].min()) / (np.ptp(images[i]) + 1e-8))
    )
    name = class_names[labels[i]] if class_names else str(labels[i])
    title = f'label {name}'
    if predictions is not None:
      pred = class_names[predictions[i]] if class_names else str(predictions[i])
      title += f' / pred {pred}'
    axes[i, 0].imshow(image)
    axes[i, 0].set_title(title, fontsize=8)
    axes[i, 1].imshow(masks[i], cmap='gray', vmin=0, vmax=1)
    axes[i, 1].set_title('foreground mask', fontsize=8)
    limit = float(np.abs(contrast[i]).max()) or 1.0
    shown = axes[i, 2].imshow(
      contrast[i], cmap='RdBu_r', vmin=-limit, vmax=limit
    )
    axes[i, 2].set_title('target contrastive map', fontsize=8)
    fig.colorbar(shown, ax=axes[i, 2], fraction=0.046)
    for ax in axes[i]:
      ax.axis('off')
  fig.tight_layout()
  return _save(fig, path)


def save_learning_curves(
  path: str,
  records: list[dict],
  keys=(
    'train_loss',
    'train_accuracy',
    'eval_accuracy',
    'eval_ce',
    'eval_bg_share',
  ),
) -> str:
  """Plots each key present in the metric records against the step."""
  present = [k for k in keys if any(k in r for r in records)]
  fig, axes = plt.subplots(
    1,
    max(len(present), 1),
    figsize=(3.6 * max(len(present), 1), 3),
    squeeze=False,
  )
  for ax, key in zip(axes[0], present):
    points = [(r['step'], r[key]) for r in records if key in r]
    steps, values = zip(*points)
    ax.plot(steps, values, marker='.' if len(points) < 50 else None)
    ax.set_title(key, fontsize=9)
    ax.set_xlabel('step')
    ax.grid(alpha=0.3)
  fig.tight_layout()
  return _save(fig, path)


def _save(fig, path: str) -> str:
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  fig.savefig(path, dpi=80)
  plt.close(fig)
  return path
