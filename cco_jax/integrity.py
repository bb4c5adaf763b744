"""Checksums of what a checkpoint holds, written at save and verified at restore.

A flipped byte inside an Orbax data file can decode without any error (the
chunk stays a valid array of garbage). To notice it, `checksums(tree)` hashes
every array leaf on the host (SHA-256 of its raw bytes, with its dtype and
shape) into a small JSON-compatible dict, which `checkpointing.save` stores as
the checkpoint's `integrity` item; `verify(tree, expected)` hashes the restored
leaves again and raises `ChecksumMismatch` naming the leaves that differ.

Per array, not per file: the hashes describe the values the run saved, so they
are independent of how Orbax lays out its files (OCDBT, per-process shards,
asynchronous writes) and are computed once, on the host copy the save makes
anyway. Cost: one SHA-256 pass over the state at save and one at restore
(docs/faults.md has the measured numbers).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import jax
import numpy as np

ALGORITHM = 'sha256'


class ChecksumMismatch(ValueError):
  """A restored checkpoint's arrays differ from what was saved."""


def leaf_name(path: tuple) -> str:
  """`path` (a `jax.tree_util` key path) as `a/b/0/c`: the same for a
  dataclass field, a dict key or a sequence index of that name."""
  parts = []
  for key in path:
    for attribute in ('name', 'key', 'idx'):
      if hasattr(key, attribute):
        parts.append(str(getattr(key, attribute)))
        break
    else:
      parts.append(str(key))
  return '/'.join(parts)


def array_digest(value: Any) -> str:
  """Hex SHA-256 of an array's dtype, shape and raw bytes (C order)."""
  array = np.ascontiguousarray(np.asarray(value))
  digest = hashlib.new(ALGORITHM)
  digest.update(f'{array.dtype.str}{array.shape}'.encode())
  digest.update(array.reshape(-1).view(np.uint8))
  return digest.hexdigest()


def json_digest(data: Any) -> str:
  """Hex SHA-256 of JSON-compatible `data` (keys sorted)."""
  text = json.dumps(data, sort_keys=True)
  return hashlib.new(ALGORITHM, text.encode()).hexdigest()


def checksums(items: dict[str, Any]) -> dict:
  """The checksums of named items: `{'algorithm', 'leaves': {name: hex}}`.

  Args:
    items: item name -> a pytree of host arrays (e.g. the train state) or,
      under a key ending in `_json`, JSON-compatible data.
  """
  leaves = {}
  for item, tree in items.items():
    if item.endswith('_json'):
      leaves[item] = json_digest(tree)
      continue
    for path, value in jax.tree_util.tree_flatten_with_path(tree)[0]:
      leaves[f'{item}/{leaf_name(path)}'] = array_digest(value)
  return {'algorithm': ALGORITHM, 'leaves': leaves}


def verify(items: dict[str, Any], expected: dict, *, subset=False) -> None:
  """Raises `ChecksumMismatch` unless `items` hash to `expected`.

  Args:
    items: as for `checksums`, restored.
    expected: what `checksums` returned at save.
    subset: `items` are part of what was saved (e.g. only the variables of
      the state, `cco_jax.restore`): only their checksums are compared.
  """
  if expected.get('algorithm') != ALGORITHM:
    raise ChecksumMismatch(
      f'unknown checksum algorithm {expected.get("algorithm")!r}'
    )
  found = checksums(items)['leaves']
  wanted = expected.get('leaves', {})
  if subset:
    wanted = {k: v for k, v in wanted.items() if k in found}
  bad = sorted(
    k for k in set(found) | set(wanted) if found.get(k) != wanted.get(k)
  )
  if bad:
    shown = ', '.join(bad[:3]) + (
      f' and {len(bad) - 3} more' if len(bad) > 3 else ''
    )
    raise ChecksumMismatch(
      f'checksum mismatch: {len(bad)} of {len(wanted)} checksums differ '
      f'from what was saved ({shown}); the files are corrupt'
    )
