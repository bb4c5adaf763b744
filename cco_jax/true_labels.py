"""True classes of image files, only as the user states them.

`experiments.explain --labels=FILE` shows a true class next to the
prediction; without it, none is shown (a file name is never read as a
label: a dog photo saved as `Rex_1.jpg` is not an Abyssinian). FILE is one
of:

  * a CSV with a header holding `image` and `label` (the 'folder' dataset's
    labels.csv: `image` is a path relative to its images/ folder, or a file
    name);
  * an Oxford-IIIT Pet list (`annotations/list.txt`, `trainval.txt`,
    `test.txt`: lines `NAME CLASS-ID SPECIES BREED-ID`, '#' comments): the
    label is the breed, or the species ('cat' / 'dog') when those are the
    model's classes.

An image is matched by its path relative to the labels' images/ folder, else
by its file name, else by its stem (Pets lists name stems). Labels that are
not a class of the model are refused in one line naming the file.
"""

from __future__ import annotations

from collections.abc import Sequence
import os

from cco_jax import errors
from cco_jax.data.datasets import labels_csv
from cco_jax.data.datasets import oxford_iiit_pet


class TrueLabels:
  """{key: class name} of a labels file, looked up by image path."""

  def __init__(self, path: str, by_key: dict[str, str]):
    self.path = path
    self._by_key = by_key

  def __len__(self) -> int:
    return len(self._by_key)

  def of(self, image_path: str) -> str | None:
    """The true class of `image_path`, or None when the file lacks it."""
    norm = os.path.normpath(image_path).replace(os.sep, '/')
    parts = norm.split('/')
    for i in range(len(parts)):  # Longest relative suffix first.
      found = self._by_key.get('/'.join(parts[i:]))
      if found is not None:
        return found
    return self._by_key.get(os.path.splitext(parts[-1])[0])


def _pets_rows(path: str, text: str) -> list[tuple[str, int, int]]:
  rows = []
  for number, line in enumerate(text.splitlines(), start=1):
    if not line.strip() or line.startswith('#'):
      continue
    fields = line.split()
    try:
      name, class_id, species = fields[0], int(fields[1]), int(fields[2])
    except (IndexError, ValueError):
      raise errors.UserError(
        f'{path}:{number}: expected "NAME CLASS-ID SPECIES BREED-ID" (an '
        'Oxford-IIIT Pet list) or a CSV with an image,label header; got '
        f'{line.strip()!r}.'
      ) from None
    rows.append((name, class_id, species))
  return rows


def _canonical(names: Sequence[str]) -> dict[str, str]:
  return {n.lower().replace(' ', '_'): n for n in names}


def read(path: str, class_names: Sequence[str]) -> TrueLabels:
  """The labels of `path` (module doc), checked against `class_names`.

  Raises:
    errors.UserError: no such file, an unreadable format, or labels that are
      not among `class_names` (one line naming the file and the fix).
  """
  if not os.path.isfile(path):
    raise errors.UserError(
      f'--labels={path}: no such file; give a CSV with an image,label header '
      "(a folder dataset's labels.csv) or an Oxford-IIIT Pet list "
      '(annotations/list.txt).'
    )
  with open(path, 'rb') as f:
    text = labels_csv.decode(path, f.read())
  classes = _canonical(class_names)
  by_key: dict[str, str] = {}
  first = next((ln for ln in text.splitlines() if ln.strip()), '')
  if ',' in first and 'image' in first and 'label' in first:
    rows, _ = labels_csv.read_rows_of(path, text, required=('image', 'label'))
    named = [(r.image, r.label) for r in rows]
  else:
    species = set(classes) == {'cat', 'dog'}
    named = [
      (
        name,
        oxford_iiit_pet.SPECIES[sp - 1]
        if species
        else oxford_iiit_pet.BREEDS[class_id - 1],
      )
      for name, class_id, sp in _pets_rows(path, text)
      if 1 <= class_id <= len(oxford_iiit_pet.BREEDS) and sp in (1, 2)
    ]
  unknown = sorted({label for _, label in named} - set(class_names))
  unknown = [u for u in unknown if u.lower().replace(' ', '_') not in classes]
  if unknown:
    raise errors.UserError(
      f'--labels={path}: labels {unknown[:5]} are not classes of the model '
      f'({list(class_names)}); give the labels file of the data it was '
      'trained on.'
    )
  for image, label in named:
    name = classes[label.lower().replace(' ', '_')]
    key = os.path.normpath(image).replace(os.sep, '/')
    by_key[key] = name
    by_key.setdefault(os.path.basename(key), name)
    by_key.setdefault(os.path.splitext(os.path.basename(key))[0], name)
  return TrueLabels(path, by_key)
