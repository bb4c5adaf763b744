"""PNG figures people can read: maps overlaid on images, learning curves.

A map shown for class `c` is its evidence against the other classes,
`E_c = M_c - mean_{c' != c} M_{c'}` (for two classes exactly the contrastive
map `K`, docs/method.md §8): red pixels raise the probability of `c`, blue
pixels lower it, white pixels do not matter. Maps are upsampled bilinearly
to the image and drawn over a grey copy of it; every figure uses ONE colour
scale, symmetric around 0, for all its maps, so their colours compare.
Uses matplotlib's Agg backend.
"""

from __future__ import annotations

from collections.abc import Sequence
import io

from etils import epath
import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import matplotlib.ticker  # pylint: disable=g-import-not-at-top
import numpy as np
from PIL import Image

CMAP = 'RdBu_r'
MAP_LEGEND = 'red: argues for the class  |  blue: against'


def evidence(cams: np.ndarray, classes) -> np.ndarray:
  """`(B, h, w)`: `M_c - mean_{c' != c} M_{c'}` for each image's class `c`.

  Args:
    cams: `(B, h, w, C)` HiResCAMs.
    classes: `(B,)` ints (or one int for all).
  """
  cams = np.asarray(cams, np.float32)
  classes = np.broadcast_to(np.asarray(classes), cams.shape[:1])
  num_classes = cams.shape[-1]
  target = np.take_along_axis(cams, classes[:, None, None, None], -1)[..., 0]
  others = (cams.sum(-1) - target) / max(num_classes - 1, 1)
  return target - others


target_contrast = evidence  # The name the training loop uses.


def displayable(image: np.ndarray) -> np.ndarray:
  """An `(S, S, 3)` image in [0, 1]: clipped, or min-max scaled if normalised."""
  image = np.asarray(image, np.float32)
  if image.min() >= 0 and image.max() <= 1:
    return image
  return (image - image.min()) / (np.ptp(image) + 1e-8)


def upsample(cam_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """`(h, w)` -> `(S, S)` bilinear (the map at image resolution)."""
  image = Image.fromarray(np.asarray(cam_map, np.float32), mode='F')
  return np.asarray(image.resize((size[1], size[0]), Image.Resampling.BILINEAR))


def overlay(ax, image: np.ndarray, cam_map: np.ndarray, limit: float):
  """Draws `cam_map` over a grey copy of `image` on `ax`; returns the map's
  artist (for a colour bar)."""
  image = displayable(image)
  grey = image.mean(-1)
  ax.imshow(grey, cmap='gray', vmin=0, vmax=1)
  shown = ax.imshow(
    upsample(cam_map, image.shape[:2]),
    cmap=CMAP,
    vmin=-limit,
    vmax=limit,
    alpha=0.6,
  )
  ax.set_xticks([])
  ax.set_yticks([])
  return shown


def outlined(ax, image: np.ndarray, mask: np.ndarray, title: str) -> None:
  """Draws `image` on `ax` with its object's outline (the 0.5 contour of the
  `(h, w)` mask, upsampled) in yellow, titled, without axes."""
  ax.imshow(displayable(image))
  ax.contour(
    upsample(mask, image.shape[:2]),
    levels=[0.5],
    colors='yellow',
    linewidths=0.8,
  )
  ax.set_title(title, fontsize=7)
  ax.axis('off')


def _evidence_colorbar(colorbar) -> None:
  """The label and ticks of an evidence colour bar: two significant digits
  (0.015, -0.005, 0; not -0.00, -0.01, -0.01 for small maps)."""
  colorbar.set_label('evidence (logit units per map cell)', fontsize=7)
  colorbar.ax.yaxis.set_major_formatter(
    matplotlib.ticker.FuncFormatter(lambda value, _: f'{value:.2g}')
  )
  colorbar.ax.tick_params(labelsize=6)


def _limit(maps) -> float:
  return float(max(np.abs(np.asarray(m)).max() for m in maps)) or 1.0


def save_explanation(
  path: str,
  image: np.ndarray,
  cams: np.ndarray,
  probabilities: np.ndarray,
  *,
  target: int,
  class_names: Sequence[str],
  true_class: str | None = None,
  panels: int | Sequence[int] = 3,
  subtitle: str = '',
) -> str:
  """One image explained: the evidence map of `target` large, and small
  panels for the `panels` most probable classes, all on one colour scale.

  Args:
    path: the PNG to write.
    image: `(S, S, 3)` in [0, 1] (normalised images are rescaled).
    cams: `(h, w, C)` the image's HiResCAMs.
    probabilities: `(C,)`.
    target: the class of the large map (usually the predicted one).
    class_names: the names of the C classes.
    true_class: the true class's name if known.
    panels: how many of the most probable classes get a small panel, or
      the classes to show.
    subtitle: an extra line under the title (e.g. the checkpoint).
  """
  probabilities = np.asarray(probabilities)
  if isinstance(panels, int):
    top = list(np.argsort(-probabilities)[: min(panels, len(probabilities))])
  else:
    top = [int(c) for c in panels]
  shown_classes = [target] + top
  maps = evidence(np.repeat(cams[None], len(shown_classes), 0), shown_classes)
  limit = _limit(maps)
  fig = plt.figure(figsize=(7.2, 4.6))
  grid = fig.add_gridspec(len(top), 3, width_ratios=(1, 2.2, 0.9))
  ax = fig.add_subplot(grid[:, 0])
  ax.imshow(displayable(image))
  ax.set_title('image', fontsize=9)
  ax.axis('off')
  ax = fig.add_subplot(grid[:, 1])
  artist = overlay(ax, image, maps[0], limit)
  name = class_names[target]
  title = f'predicted {name} ({probabilities[target]:.0%})'
  if true_class is not None:
    title += f'; true class {true_class}'
  ax.set_title(f'{title}\nwhere the image argues for {name}', fontsize=9)
  _evidence_colorbar(fig.colorbar(artist, ax=ax, fraction=0.046, pad=0.02))
  for row, c in enumerate(top):
    ax = fig.add_subplot(grid[row, 2])
    overlay(ax, image, maps[row + 1], limit)
    ax.set_title(f'{class_names[c]} {probabilities[c]:.0%}', fontsize=7)
  fig.suptitle(MAP_LEGEND + (f'\n{subtitle}' if subtitle else ''), fontsize=7)
  fig.tight_layout()
  return _save(fig, path)


def examples_per_class(labels: np.ndarray, count: int) -> np.ndarray:
  """Indices of up to `count` examples, round-robin over the classes present,
  so that every class shows up before any class shows twice."""
  labels = np.asarray(labels).reshape(-1)
  by_class = [list(np.flatnonzero(labels == c)) for c in np.unique(labels)]
  chosen = []
  while len(chosen) < count and any(by_class):
    for members in by_class:
      if members and len(chosen) < count:
        chosen.append(members.pop(0))
  return np.asarray(chosen, np.int64)


def save_cam_grid(
  path: str,
  images,
  masks,
  cams,
  labels,
  predictions=None,
  class_names=None,
  *,
  step: int | None = None,
) -> str:
  """A grid of examples: image with its object outline, and the evidence map
  of the true class over it; one colour scale for the whole figure.

  Args:
    images: `(N, S, S, 3)`; masks: `(N, h, w)` foreground at CAM resolution;
    cams: `(N, h, w, C)`; labels, predictions: `(N,)` ints.
    class_names: names of the classes (default: the indices).
    step: the training step, for the title.
  """
  images, masks = np.asarray(images), np.asarray(masks)
  labels = np.asarray(labels)
  names = class_names or [str(c) for c in range(np.shape(cams)[-1])]
  maps = evidence(cams, labels)
  limit = _limit(maps)
  rows = len(images)
  fig, axes = plt.subplots(rows, 2, figsize=(5.6, 2.5 * rows + 0.6))
  axes = np.asarray(axes).reshape(rows, 2)
  artist = None
  for i in range(rows):
    title = f'true: {names[labels[i]]}'
    if predictions is not None:
      title += f', predicted: {names[predictions[i]]}'
    outlined(axes[i, 0], images[i], masks[i], title + '\n(object outlined)')
    artist = overlay(axes[i, 1], images[i], maps[i], limit)
    axes[i, 1].set_title(f'what argues for {names[labels[i]]}', fontsize=7)
  heading = 'Where the model finds evidence for the true class'
  if step is not None:
    heading += f' (step {step})'
  fig.suptitle(f'{heading}\n{MAP_LEGEND}', fontsize=8)
  fig.tight_layout(rect=(0, 0, 0.86, 1))
  _evidence_colorbar(
    fig.colorbar(artist, cax=fig.add_axes((0.88, 0.3, 0.03, 0.4)))
  )
  return _save(fig, path)


def save_method_comparison(
  path: str,
  images,
  masks,
  labels,
  cams_by_method: dict,
  predictions_by_method: dict,
  class_names=None,
  *,
  title: str = '',
) -> str:
  """The same images explained by several models, ONE colour scale for all.

  Args:
    images: `(N, S, S, 3)`; masks: `(N, h, w)` foreground at CAM resolution;
    labels: `(N,)` ints.
    cams_by_method: {method: `(N, h, w, C)` HiResCAMs}, one column each.
    predictions_by_method: {method: `(N,)` predicted classes}.
    class_names: names of the classes (default: the indices).
    title: a first heading line.
  """
  images, masks, labels = map(np.asarray, (images, masks, labels))
  methods = list(cams_by_method)
  maps = {m: evidence(cams_by_method[m], labels) for m in methods}
  limit = _limit(list(maps.values()))
  names = class_names or [
    str(c) for c in range(np.shape(cams_by_method[methods[0]])[-1])
  ]
  rows, cols = len(images), len(methods) + 1
  fig, axes = plt.subplots(rows, cols, figsize=(2.3 * cols, 2.3 * rows + 0.8))
  axes = np.asarray(axes).reshape(rows, cols)
  artist = None
  for i in range(rows):
    outlined(axes[i, 0], images[i], masks[i], f'true: {names[labels[i]]}')
    for j, method in enumerate(methods, 1):
      artist = overlay(axes[i, j], images[i], maps[method][i], limit)
      predicted = names[int(predictions_by_method[method][i])]
      axes[i, j].set_title(f'{method}\npredicts {predicted}', fontsize=7)
  fig.suptitle(
    f'{title}\nevidence for the true class; {MAP_LEGEND}', fontsize=8
  )
  fig.tight_layout(rect=(0, 0, 0.9, 1))
  _evidence_colorbar(
    fig.colorbar(artist, cax=fig.add_axes((0.92, 0.3, 0.02, 0.4)))
  )
  return _save(fig, path)


def save_average_influence(
  path: str, influence_map: np.ndarray, mean_mask: np.ndarray
) -> str:
  """Where the evidence lies on average, beside where the objects lie."""
  fig, axes = plt.subplots(1, 2, figsize=(6.6, 3.2))
  shown = axes[0].imshow(influence_map, cmap='magma', vmin=0)
  axes[0].set_title(
    'share of all evidence per map cell\n(averaged over images)', fontsize=8
  )
  fig.colorbar(shown, ax=axes[0], fraction=0.046)
  shown = axes[1].imshow(mean_mask, cmap='gray', vmin=0, vmax=1)
  axes[1].set_title('how often the object covers\neach map cell', fontsize=8)
  fig.colorbar(shown, ax=axes[1], fraction=0.046)
  for ax in axes:
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
    'eval_mean_auc',
    'eval_ce',
    'eval_bg_share',
  ),
) -> str:
  """Plots each key present in the metric records against the step."""
  titles = {
    'train_loss': 'training loss',
    'train_accuracy': 'training accuracy',
    'eval_accuracy': 'validation accuracy',
    'eval_mean_auc': 'validation mean AUC',
    'eval_ce': 'validation cross-entropy',
    'eval_bg_share': 'share of evidence on the background\n(validation)',
  }
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
    ax.set_title(titles.get(key, key), fontsize=9)
    ax.set_xlabel('step')
    ax.grid(alpha=0.3)
  fig.tight_layout()
  return _save(fig, path)


def _save(fig, path: str) -> str:
  """Writes the PNG through `etils.epath` (local disks and object stores)."""
  target = epath.Path(path)
  target.parent.mkdir(parents=True, exist_ok=True)
  buffer = io.BytesIO()
  # 'tight': the saved area grows to every label (colour bars placed beside
  # the tight layout, long titles) instead of clipping them.
  fig.savefig(buffer, format='png', dpi=90, bbox_inches='tight', pad_inches=0.1)
  plt.close(fig)
  target.write_bytes(buffer.getvalue())
  return path
