"""The ISIC benchmark: its config, its data read from the shared sample, and
the class-wise metrics of its table (cco_jax.evaluation.classwise)."""

import csv
import json
from pathlib import Path

import numpy as np
from PIL import Image
import pytest
from scipy import stats
import synthetic_data as df

from cco_jax import data as data_lib
from cco_jax.evaluation import classwise
from experiments import isic as isic_runner
from experiments.configs import isic

ISIC = df.SHARED_DATA / 'isic-2017-sample'
CLASSES = ('melanoma', 'nevus', 'seborrheic_keratosis')


def test_variants_differ_only_where_they_should():
  cpu, ce, ace = (isic.get_config(v) for v in ('cpu', 'cpu_ce', 'cpu_ace'))
  assert (cpu.loss.name, ace.loss.name, ce.loss.name) == (
    'ace_kld',
    'ace',
    'ce',
  )
  assert cpu.model.cam_faithful and ace.model.cam_faithful
  assert not ce.model.cam_faithful
  for config in (cpu, ce, ace):
    assert config.data.name == 'folder' and config.data.task == 'label'
    assert config.data.image_size == config.data.store_size == 96
    assert config.data.augment_flip and not config.eval_ood
  # Same budget and data for the three objectives: only model/loss differ.
  flat = [c.to_dict() for c in (cpu, ce, ace)]
  for other in flat[1:]:
    for key in ('data', 'optimizer'):
      assert other[key] == flat[0][key]
    assert other['num_epochs'] == flat[0]['num_epochs']
    assert other['batch_size'] == flat[0]['batch_size']
  # The table's six objectives: one budget, chosen and stopped on
  # validation mean AUC; only the loss (and the control's architecture) differ.
  table = {v: isic.get_config(v) for v in isic_runner.DEFAULT_VARIANTS}
  assert {v: (c.loss.name, c.model.cam_faithful) for v, c in table.items()} == {
    'cpu_ce': ('ce', False),
    'cpu_ce_faithful': ('ce', True),
    'cpu_ace': ('ace', True),
    'cpu': ('ace_kld', True),
    'cpu_bce': ('bce', True),
    'cpu_ace_bce': ('ace_bce', True),
  }
  # One stopping rule for every row: the whole budget (patience 6 stopped
  # ACE while its validation AUC was still rising).
  assert {c.early_stopping_patience for c in table.values()} == {0}
  for config in table.values():
    assert config.best_metric == 'mean_auc'
    assert tuple(config.auc_tasks) == isic_runner.TASKS
    assert config.to_dict()['data'] == flat[0]['data']
    assert config.num_epochs == cpu.num_epochs
  default = isic.get_config('default')
  assert default.model.name == 'resnet50' and default.data.image_size == 224
  assert default.model.dtype == 'bfloat16' and default.data.augment_crop
  assert isic.get_config('default_ce').loss.name == 'ce'
  with pytest.raises(ValueError, match='Unknown variant'):
    isic.get_config('gpu')
  with pytest.raises(AttributeError):
    cpu.data.image_sise = 32  # Locked: a misspelt override is an error.


def test_runner_commands_name_the_variant_and_data():
  command = isic_runner.train_command(
    'cpu_ace', 2, '/w', data_dir='/d', tfds_dir='/t', overrides=('a.b=1',)
  )
  assert '--config=experiments/configs/isic.py:cpu_ace' in command
  assert {'--config.seed=2', '--config.data.manual_dir=/d'} <= set(command)
  assert command[-1] == '--config.a.b=1'
  records = [
    {'variant': 'cpu', 'seed': s, 'mean_auc': a}
    for s, a in enumerate((0.5, 0.7, 0.9))
  ]
  (row,) = isic_runner.aggregate(records)
  assert row['mean_auc']['mean'] == pytest.approx(0.7)
  assert row['mean_auc']['std'] == pytest.approx(0.2)  # ddof = 1.
  assert row['mean_auc_t_interval'] == pytest.approx(
    [0.7 - 4.302653 * 0.2 / np.sqrt(3), 0.7 + 4.302653 * 0.2 / np.sqrt(3)]
  )
  assert row['balanced_accuracy'] is None
  assert '[0.203, 1.197]' in isic_runner.markdown_table([row])


@pytest.mark.parametrize('n', [2, 3, 7])
def test_seed_interval_is_students_t(n):
  rng = np.random.default_rng(n)
  values = rng.normal(0.7, 0.05, n)
  low, high = isic_runner.t_interval([*values, None])
  # Covers the mean symmetrically, with the t quantile's half-width.
  assert (low + high) / 2 == pytest.approx(values.mean())
  quantile = (high - values.mean()) * np.sqrt(n) / values.std(ddof=1)
  assert stats.t.cdf(quantile, n - 1) == pytest.approx(0.975)
  assert isic_runner.t_interval([0.5]) is None


def test_training_curve_reads_validation_auc_and_early_stop(tmp_path):
  lines = [
    {'step': 24, 'train_loss': 1.0},
    {'step': 48, 'eval_mean_auc': 0.61, 'eval_accuracy': 0.5},
    {'step': 96, 'eval_mean_auc': 0.66},
    {'step': 144, 'eval_mean_auc': 0.64, 'early_stopped': 1},
  ]
  (tmp_path / 'metrics.jsonl').write_text(
    ''.join(json.dumps(line) + '\n' for line in lines)
  )
  curve = isic_runner._training_curve(str(tmp_path))
  assert curve == {
    'steps': [48, 96, 144],
    'mean_auc': [0.61, 0.66, 0.64],
    'last': 144,
    'stopped': True,
  }


@pytest.mark.parametrize('num_classes,size', [(2, 1), (3, 57), (5, 200)])
def test_confusion_and_balanced_accuracy_match_a_loop(num_classes, size):
  rng = np.random.default_rng(size)
  labels = rng.integers(0, num_classes, size)
  predictions = rng.integers(0, num_classes, size)
  weight = rng.integers(0, 2, size).astype(np.float32)
  confusion = classwise.confusion_matrix(
    labels, predictions, num_classes, weight
  )
  recalls = []
  for c in range(num_classes):
    rows = (labels == c) & (weight > 0)
    assert confusion[c].sum() == rows.sum()
    if rows.any():
      recalls.append((predictions[rows] == c).mean())
  assert classwise.balanced_accuracy(confusion) == pytest.approx(
    np.mean(recalls) if recalls else None
  )
  assert np.trace(confusion) == ((labels == predictions) * weight).sum()


def test_balanced_accuracy_known_values():
  labels = np.array([0] * 8 + [1] * 2)
  majority = classwise.confusion_matrix(labels, np.zeros(10, int), 3)
  summary = classwise.summary(majority, ('a', 'b', 'c'))
  assert summary['accuracy'] == pytest.approx(0.8)
  # Class c has no examples: left out, not counted as a recall of 0.
  assert summary['balanced_accuracy'] == pytest.approx(0.5)
  assert summary['recall'] == {'a': 1.0, 'b': 0.0, 'c': None}
  with pytest.raises(ValueError, match=r'predictions must lie in \[0, 3\)'):
    classwise.confusion_matrix(labels, np.full(10, 3), 3)


def test_classwise_evaluator_counts_only_real_examples():
  rng = np.random.default_rng(0)
  images = rng.normal(size=(2, 6, 4, 4, 3)).astype(np.float32)
  labels = rng.integers(0, 3, (2, 6))
  weight = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]], np.float32)

  def predict(x):  # Class = which third of [-inf, inf) the mean falls in.
    logits = np.stack(
      [-x.mean((1, 2, 3)), 0 * x[:, 0, 0, 0], x.mean((1, 2, 3))]
    )
    return logits.T, None

  batches = [
    {'image': images[i], 'label': labels[i], 'weight': weight[i]}
    for i in range(2)
  ]
  evaluator = classwise.ClasswiseEvaluator(predict, class_names=CLASSES)
  ((name, value),) = list(evaluator.run(batches))
  assert name == 'classwise' and value['clean']['count'] == 9
  predicted = np.concatenate([predict(x)[0].argmax(-1) for x in images])
  real = weight.reshape(-1) > 0
  expected = classwise.confusion_matrix(
    labels.reshape(-1)[real], predicted[real], 3
  )
  np.testing.assert_array_equal(value['clean']['confusion'], expected)


def _subset(root: Path, per_class: int = 3) -> list[list[str]]:
  """`per_class` rows of each class and split of the sample, linked."""
  rows = list(csv.reader(open(ISIC / 'labels.csv')))[1:]
  subset = []
  for split in ('train', 'test'):
    for label in CLASSES:
      subset += [r for r in rows if r[1:] == [label, split]][:per_class]
  for part in ('images', 'masks'):
    (root / part).mkdir(parents=True)
  for image, _, _ in subset:
    stem = image.rsplit('.', 1)[0]
    (root / 'images' / image).symlink_to(ISIC / 'images' / image)
    (root / 'masks' / f'{stem}.png').symlink_to(ISIC / 'masks' / f'{stem}.png')
  with open(root / 'labels.csv', 'w', newline='') as f:
    csv.writer(f).writerows([['image', 'label', 'split'], *subset])
  return subset


def test_isic_config_reads_batches_with_masks_and_labels(tmp_path):
  if not (ISIC / 'labels.csv').exists():
    pytest.skip(f'ISIC sample not found under {df.SHARED_DATA}.')
  subset = _subset(tmp_path / 'isic')
  config = isic.get_config('cpu').data.to_dict()
  size = 32
  config.update(
    manual_dir=str(tmp_path / 'isic'),
    tfds_data_dir=str(tmp_path / 'tfds'),
    image_size=size,
    store_size=size,
    prefetch=0,
  )
  import ml_collections  # pylint: disable=g-import-not-at-top

  config = ml_collections.ConfigDict(config)
  assert data_lib.class_names(config) == CLASSES
  assert data_lib.split_sizes(config)['test'] == 9
  cam = (4, 4)
  (batch,) = list(
    data_lib.create_eval_iterator(
      config,
      'test',
      cam_size=cam,
      global_batch_size=9,
      num_devices=1,
      with_pixel_mask=True,
      with_file_name=True,
    )
  )
  assert batch['image'].shape == (1, 9, size, size, 3)
  assert batch['mask'].shape == (1, 9) + cam
  labels_by_file = {r[0]: r[1] for r in subset}
  for i, name in enumerate(batch['file_name'][0]):
    name = name.decode() if isinstance(name, bytes) else str(name)
    assert CLASSES[batch['label'][0, i]] == labels_by_file[name]
    original = Image.open(ISIC / 'masks' / f'{name.rsplit(".", 1)[0]}.png')
    expected = np.asarray(original.resize((size, size), Image.NEAREST)) > 0
    agreement = (batch['pixel_mask'][0, i] > 0.5) == expected
    assert agreement.mean() > 0.95, name  # Lesion, not skin, is the object.
  train = next(
    data_lib.create_train_iterator(
      config, cam_size=cam, global_batch_size=4, num_devices=1, seed=0
    )
  )
  assert train['image'].shape == (1, 4, size, size, 3)
  assert train['mask'].shape == (1, 4) + cam
  assert set(np.unique(train['label'])) <= {0, 1, 2}
  assert 0 < train['mask'].mean() < 1
