"""Helpers on `ml_collections` configs shared by the library, entry points and tests."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ml_collections


def apply_overrides(
  config: ml_collections.ConfigDict, overrides: Mapping[str, Any]
) -> ml_collections.ConfigDict:
  """Sets dotted keys (`'data.image_size': 32`) on `config`, in place; returns it.

  Every key must already exist: a misspelt one raises a `KeyError` that names it
  and lists the fields that do exist at that level.
  """
  with config.unlocked():
    for key, value in overrides.items():
      target = config
      *path, last = key.split('.')
      for part in path:
        target = _field(target, part, key)
      _field(target, last, key)
      target[last] = value
  return config


def _field(node: ml_collections.ConfigDict, name: str, key: str) -> Any:
  if name not in node:
    raise KeyError(
      f'Config override {key!r}: no field {name!r} here; fields: '
      f'{", ".join(sorted(node.keys()))}.'
    )
  return node[name]
