"""A shortcut benchmark on real skin-lesion images, in the 'folder' layout.

From an ISIC sample in the folder layout (labels.csv `image,label,split`
with the diagnoses melanoma, nevus and seborrheic keratosis; images/;
masks/ with the expert lesion segmentations) this writes a grouped binary
benchmark, melanoma vs benign (nevus + seborrheic keratosis), in which a
realistic artifact, a coloured adhesive-patch disc of the kind dermoscopy
images carry, is pasted on the skin outside the lesion. Groups are
diagnosis x artifact:

  benign_patch, melanoma_clean    majority groups in training
  benign_clean, melanoma_patch    minority groups in training

  train       a share `correlation` of the benign images carries a patch,
              and the same share of the melanomas carries none, so the patch
              predicts "benign" (as real ISIC patches did);
  validation  balanced: half of each diagnosis carries a patch (for model
              selection, as Waterbirds' validation);
  test        'reversed': the correlation turned round (patches on
              `correlation` of the melanomas, `1 - correlation` of the
              benign), or 'balanced': half of each diagnosis.

Validation is carved from the source's train split (`validation_fraction`
of each diagnosis); test is the source's test split. Within each (split,
diagnosis), images are ordered by SHA-256 of (seed, name) and the first
`floor(share * n + 0.5)` get a patch. Each patch (radius, colour, shading,
position) is drawn from a generator seeded by (seed, name): its centre is
chosen uniformly among the places where the whole disc, plus a margin, lies
on skin (`place_patch`); an image whose lesion leaves no such place (rare:
the lesion fills the frame) gets the place farthest from the lesion, and is
counted in the metadata (`patch_touches_lesion`).

Output: ROOT/labels.csv (`image,label,split,group`, sorted by image),
ROOT/images/<stem>.jpg (quality 95), ROOT/masks/<stem>.png (the source's
lesion mask, copied byte for byte: the patch is background), ROOT/patches.csv
(each patch's centre, radius and colour, to paste it again, e.g. onto other
images for an artifact-swap test: `paste_patch`), ROOT/shortcut.json
(settings and counts). A pure function of (source files, settings): the
same inputs give byte-identical files (`experiments.make_isic_shortcut`).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import shutil

import numpy as np
from PIL import Image

from cco_jax import errors
from cco_jax.data.adhesive_patch import Patch
from cco_jax.data.adhesive_patch import paste_patch
from cco_jax.data.adhesive_patch import place_patch
from cco_jax.data.datasets import common

METADATA_FILE = 'shortcut.json'
PATCHES_FILE = 'patches.csv'
JPEG_QUALITY = 95
TEST_MODES = ('reversed', 'balanced')
MELANOMA = 'melanoma'
LABELS = ('benign', MELANOMA)
MINORITY_GROUPS = ('benign_clean', 'melanoma_patch')
_SALT = 'cco-jax/isic-shortcut/v1'


def digest(*parts) -> bytes:
  return hashlib.sha256('/'.join([_SALT, *map(str, parts)]).encode()).digest()


def image_rng(seed: int, name: str) -> np.random.Generator:
  """The generator of one image's patch: depends on (seed, name) only."""
  return np.random.default_rng(
    int.from_bytes(digest(seed, 'patch', name)[:8], 'big')
  )


def _ordered(names, seed: int, *parts) -> list[str]:
  return sorted(names, key=lambda name: digest(seed, *parts, name))


def _count(share: float, n: int) -> int:
  return math.floor(share * n + 0.5)


def assign(
  rows: list[dict],
  *,
  correlation: float,
  test: str,
  validation_fraction: float,
  seed: int,
) -> dict[str, tuple[str, str, bool]]:
  """{image: (split, label, has_patch)} of the source rows (module doc)."""
  if not 0.5 <= correlation <= 1.0:
    raise errors.UserError(
      f'correlation must be in [0.5, 1]; got {correlation} (--correlation: '
      'the share of benign training images with a patch, e.g. 0.9).'
    )
  if test not in TEST_MODES:
    raise errors.UserError(f'test must be one of {TEST_MODES}; got {test!r}.')
  if not 0.0 < validation_fraction < 1.0:
    raise errors.UserError(
      f'--validation_fraction={validation_fraction}: must be in (0, 1), '
      'e.g. 0.15.'
    )
  label = {
    r['image']: MELANOMA if r['label'] == MELANOMA else 'benign' for r in rows
  }
  split = {}
  for diagnosis in sorted({r['label'] for r in rows}):
    train = [
      r['image']
      for r in rows
      if r['split'] == 'train' and r['label'] == diagnosis
    ]
    train = _ordered(train, seed, 'validation')
    held = _count(validation_fraction, len(train))
    split.update({name: 'validation' for name in train[:held]})
    split.update({name: 'train' for name in train[held:]})
  split.update({r['image']: 'test' for r in rows if r['split'] == 'test'})
  share = {
    ('train', 'benign'): correlation,
    ('train', MELANOMA): 1 - correlation,
    ('validation', 'benign'): 0.5,
    ('validation', MELANOMA): 0.5,
    ('test', 'benign'): 1 - correlation if test == 'reversed' else 0.5,
    ('test', MELANOMA): correlation if test == 'reversed' else 0.5,
  }
  out = {}
  for (part, diagnosis), p in share.items():
    members = [n for n in split if split[n] == part and label[n] == diagnosis]
    members = _ordered(members, seed, 'patch', part)
    with_patch = _count(p, len(members))
    for i, name in enumerate(members):
      out[name] = (part, diagnosis, i < with_patch)
  return out


def _read_source(isic_dir: str) -> list[dict]:
  path = os.path.join(isic_dir, 'labels.csv')
  if not os.path.isfile(path):
    raise errors.UserError(
      f'{isic_dir} has no labels.csv; expected the ISIC sample in the folder '
      'layout (labels.csv image,label,split; images/; masks/).'
    )
  with open(path, newline='') as f:
    rows = [
      {k.strip(): v.strip() for k, v in r.items()} for r in csv.DictReader(f)
    ]
  labels = {r['label'] for r in rows}
  if MELANOMA not in labels or len(labels) < 2:
    raise errors.UserError(
      f'{path}: labels {sorted(labels)}; expected melanoma and at least one '
      'benign diagnosis.'
    )
  return rows


def _prepare_output_dir(isic_dir: str, out_dir: str, overwrite: bool) -> None:
  if os.path.realpath(isic_dir) == os.path.realpath(out_dir):
    raise errors.UserError(
      '--out_dir is --isic_dir; write the benchmark elsewhere.'
    )
  if os.path.isdir(out_dir) and os.listdir(out_dir):
    if not overwrite:
      raise errors.UserError(
        f'{out_dir} is not empty; choose another --out_dir or pass --overwrite.'
      )
    for part in ('images', 'masks', 'labels.csv', PATCHES_FILE, METADATA_FILE):
      path = os.path.join(out_dir, part)
      if os.path.isdir(path):
        shutil.rmtree(path)
      elif os.path.exists(path):
        os.remove(path)
  for part in ('images', 'masks'):
    os.makedirs(os.path.join(out_dir, part), exist_ok=True)


def _render(
  isic_dir: str, out_dir: str, image: str, has_patch: bool, seed: int
) -> Patch | None:
  """Writes one image (with its patch) and copies its mask."""
  stem = os.path.splitext(image)[0]
  with open(os.path.join(isic_dir, 'masks', f'{stem}.png'), 'rb') as f:
    mask_bytes = f.read()
  with Image.open(os.path.join(isic_dir, 'images', image)) as source:
    pixels = np.asarray(source.convert('RGB'))
  patch = None
  if has_patch:
    lesion = common.decode_mask_png(mask_bytes) > 0
    if lesion.shape != pixels.shape[:2]:
      raise errors.UserError(
        f'{image}: mask {lesion.shape[::-1]} and image '
        f'{pixels.shape[1::-1]} differ in size (width x height).'
      )
    patch = place_patch(lesion, image_rng(seed, image))
    pixels = paste_patch(pixels, patch)
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format='JPEG', quality=JPEG_QUALITY)
  with open(os.path.join(out_dir, 'images', f'{stem}.jpg'), 'wb') as f:
    f.write(buffer.getvalue())
  with open(os.path.join(out_dir, 'masks', f'{stem}.png'), 'wb') as f:
    f.write(mask_bytes)
  return patch


def make_benchmark(
  isic_dir: str,
  out_dir: str,
  *,
  correlation: float = 0.9,
  test: str = 'reversed',
  validation_fraction: float = 0.15,
  seed: int = 0,
  overwrite: bool = False,
  num_threads: int | None = None,
) -> dict:
  """Writes the benchmark (module docstring) to `out_dir`.

  Args:
    isic_dir: the ISIC sample in the folder layout.
    out_dir: where to write; must be empty or absent unless `overwrite`.
    correlation: share of the benign training images with a patch (and of
      the melanomas without one), in [0.5, 1].
    test: 'reversed' or 'balanced' (module docstring).
    validation_fraction: share of each diagnosis of the source's train split
      held out for validation.
    seed: seeds the carve, the assignment and every patch.
    overwrite: replace what `out_dir` holds.
    num_threads: image threads (the output does not depend on it).

  Returns:
    The metadata written to `out_dir/shortcut.json`: settings and counts
    {split: {group: n}}.
  """
  rows = _read_source(isic_dir)
  chosen = assign(
    rows,
    correlation=correlation,
    test=test,
    validation_fraction=validation_fraction,
    seed=seed,
  )
  _prepare_output_dir(isic_dir, out_dir, overwrite)
  images = sorted(chosen)
  threads = {} if num_threads is None else {'num_threads': num_threads}
  patches = list(
    common.ordered_parallel_map(
      lambda image: _render(isic_dir, out_dir, image, chosen[image][2], seed),
      images,
      **threads,
    )
  )
  counts, touching = {}, 0
  with open(os.path.join(out_dir, 'labels.csv'), 'w', newline='') as f:
    writer = csv.writer(f, lineterminator='\n')
    writer.writerow(('image', 'label', 'split', 'group'))
    for image in images:
      split, label, has_patch = chosen[image]
      group = f'{label}_{"patch" if has_patch else "clean"}'
      stem = os.path.splitext(image)[0]
      writer.writerow((f'{stem}.jpg', label, split, group))
      by_group = counts.setdefault(split, {})
      by_group[group] = by_group.get(group, 0) + 1
  with open(os.path.join(out_dir, PATCHES_FILE), 'w', newline='') as f:
    writer = csv.writer(f, lineterminator='\n')
    writer.writerow(('image', 'x', 'y', 'radius', 'r', 'g', 'b', 'shade'))
    for image, patch in zip(images, patches):
      if patch is None:
        continue
      touching += patch.touches_lesion
      stem = os.path.splitext(image)[0]
      writer.writerow(
        (
          f'{stem}.jpg',
          f'{patch.x:.1f}',
          f'{patch.y:.1f}',
          f'{patch.radius:.4f}',
          *patch.colour,
          f'{patch.shade:.6f}',
        )
      )
  metadata = {
    'source': os.path.realpath(isic_dir),
    'correlation': correlation,
    'test': test,
    'validation_fraction': validation_fraction,
    'seed': seed,
    'jpeg_quality': JPEG_QUALITY,
    'labels': list(LABELS),
    'minority_groups': list(MINORITY_GROUPS),
    'patch_touches_lesion': touching,
    'counts': {s: dict(sorted(c.items())) for s, c in sorted(counts.items())},
  }
  with open(os.path.join(out_dir, METADATA_FILE), 'w') as f:
    json.dump(metadata, f, indent=1, sort_keys=True)
    f.write('\n')
  return metadata


COUNTERFACTUAL_FILE = 'counterfactual.json'


def make_counterfactual(
  isic_dir: str,
  benchmark_dir: str,
  out_dir: str,
  *,
  num_threads: int | None = None,
) -> dict:
  """The benchmark at `benchmark_dir` with the patch of every test image
  toggled, for the artifact-swap test.

  Each test image is written again from its source with the patch added
  (placed as the builder would have placed it: same generator, same
  `place_patch`) or removed (the source image, encoded as the builder encodes
  a clean one); its group says which. Training and validation images and
  every mask are hard links to the benchmark's files, so the folder dataset
  reads the same splits, and the test split lists the same images in the
  same order: prediction i here is the counterfactual of prediction i there.
  Toggling twice gives the benchmark's test images byte for byte.

  Returns:
    The metadata written to `out_dir/counterfactual.json`: the benchmark's
    settings, `toggled` (test images) and their counts by new group.
  """
  with open(os.path.join(benchmark_dir, METADATA_FILE)) as f:
    settings = json.load(f)
  with open(os.path.join(benchmark_dir, 'labels.csv'), newline='') as f:
    rows = list(csv.DictReader(f))
  source = {
    os.path.splitext(r['image'])[0]: r['image'] for r in _read_source(isic_dir)
  }
  _prepare_output_dir(isic_dir, out_dir, overwrite=True)
  toggled = [r for r in rows if r['split'] == 'test']
  for row in rows:
    if row['split'] == 'test':
      continue
    stem = os.path.splitext(row['image'])[0]
    for part, name in (('images', row['image']), ('masks', f'{stem}.png')):
      os.link(
        os.path.join(benchmark_dir, part, name),
        os.path.join(out_dir, part, name),
      )
  threads = {} if num_threads is None else {'num_threads': num_threads}
  list(
    common.ordered_parallel_map(
      lambda row: _render(
        isic_dir,
        out_dir,
        source[os.path.splitext(row['image'])[0]],
        row['group'].endswith('_clean'),
        settings['seed'],
      ),
      toggled,
      **threads,
    )
  )
  counts = {}
  with open(os.path.join(out_dir, 'labels.csv'), 'w', newline='') as f:
    writer = csv.writer(f, lineterminator='\n')
    writer.writerow(('image', 'label', 'split', 'group'))
    for row in rows:
      group = row['group']
      if row['split'] == 'test':
        label, kind = group.rsplit('_', 1)
        group = f'{label}_{"patch" if kind == "clean" else "clean"}'
        counts[group] = counts.get(group, 0) + 1
      writer.writerow((row['image'], row['label'], row['split'], group))
  metadata = {
    **settings,
    'counterfactual_of': os.path.realpath(benchmark_dir),
    'toggled': len(toggled),
    'counts': {'test': dict(sorted(counts.items()))},
  }
  for name in (METADATA_FILE, COUNTERFACTUAL_FILE):
    with open(os.path.join(out_dir, name), 'w') as f:
      json.dump(
        metadata if name == COUNTERFACTUAL_FILE else settings,
        f,
        indent=1,
        sort_keys=True,
      )
      f.write('\n')
  return metadata
