"""The spurious-background benchmark with groups, in the 'folder' layout.

The same pets on the same two synthetic background kinds as `spurious`
(smooth for cats, textured for dogs when the background agrees with the
label), re-split the way the field measures robustness to a spurious feature
(Waterbirds, Sagawa et al. 2020): groups are (species x background kind),

  cat_smooth, dog_textured      majority groups (background agrees)
  cat_textured, dog_smooth      minority groups (background disagrees)

and
  train       a share `correlation` of each species on its aligned kind
              (0.95 as Waterbirds-95; 1.0 leaves no minority example at
              all, as Waterbirds-100, where only mask-based methods can
              tell the pet from the background);
  validation  `val_per_group` images in each of the four groups;
  test        `test_per_group` images in each of the four groups.

Every listed image of the source (its trainval and test lists together) is
used in one split. Within each species, images are ordered by SHA-256 of
(seed, name); the held-out splits come first, the rest go to train, where the
first `floor((1 - correlation) * n + 0.5)` get the other kind. Held-out pets
are placed one of two ways (`held_out`):

  'paired'  (default) each held-out pet is rendered on BOTH kinds, as
            `<name>-smooth.jpg` and `<name>-textured.jpg`: the first
            `test_per_group` pets of a species go to test, the next
            `val_per_group` to validation. A species' two groups then hold
            the same pets and differ only in the background (a
            counterfactual pair), and the groups are twice as large for the
            same pets taken from train: worst-group accuracy moves in finer
            steps, so checkpoint and grid choices tie less often.
  'split'   (the first benchmark) each held-out pet is rendered once: the
            first `2 * test_per_group` go to test, the next
            `2 * val_per_group` to validation, alternating kinds.

The old benchmark's reversed-test accuracy is the mean accuracy over the two
minority groups of this test split.

Output (`folder` dataset, docs/data.md): ROOT/labels.csv with columns
image,label,split,group; ROOT/images/<stem>.jpg; ROOT/masks/<stem>.png (255
on the pet and its boundary, `trimap != 2`, 0 elsewhere); ROOT/spurious.json
with the settings and counts. A pure function of (source files, settings):
the same inputs give byte-identical files.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os

import numpy as np
from PIL import Image

from cco_jax import errors
from cco_jax.data import spurious
from cco_jax.data.datasets import common
from cco_jax.data.datasets import oxford_iiit_pet

SPECIES_NAMES = ('cat', 'dog')
MINORITY_GROUPS = ('cat_textured', 'dog_smooth')
_OTHER_KIND = {0: spurious.TEXTURED, 1: spurious.SMOOTH}
HELD_OUT = ('paired', 'split')
BOTH = None  # The kind of a 'paired' held-out pet: rendered on both kinds.


def group_name(species: int, kind: str) -> str:
  """'cat_smooth', 'dog_textured', ... of a species id and background kind."""
  return f'{SPECIES_NAMES[species]}_{kind}'


def assign(
  entries: list[oxford_iiit_pet.ListEntry],
  *,
  correlation: float,
  val_per_group: int,
  test_per_group: int,
  seed: int,
  held_out: str = 'split',
) -> dict[str, tuple[str, str | None]]:
  """{name: (split, kind)} of every entry (module docstring); with
  `held_out='paired'` a held-out entry's kind is `BOTH` (None).

  Raises:
    ValueError: a species has too few images for the requested test and
      validation groups, or a bad argument.
  """
  if not 0.0 <= correlation <= 1.0:
    raise errors.UserError(
      f'--correlation={correlation}: must be in [0, 1] (the share of aligned '
      'backgrounds; e.g. 0.95).'
    )
  if held_out not in HELD_OUT:
    raise errors.UserError(f'held_out={held_out!r}; choose from {HELD_OUT}.')
  if val_per_group < 1 or test_per_group < 1:
    raise errors.UserError(
      f'val_per_group={val_per_group} and test_per_group={test_per_group} '
      'must be at least 1.'
    )
  out = {}
  kinds = (spurious.ALIGNED_KIND, _OTHER_KIND)
  for species in (0, 1):
    members = sorted(
      (e.name for e in entries if e.species == species),
      key=lambda name: spurious.digest(seed, 'group-split', name),
    )
    paired = held_out == 'paired'
    per_kind = 1 if paired else 2
    taken = per_kind * (test_per_group + val_per_group)
    if len(members) <= taken:
      raise errors.UserError(
        f'{SPECIES_NAMES[species]}: {len(members)} images, but test and '
        f'validation take {taken} ({test_per_group} + {val_per_group} per '
        f'group, {held_out} held-out placement) and train needs at least '
        'one; lower --test_per_group / --val_per_group.'
      )
    for i, name in enumerate(members[:taken]):
      split = 'test' if i < per_kind * test_per_group else 'validation'
      out[name] = (split, BOTH if paired else kinds[i % 2][species])
    train = members[taken:]
    num_other = math.floor((1 - correlation) * len(train) + 0.5)
    for i, name in enumerate(train):
      out[name] = ('train', kinds[int(i < num_other)][species])
  return out


def _render(
  pets_dir: str,
  out_dir: str,
  name: str,
  stem: str,
  kind: str,
  seed: int,
  quality: int,
) -> None:
  """Writes images/<stem>.jpg (the pet of `name` on `kind`) and its mask; the
  background's random numbers depend on (seed, name) only, so a paired pet's
  two renders differ in the kind of background alone."""
  image, trimap, _, _ = spurious.read_pair(pets_dir, name)
  background = spurious.BACKGROUNDS[kind](
    spurious.image_rng(seed, name), *image.shape[:2]
  )
  buffer = io.BytesIO()
  Image.fromarray(spurious.composite(image, trimap, background)).save(
    buffer, format='JPEG', quality=quality
  )
  with open(os.path.join(out_dir, 'images', f'{stem}.jpg'), 'wb') as f:
    f.write(buffer.getvalue())
  pet = (trimap != oxford_iiit_pet.TRIMAP_BACKGROUND).astype(np.uint8) * 255
  Image.fromarray(pet, mode='L').save(
    os.path.join(out_dir, 'masks', f'{stem}.png')
  )


def _rows(entries, chosen) -> list[tuple[str, str, int, str, str]]:
  """(stem, name, species, split, kind) of every written image, by stem."""
  out = []
  for e in entries:
    split, kind = chosen[e.name]
    if kind is BOTH:
      for both in (spurious.SMOOTH, spurious.TEXTURED):
        out.append((f'{e.name}-{both}', e.name, e.species, split, both))
    else:
      out.append((e.name, e.name, e.species, split, kind))
  return sorted(out)


def make_group_benchmark(
  pets_dir: str,
  out_dir: str,
  *,
  correlation: float = 0.95,
  val_per_group: int = 20,
  test_per_group: int = 40,
  seed: int = 0,
  jpeg_quality: int = spurious.JPEG_QUALITY,
  held_out: str = 'paired',
  overwrite: bool = False,
  num_threads: int | None = None,
) -> dict:
  """Writes the grouped benchmark (module docstring) to `out_dir`.

  Args:
    pets_dir: Oxford-IIIT Pet in the official layout.
    out_dir: where to write; must be empty or absent unless `overwrite`.
    correlation: share of each species' training images on its aligned kind.
    val_per_group, test_per_group: images per group in validation and test.
    seed: seeds the split, the kinds and every background.
    held_out: 'paired' or 'split' (module docstring).
    jpeg_quality: of the written images.
    overwrite: replace what `out_dir` holds.
    num_threads: image threads (the output does not depend on it).

  Returns:
    The metadata written to `out_dir/spurious.json`: settings and counts
    {split: {group: n}}.
  """
  spurious.prepare_output_dir(
    pets_dir,
    out_dir,
    overwrite=overwrite,
    parts=('images', 'masks', 'labels.csv'),
  )
  for part in ('images', 'masks'):
    os.makedirs(os.path.join(out_dir, part), exist_ok=True)
  entries = []
  for split in ('trainval', 'test'):
    path = os.path.join(pets_dir, 'annotations', f'{split}.txt')
    entries.extend(oxford_iiit_pet.read_split_list(path))
  names = [e.name for e in entries]
  if len(set(names)) != len(names):
    raise errors.UserError(
      f'{pets_dir}: an image is listed twice in trainval/test.'
    )
  chosen = assign(
    entries,
    correlation=correlation,
    val_per_group=val_per_group,
    test_per_group=test_per_group,
    seed=seed,
    held_out=held_out,
  )
  rows = _rows(entries, chosen)
  threads = {} if num_threads is None else {'num_threads': num_threads}
  for _ in common.ordered_parallel_map(
    lambda row: _render(
      pets_dir, out_dir, row[1], row[0], row[4], seed, jpeg_quality
    ),
    rows,
    **threads,
  ):
    pass
  counts = {}
  with open(os.path.join(out_dir, 'labels.csv'), 'w', newline='') as f:
    writer = csv.writer(f, lineterminator='\n')
    writer.writerow(('image', 'label', 'split', 'group'))
    for stem, _, species, split, kind in rows:
      group = group_name(species, kind)
      writer.writerow((f'{stem}.jpg', SPECIES_NAMES[species], split, group))
      by_group = counts.setdefault(split, {})
      by_group[group] = by_group.get(group, 0) + 1
  metadata = {
    'source': os.path.realpath(pets_dir),
    'correlation': correlation,
    'val_per_group': val_per_group,
    'test_per_group': test_per_group,
    'held_out': held_out,
    'seed': seed,
    'jpeg_quality': jpeg_quality,
    'minority_groups': list(MINORITY_GROUPS),
    'counts': {s: dict(sorted(c.items())) for s, c in sorted(counts.items())},
  }
  with open(os.path.join(out_dir, spurious.METADATA_FILE), 'w') as f:
    json.dump(metadata, f, indent=1, sort_keys=True)
    f.write('\n')
  return metadata
