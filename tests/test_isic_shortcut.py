"""The ISIC shortcut benchmark (`cco_jax.data.isic_shortcut`): the split and
patch assignment, patches on the skin only, byte-identical rebuilds, and the
folder dataset reading it with its four groups."""

import csv
import filecmp
import os
from pathlib import Path

import numpy as np
from PIL import Image
import pytest
from scipy import ndimage
import synthetic_data as df

from cco_jax import data as data_lib
from cco_jax.data import isic_shortcut


@pytest.fixture(scope='module')
def source(tmp_path_factory):
  root = tmp_path_factory.mktemp('isic_source')
  return root, df.write_isic_source(root)


@pytest.mark.parametrize('test', isic_shortcut.TEST_MODES)
def test_assignment_follows_the_shares_and_is_seeded(source, test):
  _, rows = source
  kwargs = dict(correlation=0.8, test=test, validation_fraction=0.25)
  chosen = isic_shortcut.assign(rows, seed=0, **kwargs)
  assert chosen == isic_shortcut.assign(rows[::-1], seed=0, **kwargs)
  assert chosen != isic_shortcut.assign(rows, seed=1, **kwargs)
  source_split = {r['image']: r['split'] for r in rows}
  for image, (split, label, _) in chosen.items():
    assert (split == 'test') == (source_split[image] == 'test')
    original = next(r['label'] for r in rows if r['image'] == image)
    assert label == ('melanoma' if original == 'melanoma' else 'benign')
  shares = {
    'train': (0.8, 0.2),
    'validation': (0.5, 0.5),
    'test': (0.2, 0.8) if test == 'reversed' else (0.5, 0.5),
  }
  for split, (benign, melanoma) in shares.items():
    for label, share in (('benign', benign), ('melanoma', melanoma)):
      members = [v for v in chosen.values() if v[:2] == (split, label)]
      patched = sum(v[2] for v in members)
      assert patched == np.floor(share * len(members) + 0.5), (split, label)
  # Validation: a quarter of each diagnosis of the source's train split.
  for diagnosis in df.ISIC_DIAGNOSES:
    train = [
      r['image']
      for r in rows
      if (r['split'], r['label']) == ('train', diagnosis)
    ]
    held = [n for n in train if chosen[n][0] == 'validation']
    assert len(held) == np.floor(0.25 * len(train) + 0.5)


def test_a_patch_lies_on_skin_and_only_changes_its_disc():
  for seed in range(20):
    rng = np.random.default_rng(seed)
    size = 96
    y, x = np.mgrid[0:size, 0:size]
    lesion = (y - rng.uniform(20, 76)) ** 2 + (x - rng.uniform(20, 76)) ** 2 < (
      rng.uniform(8, 30) ** 2
    )
    patch = isic_shortcut.place_patch(lesion, isic_shortcut.image_rng(0, seed))
    assert not patch.touches_lesion
    distance = ndimage.distance_transform_edt(~lesion)
    assert distance[int(patch.y), int(patch.x)] > patch.radius
    image = rng.integers(0, 255, (size, size, 3)).astype(np.uint8)
    out = isic_shortcut.paste_patch(image, patch)
    changed = (out != image).any(-1)
    assert changed.any() and not (changed & lesion).any()
    far = np.hypot(x - patch.x, y - patch.y) > patch.radius + 1
    assert not (changed & far).any()
  # A lesion filling the frame: the farthest place, flagged.
  full = np.ones((40, 40), bool)
  full[0, 0] = False
  patch = isic_shortcut.place_patch(full, np.random.default_rng(0))
  assert patch.touches_lesion


def _files(root: Path) -> list[str]:
  return sorted(
    os.path.relpath(os.path.join(d, f), root)
    for d, _, files in os.walk(root)
    for f in files
  )


def test_rebuilds_are_byte_identical_and_folder_reads_the_groups(
  source, tmp_path
):
  root, rows = source
  kwargs = dict(correlation=0.8, validation_fraction=0.25, seed=3)
  meta = isic_shortcut.make_benchmark(
    str(root), str(tmp_path / 'a'), num_threads=1, **kwargs
  )
  isic_shortcut.make_benchmark(
    str(root), str(tmp_path / 'b'), num_threads=4, **kwargs
  )
  files = _files(tmp_path / 'a')
  assert files == _files(tmp_path / 'b') and len(files) == 2 * len(rows) + 3
  match, mismatch, errors = filecmp.cmpfiles(
    tmp_path / 'a', tmp_path / 'b', files, shallow=False
  )
  assert not mismatch and not errors
  for row in rows[:5]:  # Masks copied byte for byte.
    stem = row['image'][:-4]
    assert (tmp_path / 'a' / 'masks' / f'{stem}.png').read_bytes() == (
      root / 'masks' / f'{stem}.png'
    ).read_bytes()
  # Each listed patch is where it says, in its colour, off the lesion.
  with open(tmp_path / 'a' / isic_shortcut.PATCHES_FILE) as f:
    patches = list(csv.DictReader(f))
  labels = list(csv.DictReader(open(tmp_path / 'a' / 'labels.csv')))
  patched = {r['image'] for r in labels if r['group'].endswith('_patch')}
  assert {p['image'] for p in patches} == patched
  for p in patches[:8]:
    x, y = round(float(p['x'])), round(float(p['y']))
    pixels = np.asarray(Image.open(tmp_path / 'a' / 'images' / p['image']))
    lesion = np.asarray(
      Image.open(tmp_path / 'a' / 'masks' / (p['image'][:-4] + '.png'))
    )
    assert lesion[y, x] == 0
    rim = [int(p[c]) for c in 'rgb']
    centre = pixels[y, x].astype(int)
    assert np.abs(centre - np.asarray(rim)).max() < 60, (centre, rim)
  assert meta['patch_touches_lesion'] == 0
  # Every group reaches the pipeline.
  config = df.data_config(
    name='folder',
    task='label',
    manual_dir=str(tmp_path / 'a'),
    tfds_data_dir=str(tmp_path / 'tfds'),
    image_size=32,
  )
  assert data_lib.class_names(config) == ('benign', 'melanoma')
  assert data_lib.group_names(config) == (
    'benign_clean',
    'benign_patch',
    'melanoma_clean',
    'melanoma_patch',
  )
  sizes = data_lib.split_sizes(config)
  assert sizes == {
    split: sum(meta['counts'][split].values())
    for split in ('train', 'validation', 'test')
  }


def test_bad_settings_are_named(source, tmp_path):
  root, rows = source
  with pytest.raises(ValueError, match='correlation must be in'):
    isic_shortcut.assign(
      rows, correlation=0.2, test='reversed', validation_fraction=0.1, seed=0
    )
  with pytest.raises(ValueError, match='test must be one of'):
    isic_shortcut.assign(
      rows, correlation=0.9, test='flipped', validation_fraction=0.1, seed=0
    )
  (tmp_path / 'full').mkdir()
  (tmp_path / 'full' / 'x').write_text('')
  with pytest.raises(ValueError, match='is not empty'):
    isic_shortcut.make_benchmark(str(root), str(tmp_path / 'full'))
  with pytest.raises(ValueError, match='has no labels.csv'):
    isic_shortcut.make_benchmark(str(tmp_path), str(tmp_path / 'out'))


def test_counterfactual_toggles_each_test_patch_and_back(source, tmp_path):
  """The artifact-swap test: test images with the patch added or removed,
  the rest linked; toggling twice gives the benchmark's bytes back."""
  root, rows = source
  bench = tmp_path / 'bench'
  isic_shortcut.make_benchmark(
    str(root), str(bench), correlation=0.9, test='balanced', seed=5
  )
  once, twice = tmp_path / 'once', tmp_path / 'twice'
  meta = isic_shortcut.make_counterfactual(str(root), str(bench), str(once))
  isic_shortcut.make_counterfactual(str(root), str(once), str(twice))
  labels = list(csv.DictReader(open(bench / 'labels.csv')))
  toggled = list(csv.DictReader(open(once / 'labels.csv')))
  assert [r['image'] for r in toggled] == [r['image'] for r in labels]
  test = [r for r in labels if r['split'] == 'test']
  assert meta['toggled'] == len(test) > 0
  for before, after in zip(labels, toggled):
    same = before['image'], before['label'], before['split']
    assert (after['image'], after['label'], after['split']) == same
    image = before['image']
    if before['split'] != 'test':
      assert after['group'] == before['group']
      assert os.path.samefile(once / 'images' / image, bench / 'images' / image)
      continue
    assert after['group'] != before['group']
    assert after['group'].split('_')[0] == before['group'].split('_')[0]
    changed = np.abs(
      np.asarray(Image.open(once / 'images' / image), np.int16)
      - np.asarray(Image.open(bench / 'images' / image), np.int16)
    ).max(-1)
    # Only off the lesion: the patch, plus JPEG ringing around it.
    lesion = np.asarray(Image.open(bench / 'masks' / (image[:-4] + '.png')))
    assert changed.max() > 60 and changed[lesion > 0].mean() < 3
    assert (twice / 'images' / image).read_bytes() == (
      bench / 'images' / image
    ).read_bytes()
  twice_labels = (twice / 'labels.csv').read_text()
  assert twice_labels == (bench / 'labels.csv').read_text()
