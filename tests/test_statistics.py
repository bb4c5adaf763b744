"""cco_jax.statistics against definitions and SciPy."""

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np
from scipy import stats as scipy_stats

from cco_jax import statistics


class BootstrapTest(parameterized.TestCase):
  @parameterized.parameters((1, 5), (7, 40), (50, 3))
  def test_indices_in_range_and_reproducible(self, n, resamples):
    a = statistics.bootstrap_indices(np.random.default_rng(3), n, resamples)
    b = statistics.bootstrap_indices(np.random.default_rng(3), n, resamples)
    self.assertEqual(a.shape, (resamples, n))
    np.testing.assert_array_equal(a, b)
    self.assertTrue(((a >= 0) & (a < n)).all())

  @parameterized.parameters(0, 1, 2)
  def test_stratified_keeps_each_stratum(self, seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(8, 60))
    strata = rng.integers(0, 4, n)
    idx = statistics.bootstrap_indices(rng, n, 30, strata=strata)
    # Every position draws from its own stratum: group sizes are kept.
    np.testing.assert_array_equal(
      strata[idx], np.broadcast_to(strata, idx.shape)
    )

  def test_mean_interval_covers_mean(self):
    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 1.0, 400)
    idx = statistics.bootstrap_indices(rng, x.size, 2000)
    low, high = statistics.percentile_interval(x[idx].mean(1))
    self.assertLess(low, x.mean())
    self.assertGreater(high, x.mean())
    # Width close to the normal theory 2 * 1.96 * sd / sqrt(n).
    expected = 2 * 1.96 * x.std(ddof=1) / np.sqrt(x.size)
    self.assertAlmostEqual(high - low, expected, delta=0.15 * expected)

  def test_bad_strata(self):
    with self.assertRaises(ValueError):
      statistics.bootstrap_indices(np.random.default_rng(0), 5, 2, strata=[1])


class PairedTest(parameterized.TestCase):
  @parameterized.parameters(3, 5, 12)
  def test_matches_definition_and_scipy(self, n):
    rng = np.random.default_rng(n)
    a, b = rng.normal(size=n), rng.normal(size=n)
    out = statistics.paired_t(a, b)
    d = a - b
    t = d.mean() / (d.std(ddof=1) / np.sqrt(n))
    self.assertAlmostEqual(out['t'], t, places=10)
    p = 2 * scipy_stats.t.sf(abs(t), n - 1)
    self.assertAlmostEqual(out['p'], p, places=10)
    # Pairing matters: a shared per-seed offset cancels in the paired test.
    offset = rng.normal(scale=100, size=n)
    self.assertAlmostEqual(
      statistics.paired_t(a + offset, b + offset)['t'], t, places=6
    )

  def test_constant_differences(self):
    self.assertEqual(statistics.paired_t([1, 2], [1, 2])['p'], 1.0)
    self.assertEqual(statistics.paired_t([2, 3], [1, 2])['p'], 0.0)
    self.assertIsNone(statistics.paired_t([1], [0])['p'])

  def test_sign_count(self):
    self.assertEqual(
      statistics.sign_count([1, 2, 3, 4], [0, 2, 5, 1]),
      {'wins': 2, 'ties': 1, 'losses': 1},
    )


class HolmTest(absltest.TestCase):
  def test_known_values(self):
    # m = 4: sorted 0.01, 0.02, 0.03, 0.5 -> 0.04, 0.06, 0.06, 0.5.
    adjusted = statistics.holm([0.03, None, 0.01, 0.5, 0.02])
    np.testing.assert_allclose(
      [adjusted[0], adjusted[2], adjusted[3], adjusted[4]],
      [0.06, 0.04, 0.5, 0.06],
    )
    self.assertIsNone(adjusted[1])

  def test_monotone_and_bounded(self):
    p = np.random.default_rng(1).uniform(size=20)
    adjusted = np.array(statistics.holm(list(p)))
    order = np.argsort(p)
    self.assertTrue((np.diff(adjusted[order]) >= -1e-15).all())
    self.assertTrue((adjusted >= p).all() and (adjusted <= 1).all())


if __name__ == '__main__':
  absltest.main()
