"""Evaluation metrics on hand-checkable cases and against independent NumPy."""

import jax
import numpy as np
import pytest

from cco_jax import metrics


def _numpy_sums(logits, cams, labels, mask, weight, bias):
  logits = logits.astype(np.float64)
  shifted = logits - logits.max(-1, keepdims=True)
  log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  ce = -log_probs[np.arange(len(labels)), labels]
  k = np.abs(cams[np.arange(len(labels)), ..., labels][..., None] - cams).sum(
    -1
  )
  return {
    'count': weight.sum(),
    'correct': (weight * (logits.argmax(-1) == labels)).sum(),
    'ce': (weight * ce).sum(),
    'net': (weight * k.sum((1, 2))).sum(),
    'fg': (weight * (k * mask).sum((1, 2))).sum(),
    'bg': (weight * (k * (1 - mask)).sum((1, 2))).sum(),
  }


@pytest.mark.parametrize('batch,classes', [(5, 2), (7, 4)])
def test_batch_sums_match_numpy_and_jit(batch, classes):
  rng = np.random.default_rng(batch)
  cams = rng.normal(size=(batch, 3, 2, classes)).astype(np.float32)
  bias = rng.normal(size=classes).astype(np.float32)
  logits = cams.sum((1, 2)) + bias
  labels = rng.integers(0, classes, batch)
  mask = rng.random((batch, 3, 2)).astype(np.float32)
  weight = (np.arange(batch) < batch - 2).astype(np.float32)
  group = rng.integers(0, 3, batch)
  sums = jax.jit(metrics.batch_sums, static_argnames='num_groups')(
    logits, cams, labels, mask, weight, bias=bias, group=group, num_groups=3
  )
  expected = _numpy_sums(logits, cams, labels, mask, weight, bias)
  for key, value in expected.items():
    np.testing.assert_allclose(sums[key], value, rtol=1e-5, err_msg=key)
  correct = weight * (logits.argmax(-1) == labels)
  for g in range(3):
    np.testing.assert_allclose(sums['group_count'][g], weight[group == g].sum())
    np.testing.assert_allclose(
      sums['group_correct'][g], correct[group == g].sum()
    )
  assert float(sums['identity_error']) < 1e-5
  # Without the bias the identity error is the bias's size (relative).
  unbiased = metrics.batch_sums(logits, cams, labels, mask, weight)
  np.testing.assert_allclose(
    unbiased['identity_error'],
    np.abs(bias).max() / (np.abs(logits).max() + 1),
    rtol=1e-4,
  )

  # Two halves accumulated equal the whole; summarise divides by the count.
  halves = [
    metrics.batch_sums(
      logits[s],
      cams[s],
      labels[s],
      mask[s],
      weight[s],
      bias=bias,
      group=group[s],
      num_groups=3,
    )
    for s in (slice(0, 3), slice(3, None))
  ]
  totals = metrics.accumulate(metrics.accumulate(None, halves[0]), halves[1])
  summary = metrics.summarise(totals, ['a', 'b', 'c'])
  n = weight.sum()
  assert summary['count'] == int(n)
  assert summary['accuracy'] == pytest.approx(expected['correct'] / n)
  assert summary['ce'] == pytest.approx(expected['ce'] / n, rel=1e-5)
  assert summary['bg_share'] == pytest.approx(
    expected['bg'] / expected['net'], rel=1e-5
  )
  with pytest.raises(ValueError, match='empty'):
    metrics.summarise(metrics.accumulate(None, {**halves[0], 'count': 0.0}))


def test_group_accuracies_by_hand():
  out = metrics.group_accuracies([1, 3, 0], [2, 3, 0], ['land', 'water', 'x'])
  assert out['group_accuracy/land'] == 0.5
  assert out['group_accuracy/water'] == 1.0
  assert out['group_accuracy/x'] is None
  assert out['worst_group_accuracy'] == 0.5
  assert out['worst_group'] == 'land'
  assert out['average_group_accuracy'] == 0.75


def test_relative_foreground_sensitivity_by_hand():
  # avg 0.7, denominator 2 * 0.3.
  assert metrics.relative_foreground_sensitivity(0.9, 0.5) == pytest.approx(
    0.4 / 0.6
  )
  # avg 0.25, denominator 2 * 0.25: the largest gap possible gives 1.
  assert metrics.relative_foreground_sensitivity(0.5, 0.0) == pytest.approx(1)
  assert metrics.relative_foreground_sensitivity(0.2, 0.6) == pytest.approx(
    -0.4 / 0.8
  )
  assert metrics.relative_foreground_sensitivity(1.0, 1.0) is None


def test_pointing_game_and_top_fraction_iou_by_hand():
  maps = np.array([[[4.0, 3.0], [2.0, 1.0]], [[0.0, 0.0], [5.0, 0.0]]])
  masks = np.array([[[1.0, 0.0], [1.0, 0.0]], [[1.0, 1.0], [0.0, 1.0]]])
  np.testing.assert_array_equal(metrics.pointing_game(maps, masks), [1, 0])
  # Top half: cells {0, 1} vs object {0, 2}: 1 / 3; second: {2, 0} vs {0, 1, 3}.
  np.testing.assert_allclose(
    metrics.top_fraction_iou(maps, masks, 0.5), [1 / 3, 1 / 4]
  )
  np.testing.assert_allclose(
    metrics.top_fraction_iou(maps, masks, 1.0), [0.5, 0.75]
  )
  with pytest.raises(ValueError, match='same grid'):
    metrics.pointing_game(maps, masks[:, :1])
  with pytest.raises(ValueError, match='fraction'):
    metrics.top_fraction_iou(maps, masks, 0)


def test_deletion_insertion_by_hand():
  """A "model" whose probability is the mean of the top-left 2x2 pixels."""
  images = np.ones((2, 4, 4, 3), np.float32)
  # Image 0's map ranks the top-left cell first, image 1's last.
  maps = np.array([[[9.0, 3.0], [2.0, 1.0]], [[0.0, 3.0], [2.0, 1.0]]])
  probability = lambda x: x[:, :2, :2].mean((1, 2, 3))
  out = metrics.deletion_insertion(probability, images, maps, 0.0, steps=4)
  np.testing.assert_allclose(out['deletion'][0], [1, 0, 0, 0, 0])
  np.testing.assert_allclose(out['insertion'][0], [0, 1, 1, 1, 1])
  np.testing.assert_allclose(out['deletion'][1], [1, 1, 1, 1, 0])
  np.testing.assert_allclose(out['deletion_auc'], [1 / 8, 7 / 8])
  np.testing.assert_allclose(out['insertion_auc'], [7 / 8, 1 / 8])
  np.testing.assert_allclose(metrics.auc(np.array([0.0, 1.0])), 0.5)
