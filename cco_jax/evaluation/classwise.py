"""Class-wise accuracy: confusion matrix, per-class recall, balanced accuracy.

Accuracy hides a model that predicts the majority class (69 % of the ISIC
sample are nevi); balanced accuracy, the mean over classes of each class's
recall, does not: a constant predictor scores 1 / C. Definition as in K. H.
Brodersen, C. S. Ong, K. E. Stephan, J. M. Buhmann, "The balanced accuracy
and its posterior distribution", ICPR 2010 (scikit-learn's
`balanced_accuracy_score`: classes without examples are left out).

`ClasswiseEvaluator` has the `evaluators.Evaluator` interface and also
computes these numbers under interventions (e.g. `background_swap`: does
the diagnosis move with the skin around the lesion?).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cco_jax.evaluation import evaluators
from cco_jax.evaluation import interventions


def confusion_matrix(
  labels, predictions, num_classes: int, weight=None
) -> np.ndarray:
  """`(C, C)` float64 weighted counts: row = true class, column = predicted.

  Args:
    labels, predictions: `(B,)` ints in [0, C).
    num_classes: C.
    weight: `(B,)` (None = ones); 0 leaves an example out (padding).

  Raises:
    ValueError: shapes differ or a class index is outside [0, C).
  """
  labels = np.asarray(labels).reshape(-1)
  predictions = np.asarray(predictions).reshape(-1)
  weight = (
    np.ones(len(labels)) if weight is None else np.asarray(weight).reshape(-1)
  )
  if not len(labels) == len(predictions) == len(weight):
    raise ValueError(
      f'labels ({len(labels)}), predictions ({len(predictions)}) and weight '
      f'({len(weight)}) must have the same length.'
    )
  for name, values in (('labels', labels), ('predictions', predictions)):
    if len(values) and (values.min() < 0 or values.max() >= num_classes):
      raise ValueError(
        f'{name} must lie in [0, {num_classes}); got {values.min()}..'
        f'{values.max()}. Pass the number of classes of the model head.'
      )
  confusion = np.zeros((num_classes, num_classes), np.float64)
  np.add.at(confusion, (labels, predictions), weight.astype(np.float64))
  return confusion


def per_class_recall(confusion: np.ndarray) -> np.ndarray:
  """`(C,)`: correct / count of each true class; NaN for a class without
  examples."""
  confusion = np.asarray(confusion, np.float64)
  count = confusion.sum(1)
  return np.where(
    count > 0, np.diag(confusion) / np.maximum(count, 1e-300), np.nan
  )


def balanced_accuracy(confusion: np.ndarray) -> float | None:
  """Mean per-class recall over the classes with examples (None if none)."""
  recall = per_class_recall(confusion)
  present = ~np.isnan(recall)
  return float(recall[present].mean()) if present.any() else None


def summary(confusion: np.ndarray, class_names: Sequence[str]) -> dict:
  """JSON-able `{accuracy, balanced_accuracy, recall: {name: r or None},
  confusion: C x C lists, count}`."""
  confusion = np.asarray(confusion, np.float64)
  count = float(confusion.sum())
  recall = per_class_recall(confusion)
  return {
    'accuracy': float(np.trace(confusion) / count) if count else None,
    'balanced_accuracy': balanced_accuracy(confusion),
    'recall': {
      str(name): None if np.isnan(r) else float(r)
      for name, r in zip(class_names, recall)
    },
    'confusion': confusion.tolist(),
    'count': int(round(count)),
  }


class ClasswiseEvaluator(evaluators.Evaluator):
  """Per-class recall and balanced accuracy, clean and under interventions.

  cfg: `class_names` (the C classes of the head, required); `perturbations`
  names of `interventions.PERTURBATIONS` (default none); `context`
  (`interventions.Context`; `background_swap` needs its `donors`).

  Yields `classwise`: {'clean': `summary`, <perturbation>: `summary`, ...}.
  """

  def run(self, batches):
    names = list(self.cfg['class_names'])
    perturbations = list(self.cfg.get('perturbations') or ())
    context = self.cfg.get('context') or interventions.Context()
    unknown = [p for p in perturbations if p not in interventions.PERTURBATIONS]
    if unknown:
      raise ValueError(
        f'Unknown perturbations {unknown}; choose from '
        f'{sorted(interventions.PERTURBATIONS)}.'
      )
    confusion = {
      key: np.zeros((len(names), len(names)))
      for key in ['clean'] + perturbations
    }
    for batch in batches:
      weight, labels = batch['weight'], batch['label']
      images = {'clean': batch['image']}
      for name in perturbations:
        images[name] = interventions.PERTURBATIONS[name].apply(batch, context)
      for key, x in images.items():
        predicted = np.asarray(self.predict_fn(x)[0]).argmax(-1)
        confusion[key] += confusion_matrix(
          labels, predicted, len(names), weight
        )
    yield 'classwise', {k: summary(v, names) for k, v in confusion.items()}


def split_summary(predict_fn, class_names: Sequence[str], batches) -> dict:
  """`summary` of the clean images of `batches` (flat evaluation batches
  with `image`, `label`, `weight`): the per-class accuracy (recall) and
  confusion matrix that every evaluation report holds as `per_class`."""
  evaluator = ClasswiseEvaluator(predict_fn, class_names=class_names)
  return dict(evaluator.run(batches))['classwise']['clean']
