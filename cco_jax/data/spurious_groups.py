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
used once. Within each species, images are ordered by SHA-256 of (seed,
name): the first `2 * test_per_group` go to test, the next
`2 * val_per_group` to validation (alternating kinds, so each group gets
exactly its share), the rest to train, where the first
`floor((1 - correlation) * n + 0.5)` get the other kind.

The old benchmark's reversed-test accuracy is the mean accuracy over the two
minority groups of this test split.

Output (`folder` dataset, docs/data.md): ROOT/labels.csv with columns
image,label,split,group; ROOT/images/<name>.jpg; ROOT/masks/<name>.png (255
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
) -> dict[str, tuple[str, str]]:
  """{name: (split, kind)} of every entry (module docstring).

  Raises:
    ValueError: a species has too few images for the requested test and
      validation groups, or a bad argument.
  """
  if not 0.0 <= correlation <= 1.0:
    raise errors.UserError(
      f'--correlation={correlation}: must be in [0, 1] (the share of aligned '
      'backgrounds; e.g. 0.95).'
    )
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
    held_out = 2 * (test_per_group + val_per_group)
    if len(members) <= held_out:
      raise errors.UserError(
        f'{SPECIES_NAMES[species]}: {len(members)} images, but test and '
        f'validation take {held_out} ({test_per_group} + {val_per_group} per '
        'group, two groups per species) and train needs at least one; lower '
        '--test_per_group / --val_per_group.'
      )
    for i, name in enumerate(members[:held_out]):
      split = 'test' if i < 2 * test_per_group else 'validation'
      out[name] = (split, kinds[i % 2][species])
    train = members[held_out:]
    num_other = math.floor((1 - correlation) * len(train) + 0.5)
    for i, name in enumerate(train):
      out[name] = ('train', kinds[int(i < num_other)][species])
  return out


def _render(
  pets_dir: str, out_dir: str, name: str, kind: str, seed: int, quality: int
) -> None:
  image, trimap, _, _ = spurious.read_pair(pets_dir, name)
  background = spurious.BACKGROUNDS[kind](
    spurious.image_rng(seed, name), *image.shape[:2]
  )
  buffer = io.BytesIO()
  Image.fromarray(spurious.composite(image, trimap, background)).save(
    buffer, format='JPEG', quality=quality
  )
  with open(os.path.join(out_dir, 'images', f'{name}.jpg'), 'wb') as f:
    f.write(buffer.getvalue())
  pet = (trimap != oxford_iiit_pet.TRIMAP_BACKGROUND).astype(np.uint8) * 255
  Image.fromarray(pet, mode='L').save(
    os.path.join(out_dir, 'masks', f'{name}.png')
  )


def make_group_benchmark(
  pets_dir: str,
  out_dir: str,
  *,
  correlation: float = 0.95,
  val_per_group: int = 20,
  test_per_group: int = 40,
  seed: int = 0,
  jpeg_quality: int = spurious.JPEG_QUALITY,
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
  )
  threads = {} if num_threads is None else {'num_threads': num_threads}
  for _ in common.ordered_parallel_map(
    lambda name: _render(
      pets_dir, out_dir, name, chosen[name][1], seed, jpeg_quality
    ),
    names,
    **threads,
  ):
    pass
  counts = {}
  with open(os.path.join(out_dir, 'labels.csv'), 'w', newline='') as f:
    writer = csv.writer(f, lineterminator='\n')
    writer.writerow(('image', 'label', 'split', 'group'))
    for e in sorted(entries, key=lambda e: e.name):
      split, kind = chosen[e.name]
      group = group_name(e.species, kind)
      writer.writerow((f'{e.name}.jpg', SPECIES_NAMES[e.species], split, group))
      by_group = counts.setdefault(split, {})
      by_group[group] = by_group.get(group, 0) + 1
  metadata = {
    'source': os.path.realpath(pets_dir),
    'correlation': correlation,
    'val_per_group': val_per_group,
    'test_per_group': test_per_group,
    'seed': seed,
    'jpeg_quality': jpeg_quality,
    'minority_groups': list(MINORITY_GROUPS),
    'counts': {s: dict(sorted(c.items())) for s, c in sorted(counts.items())},
  }
  with open(os.path.join(out_dir, spurious.METADATA_FILE), 'w') as f:
    json.dump(metadata, f, indent=1, sort_keys=True)
    f.write('\n')
  return metadata
