"""The statistics of a methods comparison: bootstrap, paired tests, Holm.

Small pure NumPy/SciPy functions, shared by the comparison tables
(`experiments/compare_table.py`) and the evaluators that report intervals.

  bootstrap_indices   resampled row indices, optionally within strata
                      (e.g. groups, so every resample keeps each group's size);
  percentile_interval the two-sided percentile interval of resampled values;
  paired_t            the paired t-test of two matched samples (seeds with the
                      same initial weights and data order);
  holm                Holm's step-down adjustment of p-values (controls the
                      family-wise error rate, no independence assumed);
  sign_count          wins / ties / losses of matched pairs.

Why not scipy.stats.bootstrap: the comparison resamples test images and seeds
together and needs the same resampled indices for every method (paired
differences); these functions hand the indices out instead of a statistic.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def bootstrap_indices(
  rng: np.random.Generator,
  n: int,
  num_resamples: int,
  strata: Sequence | np.ndarray | None = None,
) -> np.ndarray:
  """`(num_resamples, n)` int indices drawn with replacement.

  Args:
    rng: the generator (the caller seeds it: same seed, same resamples).
    n: the number of rows.
    num_resamples: how many resamples.
    strata: `(n,)` labels; when given, each resample draws every stratum's
      rows from that stratum only (stratified bootstrap), so each keeps its
      size; row order within a resample follows the strata's positions.

  Raises:
    ValueError: n < 1, num_resamples < 1 or strata of another length.
  """
  if n < 1 or num_resamples < 1:
    raise ValueError(f'n={n} and num_resamples={num_resamples} must be >= 1.')
  if strata is None:
    return rng.integers(0, n, size=(num_resamples, n))
  strata = np.asarray(strata)
  if strata.shape != (n,):
    raise ValueError(f'strata has shape {strata.shape}; expected ({n},).')
  out = np.empty((num_resamples, n), np.int64)
  for value in np.unique(strata):
    rows = np.flatnonzero(strata == value)
    out[:, rows] = rows[rng.integers(0, len(rows), (num_resamples, len(rows)))]
  return out


def percentile_interval(
  values: np.ndarray, level: float = 0.95
) -> tuple[float, float]:
  """The percentile interval holding `level` of the finite `values`."""
  values = np.asarray(values, np.float64)
  values = values[np.isfinite(values)]
  if not values.size:
    return (float('nan'), float('nan'))
  tail = 100 * (1 - level) / 2
  low, high = np.percentile(values, [tail, 100 - tail])
  return float(low), float(high)


def paired_t(a: Sequence[float], b: Sequence[float]) -> dict:
  """Paired t-test of `a - b` (matched by position, e.g. by seed).

  Returns:
    {'n', 'mean_difference', 'sd_difference', 't', 'p'} (two-sided); t and p
    are None when fewer than two pairs, NaN-free differences all equal (p = 1
    if they are all 0, else 0: a constant non-zero difference).
  """
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape or a.ndim != 1:
    raise ValueError(
      f'paired samples need equal 1-d shapes; {a.shape} {b.shape}'
    )
  d = a - b
  n = int(d.size)
  out = {
    'n': n,
    'mean_difference': float(d.mean()) if n else None,
    'sd_difference': float(d.std(ddof=1)) if n > 1 else None,
    't': None,
    'p': None,
  }
  if n < 2:
    return out
  if np.all(d == d[0]):
    out['p'] = 1.0 if d[0] == 0 else 0.0
    out['t'] = 0.0 if d[0] == 0 else float(np.sign(d[0]) * np.inf)
    return out
  # Imported on use: scipy.stats takes about a second to import, and the
  # training processes import this module (through the AUC evaluator).
  from scipy import stats as scipy_stats  # pylint: disable=g-import-not-at-top

  result = scipy_stats.ttest_rel(a, b)
  out['t'], out['p'] = float(result.statistic), float(result.pvalue)
  return out


def holm(pvalues: Sequence[float | None]) -> list[float | None]:
  """Holm-adjusted p-values (None stays None; order kept).

  The k-th smallest of m p-values becomes max over j <= k of
  min(1, (m - j + 1) p_(j)): reject where the adjusted value is below alpha
  and the family-wise error rate is at most alpha.
  """
  present = [(p, i) for i, p in enumerate(pvalues) if p is not None]
  m = len(present)
  out: list[float | None] = [None] * len(pvalues)
  running = 0.0
  for rank, (p, i) in enumerate(sorted(present)):
    running = max(running, min(1.0, (m - rank) * p))
    out[i] = running
  return out


def sign_count(a: Sequence[float], b: Sequence[float]) -> dict:
  """{'wins', 'ties', 'losses'} of `a` against `b`, pair by pair."""
  d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
  return {
    'wins': int((d > 0).sum()),
    'ties': int((d == 0).sum()),
    'losses': int((d < 0).sum()),
  }
