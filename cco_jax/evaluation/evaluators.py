"""Evaluators: one interface, registered in one place.

Each evaluator is `Evaluator(predict_fn, **cfg)` whose `run(batches)` yields
`(name, value)` pairs (big_vision's `evaluators/` style). `predict_fn` maps
images `(B, S, S, 3)` to `(logits (B, C), cams (B, h, w, C))` on host arrays;
`batches` are flat evaluation batches (`image`, `mask`, `pixel_mask`,
`label`, `group`, `weight`, `index`, leading axis B; weight 0 = padding or
not selected). The evaluation config lists which evaluators run
(`EVALUATORS`):

  classification      accuracy, cross-entropy, pixel influence (context
                      contribution), identity error, per-group / worst-group /
                      average-group accuracy (`metrics.batch_sums`);
  interventions       accuracy and flip rate under each intervention, RFS;
  localisation        pointing game and top-k% IoU of the true class's map;
  deletion_insertion  deletion / insertion AUC of the predicted class's map
                      and of Grad-CAM at the same layer;
  per_example         each example's label, group, prediction, probabilities;
  auc                 ROC AUC per binary task (class vs rest) and their mean,
                      bootstrap intervals, sensitivity at 0.8 / 0.9
                      specificity, balanced accuracy, confusion matrix
                      (`auc.py`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import jax
import numpy as np
from scipy import special

from cco_jax import cams as cams_lib
from cco_jax import explain
from cco_jax import metrics
from cco_jax.evaluation import auc
from cco_jax.evaluation import interventions

Batch = dict[str, np.ndarray]
PredictFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
Named = Iterator[tuple[str, Any]]

_batch_sums = jax.jit(metrics.batch_sums, static_argnames='num_groups')


class _Keeper:
  """Keeps the arrays of up to `count` real examples for figures, spread over
  the classes: once full, an example of a class not shown yet replaces one of
  a class shown more than once (rows sorted by class)."""

  def __init__(self, count: int):
    self.count, self.kept = count, []

  def add(self, weight: np.ndarray, labels: np.ndarray, fields: dict) -> None:
    if not self.count:
      return
    for i in np.flatnonzero(weight > 0):
      label = int(labels[i])
      shown = [int(row['label']) for row in self.kept]
      row = {k: np.asarray(v)[i] for k, v in fields.items()}
      if len(self.kept) < self.count:
        self.kept.append(row)
      elif label not in shown:
        repeated = [j for j, c in enumerate(shown) if shown.count(c) > 1]
        if repeated:
          self.kept[repeated[-1]] = row
    self.kept.sort(key=lambda row: int(row['label']))

  def arrays(self) -> dict:
    if not self.kept:
      return {}
    return {k: np.stack([row[k] for row in self.kept]) for k in self.kept[0]}


class Evaluator:
  """The interface: `Evaluator(predict_fn, **cfg).run(batches)` yields
  `(name, value)`."""

  def __init__(self, predict_fn: PredictFn, **cfg):
    self.predict_fn = predict_fn
    self.cfg = cfg

  def run(self, batches: Iterable[Batch]) -> Named:
    raise NotImplementedError


class ClassificationEvaluator(Evaluator):
  """Accuracy, ce, influence, identity and group accuracies.

  cfg: `bias` `(C,)` head bias (None = none); `group_names` (None = no
  groups); `keep_examples` arrays to keep for figures (yielded as
  `examples`: image, pixel_mask, mask, label, cams, prediction).

  Yields `metrics.summarise`'s names plus `bg_share_mean` (mean over images
  of bg / net), `num_images_without_influence`, `influence_map` `(h, w)`
  (mean over images of `sum_c |K| / sum |K|`) and `mean_mask` `(h, w)`.
  """

  def run(self, batches):
    bias = self.cfg.get('bias')
    names = self.cfg.get('group_names')
    keeper = _Keeper(self.cfg.get('keep_examples', 0))
    totals, share, share_count, share_map, mask_sum = None, 0.0, 0.0, 0.0, 0.0
    for batch in batches:
      logits, cams = (np.asarray(x) for x in self.predict_fn(batch['image']))
      weight = np.asarray(batch['weight'], np.float32)
      sums = _batch_sums(
        logits,
        cams,
        batch['label'],
        batch['mask'],
        weight,
        bias=bias,
        group=batch.get('group') if names else None,
        num_groups=len(names) if names else None,
      )
      totals = metrics.accumulate(totals, jax.device_get(sums))
      contrastive = np.asarray(cams_lib.contrastive_cams(cams, batch['label']))
      magnitude = np.abs(contrastive.astype(np.float64)).sum(-1)
      net = magnitude.sum((1, 2))
      valid = weight * (net > 0)
      bg = (magnitude * (1 - batch['mask'])).sum((1, 2))
      share += float((valid * bg / np.maximum(net, 1e-30)).sum())
      share_count += float(valid.sum())
      share_map = share_map + np.tensordot(
        valid, magnitude / np.maximum(net, 1e-30)[:, None, None], 1
      )
      mask_sum = mask_sum + np.tensordot(weight, batch['mask'], 1)
      keeper.add(
        weight,
        batch['label'],
        {
          'image': batch['image'],
          'pixel_mask': batch['pixel_mask'],
          'mask': batch['mask'],
          'label': batch['label'],
          'cams': cams,
          'prediction': logits.argmax(-1),
        },
      )
    yield from metrics.summarise(totals, names).items()
    count = float(totals['count'])
    yield 'bg_share_mean', share / share_count if share_count else None
    yield 'num_images_without_influence', int(round(count - share_count))
    yield 'influence_map', share_map / share_count if share_count else None
    yield 'mean_mask', mask_sum / count
    if keeper.count:
      yield 'examples', keeper.arrays()


class InterventionEvaluator(Evaluator):
  """Accuracy and flip rate (share of predictions that change) under each
  intervention; RFS from the two noise interventions.

  cfg: `perturbations` names (default: all registered); `context`
  (`interventions.Context`); `keep_examples`.

  Yields `perturbations` {name: {accuracy, flip_rate, region}},
  `relative_foreground_sensitivity` (`metrics.relative_foreground_sensitivity`
  of background_noise and foreground_noise accuracy), `foreground_flip_share`
  = flip(foreground_gray) / (flip(foreground_gray) + flip(background_gray)),
  and `examples` (per intervention `image_<name>`, `prediction_<name>`).
  """

  def run(self, batches):
    names = self.cfg.get('perturbations') or list(interventions.PERTURBATIONS)
    context = self.cfg.get('context') or interventions.Context()
    keeper = _Keeper(self.cfg.get('keep_examples', 0))
    count, correct, flips = 0.0, dict.fromkeys(names, 0.0), {}
    for batch in batches:
      weight = np.asarray(batch['weight'], np.float64)
      labels = batch['label']
      clean = np.asarray(self.predict_fn(batch['image'])[0]).argmax(-1)
      count += weight.sum()
      fields = {'image': batch['image'], 'label': labels, 'prediction': clean}
      for name in names:
        images = interventions.PERTURBATIONS[name].apply(batch, context)
        predicted = np.asarray(self.predict_fn(images)[0]).argmax(-1)
        correct[name] += (weight * (predicted == labels)).sum()
        flips[name] = (
          flips.get(name, 0.0) + (weight * (predicted != clean)).sum()
        )
        fields.update(
          {f'image_{name}': images, f'prediction_{name}': predicted}
        )
      keeper.add(weight, labels, fields)
    count = max(count, 1e-12)
    report = {
      name: {
        'accuracy': correct[name] / count,
        'flip_rate': flips[name] / count,
        'region': interventions.PERTURBATIONS[name].region,
      }
      for name in names
    }
    yield 'perturbations', report
    if {'background_noise', 'foreground_noise'} <= set(names):
      yield (
        'relative_foreground_sensitivity',
        metrics.relative_foreground_sensitivity(
          report['background_noise']['accuracy'],
          report['foreground_noise']['accuracy'],
        ),
      )
    if {'background_gray', 'foreground_gray'} <= set(names):
      fg = report['foreground_gray']['flip_rate']
      total = fg + report['background_gray']['flip_rate']
      yield 'foreground_flip_share', fg / total if total > 0 else None
    if keeper.count:
      yield 'examples', keeper.arrays()


class LocalisationEvaluator(Evaluator):
  """Pointing game and top-k% IoU of each image's true-class HiResCAM with its
  CAM-resolution mask (`metrics.pointing_game`, `metrics.top_fraction_iou`).

  cfg: `fraction` of cells for the IoU (default 0.2). Images whose mask is
  all ones (no object mask) are left out. Yields `pointing_game`,
  `top_<percent>_iou`, `localisation_count`.
  """

  def run(self, batches):
    fraction = self.cfg.get('fraction', 0.2)
    hits, ious, count = 0.0, 0.0, 0.0
    for batch in batches:
      _, cams = self.predict_fn(batch['image'])
      cams, labels = np.asarray(cams), batch['label']
      maps = np.take_along_axis(cams, labels[:, None, None, None], -1)[..., 0]
      mask = batch['mask']
      weight = batch['weight'] * (mask.reshape(len(mask), -1).min(-1) < 1)
      hits += (weight * metrics.pointing_game(maps, mask)).sum()
      ious += (weight * metrics.top_fraction_iou(maps, mask, fraction)).sum()
      count += weight.sum()
    yield 'pointing_game', hits / count if count else None
    yield f'top_{round(100 * fraction)}_iou', ious / count if count else None
    yield 'localisation_count', int(round(count))


class DeletionInsertionEvaluator(Evaluator):
  """Deletion and insertion AUC of the predicted class's probability, cells
  removed / added in the order of our map (`cams[..., c]`) and of Grad-CAM at
  the same layer (`metrics.deletion_insertion`), baseline grey.

  cfg: `gradcam_fn` `(images, classes) -> (B, h, w)` (None: ours only);
  `steps` (16); `max_examples` (64, the first real examples); `normalize`.
  Yields `deletion_insertion` {map: {deletion_auc, insertion_auc}}, `count`.
  """

  def run(self, batches):
    steps, limit = self.cfg.get('steps', 16), self.cfg.get('max_examples', 64)
    gradcam_fn = self.cfg.get('gradcam_fn')
    grey = interventions.gray_fill(normalize=self.cfg.get('normalize', False))
    sums, count = {}, 0
    for batch in batches:
      if count >= limit:
        break
      real = np.flatnonzero(batch['weight'] > 0)[: limit - count]
      if not len(real):
        continue
      images = batch['image'][real]
      logits, cams = (np.asarray(x) for x in self.predict_fn(images))
      classes = logits.argmax(-1)
      rows = np.arange(len(real))

      def probability(x, classes=classes, rows=rows):
        return explain.softmax(np.asarray(self.predict_fn(x)[0]))[rows, classes]

      maps = {'hirescam': cams[rows, ..., classes]}
      if gradcam_fn is not None:
        maps['gradcam'] = np.asarray(gradcam_fn(images, classes))
      for name, cam_map in maps.items():
        out = metrics.deletion_insertion(
          probability, images, cam_map, grey, steps=steps
        )
        for key in ('deletion_auc', 'insertion_auc'):
          sums.setdefault(name, {}).setdefault(key, 0.0)
          sums[name][key] += float(out[key].sum())
      count += len(real)
    yield (
      'deletion_insertion',
      {n: {k: v / count for k, v in d.items()} for n, d in sums.items()},
    )
    yield 'deletion_insertion_count', count


class PerExampleEvaluator(Evaluator):
  """Per-example predictions, what paired and bootstrap statistics resample.

  Yields `per_example`: {'index', 'label', 'group' (0 without groups),
  'prediction', 'probabilities' (softmax)} lists for every real example,
  sorted by `index` (the split's order), so two models evaluated on one split
  give rows in the same order and a comparison can resample test images once
  for all of them (`cco_jax.statistics`). cfg: none.
  """

  def run(self, batches):
    rows = {'index': [], 'label': [], 'group': [], 'prediction': [], 'p': []}
    for batch in batches:
      logits = np.asarray(self.predict_fn(batch['image'])[0], np.float64)
      keep = np.asarray(batch['weight']) > 0
      label = np.asarray(batch['label'])
      rows['index'].append(np.asarray(batch['index'])[keep])
      rows['label'].append(label[keep])
      rows['group'].append(
        np.asarray(batch.get('group', np.zeros_like(label)))[keep]
      )
      rows['prediction'].append(logits.argmax(-1)[keep])
      rows['p'].append(special.softmax(logits, axis=-1)[keep])
    joined = {k: np.concatenate(v) for k, v in rows.items()}
    order = np.argsort(joined['index'], kind='stable')
    yield (
      'per_example',
      {
        'index': joined['index'][order].astype(int).tolist(),
        'label': joined['label'][order].astype(int).tolist(),
        'group': joined['group'][order].astype(int).tolist(),
        'prediction': joined['prediction'][order].astype(int).tolist(),
        'probabilities': np.round(joined['p'][order], 6).tolist(),
      },
    )


# The one place where evaluators are registered.
EVALUATORS: dict[str, type[Evaluator]] = {
  'classification': ClassificationEvaluator,
  'interventions': InterventionEvaluator,
  'localisation': LocalisationEvaluator,
  'deletion_insertion': DeletionInsertionEvaluator,
  'per_example': PerExampleEvaluator,
  'auc': auc.AucEvaluator,
}


def check_names(names: Sequence[str]) -> None:
  unknown = [n for n in names if n not in EVALUATORS]
  if unknown:
    raise ValueError(
      f'Unknown evaluators {unknown}; choose from {sorted(EVALUATORS)}.'
    )
