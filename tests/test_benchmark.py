"""The benchmark's smoke mode runs and reports what docs/benchmarks/training.md reads.

Speed is never asserted; only the structure of the results, and that the
reference it compares against (per-class autodiff HiResCAM, through the head
and through the whole network) yields the same maps as the one-pass einsum.
"""

import json

import numpy as np
import pytest

from cco_jax import model_config
from cco_jax import models
from experiments.benchmarks import training_flops
from experiments.benchmarks import training_maps
from experiments.benchmarks import training_run
from experiments.benchmarks import training_settings
from experiments.configs import pets


@pytest.fixture(scope='module')
def smoke_results():
  chosen = training_settings.preset('cpu', smoke=True)
  # Optimisation level 0 compiles the steps ~1.5x faster; speed is not tested.
  results = training_run.run(
    chosen,
    chosen.steps,
    ('step', 'cams'),
    repeats=1,
    compiler_options={'xla_backend_optimization_level': 0},
  )
  json.dumps(results)  # What the entry point writes must be JSON.
  return results


def test_step_section_times_each_objective_and_its_ratio_to_ce(smoke_results):
  (entry,) = smoke_results['step']
  assert entry['setting']['label'] == 'tiny_resnet18'
  rows = entry['objectives']
  assert set(rows) == {'ce', 'ace_kld'}
  for row in rows.values():
    assert row['median_s'] > 0 and row['compile_s'] > 0 and row['lower_s'] > 0
    assert row['images_per_s'] == pytest.approx(
      entry['setting']['batch'] / row['median_s']
    )
    assert row['gflops_per_step'] > 0
    assert np.isfinite(row['loss_last'])
  assert rows['ce']['ratio_to_ce'] == 1.0
  assert rows['ace_kld']['ratio_to_ce'] == pytest.approx(
    rows['ace_kld']['median_s'] / rows['ce']['median_s']
  )


def test_einsum_maps_equal_autodiff_maps(smoke_results):
  cams = smoke_results['cams']
  assert set(cams['features']) == {'2', '5'}
  for row in cams['features'].values():
    assert row['max_rel_err_loop'] < 1e-5
    assert row['max_rel_err_vmap'] < 1e-5
    assert row['einsum_s'] > 0 and row['autodiff_head_loop_s'] > 0
  network = cams['network']
  assert set(network['classes']) == {'2', '5'}
  for count, row in network['classes'].items():
    assert row['backward_passes'] == int(count)
    assert row['max_rel_err'] < 1e-5
    assert row['autodiff_total_s'] > row['backwards_s'] > 0


def test_environment_records_versions_and_load(smoke_results):
  env = smoke_results['environment']
  for key in (
    'jax',
    'jaxlib',
    'flax',
    'backend',
    'cpus',
    'xla_flags',
    'loadavg_start',
    'loadavg_end',
  ):
    assert key in env


def test_autodiff_reference_on_a_known_head():
  # One pixel, one channel per class: the map is A * W / (H W) exactly.
  features = np.arange(1.0, 9.0, dtype=np.float32).reshape(1, 2, 2, 2)
  kernel = np.array([[1.0, 0.0, 2.0], [0.0, 1.0, -1.0]], np.float32)
  maps = np.asarray(training_maps.autodiff_maps_loop(features, kernel))
  expected = np.einsum('bhwf,fc->bhwc', features, kernel) / 4
  np.testing.assert_allclose(maps, expected, rtol=1e-6)
  np.testing.assert_allclose(
    training_maps.autodiff_maps_vmap(features, kernel), expected, rtol=1e-6
  )


def test_unknown_model_spec_is_a_usage_error():
  chosen = training_settings.preset('cpu', smoke=False)
  assert (
    training_settings.parse_setting('resnet50:224:80:37', chosen.steps).batch
    == 80
  )
  assert (
    training_settings.parse_setting('resnet18_128', chosen.steps).image_size
    == 128
  )
  with pytest.raises(Exception, match='neither a preset label'):
    training_settings.parse_setting('vgg:1:2:3', chosen.steps)


# ---------------------------------------------------------------------------
# FLOPs: XLA's count of the lowered step against an independent count
# ---------------------------------------------------------------------------


def test_analytic_count_of_one_convolution_excludes_padding():
  """A 3x3 'SAME' convolution of a 4x4 input: the 4 corner outputs see 4
  taps, the 8 edge ones 6, the 4 inner ones 9: 16 + 48 + 36 = 100 = 10 x 10
  taps per channel pair (10 per dimension)."""
  model = models.create_model(
    'resnet18', 2, num_filters=8, stem='strided', stage_sizes=(1, 1, 1, 1)
  )
  assert training_flops._valid_taps(4, 3, 1, 'SAME') == 10
  assert training_flops._valid_taps(4, 3, 2, 'SAME') == 5  # Outputs 0, 2.
  # The 7x7 stride-2 stem, padding 3, on 7 pixels: windows start at -3, -1,
  # 1, 3 and hold 4, 6, 6, 4 pixels.
  assert training_flops._valid_taps(7, 7, 2, (3, 3)) == 20
  forward = training_flops.analytic_forward_flops(model, 32, 2)
  assert training_flops.analytic_step_flops(model, 32, 2) == 3 * forward


@pytest.mark.parametrize('variant', ['cpu', 'cpu_ce'])
def test_xla_count_of_the_step_agrees_with_the_analytic_count(variant):
  """The CPU lowering's count (what the GPU check's MFU divides by) is 3 x
  the forward products, plus 1-2 % of elementwise work (BatchNorm, ReLU,
  Adam), minus the stem's unneeded input gradient."""
  config = pets.get_config(variant)
  model = model_config.create_model(config, 2)
  xla = training_flops.config_step_flops(config, 8, 2)
  analytic = training_flops.analytic_step_flops(model, 64, 8)
  assert 1.0 <= xla / analytic < 1.03, (xla, analytic)
  # Linear in the batch but for the per-step optimizer update (~0.3 %).
  assert training_flops.config_step_flops(config, 16, 2) == pytest.approx(
    2 * xla, rel=5e-3
  )


# ---------------------------------------------------------------------------
# JPEG draft decoding: close to the full decode on real images
# ---------------------------------------------------------------------------


def test_jpeg_draft_stays_close_to_the_full_decode_on_real_pets_images():
  import os  # pylint: disable=g-import-not-at-top

  from synthetic_data import SHARED_DATA  # pylint: disable=g-import-not-at-top

  from experiments.benchmarks import (
    jpeg_draft,  # pylint: disable=g-import-not-at-top
  )

  folder = os.path.join(SHARED_DATA, 'oxford-iiit-pet-sample', 'images')
  if not os.path.isdir(folder):
    pytest.skip(f'Real data samples not found under {SHARED_DATA}.')
  names = sorted(n for n in os.listdir(folder) if n.endswith('.jpg'))[:60]
  records = []
  for i, name in enumerate(names):
    with open(os.path.join(folder, name), 'rb') as f:
      data = f.read()
    if data[:2] == b'\xff\xd8':  # JPEG (the sample holds a GIF and a PNG).
      records.append(
        {'image': data, 'species': 0, 'index': i, 'file_name': name}
      )
  # The pipeline's rule (sides never below the target): few images reduced,
  # nearly identical pixels.
  exact = jpeg_draft.draft_difference(records, 224, 1.0)
  assert exact['images'] == len(records) > 50
  assert exact['mean_abs_difference'] < 0.002
  assert exact['max_image_mean_abs_difference'] < 0.02
  # Down to half the target: most images decoded at 1/2, still within ~1 %.
  half = jpeg_draft.draft_difference(records, 224, 0.5)
  assert half['reduced_by_the_draft'] > len(records) // 2
  assert half['mean_abs_difference'] < 0.015
  assert half['max_image_mean_abs_difference'] < 0.06
  # No draft: the full decode itself.
  none = jpeg_draft.draft_difference(records[:5], 224, 0.0)
  assert none['reduced_by_the_draft'] == 0 and none['mean_abs_difference'] == 0
