"""TensorBoard event files read and rewritten, so that a resumed run shows each
step once.

An event file is a sequence of TFRecords (length, masked CRC-32C of the length,
an `Event` protocol buffer, masked CRC-32C of it). `read_events` parses one
(ignoring a torn last record, as a killed writer leaves it); `keep_scalars`
rewrites a TensorBoard directory into one file holding each kept
`(tag, step)` scalar once, with its original wall time.

TensorBoard's own `purge_step` only hides the old points in some readers
(it writes a marker that a reader must apply); rewriting the files makes
every reader see each point once. The directory is swapped whole
(`DIR` -> `DIR.old`, `DIR.rewrite` -> `DIR`), and `recover` finishes or undoes
a swap that a crash interrupted, so no point is ever lost or doubled.
"""

from __future__ import annotations

from collections.abc import Callable
import struct

from absl import logging
from etils import epath
from tensorboardX.proto import event_pb2
from tensorboardX.record_writer import masked_crc32c

PATTERN = 'events.out.tfevents.*'


def read_events(data: bytes) -> list[event_pb2.Event]:
  """The events of an event file's bytes; stops at a torn or corrupt record."""
  events, offset = [], 0
  while offset + 12 <= len(data):
    header = data[offset : offset + 8]
    (length,) = struct.unpack('<Q', header)
    (header_crc,) = struct.unpack('<I', data[offset + 8 : offset + 12])
    end = offset + 12 + length + 4
    if header_crc != masked_crc32c(header) or end > len(data):
      break
    payload = data[offset + 12 : offset + 12 + length]
    (payload_crc,) = struct.unpack('<I', data[end - 4 : end])
    if payload_crc != masked_crc32c(payload):
      break
    events.append(event_pb2.Event.FromString(payload))
    offset = end
  return events


def encode(events: list[event_pb2.Event]) -> bytes:
  """`events` as the bytes of an event file."""
  parts = []
  for event in events:
    payload = event.SerializeToString()
    header = struct.pack('<Q', len(payload))
    parts += [
      header,
      struct.pack('<I', masked_crc32c(header)),
      payload,
      struct.pack('<I', masked_crc32c(payload)),
    ]
  return b''.join(parts)


def _aside(directory: epath.Path, suffix: str) -> epath.Path:
  return directory.parent / f'{directory.name}.{suffix}'


def recover(directory: epath.Path) -> None:
  """Finishes (or undoes) a swap of `directory` that a crash interrupted."""
  old, staging = _aside(directory, 'old'), _aside(directory, 'rewrite')
  if old.exists():
    if directory.exists():  # The new one is in place: drop the old one.
      old.rmtree()
    else:
      old.rename(directory)
  if staging.exists():
    staging.rmtree()


def keep_scalars(
  directory: str, keep: Callable[[str, int], bool]
) -> tuple[int, int]:
  """Rewrites the event files in `directory`: scalars `(tag, step)` with
  `keep(tag, step)` true, each once (the first written); other summaries and
  markers (e.g. purge markers) are dropped, the file-version header kept.

  Returns:
    (points kept, points dropped).
  """
  directory = epath.Path(directory)
  recover(directory)
  files = sorted(directory.glob(PATTERN)) if directory.exists() else []
  if not files:
    return 0, 0
  events = [e for f in files for e in read_events(f.read_bytes())]
  kept, seen, dropped = [], set(), 0
  for event in events:
    if event.HasField('file_version'):
      if not kept:
        kept.append(event)
      continue
    if not event.HasField('summary'):
      continue  # Session logs (purge markers), graphs: not written by us.
    values = []
    for value in event.summary.value:
      key = (value.tag, int(event.step))
      if key in seen or not keep(*key):
        dropped += 1
        continue
      seen.add(key)
      values.append(value)
    if values:
      del event.summary.value[:]
      event.summary.value.extend(values)
      kept.append(event)
  if not dropped and len(files) == 1:
    return len(seen), 0
  staging = _aside(directory, 'rewrite')
  staging.mkdir(parents=True)
  (staging / files[0].name).write_bytes(encode(kept))
  old = _aside(directory, 'old')
  directory.rename(old)
  staging.rename(directory)
  old.rmtree()
  logging.info(
    'Rewrote the TensorBoard events in %s: %d points kept, %d dropped.',
    directory,
    len(seen),
    dropped,
  )
  return len(seen), dropped
