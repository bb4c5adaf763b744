r"""Packs the real data samples small enough to travel to a lent GPU machine.

A lent H100/H200 receives at most 64 MiB of code and data. The Pets sample
(70 MB of full-size JPEGs) is rewritten in the official layout with every image
and trimap shrunk to at most --max_side pixels (the model squashes to 224 px
anyway), and the Cats-vs-Dogs sample (already 180 px) is copied as it is,
into --out; the ISIC sample (256 px JPEGs and lesion masks, 26 MB) is copied
as it is into --isic_out, a second folder for the second call (the two
together with the wheels would not fit):

    python -m experiments.gpu.make_bundle --out=.gpu_bundle \
        --isic_out=.gpu_bundle_isic \
        --pets_dir=../shared/data/oxford-iiit-pet-sample \
        --cvd_dir=../shared/data/cats-vs-dogs-sample \
        --isic_dir=../shared/data/isic-2017-sample

Then `experiments/gpu/check.sh` and `reproduce.sh` train on --out and
`isic.sh` on --isic_out (docs/gpu.md). Images that are not RGB JPEGs (the
Pets sample's GIF and RGBA PNG) are converted, as the TFDS builder would;
names, splits and list files are kept.
"""

import os
import shutil

from absl import app
from absl import flags
from PIL import Image

_OUT = flags.DEFINE_string('out', '.gpu_bundle', 'Output folder.')
_PETS = flags.DEFINE_string(
  'pets_dir',
  '../shared/data/oxford-iiit-pet-sample',
  'Oxford-IIIT Pet in the official layout.',
)
_CVD = flags.DEFINE_string(
  'cvd_dir',
  '../shared/data/cats-vs-dogs-sample',
  'Cats-vs-Dogs (PetImages/{Cat,Dog}).',
)
_ISIC = flags.DEFINE_string(
  'isic_dir',
  '../shared/data/isic-2017-sample',
  'ISIC 2017 sample (folder layout: labels.csv, images/, masks/).',
)
_ISIC_OUT = flags.DEFINE_string(
  'isic_out',
  '.gpu_bundle_isic',
  "Output folder of the ISIC sample ('' = none).",
)
_MAX_SIDE = flags.DEFINE_integer(
  'max_side', 256, 'Longest side after shrinking.'
)


def shrink(source: str, target: str, max_side: int, *, trimap: bool) -> None:
  """Writes `source` shrunk to at most `max_side` (nearest for trimaps)."""
  with Image.open(source) as image:
    image.load()
    if not trimap:
      image = image.convert('RGB')
    scale = max_side / max(image.size)
    if scale < 1:
      size = (
        max(1, round(image.width * scale)),
        max(1, round(image.height * scale)),
      )
      image = image.resize(
        size, Image.Resampling.NEAREST if trimap else Image.Resampling.BILINEAR
      )
    if trimap:
      image.save(target, format='PNG')
    else:
      image.save(target, format='JPEG', quality=90)


def pack_pets(pets_dir: str, out: str, max_side: int) -> int:
  """The Pets sample in the official layout, shrunk; returns the image count."""
  for sub in ('images', 'annotations/trimaps'):
    os.makedirs(os.path.join(out, sub), exist_ok=True)
  for name in os.listdir(os.path.join(pets_dir, 'annotations')):
    path = os.path.join(pets_dir, 'annotations', name)
    if name.endswith('.txt') or name == 'README':
      shutil.copy(path, os.path.join(out, 'annotations', name))
  count = 0
  for name in sorted(os.listdir(os.path.join(pets_dir, 'images'))):
    if not name.endswith('.jpg'):
      continue
    stem = name[:-4]
    trimap = os.path.join(pets_dir, 'annotations', 'trimaps', stem + '.png')
    shrink(
      os.path.join(pets_dir, 'images', name),
      os.path.join(out, 'images', name),
      max_side,
      trimap=False,
    )
    if os.path.exists(trimap):
      shrink(
        trimap,
        os.path.join(out, 'annotations', 'trimaps', stem + '.png'),
        max_side,
        trimap=True,
      )
    count += 1
  return count


def folder_mib(path: str) -> float:
  """Size of the files under `path` in MiB."""
  return (
    sum(
      os.path.getsize(os.path.join(d, f))
      for d, _, files in os.walk(path)
      for f in files
    )
    / 2**20
  )


def main(argv):
  del argv
  if not os.path.isdir(os.path.join(_PETS.value, 'images')):
    raise ValueError(
      f'--pets_dir={_PETS.value} has no images/ folder; point it at '
      'Oxford-IIIT Pet in the official layout.'
    )
  if not os.path.isdir(os.path.join(_CVD.value, 'PetImages')):
    raise ValueError(f'--cvd_dir={_CVD.value} has no PetImages/ folder.')
  count = pack_pets(
    _PETS.value, os.path.join(_OUT.value, 'pets'), _MAX_SIDE.value
  )
  shutil.copytree(
    _CVD.value, os.path.join(_OUT.value, 'cvd'), dirs_exist_ok=True
  )
  print(
    f'{count} Pets images and Cats-vs-Dogs in {_OUT.value}: '
    f'{folder_mib(_OUT.value):.1f} MiB'
  )
  if _ISIC_OUT.value:
    if not os.path.isfile(os.path.join(_ISIC.value, 'labels.csv')):
      raise ValueError(
        f'--isic_dir={_ISIC.value} has no labels.csv; point it at the ISIC '
        "sample in the folder layout, or pass --isic_out='' to skip it."
      )
    shutil.copytree(_ISIC.value, _ISIC_OUT.value, dirs_exist_ok=True)
    print(
      f'ISIC sample in {_ISIC_OUT.value}: {folder_mib(_ISIC_OUT.value):.1f} MiB'
    )


if __name__ == '__main__':
  app.run(main)
