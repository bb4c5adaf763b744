"""The statistics of the comparison tables. Not an entry point.

A table row is one method under one selection protocol, trained with seeds
S (the same seeds for every method: same initial weights and data order per
seed) and evaluated on the same test images. From each run's per-example
predictions (`per_example` of the evaluation report, kept as correctness):

  * the mean and sample standard deviation over seeds of each measure;
  * a 95 % interval for the seed-mean worst-group accuracy that counts both
    sources of chance: a two-level bootstrap that resamples seeds and, with
    the same draw for every seed, test images within each group
    (`cco_jax.statistics.bootstrap_indices`, stratified, so each group keeps
    its size);
  * with `machine_sd` > 0, a third source: the run's own machine. Each run's
    worst-group accuracy moves by about that much on a CPU of another
    vendor (docs/results.md, "Runs that repeat": one run's cross-machine
    standard deviation, measured on 33 runs made on an Intel and an AMD
    machine); every bootstrap draw adds to each run an independent
    Normal(0, machine_sd) deviation, the same one wherever that run appears
    in the draw. The point estimates and the t-test are unchanged;
  * against the reference method (ACE): the mean paired difference over
    seeds, its interval from the same bootstrap (the same seed and image
    draws for both methods), the paired t-test over seeds, and Holm's
    adjustment over the rows of the table (one family per table and
    measure); wins / ties / losses by seed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import zlib

import numpy as np

from cco_jax import statistics

NUM_RESAMPLES = 2000
LEVEL = 0.95


def worst_group(correct: np.ndarray, onehot: np.ndarray) -> np.ndarray:
  """Worst-group accuracy along the last axis: `correct (..., N)` and
  `onehot (N, G)` -> `(...)`."""
  accuracy = (correct @ onehot) / onehot.sum(0)
  return accuracy.min(-1)


class Matched:
  """The per-example correctness of several methods on one test set.

  Args:
    correct: {method: {seed: (N,) bool}}, every array over the same test
      examples in the same order.
    groups: `(N,)` the group of each test example.
    seed: of the bootstrap draws.
    machine_sd: one run's cross-machine standard deviation of worst-group
      accuracy, added to every draw (module docstring); 0 = one machine.
  """

  def __init__(
    self,
    correct: Mapping[str, Mapping[int, np.ndarray]],
    groups: np.ndarray,
    seed: int = 0,
    machine_sd: float = 0.0,
  ):
    if not machine_sd >= 0:
      raise ValueError(f'machine_sd={machine_sd}: give a value >= 0.')
    self.seed, self.machine_sd = seed, float(machine_sd)
    groups = np.asarray(groups)
    present = np.unique(groups)
    self.onehot = (groups[:, None] == present[None, :]).astype(np.float64)
    self.correct = {}
    for method, by_seed in correct.items():
      self.correct[method] = {}
      for s, values in by_seed.items():
        values = np.asarray(values, np.float64)
        if values.shape != groups.shape:
          raise ValueError(
            f'{method} seed {s}: {values.shape[0]} test examples, the groups '
            f'{groups.shape[0]}; every run must use the same test split.'
          )
        self.correct[method][s] = values
    self.image_draws = statistics.bootstrap_indices(
      np.random.default_rng(seed), len(groups), NUM_RESAMPLES, strata=groups
    )

  def seeds(self, *methods: str) -> list[int]:
    """The seeds every one of `methods` has, sorted."""
    common = set.intersection(*(set(self.correct[m]) for m in methods))
    return sorted(common)

  def _resampled_worst(self, method: str, seeds: Sequence[int]) -> np.ndarray:
    """`(S, B)` worst-group accuracy of each seed on each image draw."""
    stacked = np.stack([self.correct[method][s] for s in seeds])  # (S, N)
    drawn = stacked[:, self.image_draws]  # (S, B, N)
    onehot = self.onehot  # Stratified draws keep each position's group.
    worst = worst_group(drawn, onehot)
    if self.machine_sd:
      worst = worst + np.stack([self._machine(method, s) for s in seeds])
    return worst

  def _machine(self, method: str, seed: int) -> np.ndarray:
    """`(B,)` the cross-machine deviation of one run in each draw: fixed by
    the run (method, seed), so a run shared by two rows moves alike."""
    key = [self.seed, zlib.crc32(method.encode()), seed]
    rng = np.random.default_rng(key)
    return rng.normal(0.0, self.machine_sd, NUM_RESAMPLES)

  def _seed_draws(self, count: int) -> np.ndarray:
    return statistics.bootstrap_indices(
      np.random.default_rng(count * 7919), count, NUM_RESAMPLES
    )

  def worst_group_interval(self, method: str) -> dict:
    """Seed-mean worst-group accuracy and its two-level bootstrap interval."""
    seeds = self.seeds(method)
    per_seed = worst_group(
      np.stack([self.correct[method][s] for s in seeds]), self.onehot
    )
    resampled = self._resampled_worst(method, seeds)
    draws = self._seed_draws(len(seeds))
    means = np.take_along_axis(resampled, draws.T, 0).mean(0)
    low, high = statistics.percentile_interval(means, LEVEL)
    return {
      'mean': float(per_seed.mean()),
      'ci': [low, high],
      'per_seed': dict(zip(seeds, per_seed.tolist())),
    }

  def versus(self, method: str, reference: str) -> dict:
    """`method` - `reference` in worst-group accuracy, paired by seed."""
    seeds = self.seeds(method, reference)
    mine = worst_group(
      np.stack([self.correct[method][s] for s in seeds]), self.onehot
    )
    theirs = worst_group(
      np.stack([self.correct[reference][s] for s in seeds]), self.onehot
    )
    difference = self._resampled_worst(method, seeds) - self._resampled_worst(
      reference, seeds
    )
    draws = self._seed_draws(len(seeds))
    means = np.take_along_axis(difference, draws.T, 0).mean(0)
    low, high = statistics.percentile_interval(means, LEVEL)
    return {
      'seeds': seeds,
      **statistics.paired_t(mine, theirs),
      'ci': [low, high],
      **statistics.sign_count(mine, theirs),
    }


def compare_rows(
  correct: Mapping[str, Mapping[int, np.ndarray]],
  groups: np.ndarray,
  reference: str,
  seed: int = 0,
  machine_sd: float = 0.0,
) -> dict:
  """{method: {'worst_group': interval, 'versus': difference (None for the
  reference or without it)}} with Holm-adjusted p-values ('p_holm') over the
  methods compared with `reference` (`Matched` for the arguments)."""
  matched = Matched(correct, groups, seed=seed, machine_sd=machine_sd)
  out = {}
  for method in correct:
    versus = None
    if reference in correct and method != reference:
      if len(matched.seeds(method, reference)) >= 2:
        versus = matched.versus(method, reference)
    out[method] = {
      'worst_group': matched.worst_group_interval(method),
      'versus': versus,
    }
  compared = [m for m in out if out[m]['versus'] is not None]
  adjusted = statistics.holm([out[m]['versus']['p'] for m in compared])
  for method, p in zip(compared, adjusted):
    out[method]['versus']['p_holm'] = p
  return out
