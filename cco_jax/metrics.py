"""Evaluation metrics: one per-batch function, and the field's measures.

`batch_sums(logits, cams, labels, mask, weight, ...)` is the ONE jit-able
per-batch computation of evaluation. The training loop's `eval_step` calls it
(and `psum`s the result over devices); offline evaluation
(`cco_jax.evaluation`) calls it on host batches. `accumulate` adds batches'
sums and `summarise` turns the totals into means.

The field's measures, each a small function whose docstring gives its
definition and source:
  group_accuracies          per-group, worst-group and average-group accuracy
                            (Sagawa et al., ICLR 2020);
  relative_foreground_sensitivity  RFS (Moayeri et al., NeurIPS 2022);
  pointing_game             is the map's maximum on the object? (Zhang et al.,
                            ECCV 2016);
  top_fraction_iou          IoU of the map's top-k% cells with the mask;
  deletion_insertion        probability curves and their AUCs as pixels are
                            removed / added in map order (Petsiuk et al., BMVC
                            2018).
Context contribution (the background share of |K|) is `cams.pixel_influence`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import math

import jax
import jax.numpy as jnp
import numpy as np

from cco_jax import cams as cams_lib

Array = jax.Array


# ----------------------------------------------------------------------------
# The per-batch sums, shared by training and offline evaluation.
# ----------------------------------------------------------------------------


def batch_sums(
  logits: Array,
  cams: Array,
  labels: Array,
  mask: Array,
  weight: Array,
  *,
  bias: Array | None = None,
  group: Array | None = None,
  num_groups: int | None = None,
) -> dict[str, Array]:
  """Weighted sums of one (padded) batch; divide by `count` after summing.

  Args:
    logits: `(B, C)`; cams: `(B, h, w, C)` of the same forward pass.
    labels: `(B,)` int; mask: `(B, h, w)` foreground at CAM resolution.
    weight: `(B,)` 1 for real examples, 0 for padding.
    bias: `(C,)` head bias, for the identity error (None = no bias).
    group: `(B,)` int group of each example, with static `num_groups`: adds
      `group_count` and `group_correct`, each `(num_groups,)`.

  Returns:
    `count`, `correct`, `ce` (sum of cross-entropies), pixel influence `net`,
    `fg`, `bg` of the true class's contrastive maps (`cams.pixel_influence`),
    and `identity_error`, the largest `|sum M + b - s| / (max|s| + 1)` (a max,
    not a sum: combine batches with `max`).
  """
  weight = weight.astype(jnp.float32)
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
  ce = -jnp.take_along_axis(log_probs, labels[:, None], -1)[:, 0]
  correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
  influence = cams_lib.pixel_influence(
    cams_lib.contrastive_cams(cams, labels), mask
  )
  sums = {
    'count': weight.sum(),
    'correct': (weight * correct).sum(),
    'ce': (weight * ce).sum(),
    **{k: (weight * v).sum() for k, v in influence.items()},
  }
  if group is not None and num_groups is not None:
    one_hot = jax.nn.one_hot(group, num_groups, dtype=jnp.float32)
    sums['group_count'] = weight @ one_hot
    sums['group_correct'] = (weight * correct) @ one_hot
  scale = jnp.max(jnp.abs(logits)) + 1.0
  sums['identity_error'] = cams_lib.identity_error(logits, cams, bias) / scale
  return sums


def accumulate(totals: dict | None, sums: Mapping) -> dict:
  """Adds one batch's host sums to `totals` (`identity_error` by max, which
  keeps a NaN: a broken model must not read 0)."""
  sums = {k: np.asarray(v, np.float64) for k, v in sums.items()}
  if totals is None:
    return sums
  return {
    k: np.maximum(totals[k], v) if k == 'identity_error' else totals[k] + v
    for k, v in sums.items()
  }


def summarise(
  totals: Mapping, group_names: Sequence[str] | None = None
) -> dict:
  """Means of accumulated sums: `accuracy`, `ce`, `influence_net`/`_fg`/`_bg`
  (per example), `bg_share` (= sum bg / sum net), `identity_error`, `count`;
  with groups, `group_accuracy/<name>` and `worst_group_accuracy`,
  `average_group_accuracy` (`group_accuracies`).

  Raises:
    ValueError: nothing was counted.
  """
  if totals is None or float(totals['count']) <= 0:
    raise ValueError('The evaluation split is empty (no example was counted).')
  count = float(totals['count'])
  out = {
    'accuracy': float(totals['correct']) / count,
    'ce': float(totals['ce']) / count,
    'influence_net': float(totals['net']) / count,
    'influence_fg': float(totals['fg']) / count,
    'influence_bg': float(totals['bg']) / count,
    'bg_share': float(totals['bg']) / max(float(totals['net']), 1e-12),
    'identity_error': float(totals['identity_error']),
    'count': int(round(count)),
  }
  if 'group_count' in totals:
    out.update(
      group_accuracies(
        totals['group_correct'], totals['group_count'], group_names
      )
    )
  return out


# ----------------------------------------------------------------------------
# The field's measures.
# ----------------------------------------------------------------------------


def group_accuracies(
  group_correct, group_count, names: Sequence[str] | None = None
) -> dict:
  """Per-group, worst-group and average-group accuracy.

  `acc_g = correct_g / count_g` for each group with examples;
  `worst_group_accuracy = min_g acc_g`, `average_group_accuracy = mean_g
  acc_g` (unweighted over groups). Source: S. Sagawa, P. W. Koh, T. B.
  Hashimoto, P. Liang, "Distributionally Robust Neural Networks for Group
  Shifts", ICLR 2020 (worst-group and average accuracy over groups).

  Args:
    group_correct, group_count: `(G,)` (weighted) sums.
    names: G group names (default: the indices).

  Returns:
    {'group_accuracy/<name>': acc (None for an empty group), ...,
    'worst_group_accuracy', 'average_group_accuracy', 'worst_group'}.
  """
  correct = np.asarray(group_correct, np.float64)
  count = np.asarray(group_count, np.float64)
  names = list(names) if names else [str(g) for g in range(len(count))]
  if len(names) < len(count):
    names += [str(g) for g in range(len(names), len(count))]
  present = count > 0
  accuracy = np.where(present, correct / np.maximum(count, 1e-12), np.nan)
  out = {
    f'group_accuracy/{names[g]}': (float(accuracy[g]) if present[g] else None)
    for g in range(len(count))
  }
  if present.any():
    worst = int(np.nanargmin(accuracy))
    out['worst_group_accuracy'] = float(accuracy[worst])
    out['worst_group'] = names[worst]
    out['average_group_accuracy'] = float(np.nanmean(accuracy))
  return out


def relative_foreground_sensitivity(
  acc_noisy_bg: float, acc_noisy_fg: float
) -> float | None:
  """RFS = (acc_noisyBG - acc_noisyFG) / (2 min(avg, 1 - avg)).

  `acc_noisyBG`: accuracy with Gaussian noise over the background (the object
  kept); `acc_noisyFG`: with the noise over the object (background kept);
  `avg` their mean. The denominator is the largest gap possible at that
  average, so RFS lies in [-1, 1]: 1 = only the object matters, -1 = only the
  background. None when `avg` is 0 or 1. Source: M. Moayeri, S. Singla, S.
  Feizi, "Hard ImageNet: Segmentations for Objects with Strong Spurious
  Cues", NeurIPS 2022 Datasets and Benchmarks (as their code computes it).
  """
  avg = (acc_noisy_bg + acc_noisy_fg) / 2
  denominator = 2 * min(avg, 1 - avg)
  if denominator <= 0:
    return None
  return (acc_noisy_bg - acc_noisy_fg) / denominator


def pointing_game(maps, masks) -> np.ndarray:
  """Per image: 1 if the map's maximum lies on the object, else 0.

  `hit = mask[argmax_{h,w} map] > 0.5` on the map's grid (first maximum on
  ties). Source: J. Zhang, Z. Lin, J. Brandt, X. Shen, S. Sclaroff, "Top-down
  Neural Attention by Excitation Backprop", ECCV 2016 (the pointing game).

  Args:
    maps: `(B, h, w)`; masks: `(B, h, w)` object fraction per cell.

  Returns:
    `(B,)` float64 in {0, 1}.
  """
  maps, masks = np.asarray(maps), np.asarray(masks)
  _check_same_shape(maps, masks)
  flat = maps.reshape(len(maps), -1).argmax(-1)
  return (
    masks.reshape(len(masks), -1)[np.arange(len(maps)), flat] > 0.5
  ).astype(np.float64)


def top_fraction_iou(maps, masks, fraction: float = 0.2) -> np.ndarray:
  """Per image: IoU of the map's top `fraction` of cells with the object.

  `T` = the `ceil(fraction * h * w)` cells with the largest map values (ties
  broken by position), `O` = cells with mask > 0.5; `IoU = |T & O| / |T | O|`
  (1 when both are empty). The thresholded-map IoU of weakly supervised
  localisation (J. Choe et al., "Evaluating Weakly Supervised Object
  Localization Methods Right", CVPR 2020), at a fixed top-k% threshold.

  Args:
    maps: `(B, h, w)`; masks: `(B, h, w)`; fraction: in (0, 1].

  Returns:
    `(B,)` float64.
  """
  if not 0 < fraction <= 1:
    raise ValueError(f'fraction must be in (0, 1]; got {fraction}.')
  maps, masks = np.asarray(maps), np.asarray(masks)
  _check_same_shape(maps, masks)
  flat = maps.reshape(len(maps), -1)
  k = math.ceil(fraction * flat.shape[1])
  order = np.argsort(-flat, axis=-1, kind='stable')[:, :k]
  top = np.zeros(flat.shape, bool)
  np.put_along_axis(top, order, True, -1)
  obj = masks.reshape(len(masks), -1) > 0.5
  union = (top | obj).sum(-1)
  return np.where(union > 0, (top & obj).sum(-1) / np.maximum(union, 1), 1.0)


def _check_same_shape(maps, masks):
  if maps.ndim != 3 or maps.shape != masks.shape:
    raise ValueError(
      f'maps and masks must both be (B, h, w) on the same grid; got '
      f'{maps.shape} and {masks.shape}. Resize the mask to the CAM grid.'
    )


def auc(curve: np.ndarray) -> np.ndarray:
  """Trapezoidal area under `(..., n + 1)` values at fractions 0, 1/n, ..., 1."""
  curve = np.asarray(curve, np.float64)
  return (curve[..., 1:] + curve[..., :-1]).sum(-1) / (
    2 * (curve.shape[-1] - 1)
  )


def deletion_insertion(
  probability: Callable[[np.ndarray], np.ndarray],
  images: np.ndarray,
  maps: np.ndarray,
  baseline: np.ndarray,
  *,
  steps: int = 16,
) -> dict[str, np.ndarray]:
  """Deletion and insertion curves of maps, and their AUCs.

  Map cells are ranked by decreasing value. Deletion: after removing the top
  `t/steps` of the cells (their pixels set to `baseline`), the class
  probability `p_t`; insertion: starting from `baseline`, the probability after
  restoring the top `t/steps` of the cells. A faithful map gives a low
  deletion AUC (probability falls fast) and a high insertion AUC. Source: V.
  Petsiuk, A. Das, K. Saenko, "RISE: Randomized Input Sampling for
  Explanation of Black-box Models", BMVC 2018 (we remove whole map cells,
  each `S/h x S/w` pixels, and use `baseline` for both curves).

  Args:
    probability: images `(N, S, S, 3)` -> `(N,)` probabilities of each
      image's class (bind the class in the closure).
    images: `(B, S, S, 3)`.
    maps: `(B, h, w)` with `S` divisible by `h` and `w`.
    baseline: broadcastable to `images` (e.g. grey, or a blurred copy).
    steps: points of the curve after 0 (the curve has `steps + 1`).

  Returns:
    {'deletion': `(B, steps + 1)`, 'insertion': `(B, steps + 1)`,
    'deletion_auc': `(B,)`, 'insertion_auc': `(B,)`}.
  """
  images, maps = np.asarray(images, np.float32), np.asarray(maps)
  batch, size = images.shape[0], images.shape[1:3]
  h, w = maps.shape[1:]
  if size[0] % h or size[1] % w:
    raise ValueError(f'image size {size} must be a multiple of the map {h, w}.')
  baseline = np.broadcast_to(np.asarray(baseline, np.float32), images.shape)
  cells = h * w
  rank = np.empty((batch, cells), np.int64)
  order = np.argsort(-maps.reshape(batch, -1), -1, kind='stable')
  np.put_along_axis(rank, order, np.arange(cells)[None], -1)
  rank = rank.reshape(batch, h, w)
  rank = rank.repeat(size[0] // h, 1).repeat(size[1] // w, 2)[..., None]
  curves = {'deletion': [], 'insertion': []}
  for t in range(steps + 1):
    chosen = rank < round(t * cells / steps)  # the top t/steps of the cells
    curves['deletion'].append(probability(np.where(chosen, baseline, images)))
    curves['insertion'].append(probability(np.where(chosen, images, baseline)))
  out = {k: np.stack(v, -1).astype(np.float64) for k, v in curves.items()}
  out['deletion_auc'] = auc(out['deletion'])
  out['insertion_auc'] = auc(out['insertion'])
  return out
