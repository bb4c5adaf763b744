"""Evaluation: interventions touch only their region, flip rates, influence,
and `evaluate_checkpoint` / `experiments.evaluate` on a tiny trained run."""

import json
import os

import numpy as np
import pytest
import synthetic_data
from test_train import tiny_config

from cco_jax import data as input_pipeline
from cco_jax import evaluation as ev
from cco_jax import train
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
    donor = ev.donor_positions(positions, len(images_by_position), seed=seed)
    return images_by_position[donor], masks_by_position[donor]

  return donors


def _batches(num_batches=3, devices=2, per_device=3, num_padding=2, seed=0):
  """Fake eval batches whose last `num_padding` examples are padding.

  Object pixels are bright (label 1) or dark (label 0); backgrounds random.
  """
  rng = np.random.default_rng(seed)
  total = num_batches * devices * per_device
  shape = (devices, per_device)
  images, masks, batches = [], [], []
  for b in range(num_batches):
    image, mask = _images_and_mask(shape, seed=seed + b)
    label = rng.integers(0, 2, shape).astype(np.int32)
    level = np.where(label == 1, 0.9, 0.1)[..., None, None, None]
    image = np.where(mask[..., None] > 0.5, level, image).astype(np.float32)
    index = (
      b * devices * per_device + np.arange(devices * per_device)
    ).reshape(shape)
    weight = (index < total - num_padding).astype(np.float32)
    index = np.where(weight > 0, index, -1).astype(np.int32)
    cam_mask = mask.reshape(
      shape + (CAM[0], S // CAM[0], CAM[1], S // CAM[1])
    ).mean((-3, -1))
    batches.append(
      {
        'image': image,
        'pixel_mask': mask,
        'mask': cam_mask,
        'label': label,
        'weight': weight,
        'index': index,
      }
    )
    images.append(image.reshape(-1, S, S, 3))
    masks.append(mask.reshape(-1, S, S))
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
    (0.5 - input_pipeline.IMAGENET_MEAN) / input_pipeline.IMAGENET_STD
    if normalize
    else 0.5
  )
  np.testing.assert_allclose(
    out[fg], np.broadcast_to(grey, out[fg].shape), rtol=1e-6
  )


def test_noise_depends_on_position_not_batch():
  a = ev.noise_fill(np.array([3, 5]), S, seed=1, std=0.25, normalize=False)
  b = ev.noise_fill(np.array([[5]]), S, seed=1, std=0.25, normalize=False)
  c = ev.noise_fill(np.array([5]), S, seed=2, std=0.25, normalize=False)
  np.testing.assert_array_equal(a[1], b[0, 0])
  assert not np.array_equal(a[1], c[0]) and not np.array_equal(a[0], a[1])
  assert a.min() >= 0 and a.max() <= 1 and abs(a.mean() - 0.5) < 0.05


def test_donors_form_one_cycle_without_fixed_points():
  donors = ev.donor_positions(np.arange(50), 50, seed=3)
  assert sorted(donors) == list(range(50))
  assert not np.any(donors == np.arange(50))
  seen, p = set(), 0
  while p not in seen:
    seen.add(p)
    p = donors[p]
  assert len(seen) == 50
  np.testing.assert_array_equal(
    ev.donor_positions(np.array([[7, 9]]), 50, seed=3)[0], donors[[7, 9]]
  )


def test_swap_pastes_donor_background_and_greys_the_donor_object():
  images, mask = _images_and_mask((4,))
  donor_images, donor_masks = _images_and_mask((4,), seed=1)
  out = ev.swap_background(
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
    ev.replace_background(images, np.ones((2, 3) + CAM), 0.5)


# ----------------------------------------------------------------------------
# Flip rates and influence over batches.
# ----------------------------------------------------------------------------


def test_flip_rate_and_relative_foreground_sensitivity():
  clean = np.array([[2.0, 1.0], [0.0, 1.0], [1.0, 0.0], [0.0, 3.0]])
  assert ev.flip_rate(clean, clean) == 0.0
  flipped = clean[:, ::-1]
  assert ev.flip_rate(clean, flipped) == 1.0
  assert ev.flip_rate(clean, flipped, np.array([1.0, 1.0, 0.0, 0.0])) == 1.0
  partly = np.concatenate([clean[:1], flipped[1:]])
  assert ev.flip_rate(clean, partly, np.array([3.0, 1.0, 0.0, 0.0])) == 0.25
  assert ev.relative_foreground_sensitivity(0.3, 0.1) == pytest.approx(0.75)
  assert ev.relative_foreground_sensitivity(0.0, 0.0) is None


def test_model_ignoring_its_input_never_flips():
  batches, images, masks = _batches()

  def constant(x):
    logits = np.broadcast_to(
      np.array([0.3, -0.2], np.float32), x.shape[:-3] + (2,)
    )
    return logits, np.zeros(x.shape[:-3] + CAM + (2,), np.float32)

  result = ev.evaluate_batches(
    constant, batches, context=ev.Context(donors=_donors(images, masks))
  )
  report = result.report
  labels = np.concatenate([b['label'].reshape(-1) for b in batches])[
    : report['count']
  ]
  assert report['count'] == len(images) - 2
  assert report['accuracy'] == pytest.approx(np.mean(labels == 0))
  assert set(report['perturbations']) == set(ev.PERTURBATIONS)
  for values in report['perturbations'].values():
    assert values['flip_rate'] == 0.0
  assert report['relative_foreground_sensitivity'] is None


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


def test_oracle_reading_only_the_object_ignores_background_interventions():
  batches, images, masks = _batches()
  oracle = _RegionReader('fg', batches)
  report = ev.evaluate_batches(
    oracle, oracle.stream(), context=ev.Context(donors=_donors(images, masks))
  ).report
  assert report['accuracy'] == 1.0
  for name in BACKGROUND:
    assert report['perturbations'][name]['flip_rate'] == 0.0, name
  # Grey 0.5 on the object: class 1 needs brightness > 0.5, so every label-1 flips.
  assert report['perturbations']['foreground_gray']['flip_rate'] > 0.2
  assert report['relative_foreground_sensitivity'] == 1.0


def test_model_reading_only_the_background_ignores_foreground_grey():
  batches, images, masks = _batches()
  reader = _RegionReader('bg', batches)
  report = ev.evaluate_batches(
    reader, reader.stream(), context=ev.Context(donors=_donors(images, masks))
  ).report
  assert report['perturbations']['foreground_gray']['flip_rate'] == 0.0
  assert report['perturbations']['background_noise']['flip_rate'] > 0.0
  assert report['relative_foreground_sensitivity'] in (0.0, None)


def test_influence_shares_and_map():
  rng = np.random.default_rng(0)
  cams = rng.normal(size=(5, 3, 3, 4)).astype(np.float32)
  labels = rng.integers(0, 4, 5)
  mask = (rng.random((5, 3, 3)) < 0.5).astype(np.float32)
  influence = ev.pixel_influence(cams, labels, mask)
  np.testing.assert_allclose(
    influence['net'], influence['fg'] + influence['bg'], rtol=1e-5
  )
  assert np.all((influence['bg_share'] >= 0) & (influence['bg_share'] <= 1))
  np.testing.assert_allclose(influence['map'].sum((1, 2)), 1.0, rtol=1e-6)
  outside = ev.pixel_influence(cams, labels, np.zeros_like(mask))
  np.testing.assert_allclose(outside['bg_share'], 1.0, rtol=1e-6)


def test_positions_select_what_counts_and_influence_is_reported():
  batches, images, masks = _batches()
  rng = np.random.default_rng(1)

  def predict(x):
    lead = x.shape[:-3]
    return rng.normal(size=lead + (2,)), rng.normal(size=lead + CAM + (2,))

  result = ev.evaluate_batches(
    predict,
    batches,
    perturbations={},
    positions=np.array([0, 4, 7]),
    keep_positions=np.array([4]),
  )
  influence = result.report['influence']
  assert result.report['count'] == 3 and result.report['perturbations'] == {}
  assert influence['net'] == pytest.approx(influence['fg'] + influence['bg'])
  for key in ('bg_share_mean', 'bg_share_of_sums'):
    assert 0.0 <= influence[key] <= 1.0
  assert result.influence_map.shape == CAM
  assert result.influence_map.sum() == pytest.approx(1.0)
  assert len(result.examples['label']) == 1
  assert ev.subset_positions(10, 3).tolist() == [0, 3, 6]
  assert (
    ev.subset_positions(10, None) is None and ev.subset_positions(3, 5) is None
  )


# ----------------------------------------------------------------------------
# A trained run, end to end.
# ----------------------------------------------------------------------------


REPORT_KEYS = {
  'workdir',
  'step',
  'checkpoint',
  'checkpoint_metrics',
  'split',
  'count',
  'accuracy',
  'ce',
  'perturbations',
  'relative_foreground_sensitivity',
  'influence',
  'ood',
  'task',
  'model',
  'loss',
  'data',
}


def test_evaluate_checkpoint_of_a_tiny_run(
  tmp_path, synthetic_pets_dir, synthetic_cvd_dir, synthetic_data_dir
):
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
  # Cats-vs-Dogs images other than the training-time ones: the shared data dir
  # holds the first copy, so this one must be prepared beside the run.
  other_cvd = synthetic_data.write_synthetic_cats_vs_dogs(
    tmp_path / 'other_cvd'
  )
  (other_cvd / 'PetImages' / 'Cat' / '0.jpg').unlink()
  result = ev.run_checkpoint_evaluation(
    str(workdir), ood_manual_dir=str(other_cvd), keep_examples=2
  )
  report = result.report
  assert REPORT_KEYS <= set(report)
  json.dumps(report, allow_nan=False)
  assert report['step'] == 2 and report['checkpoint'] == 'best'
  assert report['count'] == synthetic_data.NUM_TEST
  assert set(report['perturbations']) == set(ev.PERTURBATIONS)
  for values in report['perturbations'].values():
    assert (
      0.0 <= values['accuracy'] <= 1.0 and 0.0 <= values['flip_rate'] <= 1.0
    )
  influence = report['influence']
  assert influence['net'] == pytest.approx(
    influence['fg'] + influence['bg'], rel=1e-4
  )
  assert np.array(influence['map']).shape == (4, 4)
  assert report['ood']['count'] == synthetic_data.NUM_CVD_DECODABLE - 1
  ood_dir = report['ood']['tfds_data_dir']
  assert ood_dir.startswith(
    os.path.join(str(workdir), ev.EVALUATION_DIR, 'tfds_')
  )
  assert report['data']['tfds_data_dir'] == str(synthetic_data_dir)

  path = evaluate_cli.write_outputs(str(workdir), result, normalize=False)
  assert json.loads(open(path).read())['count'] == report['count']
  for name in (
    'cams_test.png',
    'perturbations_test.png',
    'influence_map_test.png',
  ):
    assert os.path.getsize(workdir / ev.EVALUATION_DIR / name) > 0
  assert any(
    'Cats-vs-Dogs' in line for line in evaluate_cli.summary_lines(report)
  )

  # The restored model is the one training evaluated at that step.
  validation = ev.evaluate_checkpoint(
    str(workdir), split='validation', perturb=False, with_ood=False
  )
  logged = validation['checkpoint_metrics']
  assert validation['accuracy'] == logged['eval_accuracy']
  assert validation['ce'] == pytest.approx(logged['eval_ce'], rel=1e-4)
  assert validation['influence']['bg_share_of_sums'] == pytest.approx(
    logged['eval_bg_share'], rel=1e-4
  )
  small = ev.evaluate_checkpoint(
    str(workdir),
    split='validation',
    num_examples=2,
    perturb=False,
    with_ood=False,
  )
  assert (
    small['count'] == 2
    and small['perturbations'] == {}
    and small['ood'] is None
  )


def test_config_json_restores_tuples(tmp_path):
  config = tiny_config('p', 'c', 'd')
  (tmp_path / 'config.json').write_text(config.to_json_best_effort())
  restored = ev.load_config(str(tmp_path))
  assert restored.model.stage_sizes == (1, 1, 1, 1)
  assert restored.data.to_dict() == config.data.to_dict()
  with pytest.raises(FileNotFoundError, match='config.json'):
    ev.load_config(str(tmp_path / 'missing'))


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
