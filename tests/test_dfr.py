"""DFR: the L1 logistic solver, its cross-validation and the refit head.

The solver is checked against the optimality conditions of the L1 problem
(not against itself), the folded standardisation against its definition, and
the whole stage on a real trained run: only the head changes, and the refit
model keeps the logit-sum identity.
"""

import csv
import dataclasses

import jax
import numpy as np
import pytest

from cco_jax import cams as cams_lib
from cco_jax import configuration
from cco_jax import dfr
from cco_jax import evaluation
from cco_jax import jtt
from cco_jax import restore
from cco_jax import train
from cco_jax.data import spurious_groups
from experiments.configs import spurious as spurious_configs


def _problem(seed, n, f, c):
  rng = np.random.default_rng(seed)
  w = rng.normal(size=(f, c)) * (rng.random((f, 1)) < 0.4)
  x = rng.normal(size=(n, f)) * rng.uniform(0.5, 3, f)
  y = (x @ w + rng.gumbel(size=(n, c))).argmax(-1)
  return x, y


@pytest.mark.parametrize(
  'seed, n, f, c, strength, intercept',
  [(0, 60, 5, 2, 1.0, True), (1, 120, 12, 3, 0.1, True),
   (2, 80, 7, 2, 0.03, False), (3, 200, 20, 4, 10.0, True)],
)  # fmt: skip
def test_solver_meets_l1_optimality(seed, n, f, c, strength, intercept):
  x, y = _problem(seed, n, f, c)
  kernel, bias = dfr.fit_logistic(
    x, y, c, strength, fit_intercept=intercept, num_iterations=20000,
    tolerance=1e-12,
  )  # fmt: skip
  z = x @ kernel + bias
  p = np.exp(z - z.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  residual = p - np.eye(c)[y]
  # Gradient of C * sum CE with respect to the kernel and the bias.
  grad_w = strength * x.T @ residual
  grad_b = strength * residual.sum(0)
  active = np.abs(kernel) > 1e-10
  # Subgradient conditions: -grad = sign(w) where w != 0, |grad| <= 1 at 0.
  np.testing.assert_allclose(
    grad_w[active], -np.sign(kernel[active]), atol=2e-3
  )
  assert (np.abs(grad_w[~active]) <= 1 + 2e-3).all()
  if intercept:
    np.testing.assert_allclose(grad_b, 0, atol=2e-3)
  else:
    np.testing.assert_array_equal(bias, 0)
  # A weaker penalty never has a higher penalised-free training loss.
  loose = dfr.fit_logistic(x, y, c, strength * 10, fit_intercept=intercept)
  assert (
    dfr.logistic_loss(x, y, *loose)
    <= dfr.logistic_loss(x, y, kernel, bias) + 1e-6
  )


@pytest.mark.parametrize('centre', [True, False])
def test_fold_is_the_standardised_head(centre):
  rng = np.random.default_rng(int(centre))
  x = rng.normal(3, 2, (30, 6))
  x[:, 2] = 1.0  # A constant feature: scale 0 must not divide by zero.
  scaler = dfr.Standardiser.fit(x, centre=centre)
  kernel, bias = rng.normal(size=(6, 3)), rng.normal(size=3)
  folded, folded_bias = scaler.fold(kernel, bias)
  np.testing.assert_allclose(
    x @ folded + folded_bias, scaler(x) @ kernel + bias, rtol=1e-10, atol=1e-10
  )
  if not centre:  # No bias to absorb a shift: the bias is untouched.
    np.testing.assert_allclose(folded_bias, bias)


def test_balanced_subset_and_cross_validation():
  rng = np.random.default_rng(0)
  groups = np.repeat([0, 1, 2, 3], [40, 7, 25, 9])
  rows = dfr.balanced_subset(rng, groups)
  assert np.bincount(groups[rows]).tolist() == [7, 7, 7, 7]
  assert len(set(rows.tolist())) == len(rows)
  x, y = _problem(5, len(groups), 6, 2)
  first = dfr.cross_validate(x, y, groups, 2, 4, c_grid=(1.0, 0.1), seed=1)
  again = dfr.cross_validate(x, y, groups, 2, 4, c_grid=(1.0, 0.1), seed=1)
  assert first == again and first['c'] in (1.0, 0.1)
  assert set(first['scores']) == {1.0, 0.1}
  assert all(0 <= s <= 1 for s in first['scores'].values())


def test_refit_head_changes_only_the_head_and_keeps_the_identity(
  tmp_path, synthetic_pets_dir
):
  out = tmp_path / 'bench'
  spurious_groups.make_group_benchmark(
    str(synthetic_pets_dir), str(out), correlation=0.9, val_per_group=3,
    test_per_group=2,
  )  # fmt: skip
  config = configuration.apply_overrides(
    spurious_configs.get_config('ace'),
    {
      'data.manual_dir': str(out),
      'data.tfds_data_dir': str(tmp_path / 'tfds'),
      'data.image_size': 32,
      'model.num_filters': 8,
      'batch_size': 8,
      'eval_batch_size': 8,
      'num_train_steps': 4,
      'eval_every_steps': 2,
      'log_every_steps': 2,
    },
  )
  train.train_and_evaluate(config, str(tmp_path / 'run'))
  trained = restore.restore_model(str(tmp_path / 'run'), step='last')
  refit, info = dfr.refit_head(
    trained, c_grid=(1.0, 0.1), num_folds=2, num_subsets=3, batch_size=8
  )
  assert info['group_counts'] == dict.fromkeys(trained.record.group_names, 3)
  assert not info['fit_intercept']  # The faithful head has no bias.
  assert refit.checkpoint == 'last+dfr'
  before = jax.tree_util.tree_leaves_with_path(trained.variables)
  after = dict(jax.tree_util.tree_leaves_with_path(refit.variables))
  changed = [
    jax.tree_util.keystr(k)
    for k, v in before
    if not np.array_equal(np.asarray(v), np.asarray(after[k]))
  ]
  assert changed == ["['params']['head']['kernel']"]
  images = (
    np.random.default_rng(0).normal(size=(5, 32, 32, 3)).astype(np.float32)
  )
  logits, maps = refit.predict_fn()(images)
  error = cams_lib.identity_error(logits, maps)
  assert float(error) < cams_lib.identity_tolerance(np.float32)
  # The refit logits are the pooled features times the refit kernel.
  features = dfr.pooled_features(
    refit.model,
    refit.variables,
    [{'image': images, 'label': np.zeros(5, int), 'weight': np.ones(5)}],
  )['features']
  kernel = np.asarray(refit.variables['params']['head']['kernel'], np.float64)
  np.testing.assert_allclose(features @ kernel, logits, rtol=1e-4, atol=1e-4)
  assert dataclasses.replace(refit, checkpoint='x').step == trained.step
  # JTT's error set: exactly the training images the model gets wrong (the
  # per-example evaluator on the unaugmented train split counts them).
  errors = jtt.train_errors(trained, batch_size=8)
  config = evaluation.default_config()
  config.update(split='train', evaluators=('per_example',), ood=False)
  rows = evaluation.evaluate_checkpoint(
    str(tmp_path / 'run'), config, trained=trained
  ).report['per_example']
  wrong = sum(p != y for p, y in zip(rows['prediction'], rows['label']))
  assert len(errors) == wrong
  with open(out / 'labels.csv') as f:
    train_rows = {
      r['image'] for r in csv.DictReader(f) if r['split'] == 'train'
    }
  assert set(errors) <= train_rows
