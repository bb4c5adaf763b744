"""Data for the dataset and input-pipeline tests.

Synthetic copies of the official layouts (always available) and where the real
samples in `shared/data` live (tests that need them skip when they are absent).
The pytest fixtures over these are in `conftest.py`.

Synthetic Pets images are dark blue with a bright yellow rectangle in their
left half; the trimap marks that rectangle as pet (1), a one-pixel ring around
it as boundary (3) and the rest as background (2). So the foreground of any crop
or flip can be read off the image itself (`is_foreground_pixel`, which also
works for the greyscale one), which is what the alignment tests check.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import ml_collections
import numpy as np
from PIL import Image

from cco_jax import data as data_lib
from cco_jax.data.datasets import oxford_iiit_pet

SHARED_DATA = Path(
  os.environ.get(
    'CCO_SHARED_DATA',
    Path(__file__).resolve().parents[1].parent / 'shared' / 'data',
  )
)
REAL_PETS = SHARED_DATA / 'oxford-iiit-pet-sample'
REAL_CATS_VS_DOGS = SHARED_DATA / 'cats-vs-dogs-sample'

# Synthetic Pets: (breed, species 0/1); 10 trainval and 4 test images each.
SYNTHETIC_BREEDS = (('Abyssinian', 0), ('Bengal', 0), ('american_bulldog', 1))
NUM_TRAINVAL_PER_BREED = 10
NUM_TEST_PER_BREED = 4
NUM_TRAINVAL = NUM_TRAINVAL_PER_BREED * len(SYNTHETIC_BREEDS)
NUM_TEST = NUM_TEST_PER_BREED * len(SYNTHETIC_BREEDS)
# Special files: stored as '.jpg' whatever their real format.
RGBA_PNG = 'Abyssinian_12'  # test split (officially Abyssinian_5).
LISTED_GIF = 'american_bulldog_7'  # trainval: must be converted.
UNLISTED_GIF = 'Abyssinian_34'  # in no split, as in the official release.
GREYSCALE = 'Bengal_3'  # trainval.
EMPTY_TRIMAP = 'american_bulldog_9'  # trainval: all background.
BOUNDARY_ONLY = 'Bengal_9'  # trainval: the rectangle is all boundary (3).
NUM_EMPTY_DEFAULT = 2  # EMPTY_TRIMAP and BOUNDARY_ONLY, boundary not fg.

# Synthetic Cats-vs-Dogs: 6 decodable JPEGs per class, one PNG-as-.jpg dog,
# one empty and one garbage file (skipped), and a Thumbs.db (ignored).
NUM_CVD_DECODABLE = 13
NUM_CVD_SKIPPED = 2

FG_COLOR = (240, 200, 60)  # Bright: grey level about 196.
BG_COLOR = (20, 30, 120)  # Dark: grey level about 38.
RED = (230, 20, 20)
BLUE = (20, 20, 230)


def is_foreground_pixel(images: np.ndarray) -> np.ndarray:
  """(..., 3) images in [0, 1] -> bool (...): bright = synthetic foreground."""
  return images.mean(axis=-1) > 0.45


def fg_rectangle(width: int, height: int) -> tuple[int, int, int, int]:
  """(left, top, right, bottom) of the synthetic foreground: left half."""
  return (width // 8, height // 4, width // 2, 3 * height // 4)


def synthetic_pair(
  width: int, height: int, *, trimap_kind: str = 'normal'
) -> tuple[Image.Image, np.ndarray]:
  """An RGB image and its trimap (uint8 (H, W)) in the synthetic convention."""
  left, top, right, bottom = fg_rectangle(width, height)
  pixels = np.empty((height, width, 3), np.uint8)
  pixels[:] = BG_COLOR
  pixels[top:bottom, left:right] = FG_COLOR
  trimap = np.full((height, width), oxford_iiit_pet.TRIMAP_BACKGROUND, np.uint8)
  if trimap_kind == 'normal':
    trimap[top - 1 : bottom + 1, left - 1 : right + 1] = (
      oxford_iiit_pet.TRIMAP_BOUNDARY
    )
    trimap[top:bottom, left:right] = oxford_iiit_pet.TRIMAP_PET
  elif trimap_kind == 'boundary_only':
    trimap[top:bottom, left:right] = oxford_iiit_pet.TRIMAP_BOUNDARY
  return Image.fromarray(pixels), trimap


def _image_bytes(image: Image.Image, name: str) -> bytes:
  buffer = io.BytesIO()
  if name == RGBA_PNG:
    image.convert('RGBA').save(buffer, format='PNG')
  elif name in (LISTED_GIF, UNLISTED_GIF):
    image.save(buffer, format='GIF')
  elif name == GREYSCALE:
    image.convert('L').save(buffer, format='JPEG', quality=95)
  else:
    image.save(buffer, format='JPEG', quality=95)
  return buffer.getvalue()


def write_synthetic_pets(root: Path) -> Path:
  """Writes a small Oxford-IIIT Pet in the official layout under `root`."""
  (root / 'images').mkdir(parents=True)
  (root / 'annotations' / 'trimaps').mkdir(parents=True)
  lines = {
    'trainval': ['# Official lists have no comments; list.txt has.'],
    'test': ['#Image CLASS-ID SPECIES BREED ID', ''],
  }
  for breed, species in SYNTHETIC_BREEDS:
    class_id = oxford_iiit_pet.BREEDS.index(breed) + 1
    for number in range(1, NUM_TRAINVAL_PER_BREED + NUM_TEST_PER_BREED + 1):
      name = f'{breed}_{number}'
      split = 'trainval' if number <= NUM_TRAINVAL_PER_BREED else 'test'
      lines[split].append(f'{name} {class_id} {species + 1} {number}')
  names = [
    line.split()[0]
    for split in lines.values()
    for line in split
    if line and not line.startswith('#')
  ] + [UNLISTED_GIF]
  for i, name in enumerate(names):
    width, height = (96, 64) if i % 2 else (64, 80)
    kind = {EMPTY_TRIMAP: 'empty', BOUNDARY_ONLY: 'boundary_only'}.get(
      name, 'normal'
    )
    image, trimap = synthetic_pair(width, height, trimap_kind=kind)
    (root / 'images' / f'{name}.jpg').write_bytes(_image_bytes(image, name))
    Image.fromarray(trimap).save(
      root / 'annotations' / 'trimaps' / f'{name}.png'
    )
  for split, split_lines in lines.items():
    (root / 'annotations' / f'{split}.txt').write_text(
      '\n'.join(split_lines) + '\n'
    )
  return root


def write_synthetic_cats_vs_dogs(root: Path) -> Path:
  """Writes a small Cats-vs-Dogs in the Microsoft layout under `root`."""
  for folder, color in (('Cat', RED), ('Dog', BLUE)):
    directory = root / 'PetImages' / folder
    directory.mkdir(parents=True)
    for number in range(6):
      Image.new('RGB', (40, 30), color).save(
        directory / f'{number}.jpg', quality=90
      )
    (directory / 'Thumbs.db').write_bytes(b'not an image')
  Image.new('RGB', (30, 40), BLUE).save(
    root / 'PetImages' / 'Dog' / '7.jpg', format='PNG'
  )
  (root / 'PetImages' / 'Cat' / '666.jpg').write_bytes(b'')
  (root / 'PetImages' / 'Dog' / '11702.jpg').write_bytes(b'garbage' * 10)
  return root


def data_config(**overrides) -> ml_collections.ConfigDict:
  """`default_config()` with `overrides`, small images and in-process reading."""
  config = data_lib.default_config()
  config.update(dict(image_size=32, prefetch=0), **overrides)
  return config


ISIC_DIAGNOSES = ('melanoma', 'nevus', 'seborrheic_keratosis')


def write_isic_source(root: Path, n: int = 60, size: int = 64) -> list[dict]:
  """n skin-coloured images with an elliptic lesion each, in the folder
  layout, diagnoses and splits in fixed proportions."""
  (root / 'images').mkdir(parents=True)
  (root / 'masks').mkdir(parents=True)
  rows = []
  for i in range(n):
    rng = np.random.default_rng(i)
    y, x = np.mgrid[0:size, 0:size]
    cy, cx = rng.uniform(0.3, 0.7, 2) * size
    ry, rx = rng.uniform(0.12, 0.3, 2) * size
    lesion = ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1
    pixels = np.where(lesion[..., None], (90, 50, 30), (225, 180, 160))
    pixels = pixels + rng.integers(-10, 10, pixels.shape)
    name = f'ISIC_{i:07d}.jpg'
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(
      root / 'images' / name, quality=95
    )
    Image.fromarray(lesion.astype(np.uint8) * 255).save(
      root / 'masks' / f'ISIC_{i:07d}.png'
    )
    diagnosis = ISIC_DIAGNOSES[0 if i % 4 == 0 else 1 + i % 2]
    rows.append(
      {
        'image': name,
        'label': diagnosis,
        'split': 'test' if i % 5 == 0 else 'train',
      }
    )
  with open(root / 'labels.csv', 'w', newline='') as f:
    writer = csv.DictWriter(f, ('image', 'label', 'split'))
    writer.writeheader()
    writer.writerows(rows)
  return rows
