"""Evaluation: interventions touch only their region; evaluators on oracle
models; `evaluate_checkpoint` / `experiments.evaluate` on a tiny run."""

import json
import os

import numpy as np
import pytest
import synthetic_data
from test_explain import write_tiny_run
from test_train import tiny_config

from cco_jax import evaluation as ev
from cco_jax import restore
from cco_jax import train
from cco_jax.data import config as data_config
from cco_jax.evaluation import evaluators
from cco_jax.evaluation import interventions as iv
from cco_jax.evaluation import report as report_lib
from experiments import evaluate as evaluate_cli
from experiments import reproduce

S = 8
CAM = (2, 2)
BACKGROUND = [
  k for k, p in ev.PERTURBATIONS.items() if p.region == 'background'
]


def _images_and_mask(shape=(2, 3), seed=0):
  rng = np.random.default_rng(seed)
  images = rng.uniform(0.01, 0.99, shape + (S, S, 3)).astype(np.float32)
  mask = (rng.random(shape + (S, S)) < 0.4).astype(np.float32)
  return images, mask


def _donors(images_by_position, masks_by_position, seed=0):
  """A `Context.donors` over in-memory examples (position -> arrays)."""

  def donors(positions):
    donor = iv.donor_positions(positions, len(images_by_position), seed=seed)
    return images_by_position[donor], masks_by_position[donor]

  return donors


def _batches(num_batches=3, per_batch=6, num_padding=2, seed=0):
  """Fake flat eval batches whose last `num_padding` examples are padding.

  Object pixels are bright (label 1) or dark (label 0); backgrounds random;
  groups 0..3 = 2 * label + position parity.
  """
  rng = np.random.default_rng(seed)
  total = num_batches * per_batch
  images, masks, batches = [], [], []
  for b in range(num_batches):
    image, mask = _images_and_mask((per_batch,), seed=seed + b)
    label = rng.integers(0, 2, per_batch).astype(np.int32)
    level = np.where(label == 1, 0.9, 0.1)[..., None, None, None]
    image = np.where(mask[..., None] > 0.5, level, image).astype(np.float32)
    index = b * per_batch + np.arange(per_batch)
    weight = (index < total - num_padding).astype(np.float32)
    index = np.where(weight > 0, index, -1).astype(np.int32)
    cam_mask = mask.reshape(
      (per_batch, CAM[0], S // CAM[0], CAM[1], S // CAM[1])
    ).mean((-3, -1))
    batches.append(
      {
        'image': image,
        'pixel_mask': mask,
        'mask': cam_mask,
        'label': label,
        'group': (2 * label + index % 2).astype(np.int32),
        'weight': weight,
        'index': index,
      }
    )
    images.append(image)
    masks.append(mask)
  return batches, np.concatenate(images), np.concatenate(masks)


# ----------------------------------------------------------------------------
# Interventions.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize('normalize', [False, True])
def test_background_interventions_keep_the_object_exactly(normalize):
  images, mask = _images_and_mask()
  images = ev.to_model_space(images, normalize=normalize)
  index = np.arange(6).reshape(2, 3)
  context = ev.Context(
    normalize=normalize,
    donors=_donors(
      images.reshape(-1, S, S, 3)[::-1].copy(), 1 - mask.reshape(-1, S, S)
    ),
  )
  batch = {'image': images, 'pixel_mask': mask, 'index': index}
  fg, bg = mask > 0.5, mask <= 0.5
  for name in BACKGROUND:
    out = ev.PERTURBATIONS[name].apply(batch, context)
    assert out.shape == images.shape and out.dtype == np.float32
    np.testing.assert_array_equal(out[fg], images[fg], err_msg=name)
    assert np.all(np.any(out[bg] != images[bg], -1)), name


@pytest.mark.parametrize('normalize', [False, True])
def test_foreground_grey_keeps_the_background_exactly(normalize):
  images, mask = _images_and_mask()
  out = ev.PERTURBATIONS['foreground_gray'].apply(
    {'image': images, 'pixel_mask': mask}, ev.Context(normalize=normalize)
  )
  fg, bg = mask > 0.5, mask <= 0.5
  np.testing.assert_array_equal(out[bg], images[bg])
  grey = (
    (0.5 - data_config.IMAGENET_MEAN) / data_config.IMAGENET_STD
    if normalize
    else 0.5
  )
  np.testing.assert_allclose(
    out[fg], np.broadcast_to(grey, out[fg].shape), rtol=1e-6
  )


def test_noise_depends_on_position_not_batch():
  a = iv.noise_fill(np.array([3, 5]), S, seed=1, std=0.25, normalize=False)
  b = iv.noise_fill(np.array([[5]]), S, seed=1, std=0.25, normalize=False)
  c = iv.noise_fill(np.array([5]), S, seed=2, std=0.25, normalize=False)
  np.testing.assert_array_equal(a[1], b[0, 0])
  assert not np.array_equal(a[1], c[0]) and not np.array_equal(a[0], a[1])
  assert a.min() >= 0 and a.max() <= 1 and abs(a.mean() - 0.5) < 0.05


def test_donors_form_one_cycle_without_fixed_points():
  donors = iv.donor_positions(np.arange(50), 50, seed=3)
  assert sorted(donors) == list(range(50))
  assert not np.any(donors == np.arange(50))
  seen, p = set(), 0
  while p not in seen:
    seen.add(p)
    p = donors[p]
  assert len(seen) == 50
  np.testing.assert_array_equal(
    iv.donor_positions(np.array([[7, 9]]), 50, seed=3)[0], donors[[7, 9]]
  )


def test_swap_pastes_donor_background_and_greys_the_donor_object():
  images, mask = _images_and_mask((4,))
  donor_images, donor_masks = _images_and_mask((4,), seed=1)
  out = iv.swap_background(
    images, mask, donor_images, donor_masks, normalize=False
  )
  own = mask > 0.5
  both_bg = (mask <= 0.5) & (donor_masks <= 0.5)
  donor_object = (mask <= 0.5) & (donor_masks > 0.5)
  np.testing.assert_array_equal(out[own], images[own])
  np.testing.assert_array_equal(out[both_bg], donor_images[both_bg])
  np.testing.assert_array_equal(
    out[donor_object], np.full_like(out[donor_object], 0.5)
  )


def test_mask_at_cam_resolution_is_an_error_naming_pixel_mask():
  images, _ = _images_and_mask()
  with pytest.raises(ValueError, match='pixel_mask'):
    iv.replace_background(images, np.ones((2, 3) + CAM), 0.5)


# ----------------------------------------------------------------------------
# Evaluators over batches, with oracle models.
# ----------------------------------------------------------------------------


def test_model_ignoring_its_input_never_flips():
  batches, images, masks = _batches()

  def constant(x):
    logits = np.broadcast_to(np.array([0.3, -0.2], np.float32), (len(x), 2))
    return logits, np.zeros((len(x),) + CAM + (2,), np.float32)

  context = ev.Context(donors=_donors(images, masks))
  report = dict(
    evaluators.InterventionEvaluator(constant, context=context).run(batches)
  )
  assert set(report['perturbations']) == set(ev.PERTURBATIONS)
  for values in report['perturbations'].values():
    assert values['flip_rate'] == 0.0
  labels = np.concatenate([b['label'] for b in batches])
  weight = np.concatenate([b['weight'] for b in batches])
  accuracy = (weight * (labels == 0)).sum() / weight.sum()
  assert report['perturbations']['background_noise']['accuracy'] == (
    pytest.approx(accuracy)
  )
  assert report['relative_foreground_sensitivity'] == 0.0
  assert report['foreground_flip_share'] is None


class _RegionReader:
  """Predicts from the mean brightness of the object ('fg') or of the background
  ('bg') only, the oracles of the flip-rate tests.

  The evaluator handles one batch at a time (clean, then each intervention), so
  the predictor reads the pixel mask of the batch that `stream` last yielded.
  """

  def __init__(self, region, batches):
    self.region, self.batches, self.mask = region, batches, None

  def stream(self):
    for batch in self.batches:
      self.mask = batch['pixel_mask']
      yield batch

  def __call__(self, images):
    weight = self.mask if self.region == 'fg' else 1 - self.mask
    brightness = (images.mean(-1) * weight).sum((-2, -1)) / np.maximum(
      weight.sum((-2, -1)), 1
    )
    logits = np.stack([0.5 - brightness, brightness - 0.5], -1)
    cams = np.zeros(images.shape[:-3] + CAM + (2,), np.float32)
    cams[..., 0, 0, :] = logits
    return logits, cams


def _interventions(reader, images, masks):
  context = ev.Context(donors=_donors(images, masks))
  evaluator = evaluators.InterventionEvaluator(
    reader, context=context, keep_examples=3
  )
  return dict(evaluator.run(reader.stream()))


def test_oracle_reading_only_the_object_ignores_background_interventions():
  batches, images, masks = _batches()
  report = _interventions(_RegionReader('fg', batches), images, masks)
  for name in BACKGROUND:
    assert report['perturbations'][name]['flip_rate'] == 0.0, name
    assert report['perturbations'][name]['accuracy'] == 1.0, name
  # Grey 0.5 on the object: class 1 needs brightness > 0.5, so every label-1 flips.
  assert report['perturbations']['foreground_gray']['flip_rate'] > 0.2
  assert report['foreground_flip_share'] == 1.0
  # Accuracy 1 with a noisy background, lower with a noisy object: RFS = 1.
  assert report['perturbations']['foreground_noise']['accuracy'] < 1.0
  assert report['relative_foreground_sensitivity'] == pytest.approx(1.0)
  examples = report['examples']
  assert len(examples['label']) == 3
  assert len(set(examples['label'].tolist())) == 2  # both classes shown
  assert examples['image_background_gray'].shape == (3, S, S, 3)


def test_model_reading_only_the_background_ignores_foreground_changes():
  batches, images, masks = _batches()
  report = _interventions(_RegionReader('bg', batches), images, masks)
  assert report['perturbations']['foreground_gray']['flip_rate'] == 0.0
  assert report['perturbations']['foreground_noise']['flip_rate'] == 0.0
  assert report['perturbations']['background_noise']['flip_rate'] > 0.0
  assert report['foreground_flip_share'] == 0.0


def _linear_predictor(classes=3, seed=0):
  """Logits and exact maps of a linear model on 2x2-pixel cells."""
  w = np.random.default_rng(seed).normal(size=(3, classes)).astype(np.float32)

  def predict(images):
    cells = images.reshape(len(images), CAM[0], S // CAM[0], CAM[1], -1, 3)
    features = cells.mean((2, 4))  # (B, h, w, 3)
    cams = features @ w / (CAM[0] * CAM[1])
    return cams.sum((1, 2)) + 0.5, cams

  return predict


def test_classification_matches_an_independent_computation():
  batches, _, _ = _batches()
  predict = _linear_predictor(classes=2)
  names = ['a', 'b', 'c', 'd']
  report = dict(
    evaluators.ClassificationEvaluator(
      predict, bias=np.full(2, 0.5), group_names=names, keep_examples=2
    ).run(batches)
  )
  flat = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
  logits, cams = predict(flat['image'])
  real = flat['weight'] > 0
  labels = flat['label']
  correct = logits.argmax(-1) == labels
  assert report['count'] == real.sum()
  assert report['accuracy'] == pytest.approx(correct[real].mean())
  z = logits - logits.max(-1, keepdims=True)
  ce = np.log(np.exp(z).sum(-1)) - z[np.arange(len(z)), labels]
  assert report['ce'] == pytest.approx(ce[real].mean(), rel=1e-5)
  k = np.abs(cams[np.arange(len(z)), ..., labels][..., None] - cams).sum(-1)
  bg = (k * (1 - flat['mask'])).sum((1, 2))
  assert report['bg_share'] == pytest.approx(
    bg[real].sum() / k[real].sum(), rel=1e-5
  )
  assert report['identity_error'] < 1e-6
  for g, name in enumerate(names):
    chosen = real & (flat['group'] == g)
    expected = correct[chosen].mean() if chosen.any() else None
    assert report[f'group_accuracy/{name}'] == pytest.approx(expected)
  accuracies = [correct[real & (flat['group'] == g)].mean() for g in range(4)]
  assert report['worst_group_accuracy'] == pytest.approx(min(accuracies))
  assert report['average_group_accuracy'] == pytest.approx(np.mean(accuracies))
  assert report['influence_map'].shape == CAM
  assert report['influence_map'].sum() == pytest.approx(1.0)
  assert report['examples']['cams'].shape == (2,) + CAM + (2,)


def test_localisation_of_maps_on_and_off_the_object():
  batches, _, _ = _batches()
  for batch in batches:  # binary masks: the cells of largest object share
    top = batch['mask'].max((1, 2), keepdims=True)
    batch['mask'] = (batch['mask'] == top).astype(np.float32)

  def on_object(images, sign=1.0):
    batch = next(b for b in batches if b['image'] is images)
    cams = np.repeat(sign * batch['mask'][..., None], 2, -1)
    return np.zeros((len(images), 2)), cams

  def run(predict):
    return dict(evaluators.LocalisationEvaluator(predict).run(batches))

  on = run(on_object)
  off = run(lambda x: on_object(x, -1.0))
  assert on['localisation_count'] > 0
  assert on['pointing_game'] == 1.0 and off['pointing_game'] < 1.0
  assert on['top_20_iou'] > off['top_20_iou']


def test_deletion_insertion_ranks_a_faithful_map_first():
  batches, _, _ = _batches()
  predict = _linear_predictor(classes=2, seed=3)

  def reversed_map(images, classes):
    _, cams = predict(images)
    return -cams[np.arange(len(images)), ..., classes]

  out = dict(
    evaluators.DeletionInsertionEvaluator(
      predict, gradcam_fn=reversed_map, steps=4, max_examples=5
    ).run(batches)
  )
  assert out['deletion_insertion_count'] == 5
  ours, reverse = (
    out['deletion_insertion']['hirescam'],
    out['deletion_insertion']['gradcam'],
  )
  assert ours['deletion_auc'] < reverse['deletion_auc']
  assert ours['insertion_auc'] > reverse['insertion_auc']


def test_subset_positions():
  assert report_lib.subset_positions(10, 3).tolist() == [0, 3, 6]
  assert report_lib.subset_positions(10, 0) is None
  assert report_lib.subset_positions(3, 5) is None
  with pytest.raises(ValueError, match='num_examples'):
    report_lib.subset_positions(3, -1)


# ----------------------------------------------------------------------------
# A run, end to end.
# ----------------------------------------------------------------------------


def test_evaluate_checkpoint_of_a_tiny_run(
  tmp_path, synthetic_pets_dir, synthetic_cvd_dir, synthetic_data_dir
):
  workdir = tmp_path / 'run'
  config = tiny_config(
    synthetic_pets_dir, synthetic_cvd_dir, synthetic_data_dir
  )
  write_tiny_run(str(workdir), config)
  # Cats-vs-Dogs images other than the training-time ones: the shared data dir
  # holds the first copy, so this one must be prepared beside the run.
  other_cvd = synthetic_data.write_synthetic_cats_vs_dogs(
    tmp_path / 'other_cvd'
  )
  (other_cvd / 'PetImages' / 'Cat' / '0.jpg').unlink()
  settings = ev.default_config()
  settings.keep_examples = 2
  settings.deletion_examples = 3
  settings.deletion_steps = 2
  result = ev.evaluate_checkpoint(
    str(workdir),
    settings,
    ood_overrides={'ood_manual_dir': str(other_cvd)},
  )
  report = result.report
  json.dumps(report, allow_nan=False)
  assert report['step'] == 2 and report['checkpoint'] == 'best'
  assert report['count'] == synthetic_data.NUM_TEST
  assert set(report['perturbations']) == set(ev.PERTURBATIONS)
  for key in ('accuracy', 'bg_share', 'pointing_game', 'top_20_iou'):
    assert 0.0 <= report[key] <= 1.0, key
  assert report['identity_error'] < 1e-5
  assert set(report['deletion_insertion']) == {'hirescam', 'gradcam'}
  assert np.array(report['influence_map']).shape == (4, 4)
  assert report['ood']['count'] == synthetic_data.NUM_CVD_DECODABLE - 1
  assert report['ood']['tfds_data_dir'].startswith(
    os.path.join(str(workdir), ev.EVALUATION_DIR, 'tfds_')
  )
  assert report['data']['tfds_data_dir'] == str(synthetic_data_dir)

  path = evaluate_cli.write_outputs(str(workdir), result)
  assert path == str(workdir / 'evaluation' / 'report_2.json')
  assert json.loads(open(path).read())['count'] == report['count']
  for name in ('cams', 'perturbations', 'influence_map'):
    assert os.path.getsize(workdir / 'evaluation' / f'{name}_test_2.png') > 0
  lines = evaluate_cli.summary_lines(report)
  assert any('Cats-vs-Dogs' in line for line in lines)
  assert any('pointing game' in line for line in lines)
  mean_auc = report['auc']['mean_auc']
  assert any(f'mean AUC {mean_auc:.3f} [' in line for line in lines)

  # Another checkpoint gets its own report; the first one stays.
  settings = ev.default_config()
  settings.evaluators = ('classification',)
  settings.num_examples = 2
  settings.ood = False
  last = ev.evaluate_checkpoint(str(workdir), settings, step='last')
  assert last.report['step'] == 4 and last.report['count'] == 2
  assert 'perturbations' not in last.report and last.report['ood'] is None
  evaluate_cli.write_outputs(str(workdir), last)
  assert json.loads(open(path).read())['step'] == 2
  assert (workdir / 'evaluation' / 'report_4.json').exists()


def test_offline_evaluation_equals_the_training_loops(
  tmp_path, synthetic_pets_dir, synthetic_cvd_dir, synthetic_data_dir
):
  """One path: a trained run's logged validation metrics are reproduced."""
  workdir = tmp_path / 'run'
  train.train_and_evaluate(
    tiny_config(
      synthetic_pets_dir,
      synthetic_cvd_dir,
      synthetic_data_dir,
      num_train_steps=2,
      eval_ood=False,
      num_figure_examples=0,
    ),
    str(workdir),
  )
  settings = ev.default_config()
  settings.split = 'validation'
  settings.evaluators = ('classification',)
  settings.ood = False
  report = ev.evaluate_checkpoint(str(workdir), settings).report
  logged = report['checkpoint_metrics']
  assert report['step'] == 2
  assert report['accuracy'] == logged['eval_accuracy']
  assert report['count'] == logged['eval_count']
  assert report['ce'] == pytest.approx(logged['eval_ce'], rel=1e-4)
  assert report['bg_share'] == pytest.approx(logged['eval_bg_share'], rel=1e-4)


def test_config_json_restores_tuples(tmp_path):
  config = tiny_config('p', 'c', 'd')
  (tmp_path / 'config.json').write_text(config.to_json_best_effort())
  restored = restore.load_config(str(tmp_path))
  assert restored.model.stage_sizes == (1, 1, 1, 1)
  assert restored.data.to_dict() == config.data.to_dict()
  with pytest.raises(FileNotFoundError, match='config.json'):
    restore.load_config(str(tmp_path / 'missing'))


# ----------------------------------------------------------------------------
# The reproduction driver's bookkeeping (no training).
# ----------------------------------------------------------------------------


def test_reproduce_selects_runs_and_aggregates():
  specs = reproduce.select_runs(['spurious', 'cpu_ace'], [0, 1])
  assert [s.name for s in specs] == [
    'spurious_cpu_ace_s0',
    'spurious_cpu_ace_s1',
  ]
  assert len(reproduce.select_runs([], [0, 1, 2])) == 18
  with pytest.raises(ValueError, match='unknown'):
    reproduce.select_runs(['pets'], [0])
  records = [
    {key: None for key, _ in reproduce.COLUMNS}
    | {
      'dataset': 'spurious',
      'variant': 'cpu_ace',
      'seed': s,
      'spurious_reversed_accuracy': acc,
      'relative_foreground_sensitivity': None,
      'bg_share_mean_of_images': None,
    }
    for s, acc in ((0, 0.5), (1, 0.7))
  ]
  (row,) = reproduce.aggregate(records)
  assert row['spurious_reversed_accuracy']['mean'] == pytest.approx(0.6)
  assert row['spurious_reversed_accuracy']['std'] == pytest.approx(
    np.std([0.5, 0.7], ddof=1)
  )
  assert row['ood_accuracy'] is None
  table = reproduce.markdown_table(
    [row], {'platform': 'x', 'cpu_count': 2, 'jax': '0', 'devices': 'cpu'}, 60.0
  )
  assert '0.600 ± 0.141' in table and '| spurious | ACE |' in table


def _write_grouped_folder(root, num=24, size=20, seed=0):
  """A 'folder' dataset: two classes (bright / dark object), two groups
  (background), labels.csv with a group column."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(seed)
  (root / 'images').mkdir(parents=True)
  (root / 'masks').mkdir()
  rows = ['image,label,split,group']
  for i in range(num):
    label, group = ('bright', 'dark')[i % 2], ('land', 'water')[(i // 2) % 2]
    pixels = rng.integers(0, 256, (size, size, 3)).astype(np.uint8)
    mask = np.zeros((size, size), np.uint8)
    mask[5:15, 5:15] = 255
    pixels[mask > 0] = 230 if label == 'bright' else 20
    Image.fromarray(pixels).save(root / 'images' / f'{i}.png')
    Image.fromarray(mask).save(root / 'masks' / f'{i}.png')
    split = 'test' if i % 3 == 0 else 'train'
    rows.append(f'{i}.png,{label},{split},{group}')
  (root / 'labels.csv').write_text('\n'.join(rows) + '\n')
  return root


def test_grouped_dataset_reports_worst_group_accuracy(tmp_path):
  from cco_jax import configuration  # pylint: disable=g-import-not-at-top

  root = _write_grouped_folder(tmp_path / 'grouped')
  config = tiny_config(root, '', tmp_path / 'tfds')
  configuration.apply_overrides(
    config, {'data.name': 'folder', 'data.task': 'label'}
  )
  workdir = tmp_path / 'run'
  write_tiny_run(str(workdir), config)
  settings = ev.default_config()
  settings.evaluators = ('classification',)
  report = ev.evaluate_checkpoint(str(workdir), settings).report
  assert report['class_names'] == ['bright', 'dark'] and report['ood'] is None
  groups = [report[f'group_accuracy/{g}'] for g in ('land', 'water')]
  assert report['worst_group_accuracy'] == min(groups)
  assert report['average_group_accuracy'] == pytest.approx(np.mean(groups))
  assert report['count'] == 8
  assert any(
    'worst-group accuracy' in line
    for line in evaluate_cli.summary_lines(report)
  )


@pytest.mark.parametrize('undefined', [float('nan'), None])
def test_summary_names_a_task_without_positives_instead_of_failing(undefined):
  """A split without one diagnosis (a subset of ISIC without seborrheic
  keratoses) has no AUC for that task: NaN in memory, None in the JSON."""
  report = {
    'workdir': '/w',
    'step': 3,
    'checkpoint': 'best',
    'split': 'test',
    'count': 60,
    'auc': {
      'mean_auc': undefined,
      'mean_auc_interval': [undefined, undefined],
      'tasks': {
        'melanoma': {'auc': 0.71, 'num_positives': 9, 'num_negatives': 51},
        'seborrheic_keratosis': {
          'auc': undefined,
          'num_positives': 0,
          'num_negatives': 60,
        },
      },
    },
  }
  (line,) = [x for x in evaluate_cli.summary_lines(report) if 'AUC' in x]
  assert line == (
    '  mean AUC n/a [n/a, n/a]; AUC per task: melanoma 0.710, '
    'seborrheic_keratosis n/a (0 positive, 60 negative images)'
  )
