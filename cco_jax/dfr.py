"""Deep feature reweighting (DFR): refit only the head on group-balanced data.

Kirichenko, Izmailov & Wilson (2022), "Last layer re-training is sufficient
for robustness to spurious correlations" (DFR^Val_Tr): keep a trained
network's features, and refit its last layer by L1-regularised logistic
regression on a group-balanced held-out set (the validation split, whose
group labels it uses), with the regularisation chosen by cross-validation on
that set. Their reference implementation standardises the features and
averages the weights of refits on several group-balanced subsets; so does
this one.

Here the last layer is the faithful head (average over positions, then
dense): the refit replaces its kernel `(F, C)` (and its bias, when the head
has one; the faithful head has none and is refit without intercept, so the
architecture is unchanged) and nothing else. The maps are still the einsum
of the same activations with the new kernel, so the logit-sum identity holds
for the refit model exactly as for the original (`tests/test_dfr.py`).

  pooled_features     the head's input averaged over positions, per image;
  fit_logistic        multinomial logistic regression with an L1 penalty,
                      by accelerated proximal gradient (FISTA) in float64;
  cross_validate      the penalty chosen by group-stratified k-fold
                      cross-validation on worst-group accuracy;
  refit_head          the whole stage: features of the validation split,
                      cross-validation, the averaged refit, the new head.

Why not scikit-learn (the reference's `LogisticRegression(penalty='l1',
solver='liblinear')`): it is not among the project's dependencies; the
problem is small (hundreds of images, F <= 2048) and the solver is 40 lines
checked against the optimality conditions of the L1 problem in the tests.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses

import jax
import numpy as np
from scipy import special

from cco_jax import head_features

# Inverse regularisation strengths C of the reference implementation (the
# sklearn convention: minimise C * sum of losses + ||W||_1).
C_GRID = (1.0, 0.7, 0.3, 0.1, 0.07, 0.03, 0.01)


def logistic_loss(x, y, kernel, bias) -> float:
  """Mean softmax cross-entropy of `x (N, F) @ kernel (F, C) + bias (C,)`."""
  log_p = special.log_softmax(x @ kernel + bias, axis=-1)
  return float(-log_p[np.arange(len(y)), y].mean())


def fit_logistic(
  x: np.ndarray,
  y: np.ndarray,
  num_classes: int,
  c: float,
  *,
  fit_intercept: bool = True,
  num_iterations: int = 3000,
  tolerance: float = 1e-9,
) -> tuple[np.ndarray, np.ndarray]:
  """L1-regularised multinomial logistic regression.

  Minimises `C * sum_i CE(x_i W + b, y_i) + ||W||_1` (sklearn's convention;
  the bias is not penalised) by FISTA with a fixed step from the Lipschitz
  bound of the softmax cross-entropy's gradient.

  Args:
    x: `(N, F)` features.
    y: `(N,)` int labels in [0, num_classes).
    num_classes: C.
    c: the inverse regularisation strength (> 0).
    fit_intercept: learn `b` (else `b = 0`).
    num_iterations: at most this many proximal steps.
    tolerance: stop when no parameter moves more than this.

  Returns:
    `(kernel (F, C), bias (C,))`, float64.
  """
  x = np.asarray(x, np.float64)
  y = np.asarray(y)
  n, f = x.shape
  one_hot = np.eye(num_classes)[y]
  ones = np.ones((n, 1)) if fit_intercept else np.zeros((n, 1))
  design = np.concatenate([x, ones], 1)  # The bias is the last row.
  # Gradient of the mean CE is Lipschitz with constant <= ||X||^2 / (2 n).
  lipschitz = max(np.linalg.norm(design, 2) ** 2 / (2 * n), 1e-12)
  step = 1.0 / lipschitz
  threshold = step / (c * n)  # The L1 weight on the mean loss is 1 / (C n).
  weights = np.zeros((f + 1, num_classes))
  momentum, t = weights.copy(), 1.0
  for _ in range(num_iterations):
    gradient = (
      design.T @ (special.softmax(design @ momentum, axis=-1) - one_hot) / n
    )
    moved = momentum - step * gradient
    new = moved.copy()
    new[:f] = np.sign(moved[:f]) * np.maximum(np.abs(moved[:f]) - threshold, 0)
    t_next = (1 + np.sqrt(1 + 4 * t * t)) / 2
    momentum = new + (t - 1) / t_next * (new - weights)
    change = np.abs(new - weights).max()
    weights, t = new, t_next
    if change < tolerance:
      break
  return weights[:f], weights[f] if fit_intercept else np.zeros(num_classes)


def group_accuracies(predictions, labels, groups, num_groups) -> np.ndarray:
  """`(num_groups,)` accuracy of each group (NaN where a group is empty)."""
  out = np.full(num_groups, np.nan)
  for g in range(num_groups):
    rows = groups == g
    if rows.any():
      out[g] = float((predictions[rows] == labels[rows]).mean())
  return out


def balanced_subset(rng: np.random.Generator, groups: np.ndarray) -> np.ndarray:
  """Row indices with every present group cut to the smallest group's size
  (the reference's group-balanced subsample), sorted."""
  present = np.unique(groups)
  size = min(int((groups == g).sum()) for g in present)
  rows = [
    rng.choice(np.flatnonzero(groups == g), size, replace=False)
    for g in present
  ]
  return np.sort(np.concatenate(rows))


@dataclasses.dataclass(frozen=True)
class Standardiser:
  """`(x - mean) / scale` per feature; `centre=False` keeps `mean` at 0 (a
  head without bias cannot absorb the shift)."""

  mean: np.ndarray
  scale: np.ndarray

  @classmethod
  def fit(cls, x: np.ndarray, centre: bool = True) -> Standardiser:
    mean = x.mean(0) if centre else np.zeros(x.shape[1])
    scale = np.sqrt(((x - mean) ** 2).mean(0))
    return cls(mean, np.where(scale > 0, scale, 1.0))

  def __call__(self, x: np.ndarray) -> np.ndarray:
    return (x - self.mean) / self.scale

  def fold(self, kernel, bias) -> tuple[np.ndarray, np.ndarray]:
    """The head on raw features equal to `(kernel, bias)` on standardised
    ones: `x K' + b' == standardise(x) K + b`."""
    folded = kernel / self.scale[:, None]
    return folded, bias - self.mean @ folded


def cross_validate(
  x: np.ndarray,
  y: np.ndarray,
  groups: np.ndarray,
  num_classes: int,
  num_groups: int,
  *,
  c_grid: Sequence[float] = C_GRID,
  num_folds: int = 5,
  fit_intercept: bool = True,
  seed: int = 0,
) -> dict:
  """Chooses C by group-stratified k-fold cross-validation.

  Each group's rows are dealt into `num_folds` folds in a seeded random
  order; for each C, a refit on the other folds (standardised on them) is
  scored by worst-group accuracy on the held fold; the score is the mean over
  folds. Ties go to the smaller C (the stronger penalty).

  Returns:
    {'c': chosen C, 'scores': {C: mean worst-group accuracy}, 'num_folds'}.
  """
  rng = np.random.default_rng(seed)
  fold = np.empty(len(y), np.int64)
  for g in np.unique(groups):
    rows = rng.permutation(np.flatnonzero(groups == g))
    fold[rows] = np.arange(len(rows)) % num_folds
  scores = {}
  for c in c_grid:
    worst = []
    for k in range(num_folds):
      train, held = fold != k, fold == k
      scaler = Standardiser.fit(x[train], centre=fit_intercept)
      kernel, bias = fit_logistic(
        scaler(x[train]), y[train], num_classes, c, fit_intercept=fit_intercept
      )
      predictions = (scaler(x[held]) @ kernel + bias).argmax(-1)
      accuracy = group_accuracies(
        predictions, y[held], groups[held], num_groups
      )
      worst.append(np.nanmin(accuracy))
    scores[float(c)] = float(np.mean(worst))
  chosen = max(c_grid, key=lambda c: (scores[float(c)], -c))
  return {'c': float(chosen), 'scores': scores, 'num_folds': num_folds}


def fit_balanced_average(
  x, y, groups, num_classes, c, *, num_subsets=10, fit_intercept=True, seed=0
) -> tuple[np.ndarray, np.ndarray]:
  """The reference's final head: refits on `num_subsets` group-balanced
  subsets (standardised on all of `x`), weights averaged, folded back to raw
  features. Returns `(kernel (F, C), bias (C,))`."""
  rng = np.random.default_rng(seed)
  scaler = Standardiser.fit(x, centre=fit_intercept)
  z = scaler(x)
  kernels, biases = [], []
  for _ in range(num_subsets):
    rows = balanced_subset(rng, groups)
    k, b = fit_logistic(
      z[rows], y[rows], num_classes, c, fit_intercept=fit_intercept
    )
    kernels.append(k)
    biases.append(b)
  return scaler.fold(np.mean(kernels, 0), np.mean(biases, 0))


def pooled_features(model, variables, batches) -> dict:
  """{'features' (N, F) float64, 'label' (N,), 'group' (N,)}: the head's
  input averaged over positions for every real example of flat `batches`
  (`image`, `label`, `weight`, optional `group`)."""
  forward = jax.jit(
    lambda v, images: head_features.forward_with_features(model, v, images)[2]
  )
  features, labels, groups = [], [], []
  for batch in batches:
    keep = np.asarray(batch['weight']) > 0
    pooled = np.asarray(forward(variables, batch['image']), np.float64)
    features.append(pooled.mean((1, 2))[keep])
    labels.append(np.asarray(batch['label'])[keep])
    groups.append(
      np.asarray(batch.get('group', np.zeros_like(batch['label'])))[keep]
    )
  return {
    'features': np.concatenate(features),
    'label': np.concatenate(labels),
    'group': np.concatenate(groups),
  }


def refit_head(
  trained,
  *,
  split: str = 'validation',
  c_grid: Sequence[float] = C_GRID,
  num_folds: int = 5,
  num_subsets: int = 10,
  seed: int = 0,
  batch_size: int = 64,
  data_overrides: dict | None = None,
):
  """DFR on a restored model (`restore.TrainedModel`): its head refit on the
  group-balanced `split` (module docstring).

  Returns:
    `(model, info)`: a `TrainedModel` equal to `trained` but for the head's
    kernel (and bias, if it has one) and `checkpoint` ('<how>+dfr'); `info`
    {'c', 'scores', 'num_folds', 'num_subsets', 'split', 'count',
    'group_counts', 'fit_intercept', 'refit_split_accuracy'}.

  Raises:
    errors.UserError: the run has no groups, or the split lacks a group.
  """
  # Imported here: the stage needs the data pipeline, the math above not.
  from cco_jax import errors  # pylint: disable=g-import-not-at-top
  from cco_jax.data import sources  # pylint: disable=g-import-not-at-top
  from cco_jax.evaluation import report  # pylint: disable=g-import-not-at-top

  groups = trained.record.group_names
  if len(groups) < 2:
    raise errors.UserError(
      f'{trained.workdir}: DFR refits on group-balanced data, but the run has '
      "no groups; give the folder dataset a 'group' column."
    )
  data = report.resolved_data(
    trained.config, data_overrides, f'{trained.workdir}/evaluation'
  )
  source = sources.load_split_sources(data, [split])[split]
  batches = report.split_batches(
    data, source, cam_size=trained.cam_size, batch_size=batch_size
  )
  found = pooled_features(trained.model, trained.variables, batches)
  x, y, g = found['features'], found['label'], found['group']
  counts = np.bincount(g, minlength=len(groups))
  if (counts == 0).any():
    missing = [n for n, c in zip(groups, counts) if not c]
    raise errors.UserError(
      f'{data.manual_dir or data.name}: the {split!r} split has no example '
      f'of groups {missing}; DFR needs every group there.'
    )
  params = trained.variables['params']
  fit_intercept = 'bias' in params['head']
  num_classes = len(trained.class_names)
  chosen = cross_validate(
    x, y, g, num_classes, len(groups), c_grid=c_grid, num_folds=num_folds,
    fit_intercept=fit_intercept, seed=seed,
  )  # fmt: skip
  kernel, bias = fit_balanced_average(
    x, y, g, num_classes, chosen['c'], num_subsets=num_subsets,
    fit_intercept=fit_intercept, seed=seed,
  )  # fmt: skip
  head = dict(params['head'])
  head['kernel'] = np.asarray(kernel, np.float32)
  if fit_intercept:
    head['bias'] = np.asarray(bias, np.float32)
  variables = {**trained.variables, 'params': {**params, 'head': head}}
  model = dataclasses.replace(
    trained, variables=variables, checkpoint=f'{trained.checkpoint}+dfr'
  )
  predictions = (x @ kernel + bias).argmax(-1)
  info = {
    **chosen,
    'num_subsets': num_subsets,
    'split': split,
    'count': int(len(y)),
    'group_counts': dict(zip(groups, counts.astype(int).tolist())),
    'fit_intercept': fit_intercept,
    'refit_split_accuracy': float((predictions == y).mean()),
  }
  return model, info
