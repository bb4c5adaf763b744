"""The spurious-background benchmark: layout, counts, correlation, determinism."""

import hashlib
import json
from pathlib import Path
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest
import synthetic_data

from cco_jax import data as data_lib
from cco_jax.data import spurious
from cco_jax.data.datasets import oxford_iiit_pet

REPO = Path(__file__).resolve().parents[1]
NUM_LISTED = synthetic_data.NUM_TRAINVAL + synthetic_data.NUM_TEST


def _hashes(root: Path) -> dict[str, str]:
  return {
    str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
    for p in sorted(root.rglob('*'))
    if p.is_file()
  }


@pytest.fixture(scope='module')
def benchmark(tmp_path_factory, synthetic_pets_dir):
  """The benchmark of the synthetic Pets, written by the real entry point."""
  out = tmp_path_factory.mktemp('spurious') / 'bench'
  result = subprocess.run(
    [
      sys.executable,
      '-m',
      'experiments.make_spurious',
      f'--pets_dir={synthetic_pets_dir}',
      f'--out_dir={out}',
      '--correlation=0.9',
      '--seed=0',
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  summary = json.loads(result.stdout.strip().splitlines()[-1])
  return out, summary


def test_layout_counts_and_correlation(benchmark, synthetic_pets_dir):
  out, summary = benchmark
  oxford_iiit_pet.check_manual_dir(out)
  assert len(list((out / 'images').glob('*.jpg'))) == NUM_LISTED
  assert (
    len(list((out / 'annotations' / 'trimaps').glob('*.png'))) == NUM_LISTED
  )
  metadata = json.loads((out / spurious.METADATA_FILE).read_text())
  for split, count in (
    ('trainval', synthetic_data.NUM_TRAINVAL),
    ('test', synthetic_data.NUM_TEST),
  ):
    entries = oxford_iiit_pet.read_split_list(
      out / 'annotations' / f'{split}.txt'
    )
    source = oxford_iiit_pet.read_split_list(
      synthetic_pets_dir / 'annotations' / f'{split}.txt'
    )
    assert entries == source and len(entries) == count
    by_species = summary['counts'][split]
    assert sum(sum(kinds.values()) for kinds in by_species.values()) == count
  listed = oxford_iiit_pet.read_split_list(out / 'annotations' / 'list.txt')
  assert len(listed) == NUM_LISTED
  # Train: each species on its aligned kind at the requested rate (within one
  # image of rounding); test: every image on the other kind.
  for species, aligned in (
    ('cat', spurious.SMOOTH),
    ('dog', spurious.TEXTURED),
  ):
    kinds = summary['counts']['trainval'][species]
    n = sum(kinds.values())
    assert abs(kinds[aligned] - 0.9 * n) <= 0.5
    assert summary['counts']['test'][species][aligned] == 0
  assert (
    summary['aligned_share']['trainval']
    >= 0.9 - 1 / synthetic_data.NUM_TRAINVAL
  )
  assert summary['aligned_share']['test'] == 0.0
  assert metadata['counts'] == summary['counts']


def test_pets_are_pasted_and_trimaps_kept(benchmark, synthetic_pets_dir):
  out, _ = benchmark
  name = 'Abyssinian_2'
  trimap_bytes = (
    synthetic_pets_dir / 'annotations' / 'trimaps' / f'{name}.png'
  ).read_bytes()
  assert (
    out / 'annotations' / 'trimaps' / f'{name}.png'
  ).read_bytes() == trimap_bytes
  trimap = np.asarray(
    Image.open(out / 'annotations' / 'trimaps' / f'{name}.png')
  )
  before = np.asarray(
    Image.open(synthetic_pets_dir / 'images' / f'{name}.jpg').convert('RGB'),
    np.float32,
  )
  after = np.asarray(Image.open(out / 'images' / f'{name}.jpg'), np.float32)
  assert after.shape == before.shape
  diff = np.abs(after - before).mean(-1)
  pet = trimap == oxford_iiit_pet.TRIMAP_PET
  # Away from the edges (JPEG ringing), the pet is unchanged, the background not.
  inner = (
    pet
    & np.roll(pet, 2, 0)
    & np.roll(pet, -2, 0)
    & np.roll(pet, 2, 1)
    & np.roll(pet, -2, 1)
  )
  assert diff[inner].mean() < 6
  assert diff[trimap == oxford_iiit_pet.TRIMAP_BACKGROUND].mean() > 20


def test_same_inputs_give_identical_bytes(
  benchmark, synthetic_pets_dir, tmp_path
):
  out, _ = benchmark
  again = tmp_path / 'again'
  spurious.make_benchmark(
    str(synthetic_pets_dir), str(again), correlation=0.9, seed=0, num_threads=1
  )
  assert _hashes(again) == _hashes(out)
  other = tmp_path / 'other_seed'
  spurious.make_benchmark(
    str(synthetic_pets_dir), str(other), correlation=0.9, seed=1
  )
  differing = [k for k, v in _hashes(other).items() if _hashes(out).get(k) != v]
  assert any(k.startswith('images/') for k in differing)
  with pytest.raises(ValueError, match='not empty'):
    spurious.make_benchmark(str(synthetic_pets_dir), str(again))
  with pytest.raises(ValueError, match='correlation'):
    spurious.make_benchmark(
      str(synthetic_pets_dir), str(tmp_path / 'x'), correlation=1.5
    )


def test_input_pipeline_reads_the_benchmark(benchmark, tmp_path):
  out, _ = benchmark
  config = synthetic_data.data_config(
    manual_dir=str(out), tfds_data_dir=str(tmp_path / 'tfds')
  )
  sizes = data_lib.split_sizes(config)
  assert sizes['train'] + sizes['validation'] == synthetic_data.NUM_TRAINVAL
  assert sizes['test'] == synthetic_data.NUM_TEST
  batch = next(
    iter(
      data_lib.create_eval_iterator(
        config, 'test', cam_size=(4, 4), global_batch_size=4, num_devices=2
      )
    )
  )
  assert batch['image'].shape == (2, 2, 32, 32, 3) and batch['mask'].shape == (
    2,
    2,
    4,
    4,
  )
  train_batch = next(
    data_lib.create_train_iterator(
      config, cam_size=(4, 4), global_batch_size=4, num_devices=2, seed=0
    )
  )
  assert train_batch['image'].shape == (2, 2, 32, 32, 3)
  assert np.isfinite(train_batch['image']).all()
  # Groups: species x background kind, from spurious.json, in every batch.
  names = data_lib.group_names(config)
  assert names == ('cat/smooth', 'cat/textured', 'dog/smooth', 'dog/textured')
  kinds = json.loads((out / spurious.METADATA_FILE).read_text())['kinds']
  seen = 0
  for batch in data_lib.create_eval_iterator(
    config,
    'test',
    cam_size=(4, 4),
    global_batch_size=4,
    num_devices=2,
    with_file_name=True,
  ):
    for name, group, label, weight in zip(
      batch['file_name'].ravel(),
      batch['group'].ravel(),
      batch['label'].ravel(),
      batch['weight'].ravel(),
    ):
      if weight:
        species = ('cat', 'dog')[label]
        assert names[group] == f'{species}/{kinds[name[:-4]]}', name
        seen += 1
  assert seen == synthetic_data.NUM_TEST
  assert set(np.unique(train_batch['group'])) <= {0, 1, 2, 3}


def test_background_kinds_differ_in_spatial_frequency():
  def roughness(pixels):
    small = np.asarray(
      Image.fromarray(pixels).resize((64, 64), Image.Resampling.BILINEAR),
      np.float32,
    )
    return (
      np.abs(np.diff(small, axis=1)).mean()
      + np.abs(np.diff(small, axis=0)).mean()
    )

  for seed in range(8):
    rng = np.random.default_rng(seed)
    smooth = spurious.smooth_background(rng, 300, 400)
    textured = spurious.textured_background(rng, 300, 400)
    assert smooth.shape == textured.shape == (300, 400, 3)
    assert smooth.dtype == textured.dtype == np.uint8
    assert roughness(textured) > 3 * roughness(smooth), seed
