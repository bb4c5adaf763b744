"""Early stopping (`cco_jax.early_stopping`) and validation AUC in a real
short training: the stop, its record in metrics.jsonl, and a resume that
stays stopped."""

import json
import math

import pytest

from cco_jax import configuration
from cco_jax import early_stopping
from cco_jax import errors
from cco_jax import metric_writers
from cco_jax import train
from experiments.configs import pets as pets_config


def test_stops_after_patience_evaluations_without_improvement():
  early = early_stopping.EarlyStopping(2)
  values = [0.5, 0.6, 0.6, 0.55, 0.7, float('nan'), 0.69]
  stops = [early.update(step, v) for step, v in enumerate(values, 1)]
  # 0.6 at step 2 is the best until 0.7 (step 5); ties and NaN never improve.
  assert stops == [False, False, False, True, False, False, True]
  assert early.best == 0.7 and early.best_step == 5
  record = early.record()
  assert record['early_stopped'] == 1
  assert record['early_stopping_evaluations_since_best'] == 2
  restored = early_stopping.EarlyStopping.from_json(
    json.loads(json.dumps(early.to_json())), 2
  )
  assert restored == early and restored.stopped
  # A longer patience on resume un-stops it.
  assert not early_stopping.EarlyStopping.from_json(early.to_json(), 3).stopped


def test_patience_zero_never_stops_and_bad_patience_is_one_line():
  early = early_stopping.EarlyStopping(0)
  assert not any(early.update(s, 0.1) for s in range(50))
  assert 'early_stopped' not in early.record()
  with pytest.raises(errors.UserError, match='early_stopping_patience'):
    early_stopping.EarlyStopping(-1)


def _config(synthetic_pets_dir, synthetic_cvd_dir, synthetic_data_dir):
  config = pets_config.get_config('cpu')
  with config.unlocked():
    config.data.manual_dir = str(synthetic_pets_dir)
    config.data.ood_manual_dir = str(synthetic_cvd_dir)
    config.data.tfds_data_dir = str(synthetic_data_dir)
    config.data.image_size = 32
    config.model.num_filters = 4
    config.batch_size = 8
    config.eval_batch_size = 16
    config.log_every_steps = 1
    config.eval_every_steps = 1
    config.num_figure_examples = 0
  return configuration.apply_overrides(
    config,
    {
      'loss.name': 'bce',
      'num_train_steps': 40,
      'best_metric': 'mean_auc',
      'early_stopping_patience': 2,
      'data.sampling': 'class_balanced',
    },
  )


def test_short_training_stops_early_on_validation_auc_and_stays_stopped(
  tmp_path, synthetic_pets_dir, synthetic_cvd_dir, synthetic_data_dir
):
  config = _config(synthetic_pets_dir, synthetic_cvd_dir, synthetic_data_dir)
  final = train.train_and_evaluate(config, str(tmp_path))
  records = metric_writers.read_metrics(tmp_path)
  evals = [r for r in records if 'eval_mean_auc' in r]
  assert evals, records
  # Recompute the early-stopping state from the logged AUCs.
  best, best_step, since = None, 0, 0
  for record in evals:
    value = record['eval_mean_auc']
    assert 0.0 <= value <= 1.0 and record['eval_auc_dog'] == value
    if not math.isnan(value) and (best is None or value > best):
      best, best_step, since = value, record['step'], 0
    else:
      since += 1
    assert record['early_stopping_best_step'] == best_step
    assert record['early_stopping_evaluations_since_best'] == since
  stopped = [r for r in evals if r.get('early_stopped')]
  last_step = max(r['step'] for r in records if 'train_loss' in r)
  # The synthetic species are separable: the AUC peaks at once, so the run
  # stops at the second evaluation without improvement, long before 40.
  assert len(stopped) == 1 and stopped[0] is evals[-1]
  assert last_step == stopped[0]['step'] < 40
  assert since == 2 and stopped[0]['early_stopping_best_step'] == best_step
  assert 'test_mean_auc' in final and 'validation_mean_auc' in final
  assert 'test_auc_balanced_accuracy' in final
  # What training returns is what it wrote, step included (the end-of-run
  # summary of `experiments.pets` prints that step).
  assert final['step'] == last_step
  assert final == json.loads((tmp_path / 'final_metrics.json').read_text())
  # Resuming a stopped run trains no further.
  train.train_and_evaluate(config, str(tmp_path))
  again = metric_writers.read_metrics(tmp_path)
  assert max(r['step'] for r in again if 'train_loss' in r) == last_step
