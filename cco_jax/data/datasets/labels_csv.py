"""Reading the 'folder' dataset's labels.csv as people save it.

Spreadsheets and editors write CSV files in several ways; each is either read
correctly or refused in one line naming the file, the problem and the fix:

  * a UTF-8 byte-order mark ("CSV UTF-8" in Excel) is dropped;
  * UTF-16 with its byte-order mark ("Unicode text") is decoded;
  * any other text that is not UTF-8 (Latin-1, Windows-1252, ...) is refused,
    naming the line and the byte: decoding it by guess could turn a file name
    into one that does not exist;
  * line endings of any one kind (\\n, \\r\\n, \\r) are read; a line with only
    blanks or commas (what broken or doubled line endings leave behind) is
    refused with the count and the line numbers, naming the line endings when
    the file mixes them;
  * a header separated by ';' or tabs is refused naming the separator.

`read_rows(path)` returns the rows and whether a `group` column exists.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
import re

from cco_jax import errors

REQUIRED_COLUMNS = ('image', 'label', 'split')
_SAVE_AS_UTF8 = (
  "save it as UTF-8 (a spreadsheet's 'CSV UTF-8', or "
  '`iconv -f latin1 -t utf-8 OLD > labels.csv`)'
)


@dataclasses.dataclass(frozen=True)
class Row:
  """One line of labels.csv (`line` counts the header as line 1)."""

  line: int
  image: str
  label: str
  split: str
  group: str = ''
  labels: tuple[str, ...] = ()

  @property
  def present(self) -> tuple[str, ...]:
    """The classes present: the primary `label` and those of `labels`."""
    return tuple(sorted({self.label, *self.labels} - {''}))


def decode(path: str, data: bytes) -> str:
  """The text of a CSV file's bytes (module doc), or a one-line UserError."""
  if data.startswith((b'\xff\xfe', b'\xfe\xff')):
    try:
      return data.decode('utf-16')
    except UnicodeDecodeError as e:
      raise errors.UserError(
        f'{path}: starts with a UTF-16 byte-order mark but is not UTF-16 '
        f'({e.reason} at byte {e.start}); {_SAVE_AS_UTF8}.'
      ) from None
  try:
    return data.decode('utf-8-sig')
  except UnicodeDecodeError as e:
    line = data[: e.start].count(b'\n') + 1
    raise errors.UserError(
      f'{path}: not UTF-8 text (line {line}, byte '
      f'{data[e.start : e.start + 1]!r}: probably Latin-1 or Windows-1252); '
      f'{_SAVE_AS_UTF8}.'
    ) from None


def line_endings(text: str) -> dict[str, int]:
  """{'\\r\\n': count, '\\n': count, '\\r': count} of the line breaks in
  `text` (kinds that occur)."""
  counts = {
    '\\r\\n': text.count('\r\n'),
    '\\n': len(re.findall(r'(?<!\r)\n', text)),
    '\\r': len(re.findall(r'\r(?!\n)', text)),
  }
  return {kind: n for kind, n in counts.items() if n}


def _check_header(
  path: str, header: list[str], required: tuple[str, ...]
) -> None:
  missing = [c for c in required if c not in header]
  if not missing:
    return
  joined = ','.join(header)
  for separator, name in ((';', 'semicolons'), ('\t', 'tabs')):
    if len(header) == 1 and separator in joined:
      raise errors.UserError(
        f'{path}: the header {joined!r} is separated by {name}; save the '
        f'file with commas (header {",".join(required)}).'
      )
  raise errors.UserError(
    f'{path}: header {header} lacks {missing}; make its first line '
    f'{",".join(required)}'
    + (
      '[,group] (split: train, validation or test).'
      if 'split' in required
      else '.'
    )
  )


def _blank_rows_error(path: str, lines: list[int], text: str) -> Exception:
  kinds = line_endings(text)
  cause = (
    f'the file mixes line endings ({", ".join(f"{n} {k}" for k, n in kinds.items())})'
    if len(kinds) > 1
    else 'an empty spreadsheet row or a stray line break'
  )
  shown = ', '.join(map(str, lines[:10])) + (', ...' if len(lines) > 10 else '')
  return errors.UserError(
    f'{path}: {len(lines)} blank rows (lines {shown}; only blanks or commas): '
    f'{cause}; delete them, or save the file again with one kind of line '
    'ending (e.g. `dos2unix labels.csv`).'
  )


def read_rows(path: os.PathLike[str] | str) -> tuple[list[Row], bool]:
  """(rows of the labels.csv at `path`, whether it has a group column).

  Raises:
    errors.UserError: undecodable text, a header without the required
      columns, or blank rows (module doc).
  """
  path = os.fspath(path)
  with open(path, 'rb') as f:
    text = decode(path, f.read())
  return read_rows_of(path, text)


def read_rows_of(
  path: str, text: str, required: tuple[str, ...] = REQUIRED_COLUMNS
) -> tuple[list[Row], bool]:
  """`read_rows` of the decoded `text` of `path`, whose header must hold
  `required` (absent optional columns read as '')."""
  reader = csv.reader(io.StringIO(text, newline=''))
  header = [c.strip() for c in next(reader, [])]
  _check_header(path, header, required)
  has_group = 'group' in header
  has_labels = 'labels' in header
  rows, blank = [], []
  for raw in reader:
    line = reader.line_num
    if not raw:
      continue  # An empty line (csv's own blank): nothing was written there.
    values = [v.strip() for v in raw]
    if not any(values):
      blank.append(line)
      continue
    fields = dict(zip(header, values + [''] * (len(header) - len(values))))
    rows.append(
      Row(
        line=line,
        image=fields['image'],
        label=fields['label'],
        split=fields.get('split', ''),
        group=fields.get('group', '') if has_group else '',
        labels=split_names(fields.get('labels', '')) if has_labels else (),
      )
    )
  if blank:
    raise _blank_rows_error(path, blank, text)
  return rows, has_group


def split_names(cell: str) -> tuple[str, ...]:
  """The names of a multi-label `labels` cell (`;`-separated, blanks
  ignored)."""
  return tuple(name.strip() for name in cell.split(';') if name.strip())


def has_column(path: os.PathLike[str] | str, column: str) -> bool:
  """Whether the header of the CSV at `path` holds `column` (the file's
  encoding and line endings read as by `read_rows`)."""
  path = os.fspath(path)
  with open(path, 'rb') as f:
    text = decode(path, f.read())
  header = next(csv.reader(io.StringIO(text, newline='')), [])
  return column in [c.strip() for c in header]
