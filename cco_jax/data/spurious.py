"""A spurious-background benchmark built from Oxford-IIIT Pet (no downloads).

Every listed pet is cut out with its trimap (pet + boundary: `trimap != 2`) and
pasted, at the same place and size, onto a procedurally generated background of
one of two kinds (`BACKGROUNDS`):

  smooth    (kind A) a linear gradient between two random colours at a random
            angle, modulated by 1-2.5 broad sinusoidal stripes: only low spatial
            frequencies.
  textured  (kind B) a checkerboard or a lattice of dots (half each) of two random
            colours, 10-16 cells across the shorter side, so the texture
            survives squashing to 64 px: high spatial frequencies.

Colours of both kinds come from the same distribution (`_random_colour`), so
only the spatial structure tells the kinds apart. In `trainval` the kind is
correlated with the species: a share `correlation` of each species gets its
aligned kind (cats on smooth, dogs on textured) and the rest the other kind,
exactly (`assign_kinds`), so the pipeline's validation carve of trainval has
about the same correlation. In `test` the correlation is reversed for every
image (cats on textured, dogs on smooth): a model that learnt the background
fails there, one that learnt the pet does not notice.

The output has the official layout (`images/<NAME>.jpg`,
`annotations/trimaps/<NAME>.png` (the original trimap: geometry is unchanged),
`annotations/{trainval,test,list}.txt` with the source's lines), so
`config.data.manual_dir=OUT` trains on it unchanged, plus `spurious.json`
recording the settings and each image's kind. Everything is a pure function of
(source files, correlation, seed): the same inputs give byte-identical files.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import hashlib
import io
import json
import math
import os
import shutil

import numpy as np
from PIL import Image

from cco_jax import errors
from cco_jax.data.datasets import common
from cco_jax.data.datasets import oxford_iiit_pet

JPEG_QUALITY = 95
SMOOTH, TEXTURED = 'smooth', 'textured'
# The kind each species gets when the background agrees with the label.
ALIGNED_KIND = {0: SMOOTH, 1: TEXTURED}  # species 0 = cat, 1 = dog
METADATA_FILE = 'spurious.json'
_SALT = 'cco-jax/spurious/v1'


def _random_colour(rng: np.random.Generator) -> np.ndarray:
  """A float (3,) RGB colour in [0, 255], the same distribution for all kinds."""
  return rng.uniform(0.0, 255.0, 3)


def smooth_background(
  rng: np.random.Generator, height: int, width: int
) -> np.ndarray:
  """Kind A: gradient between two colours plus broad stripes, uint8 (H, W, 3)."""
  c0, c1 = _random_colour(rng), _random_colour(rng)
  angle = rng.uniform(0, 2 * np.pi)
  stripe_angle = rng.uniform(0, 2 * np.pi)
  cycles = rng.uniform(1.0, 2.5)
  phase = rng.uniform(0, 2 * np.pi)
  y, x = np.mgrid[0:height, 0:width].astype(np.float64)
  y, x = y / max(height - 1, 1), x / max(width - 1, 1)
  t = np.cos(angle) * x + np.sin(angle) * y
  t = (t - t.min()) / max(np.ptp(t), 1e-9)
  t = np.clip(
    t
    + 0.2
    * np.sin(
      2 * np.pi * cycles * (np.cos(stripe_angle) * x + np.sin(stripe_angle) * y)
      + phase
    ),
    0,
    1,
  )
  pixels = c0 + t[..., None] * (c1 - c0)
  return np.clip(np.round(pixels), 0, 255).astype(np.uint8)


def textured_background(
  rng: np.random.Generator, height: int, width: int
) -> np.ndarray:
  """Kind B: a checkerboard or a dot lattice of two colours, uint8 (H, W, 3)."""
  c0, c1 = _random_colour(rng), _random_colour(rng)
  cells = rng.integers(10, 17)
  cell = min(height, width) / cells
  offset = rng.uniform(0, cell, 2)
  y, x = np.mgrid[0:height, 0:width].astype(np.float64)
  u, v = (x + offset[0]) / cell, (y + offset[1]) / cell
  if rng.random() < 0.5:
    pattern = (np.floor(u) + np.floor(v)) % 2 == 1
  else:
    radius = rng.uniform(0.25, 0.4)
    pattern = (u % 1 - 0.5) ** 2 + (v % 1 - 0.5) ** 2 < radius**2
  pixels = np.where(pattern[..., None], c1, c0)
  return np.clip(np.round(pixels), 0, 255).astype(np.uint8)


# The one place where background kinds are registered.
BACKGROUNDS: Mapping[
  str, Callable[[np.random.Generator, int, int], np.ndarray]
] = {
  SMOOTH: smooth_background,
  TEXTURED: textured_background,
}


def digest(*parts) -> bytes:
  return hashlib.sha256('/'.join([_SALT, *map(str, parts)]).encode()).digest()


def image_rng(seed: int, name: str) -> np.random.Generator:
  """The generator of one image's background: depends on (seed, name) only."""
  return np.random.default_rng(
    int.from_bytes(digest(seed, 'image', name)[:8], 'big')
  )


def assign_kinds(
  entries: Sequence[oxford_iiit_pet.ListEntry],
  *,
  split: str,
  correlation: float,
  seed: int,
) -> dict[str, str]:
  """The background kind of each image.

  'trainval': within each species, images are ordered by SHA-256 of (seed,
  name); the first `floor((1 - correlation) * n + 0.5)` get the other kind,
  the rest the aligned kind (`ALIGNED_KIND`). 'test': every image gets the
  other kind (the correlation reversed).

  Args:
    entries: the split's list entries.
    split: 'trainval' or 'test'.
    correlation: share of trainval images of each species on the aligned kind.
    seed: the benchmark seed.

  Returns:
    {name: kind}.
  """
  if split not in ('trainval', 'test'):
    raise ValueError(f"split must be 'trainval' or 'test'; got {split!r}.")
  other = {0: TEXTURED, 1: SMOOTH}
  if split == 'test':
    return {e.name: other[e.species] for e in entries}
  kinds = {}
  for species in (0, 1):
    members = sorted(
      (e.name for e in entries if e.species == species),
      key=lambda name: digest(seed, 'assign', name),
    )
    num_other = math.floor((1 - correlation) * len(members) + 0.5)
    for i, name in enumerate(members):
      kinds[name] = other[species] if i < num_other else ALIGNED_KIND[species]
  return kinds


def composite(
  image: np.ndarray, trimap: np.ndarray, background: np.ndarray
) -> np.ndarray:
  """The pet (trimap != 2: pet and boundary) of `image` on `background`.

  Args:
    image: uint8 (H, W, 3).
    trimap: (H, W) with 1 = pet, 2 = background, 3 = boundary.
    background: uint8 (H, W, 3).

  Returns:
    uint8 (H, W, 3): `image` where `trimap != 2`, `background` elsewhere.
  """
  if image.shape[:2] != trimap.shape or background.shape != image.shape:
    raise ValueError(
      f'image {image.shape}, trimap {trimap.shape} and background '
      f'{background.shape} must share (H, W).'
    )
  pet = (trimap != oxford_iiit_pet.TRIMAP_BACKGROUND)[..., None]
  return np.where(pet, image, background)


def read_pair(
  pets_dir: str, name: str
) -> tuple[np.ndarray, np.ndarray, bytes, bool]:
  """(image uint8 (H, W, 3), trimap (H, W), trimap PNG bytes, trimap_resized)."""
  image_path = os.path.join(pets_dir, 'images', f'{name}.jpg')
  trimap_path = os.path.join(pets_dir, 'annotations', 'trimaps', f'{name}.png')
  for path in (image_path, trimap_path):
    if not os.path.exists(path):
      raise errors.UserError(
        f'{path} is listed in a split but missing. Expected the '
        f'official layout: {oxford_iiit_pet.LAYOUT}.'
      )
  with Image.open(image_path) as im:
    image = np.asarray(im.convert('RGB'))
  with open(trimap_path, 'rb') as f:
    trimap_bytes = f.read()
  with Image.open(io.BytesIO(trimap_bytes)) as tm:
    trimap = np.asarray(tm if tm.mode in ('L', 'P') else tm.convert('L'))
  if trimap.shape != image.shape[:2]:
    resized = Image.fromarray(trimap.astype(np.uint8), mode='L').resize(
      (image.shape[1], image.shape[0]), Image.Resampling.NEAREST
    )
    trimap = np.asarray(resized)
    buffer = io.BytesIO()
    resized.save(buffer, format='PNG')
    return image, trimap, buffer.getvalue(), True
  return image, trimap, trimap_bytes, False


def _render(
  pets_dir: str,
  out_dir: str,
  name: str,
  kind: str,
  seed: int,
  jpeg_quality: int,
) -> None:
  image, trimap, trimap_bytes, _ = read_pair(pets_dir, name)
  background = BACKGROUNDS[kind](image_rng(seed, name), *image.shape[:2])
  buffer = io.BytesIO()
  Image.fromarray(composite(image, trimap, background)).save(
    buffer, format='JPEG', quality=jpeg_quality
  )
  with open(os.path.join(out_dir, 'images', f'{name}.jpg'), 'wb') as f:
    f.write(buffer.getvalue())
  with open(
    os.path.join(out_dir, 'annotations', 'trimaps', f'{name}.png'), 'wb'
  ) as f:
    f.write(trimap_bytes)


def _list_lines(path: str) -> list[str]:
  """The entry lines of an official list (comments and blank lines dropped)."""
  with open(path) as f:
    lines = [line.strip() for line in f]
  return [line for line in lines if line and not line.startswith('#')]


def _counts(entries, kinds) -> dict:
  counts = {}
  for e in entries:
    species = oxford_iiit_pet.SPECIES[e.species]
    counts.setdefault(species, {SMOOTH: 0, TEXTURED: 0})[kinds[e.name]] += 1
  return counts


def aligned_share(
  entries: Sequence[oxford_iiit_pet.ListEntry], kinds: Mapping[str, str]
) -> float:
  """Share of `entries` whose background kind is their species' aligned kind."""
  aligned = sum(kinds[e.name] == ALIGNED_KIND[e.species] for e in entries)
  return aligned / max(len(entries), 1)


def prepare_output_dir(
  pets_dir: str, out_dir: str, *, overwrite: bool, parts: Sequence[str]
) -> None:
  """Checks the source and that `out_dir` is empty, or (`overwrite`) removes
  its `parts` (directories or files) and `METADATA_FILE`.

  Raises:
    ValueError: a bad source layout, `out_dir == pets_dir`, or a non-empty
      `out_dir` without `overwrite`.
  """
  oxford_iiit_pet.check_manual_dir(pets_dir)
  if os.path.realpath(pets_dir) == os.path.realpath(out_dir):
    raise errors.UserError(
      f'--out_dir={out_dir} is --pets_dir; write the benchmark elsewhere.'
    )
  if os.path.isdir(out_dir) and os.listdir(out_dir):
    if not overwrite:
      raise errors.UserError(
        f'{out_dir} is not empty; choose another --out_dir or pass --overwrite.'
      )
    for part in (*parts, METADATA_FILE):
      path = os.path.join(out_dir, part)
      if os.path.isdir(path):
        shutil.rmtree(path)
      elif os.path.exists(path):
        os.remove(path)


def make_benchmark(
  pets_dir: str,
  out_dir: str,
  *,
  correlation: float = 0.9,
  seed: int = 0,
  jpeg_quality: int = JPEG_QUALITY,
  overwrite: bool = False,
  num_threads: int | None = None,
) -> dict:
  """Writes the spurious-background benchmark (module docstring) to `out_dir`.

  Args:
    pets_dir: Oxford-IIIT Pet in the official layout (images/,
      annotations/trimaps/, annotations/{trainval,test}.txt).
    out_dir: where to write; must be empty or absent unless `overwrite`.
    correlation: share of each species' trainval images on its aligned
      background kind, in [0, 1].
    seed: seeds the kind assignment and every background.
    jpeg_quality: of the written images.
    overwrite: replace `out_dir`'s images/, annotations/ and spurious.json.
    num_threads: image threads (None = the Pets builder's default). The output
      does not depend on it.

  Returns:
    The metadata written to `out_dir/spurious.json`: settings, per-split
    counts {species: {kind: n}}, `aligned_share` per split, and {name: kind}.

  Raises:
    ValueError: a bad layout or argument, or a non-empty `out_dir`.
  """
  if not 0.0 <= correlation <= 1.0:
    raise errors.UserError(
      f'--correlation={correlation}: must be in [0, 1] (the share of aligned '
      'backgrounds; e.g. 0.95).'
    )
  prepare_output_dir(
    pets_dir, out_dir, overwrite=overwrite, parts=('images', 'annotations')
  )
  os.makedirs(os.path.join(out_dir, 'images'), exist_ok=True)
  os.makedirs(os.path.join(out_dir, 'annotations', 'trimaps'), exist_ok=True)

  lines, entries, kinds, names = {}, {}, {}, []
  for split in ('trainval', 'test'):
    path = os.path.join(pets_dir, 'annotations', f'{split}.txt')
    lines[split] = _list_lines(path)
    entries[split] = oxford_iiit_pet.read_split_list(path)
    kinds.update(
      assign_kinds(
        entries[split], split=split, correlation=correlation, seed=seed
      )
    )
    names.extend(e.name for e in entries[split])
  if len(set(names)) != len(names):
    raise errors.UserError(
      f'{pets_dir}: an image is listed twice in trainval/test.'
    )

  threads = {} if num_threads is None else {'num_threads': num_threads}
  for _ in common.ordered_parallel_map(
    lambda name: _render(
      pets_dir, out_dir, name, kinds[name], seed, jpeg_quality
    ),
    names,
    **threads,
  ):
    pass

  annotations = os.path.join(out_dir, 'annotations')
  for split in ('trainval', 'test'):
    with open(os.path.join(annotations, f'{split}.txt'), 'w') as f:
      f.write(''.join(f'{line}\n' for line in lines[split]))
  with open(os.path.join(annotations, 'list.txt'), 'w') as f:
    f.write(
      '#Image CLASS-ID SPECIES BREED ID\n#ID: 1:37 Class ids\n'
      '#SPECIES: 1:Cat 2:Dog\n#BREED ID: 1-25:Cat 1:12:Dog\n'
      '#All images with 1st letter as captial are cat images\n'
      '#images with small first letter are dog images\n'
    )
    f.write(''.join(f'{line}\n' for line in lines['trainval'] + lines['test']))
  metadata = {
    'source': os.path.realpath(pets_dir),
    'correlation': correlation,
    'seed': seed,
    'jpeg_quality': jpeg_quality,
    'aligned_kind': {
      oxford_iiit_pet.SPECIES[s]: k for s, k in ALIGNED_KIND.items()
    },
    'counts': {split: _counts(entries[split], kinds) for split in entries},
    'aligned_share': {
      split: aligned_share(entries[split], kinds) for split in entries
    },
    'kinds': dict(sorted(kinds.items())),
  }
  with open(os.path.join(out_dir, METADATA_FILE), 'w') as f:
    json.dump(metadata, f, indent=1, sort_keys=True)
    f.write('\n')
  return metadata
