"""The field's scores for binary tasks: ROC AUC with bootstrap intervals.

Skin-lesion challenges (ISIC 2017 task 3) score a classifier as binary tasks,
each class against the rest (melanoma vs nevus + seborrheic keratosis, ...),
by ROC AUC, and rank by the tasks' mean. A task's score per image is read
from the logits as the objective reads them (`objectives.head`):

  softmax  the class's probability, `softmax(logits)[c]`;
  sigmoid  its own head, `sigmoid(logits[c])` (`bce`, `ace_bce`).

An image is a positive of task c when its label is c or, for multi-label
data, when its multi-hot `targets` have c. Per task: `auc` (Mann-Whitney:
the share of positive-negative pairs the score orders right, ties 1/2),
its percentile bootstrap interval over images (`cco_jax.statistics`),
sensitivity at specificity 0.8 and 0.9, and balanced accuracy and the 2x2
confusion matrix at the decision threshold 0.5. Over the tasks: `mean_auc`
with its interval (the same resamples). Over the classes: the argmax
prediction's balanced accuracy and confusion matrix.

`auc_metrics` is the pure function (training's validation calls it with no
resamples, `train_evaluation.auc_validation`); `AucEvaluator` runs it in an
evaluation report (`evaluators.EVALUATORS['auc']`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import special

from cco_jax import statistics

SPECIFICITIES = (0.8, 0.9)
THRESHOLD = 0.5
NUM_RESAMPLES = 1000
LEVEL = 0.95
# The objectives with `head = 'sigmoid'` (`objectives.binary`), named here so
# that evaluation never imports the training code (a test checks the list
# against the registry).
SIGMOID_LOSSES = ('bce', 'ace_bce')


def roc_auc(scores: np.ndarray, positives: np.ndarray) -> float:
  """ROC AUC `P(s+ > s-) + P(s+ = s-) / 2` over all positive-negative pairs.

  Computed from midranks (Mann-Whitney U) in float64. NaN without a positive
  or without a negative.

  Args:
    scores: `(N,)` scores, higher = more positive.
    positives: `(N,)` bool.
  """
  scores = np.asarray(scores, np.float64)
  positives = np.asarray(positives, bool)
  num_pos = int(positives.sum())
  num_neg = len(positives) - num_pos
  if not num_pos or not num_neg:
    return float('nan')
  # scipy.stats takes about a second to import: only runs that score AUC
  # pay it, not every training process that imports the evaluators.
  from scipy import stats as scipy_stats  # pylint: disable=g-import-not-at-top

  ranks = scipy_stats.rankdata(scores)
  u = ranks[positives].sum() - num_pos * (num_pos + 1) / 2
  return float(u / (num_pos * num_neg))


def sensitivity_at_specificity(
  scores: np.ndarray, positives: np.ndarray, specificity: float
) -> float:
  """The largest sensitivity of a threshold whose specificity is at least
  `specificity` (an image is called positive when its score >= threshold).

  Thresholds: every score and +inf (call nothing positive). NaN without a
  positive or without a negative.
  """
  scores = np.asarray(scores, np.float64)
  positives = np.asarray(positives, bool)
  pos, neg = np.sort(scores[positives]), np.sort(scores[~positives])
  if not len(pos) or not len(neg):
    return float('nan')
  thresholds = np.append(np.unique(scores), np.inf)
  # Specificity: negatives below the threshold; sensitivity: positives at or
  # above it.
  spec = np.searchsorted(neg, thresholds, side='left') / len(neg)
  sens = 1 - np.searchsorted(pos, thresholds, side='left') / len(pos)
  return float(sens[spec >= specificity - 1e-12].max())


def binary_confusion(
  predicted: np.ndarray, positives: np.ndarray
) -> np.ndarray:
  """int64 `[[TN, FP], [FN, TP]]` (rows: truth, columns: prediction)."""
  predicted = np.asarray(predicted, bool)
  positives = np.asarray(positives, bool)
  return np.array(
    [
      [np.sum(~positives & ~predicted), np.sum(~positives & predicted)],
      [np.sum(positives & ~predicted), np.sum(positives & predicted)],
    ],
    np.int64,
  )


def confusion_matrix(
  labels: np.ndarray, predictions: np.ndarray, num_classes: int
) -> np.ndarray:
  """int64 `(C, C)`: row = true class, column = predicted class."""
  matrix = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(matrix, (np.asarray(labels), np.asarray(predictions)), 1)
  return matrix


def balanced_accuracy(matrix: np.ndarray) -> float:
  """Mean over the classes present (rows with examples) of their recall."""
  matrix = np.asarray(matrix, np.float64)
  totals = matrix.sum(1)
  present = totals > 0
  if not present.any():
    return float('nan')
  return float((np.diag(matrix)[present] / totals[present]).mean())


def task_scores(
  logits: np.ndarray, task_classes: Sequence[int], head: str
) -> np.ndarray:
  """`(N, T)` float64 scores of the tasks (module docstring)."""
  logits = np.asarray(logits, np.float64)
  if head == 'softmax':
    probabilities = special.softmax(logits, axis=-1)
  elif head == 'sigmoid':
    probabilities = special.expit(logits)
  else:
    raise ValueError(f"head must be 'softmax' or 'sigmoid'; got {head!r}.")
  return probabilities[:, list(task_classes)]


def default_tasks(class_names: Sequence[str]) -> tuple[str, ...]:
  """Two classes: the second against the first; more: each against the rest."""
  return (class_names[1],) if len(class_names) == 2 else tuple(class_names)


def task_indices(
  class_names: Sequence[str], tasks: Sequence[str]
) -> tuple[int, ...]:
  """The class index of each task name (ValueError naming the unknown)."""
  unknown = [t for t in tasks if t not in class_names]
  if unknown:
    raise ValueError(
      f'AUC tasks {unknown} are not classes of this model '
      f'{list(class_names)}; name classes in config.auc_tasks.'
    )
  return tuple(list(class_names).index(t) for t in tasks)


def auc_metrics(
  logits: np.ndarray,
  labels: np.ndarray,
  *,
  class_names: Sequence[str],
  tasks: Sequence[str] = (),
  head: str = 'softmax',
  targets: np.ndarray | None = None,
  num_resamples: int = NUM_RESAMPLES,
  seed: int = 0,
  level: float = LEVEL,
) -> dict:
  """AUC per task, their mean, intervals, sensitivities, balanced accuracy.

  Args:
    logits: `(N, C)` of the real images (no padding).
    labels: `(N,)` int classes.
    class_names: the C class names, in logit order.
    tasks: class names, each scored against the rest (() = `default_tasks`).
    head: 'softmax' or 'sigmoid' (how the objective read the logits).
    targets: `(N, C)` multi-hot, for multi-label data (None: from labels).
    num_resamples: bootstrap resamples of the images (0 = no intervals).
    seed: of the resamples (same seed, same intervals).
    level: of the intervals.

  Returns:
    {'tasks': {task: {auc, auc_interval, sensitivity_at_specificity_0.8,
    ..._0.9, balanced_accuracy, confusion [[TN, FP], [FN, TP]],
    num_positives, num_negatives}}, 'mean_auc', 'mean_auc_interval',
    'balanced_accuracy' and 'confusion_matrix' (argmax over the classes),
    'count'}; intervals are None without resamples.
  """
  logits = np.asarray(logits, np.float64)
  labels = np.asarray(labels, np.int64)
  tasks = tuple(tasks) or default_tasks(class_names)
  indices = task_indices(class_names, tasks)
  scores = task_scores(logits, indices, head)
  if targets is None:
    positives = labels[:, None] == np.asarray(indices)[None, :]
  else:
    positives = np.asarray(targets)[:, list(indices)] > 0.5
  aucs = np.array(
    [roc_auc(scores[:, t], positives[:, t]) for t in range(len(tasks))]
  )
  resampled = None
  if num_resamples > 0 and len(labels):
    rows = statistics.bootstrap_indices(
      np.random.default_rng(seed), len(labels), num_resamples
    )
    resampled = np.array(
      [
        [roc_auc(scores[r, t], positives[r, t]) for t in range(len(tasks))]
        for r in rows
      ]
    )
  per_task = {}
  for t, task in enumerate(tasks):
    called = scores[:, t] >= THRESHOLD
    confusion = binary_confusion(called, positives[:, t])
    per_task[task] = {
      'auc': float(aucs[t]),
      'auc_interval': None
      if resampled is None
      else statistics.percentile_interval(resampled[:, t], level),
      **{
        f'sensitivity_at_specificity_{s}': sensitivity_at_specificity(
          scores[:, t], positives[:, t], s
        )
        for s in SPECIFICITIES
      },
      'balanced_accuracy': balanced_accuracy(confusion),
      'confusion': confusion.tolist(),
      'num_positives': int(positives[:, t].sum()),
      'num_negatives': int((~positives[:, t]).sum()),
    }
  matrix = confusion_matrix(labels, logits.argmax(-1), len(class_names))
  return {
    'tasks': per_task,
    'mean_auc': float(aucs.mean()) if len(aucs) else float('nan'),
    'mean_auc_interval': None
    if resampled is None
    else statistics.percentile_interval(resampled.mean(1), level),
    'balanced_accuracy': balanced_accuracy(matrix),
    'confusion_matrix': matrix.tolist(),
    'count': len(labels),
  }


def settings_of(config, class_names: Sequence[str], *, seed: int = 0) -> dict:
  """The `AucEvaluator` cfg of a trained run's `config`: its classes, its
  `auc_tasks` and how its objective read the logits."""
  return dict(
    class_names=tuple(class_names),
    tasks=tuple(config.get('auc_tasks', ()) or ()),
    head='sigmoid' if config.loss.name in SIGMOID_LOSSES else 'softmax',
    seed=seed,
  )


class AucEvaluator:
  """`auc_metrics` over a split (the real images: weight > 0).

  The `evaluators.Evaluator` interface (not a subclass: `evaluators`
  imports this module to register it).

  cfg: `class_names` (required), `tasks` (() = `default_tasks`), `head`
  ('softmax'), `num_resamples` (1000), `seed` (0). Yields `auc` (the whole
  `auc_metrics` dict), `mean_auc` and `auc_balanced_accuracy`.
  """

  def __init__(self, predict_fn, **cfg):
    self.predict_fn = predict_fn
    self.cfg = cfg

  def run(self, batches):
    logits, labels, targets = [], [], []
    for batch in batches:
      real = np.asarray(batch['weight']) > 0
      out = np.asarray(self.predict_fn(batch['image'])[0])
      logits.append(out[real])
      labels.append(np.asarray(batch['label'])[real])
      if 'targets' in batch:
        targets.append(np.asarray(batch['targets'])[real])
    results = auc_metrics(
      np.concatenate(logits),
      np.concatenate(labels),
      class_names=self.cfg['class_names'],
      tasks=self.cfg.get('tasks') or (),
      head=self.cfg.get('head', 'softmax'),
      targets=np.concatenate(targets) if targets else None,
      num_resamples=self.cfg.get('num_resamples', NUM_RESAMPLES),
      seed=self.cfg.get('seed', 0),
    )
    yield 'auc', results
    yield 'mean_auc', results['mean_auc']
    yield 'auc_balanced_accuracy', results['balanced_accuracy']
