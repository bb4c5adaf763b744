"""Helpers shared by the project's TFDS builders (no TensorFlow needed).

rgb_jpeg_bytes          any image file Pillow reads -> RGB JPEG bytes.
ordered_parallel_map    a bounded, ordered thread-pool map for preparing.
code_path_property      lets TFDS locate builders outside its own tree.
manual_dir_or_none      the manual directory of a download manager, if any.
squash_jpeg             store images pre-squashed (`data.store_size`).
decode_mask_png         8-bit PNG of any mode -> uint8 (H, W) values.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
import concurrent.futures
import dataclasses
import inspect
import io
import itertools
import os
import shutil
from typing import TypeVar

from etils import epath
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from cco_jax import errors
from cco_jax.data.datasets import downloads

_T = TypeVar('_T')
_S = TypeVar('_S')

JPEG_QUALITY = 95
# Errors Pillow raises on files that are empty, truncated or not images.
UNREADABLE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)

# Threads that validate and re-encode images while preparing (Pillow releases
# the GIL while decoding), and how many images each batch of work holds.
_NUM_THREADS = max(1, min(8, os.cpu_count() or 1))
_CHUNK_SIZE = 64
# Raw pixels are stored as one bytes string (an int64 list per pixel would
# make reading ~100x slower).
_BYTES = tfds.features.Encoding.BYTES


def rgb_jpeg_bytes(
  data: bytes, *, quality: int = JPEG_QUALITY
) -> tuple[bytes, bool]:
  """Returns `data` as the bytes of a decodable RGB JPEG.

  A file that is already an RGB JPEG and decodes completely is returned
  unchanged; any other image Pillow can read (GIF, PNG, RGBA, CMYK, greyscale)
  is converted to RGB and re-encoded.

  Args:
    data: the bytes of an image file.
    quality: JPEG quality used when re-encoding.

  Returns:
    (jpeg_bytes, reencoded).

  Raises:
    PIL.UnidentifiedImageError, OSError, SyntaxError, ValueError: when Pillow
      cannot decode `data` (empty, truncated or not an image).
  """
  with Image.open(io.BytesIO(data)) as image:
    image.load()  # Decodes everything: truncated files fail here.
    if image.format == 'JPEG' and image.mode == 'RGB':
      return data, False
    rgb = to_rgb(image)
  buffer = io.BytesIO()
  rgb.save(buffer, format='JPEG', quality=quality)
  return buffer.getvalue(), True


# Pillow modes of more than 8 bits per pixel, and their largest value.
_WIDE_MODES = {'I;16': 65535, 'I;16B': 65535, 'I;16L': 65535, 'I;16N': 65535}


def to_rgb(image: Image.Image) -> Image.Image:
  """Any image Pillow reads -> 8-bit RGB, with its brightness kept.

  Pillow's own `convert('RGB')` clips 16-bit greyscale (modes 'I;16*', and
  'I' as 16-bit PNGs open) to 255, which turns a photo solid white; here it is
  scaled to 0..255 instead (value / 257, so 65535 -> 255). Alpha is dropped,
  as TFDS's own builder does.

  Raises:
    ValueError: a floating-point image (mode 'F'): its scale is unknown.
  """
  if image.mode in _WIDE_MODES or image.mode == 'I':
    values = np.asarray(image).astype(np.float64)
    top = _WIDE_MODES.get(image.mode, 65535)
    if image.mode == 'I' and values.max(initial=0) > top:
      top = float(values.max())  # 32-bit data: scale by its own range.
    scaled = np.clip(np.round(values * (255.0 / top)), 0, 255)
    return Image.fromarray(scaled.astype(np.uint8), 'L').convert('RGB')
  if image.mode == 'F':
    raise ValueError(
      'a floating-point image (mode F) has no known scale; save it as an '
      '8- or 16-bit PNG or a JPEG'
    )
  if image.mode in ('RGBA', 'LA') or (
    image.mode == 'P' and 'transparency' in image.info
  ):
    image = image.convert('RGBA')
  return image.convert('RGB')


def ordered_parallel_map(
  fn: Callable[[_T], _S],
  items: Iterable[_T],
  *,
  num_threads: int = _NUM_THREADS,
  chunk_size: int = _CHUNK_SIZE,
) -> Iterator[_S]:
  """Yields `fn(item)` for each item, in order, computed by a thread pool.

  At most `chunk_size` results are held at once, so memory stays bounded.
  """
  items = iter(items)
  with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
    while chunk := list(itertools.islice(items, chunk_size)):
      yield from pool.map(fn, chunk)


def _code_path(cls) -> epath.Path:
  return epath.Path(inspect.getfile(cls))


# TFDS 4.9.10 locates a builder's source through `importlib_resources`, a
# package it does not install on Python >= 3.9, unless the builder lives in a
# zip app; builders outside TFDS's own tree therefore set `code_path` directly.
code_path_property = tfds.core.utils.classproperty(classmethod(_code_path))


def download_and_extract(dl_manager: tfds.download.DownloadManager, urls):
  """Downloads `urls` (a str or a dict of them) and extracts each archive.

  TFDS's own extractor needs TensorFlow; this one uses Python's `shutil`
  (.tar, .tar.gz, .tgz, .zip) and extracts each archive once, next to it.

  Returns:
    The extracted directory (or a dict of them, with the keys of `urls`); a
    download that is already a directory is returned as it is.

  Raises:
    errors.UserError: a host cannot be reached or a download fails
      (`downloads`: one line naming --manual_dir and --download_mirror).
  """
  import requests  # pylint: disable=g-import-not-at-top

  listed = list(urls.values()) if isinstance(urls, dict) else [urls]
  downloads.check_reachable(
    u
    for u in listed
    if not downloads.already_downloaded(dl_manager.download_dir, u)
  )
  try:
    paths = dl_manager.download(urls)
  except (
    requests.exceptions.RequestException,
    tfds.download.DownloadError,
  ) as e:
    raise downloads.download_error(
      ', '.join(listed), f'{type(e).__name__}: {e}'.splitlines()[0][:300]
    ) from None

  def extract(path) -> epath.Path:
    path = epath.Path(path)
    if path.is_dir():
      return path
    target = epath.Path(f'{os.fspath(path)}.extracted')
    if not (target / '.done').exists():
      shutil.unpack_archive(os.fspath(path), os.fspath(target), _format(path))
      (target / '.done').touch()
    return target

  if isinstance(paths, dict):
    return {key: extract(path) for key, path in paths.items()}
  return extract(paths)


def _format(path: epath.Path) -> str:
  """shutil's archive format of a downloaded file, from its name."""
  name = path.name.lower()
  for suffixes, archive_format in (
    (('.tar.gz', '.tgz'), 'gztar'),
    (('.tar',), 'tar'),
    (('.zip',), 'zip'),
  ):
    if name.endswith(suffixes):
      return archive_format
  raise errors.UserError(
    f'{os.fspath(path)}: not a .tar, .tar.gz, .tgz or .zip.'
  )


def manual_dir_or_none(
  dl_manager: tfds.download.DownloadManager,
) -> epath.Path | None:
  """The manual directory of `dl_manager`; None when unset or empty."""
  try:
    return epath.Path(dl_manager.manual_dir)
  except AssertionError:  # No manual directory, or an empty one.
    return None


def image_size(jpeg: bytes) -> tuple[int, int]:
  """(width, height) of encoded image bytes, without decoding the pixels."""
  with Image.open(io.BytesIO(jpeg)) as image:
    return image.size


def squash_jpeg(
  jpeg: bytes, size: int, *, quality: int = JPEG_QUALITY, raw: bool = False
) -> bytes | np.ndarray:
  """An image squashed to (size, size) (bilinear), as JPEG bytes.

  What `data.store_size` stores: the pipeline then decodes (S, S) JPEGs, which
  is several times faster than decoding full-size ones.
  """
  with Image.open(io.BytesIO(jpeg)) as image:
    image.draft('RGB', (size, size))
    rgb = image.convert('RGB').resize((size, size), Image.Resampling.BILINEAR)
  if raw:
    return np.asarray(rgb)
  buffer = io.BytesIO()
  rgb.save(buffer, format='JPEG', quality=quality)
  return buffer.getvalue()


def squash_mask_png(png: bytes, size: int) -> bytes:
  """A single-channel PNG mask squashed to (size, size) (nearest)."""
  with Image.open(io.BytesIO(png)) as mask:
    values = np.asarray(mask)
  resized = Image.fromarray(values.astype(np.uint8), mode='L').resize(
    (size, size), Image.Resampling.NEAREST
  )
  return png_bytes(np.asarray(resized))


def png_bytes(values: np.ndarray) -> bytes:
  """uint8 (H, W) -> single-channel ('L') PNG bytes."""
  buffer = io.BytesIO()
  Image.fromarray(values.astype(np.uint8), mode='L').save(buffer, format='PNG')
  return buffer.getvalue()


def decode_mask_png(data: bytes) -> np.ndarray:
  """An 8-bit PNG mask of any mode -> uint8 (H, W).

  'L' and 'P' keep their stored values (for 'P', the palette indices); 'LA'
  keeps its grey channel; 'RGB'/'RGBA' masks become grey ('L'), so a black and
  white mask reads 0 / 255 whichever mode it was saved in; '1' reads 0 / 255.

  Raises:
    ValueError: a 16-bit or float PNG (modes 'I', 'I;16', 'F').
  """
  with Image.open(io.BytesIO(data)) as mask:
    mask.load()
    if mask.mode in ('L', 'P'):
      return np.asarray(mask, np.uint8)
    if mask.mode in ('1', 'LA', 'RGB', 'RGBA'):
      return np.asarray(mask.convert('L'), np.uint8)
    raise ValueError(
      f'mask mode {mask.mode!r} is not 8-bit; save it as an 8-bit PNG '
      "(mode 'L': 0 = background, >0 = object)."
    )


@dataclasses.dataclass(frozen=True)
class PrepareOptions:
  """Options that change what preparing writes (the `config.data` fields).

  Attributes:
    store_size: 0 = images as they are; S = squashed to (S, S) (bilinear;
      masks nearest).
    store_format: with store_size, 'jpeg' or 'raw' (uint8 arrays).
    missing_masks: 'folder': 'error', 'all_ones' or 'drop' a row without a
      mask.
    resize_masks: 'folder': resize a mask of another size than its image.
    skip_bad_images: 'folder': skip unreadable images instead of failing.
    download_mirror: '' or a base URL that serves the official file names.
  """

  store_size: int = 0
  store_format: str = 'jpeg'
  missing_masks: str = 'error'
  resize_masks: bool = False
  skip_bad_images: bool = False
  download_mirror: str = ''


def mirrored(url: str, mirror: str) -> str:
  """`url`, or `mirror/<url's file name>` when a mirror is given."""
  if not mirror:
    return url
  return f'{mirror.rstrip("/")}/{url.rsplit("/", 1)[-1]}'


class ProjectBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A GeneratorBasedBuilder that takes the project's `PrepareOptions`."""

  def __init__(self, *, options: PrepareOptions | None = None, **kwargs):
    self.options = options or PrepareOptions()
    super().__init__(**kwargs)

  @property
  def stores_raw(self) -> bool:
    return bool(self.options.store_size) and self.options.store_format == 'raw'

  def image_feature(self) -> tfds.features.FeatureConnector:
    """The 'image' feature: a JPEG, or uint8 (S, S, 3) pixels when raw."""
    if self.stores_raw:
      size = self.options.store_size
      return tfds.features.Tensor(
        shape=(size, size, 3), dtype=np.uint8, encoding=_BYTES
      )
    return tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg')

  def mask_feature(self) -> tfds.features.FeatureConnector:
    """'segmentation_mask': a PNG, or uint8 (S, S, 1) values when raw."""
    if self.stores_raw:
      size = self.options.store_size
      return tfds.features.Tensor(
        shape=(size, size, 1), dtype=np.uint8, encoding=_BYTES
      )
    return tfds.features.Image(shape=(None, None, 1), encoding_format='png')

  def stored(self, image: bytes, mask: bytes | None = None):
    """`store(self.options, image, mask)`."""
    return store(self.options, image, mask)


def store(options: PrepareOptions, image: bytes, mask: bytes | None = None):
  """(image, mask) as stored: squashed to `options.store_size` if > 0 (JPEG /
  PNG bytes, or uint8 arrays (S, S, 3) / (S, S, 1) with store_format 'raw')."""
  size = options.store_size
  if not size:
    return image, mask
  raw = options.store_format == 'raw'
  image = squash_jpeg(image, size, raw=raw)
  if mask is not None:
    mask = squash_mask_png(mask, size)
    if raw:
      mask = np.asarray(Image.open(io.BytesIO(mask)))[..., None]
  return image, mask
