"""ROC AUC and the field's binary scores (`cco_jax.evaluation.auc`), against
brute-force definitions in float64."""

from __future__ import annotations

import itertools
import types

import ml_collections
import numpy as np
import pytest
from scipy import special

from cco_jax import errors
from cco_jax import objectives
from cco_jax import train_evaluation
from cco_jax.evaluation import auc
from cco_jax.evaluation import evaluators


def pairwise_auc(scores, positives):
  """Every positive-negative pair: 1 if ordered right, 1/2 if tied."""
  pos = [s for s, p in zip(scores, positives) if p]
  neg = [s for s, p in zip(scores, positives) if not p]
  total = 0.0
  for a, b in itertools.product(pos, neg):
    total += 1.0 if a > b else 0.5 if a == b else 0.0
  return total / (len(pos) * len(neg))


def brute_sensitivity(scores, positives, specificity):
  """Every threshold (each score, +inf): the best sensitivity it allows."""
  scores, positives = np.asarray(scores), np.asarray(positives, bool)
  best = 0.0
  for t in list(scores) + [np.inf]:
    called = scores >= t
    spec = np.mean(~called[~positives])
    if spec >= specificity:
      best = max(best, np.mean(called[positives]))
  return best


@pytest.mark.parametrize('seed', range(6))
def test_auc_is_the_pairwise_definition_with_ties(seed):
  rng = np.random.default_rng(seed)
  n = int(rng.integers(2, 40))
  # Coarse scores: many ties, between and within the classes.
  scores = rng.integers(0, 5, n) / 4.0
  positives = rng.uniform(size=n) < 0.4
  positives[0], positives[1] = True, False
  assert auc.roc_auc(scores, positives) == pytest.approx(
    pairwise_auc(scores, positives), abs=1e-12
  )
  assert auc.roc_auc(-scores, positives) == pytest.approx(
    1 - pairwise_auc(scores, positives), abs=1e-12
  )


def test_auc_extremes_and_undefined():
  assert auc.roc_auc([0.1, 0.2, 0.9], [False, False, True]) == 1.0
  assert auc.roc_auc([0.9, 0.2, 0.1], [False, False, True]) == 0.0
  assert auc.roc_auc([0.5, 0.5, 0.5], [True, False, True]) == 0.5
  assert np.isnan(auc.roc_auc([0.1, 0.2], [True, True]))
  assert np.isnan(auc.sensitivity_at_specificity([0.1], [True], 0.8))


@pytest.mark.parametrize('seed', range(6))
@pytest.mark.parametrize('specificity', auc.SPECIFICITIES)
def test_sensitivity_at_specificity_is_the_brute_force(seed, specificity):
  rng = np.random.default_rng(100 + seed)
  n = int(rng.integers(4, 60))
  scores = np.round(rng.uniform(size=n), 1)
  positives = rng.uniform(size=n) < 0.5
  positives[:2] = (True, False)
  assert auc.sensitivity_at_specificity(
    scores, positives, specificity
  ) == pytest.approx(brute_sensitivity(scores, positives, specificity))


def test_confusion_and_balanced_accuracy():
  labels = np.array([0, 0, 0, 1, 1, 2])
  predictions = np.array([0, 1, 0, 1, 1, 0])
  matrix = auc.confusion_matrix(labels, predictions, 4)
  np.testing.assert_array_equal(
    matrix, [[2, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]
  )
  # Recalls 2/3, 1, 0 over the three classes present.
  assert auc.balanced_accuracy(matrix) == pytest.approx((2 / 3 + 1 + 0) / 3)
  np.testing.assert_array_equal(
    auc.binary_confusion(
      [True, False, True, False], [True, True, False, False]
    ),
    [[1, 1], [1, 1]],
  )


def _case(seed, n=80, num_classes=3):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, num_classes, n)
  logits = rng.normal(size=(n, num_classes)) + 1.5 * np.eye(num_classes)[labels]
  return logits, labels


def test_softmax_tasks_read_class_probabilities():
  logits, labels = _case(0)
  names = ('melanoma', 'nevus', 'seborrheic_keratosis')
  tasks = ('melanoma', 'seborrheic_keratosis')
  out = auc.auc_metrics(
    logits, labels, class_names=names, tasks=tasks, num_resamples=0
  )
  probabilities = special.softmax(logits, axis=-1)
  for task, c in zip(tasks, (0, 2)):
    expected = pairwise_auc(probabilities[:, c], labels == c)
    assert out['tasks'][task]['auc'] == pytest.approx(expected, abs=1e-12)
    assert out['tasks'][task]['num_positives'] == int((labels == c).sum())
  assert out['mean_auc'] == pytest.approx(
    np.mean([out['tasks'][t]['auc'] for t in tasks])
  )
  matrix = np.asarray(out['confusion_matrix'])
  assert (
    matrix.sum() == 80
    and np.trace(matrix) == (logits.argmax(-1) == labels).sum()
  )
  assert out['mean_auc_interval'] is None


def test_sigmoid_heads_are_read_independently():
  logits, labels = _case(1)
  # A softmax would mix the heads; a sigmoid head is its own score: shifting
  # another head must not change a task's AUC under 'sigmoid'.
  shifted = logits.copy()
  shifted[:, 1] += np.random.default_rng(0).normal(size=len(labels)) * 5
  kwargs = dict(class_names=('a', 'b', 'c'), tasks=('a',), num_resamples=0)
  sig = auc.auc_metrics(logits, labels, head='sigmoid', **kwargs)
  sig_shifted = auc.auc_metrics(shifted, labels, head='sigmoid', **kwargs)
  soft_shifted = auc.auc_metrics(shifted, labels, head='softmax', **kwargs)
  assert sig['mean_auc'] == sig_shifted['mean_auc']
  assert soft_shifted['mean_auc'] != sig['mean_auc']
  # The decision threshold 0.5 is sigma(0): the confusion counts logits >= 0.
  called = logits[:, 0] >= 0
  np.testing.assert_array_equal(
    sig['tasks']['a']['confusion'],
    auc.binary_confusion(called, labels == 0),
  )


def test_multi_label_targets_define_the_positives():
  logits, labels = _case(2)
  targets = (np.random.default_rng(3).uniform(size=logits.shape) < 0.3) * 1.0
  out = auc.auc_metrics(
    logits,
    labels,
    class_names=('a', 'b', 'c'),
    tasks=('b', 'c'),
    head='sigmoid',
    targets=targets,
    num_resamples=0,
  )
  for task, c in (('b', 1), ('c', 2)):
    expected = pairwise_auc(special.expit(logits[:, c]), targets[:, c] > 0)
    assert out['tasks'][task]['auc'] == pytest.approx(expected, abs=1e-12)


def test_bootstrap_intervals_are_seeded_and_cover_the_estimate():
  logits, labels = _case(4, n=120)
  kwargs = dict(class_names=('a', 'b', 'c'), num_resamples=300)
  first = auc.auc_metrics(logits, labels, seed=5, **kwargs)
  again = auc.auc_metrics(logits, labels, seed=5, **kwargs)
  other = auc.auc_metrics(logits, labels, seed=6, **kwargs)
  assert first == again
  assert first['mean_auc_interval'] != other['mean_auc_interval']
  low, high = first['mean_auc_interval']
  assert low < first['mean_auc'] < high and high - low < 0.2
  for values in first['tasks'].values():
    low, high = values['auc_interval']
    assert low <= values['auc'] <= high
  # Default tasks: every class of three; the second of two.
  assert tuple(first['tasks']) == ('a', 'b', 'c')
  assert auc.default_tasks(('cat', 'dog')) == ('dog',)


def test_unknown_task_is_named():
  logits, labels = _case(0)
  with pytest.raises(ValueError, match=r"AUC tasks \['melanoma'\]"):
    auc.auc_metrics(
      logits, labels, class_names=('a', 'b', 'c'), tasks=('melanoma',)
    )


def test_registered_evaluator_skips_padding():
  logits, labels = _case(7, n=10)
  table = {i: logits[i] for i in range(10)}

  def predict(images):
    rows = np.asarray(images)[:, 0, 0, 0].astype(int)
    return np.stack([table.get(r, np.full(3, 50.0)) for r in rows]), None

  batches = []
  for start in (0, 6):
    rows = np.arange(start, start + 6)
    weight = (rows < 10).astype(np.float32)
    images = np.zeros((6, 2, 2, 3), np.float32)
    images[:, 0, 0, 0] = rows
    batches.append(
      {'image': images, 'label': np.resize(labels, 12)[rows], 'weight': weight}
    )
  evaluator = evaluators.EVALUATORS['auc'](
    predict, class_names=('a', 'b', 'c'), num_resamples=50
  )
  out = dict(evaluator.run(batches))
  direct = auc.auc_metrics(
    logits, labels, class_names=('a', 'b', 'c'), num_resamples=50
  )
  assert out['auc'] == direct and out['mean_auc'] == direct['mean_auc']
  assert out['auc']['count'] == 10


def test_sigmoid_losses_are_the_registry_s():
  sigmoid = {n for n in objectives.names() if objectives.head(n) == 'sigmoid'}
  assert sigmoid == set(auc.SIGMOID_LOSSES)


def test_training_validation_tasks_and_their_errors():
  setup = types.SimpleNamespace(
    record=types.SimpleNamespace(class_names=('cat', 'dog')),
    objective=types.SimpleNamespace(head='sigmoid'),
    p_predict=None,
  )

  def spec(**values):
    config = ml_collections.ConfigDict(
      {'auc_tasks': (), 'best_metric': 'accuracy', **values}
    )
    return train_evaluation.auc_spec(config, setup)

  assert spec() is None
  assert spec(best_metric='mean_auc').tasks == ('dog',)
  both = spec(auc_tasks=('cat', 'dog'))
  assert both.tasks == ('cat', 'dog') and both.head == 'sigmoid'
  with pytest.raises(errors.UserError, match=r"AUC tasks \['melanoma'\]"):
    spec(auc_tasks=('melanoma',))
