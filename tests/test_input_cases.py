"""Bad input that used to pass or confuse: each is read correctly or refused
in one line naming the file and the fix (labels.csv encodings and line
endings, 16-bit images, tiny images, symlinks), the options `prepare` records
for training, and the download probe."""

from __future__ import annotations

import io
import os
from pathlib import Path

import ml_collections
import numpy as np
from PIL import Image
import pytest
from tensorflow_datasets.core.download import resource
from test_data_folder import _prepare
from test_data_folder import _small_folder

from cco_jax import errors
from cco_jax.data import config as data_config_lib
from cco_jax.data import prepare_record
from cco_jax.data import transforms
from cco_jax.data.datasets import common
from cco_jax.data.datasets import downloads
from cco_jax.data.datasets import labels_csv

ROWS = 'image,label,split\na.jpg,cat,train\nsub/b.jpg,dog,test\n'


def _rows(path: Path):
  rows, has_group = labels_csv.read_rows(path)
  return [(r.line, r.image, r.label, r.split) for r in rows], has_group


EXPECTED = (
  [(2, 'a.jpg', 'cat', 'train'), (3, 'sub/b.jpg', 'dog', 'test')],
  False,
)


@pytest.mark.parametrize(
  'name, data',
  [
    ('utf8', ROWS.encode()),
    ('bom', b'\xef\xbb\xbf' + ROWS.encode()),  # Excel's "CSV UTF-8".
    ('utf16', ROWS.encode('utf-16')),  # "Unicode text", with its BOM.
    ('crlf', ROWS.replace('\n', '\r\n').encode()),
    ('cr', ROWS.replace('\n', '\r').encode()),  # Old Mac line endings.
    ('crcrlf', ROWS.replace('\n', '\r\r\n').encode()),  # Doubled: empty lines.
  ],
)
def test_labels_csv_as_spreadsheets_save_it_reads_the_same(
  tmp_path, name, data
):
  path = tmp_path / f'{name}.csv'
  path.write_bytes(data)
  rows, has_group = _rows(path)
  assert [r[1:] for r in rows] == [r[1:] for r in EXPECTED[0]]
  assert has_group is False


def test_latin1_labels_csv_is_refused_naming_file_line_and_fix(tmp_path):
  path = tmp_path / 'labels.csv'
  path.write_bytes(
    'image,label,split\na.jpg,chat,train\nb.jpg,léopard,test\n'.encode(
      'latin-1'
    )
  )
  with pytest.raises(errors.UserError) as e:
    labels_csv.read_rows(path)
  message = str(e.value)
  assert '\n' not in message
  assert str(path) in message and 'not UTF-8' in message
  assert 'line 3' in message and "b'\\xe9'" in message
  assert 'save it as UTF-8' in message


def test_whitespace_rows_from_broken_line_endings_are_named(tmp_path):
  path = tmp_path / 'labels.csv'
  lines = ROWS.strip().split('\n')
  path.write_bytes('\n \r'.join(lines).encode() + b'\n')
  with pytest.raises(errors.UserError) as e:
    labels_csv.read_rows(path)
  message = str(e.value)
  assert '2 blank rows (lines 2, 4' in message
  assert 'mixes line endings' in message and '\\r' in message
  # Commas only (a spreadsheet's empty row) with one kind of line ending.
  path.write_text(ROWS + ',,\n')
  with pytest.raises(errors.UserError, match=r'1 blank rows \(lines 4;.*empty'):
    labels_csv.read_rows(path)


def test_header_problems_name_the_fix(tmp_path):
  path = tmp_path / 'labels.csv'
  path.write_text(ROWS.replace(',', ';'))
  with pytest.raises(errors.UserError, match='separated by semicolons'):
    labels_csv.read_rows(path)
  path.write_text('image,label\na.jpg,cat\n')
  with pytest.raises(
    errors.UserError, match=r"lacks \['split'\]; make its first"
  ):
    labels_csv.read_rows(path)


def _png16(values: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(values.astype(np.uint16)).save(buffer, format='PNG')
  return buffer.getvalue()


def test_16_bit_greyscale_is_scaled_not_white(tmp_path):
  # A horizontal ramp over the whole 16-bit range, and a dark 16-bit image.
  ramp = np.tile(np.linspace(0, 65535, 64), (16, 1))
  dark = np.full((16, 64), 4096)
  for values in (ramp, dark):
    jpeg, reencoded = common.rgb_jpeg_bytes(_png16(values))
    assert reencoded
    with Image.open(io.BytesIO(jpeg)) as image:
      pixels = np.asarray(image.convert('L'), np.float64)
    # value / 257 (JPEG rounding aside); Pillow alone gives 255 everywhere.
    np.testing.assert_allclose(pixels, values / 257.0, atol=6)
  # The explain path reads files through the same conversion.
  path = tmp_path / 'dark16.png'
  path.write_bytes(_png16(dark))
  image = transforms.read_image_file(path, image_size=8, normalize=False)
  np.testing.assert_allclose(image, 4096 / 257 / 255, atol=0.02)


def test_float_image_is_refused():
  buffer = io.BytesIO()
  Image.fromarray(np.ones((4, 4), np.float32)).save(buffer, format='TIFF')
  with pytest.raises(ValueError, match='floating-point image'):
    common.rgb_jpeg_bytes(buffer.getvalue())


def test_tiny_image_is_refused_or_skipped_and_counted(tmp_path):
  root = tmp_path / 'root'
  rows = _small_folder(root, n=6)
  tiny = rows[0][0]
  Image.new('RGB', (1, 1)).save(root / 'images' / tiny)
  Image.new('L', (1, 1), 255).save(
    root / 'masks' / f'{tiny.rsplit(".", 1)[0]}.png'
  )
  with pytest.raises(errors.UserError) as e:
    _prepare(root, tmp_path / 'a')
  message = str(e.value)
  assert f"'{tiny}': unreadable image" in message
  assert '1x1 pixels, smaller than 8 on a side' in message
  assert '--skip_bad_images' in message
  builder = _prepare(root, tmp_path / 'b', skip_bad_images=True)
  assert builder.info.metadata['num_skipped_images'] == 1
  assert builder.info.metadata['skipped_images'] == [tiny]


def test_symlink_loop_and_dangling_link_are_named(tmp_path):
  root = tmp_path / 'root'
  rows = _small_folder(root, n=6)
  loop = root / 'images' / rows[0][0]
  loop.unlink()
  os.symlink(loop.name, loop)
  dangling = root / 'images' / rows[2][0]
  dangling.unlink()
  os.symlink('/nowhere/photo.png', dangling)
  with pytest.raises(errors.UserError) as e:
    _prepare(root, tmp_path / 'tfds')
  message = str(e.value)
  assert f'{loop} is a symlink loop' in message
  assert (
    f'{dangling} is a symlink to a missing file (/nowhere/photo.png)' in message
  )


def test_bom_labels_csv_prepares(tmp_path):
  root = tmp_path / 'root'
  _small_folder(root, n=6)
  text = (root / 'labels.csv').read_text()
  (root / 'labels.csv').write_bytes(
    b'\xef\xbb\xbf' + text.replace('\n', '\r\n').encode()
  )
  builder = _prepare(root, tmp_path / 'tfds')
  assert builder.info.splits['train'].num_examples == 4
  assert builder.info.splits['test'].num_examples == 2


def _data_config(tmp_path, **fields) -> ml_collections.ConfigDict:
  config = data_config_lib.default_config()
  config.update(
    dict(name='folder', manual_dir=str(tmp_path / 'root'),
         tfds_data_dir=str(tmp_path / 'tfds'), **fields)
  )  # fmt: skip
  return config


def test_prepare_record_is_adopted_where_the_config_keeps_defaults(tmp_path):
  (tmp_path / 'root').mkdir()
  given = _data_config(
    tmp_path, missing_masks='all_ones', store_size=48, validation_fraction=0.2
  )
  path = prepare_record.write(given)
  assert path.startswith(str(tmp_path / 'tfds' / prepare_record.RECORD_DIR))
  training = _data_config(tmp_path)
  adopted = prepare_record.adopt(training)
  assert sorted(adopted) == [
    "missing_masks='all_ones'",
    'store_size=48',
    'validation_fraction=0.2',
  ]
  assert training.missing_masks == 'all_ones' and training.store_size == 48
  # A value the user set wins over the record; another folder has none.
  explicit = _data_config(tmp_path, missing_masks='drop')
  prepare_record.adopt(explicit)
  assert explicit.missing_masks == 'drop' and explicit.store_size == 48
  other = _data_config(tmp_path)
  other.manual_dir = str(tmp_path / 'other')
  assert prepare_record.adopt(other) == [] and other.missing_masks == 'error'


def test_download_probe_fails_fast_naming_both_fixes(tmp_path):
  for url in (
    'https://host.invalid/pets/images.tar.gz',
    'http://127.0.0.1:1/x.zip',
  ):
    with pytest.raises(errors.UserError) as e:
      downloads.check_reachable([url], timeout_s=5)
    message = str(e.value)
    assert url in message
    assert '--manual_dir=DIR' in message and '--download_mirror=URL' in message
  url = 'https://host.invalid/pets/images.tar.gz'
  (tmp_path / resource.get_dl_fname(url)).write_bytes(b'x')  # As TFDS names it.
  assert downloads.already_downloaded(tmp_path, url)
  assert not downloads.already_downloaded(
    tmp_path, 'https://host.invalid/y.zip'
  )
