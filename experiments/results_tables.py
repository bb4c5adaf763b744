"""Shared by the results runners (`reproduce`, `isic`): seed statistics,
table cells and the machine a table was measured on. Not an entry point."""

from __future__ import annotations

import os
import platform

import numpy as np

# Keys whose values are counts or seconds: shown without decimals.
COUNTS = ('train_seconds', 'step', 'steps_trained')


def seed_stat(values) -> dict | None:
  """Mean and sample std (ddof=1; 0 for one seed) of the measured values.

  `None` entries (not measured) are left out; `None` when nothing is left.
  """
  values = np.array([v for v in values if v is not None], np.float64)
  if not len(values):
    return None
  return {
    'mean': float(values.mean()),
    'std': float(values.std(ddof=1)) if len(values) > 1 else 0.0,
    'n': int(len(values)),
  }


def cell(stat: dict | None, key: str) -> str:
  """'mean ± std' (the mean alone for one seed), '—' when not measured."""
  if stat is None:
    return '—'
  digits = 0 if key in COUNTS else 3
  text = f'{stat["mean"]:.{digits}f}'
  return text if stat['n'] == 1 else f'{text} ± {stat["std"]:.{digits}f}'


def machine_info() -> dict:
  """The machine, Python and JAX a table was measured with."""
  import jax  # pylint: disable=g-import-not-at-top

  return {
    'platform': platform.platform(),
    'processor': platform.processor(),
    'cpu_count': os.cpu_count(),
    'load_average': os.getloadavg(),
    'python': platform.python_version(),
    'jax': jax.__version__,
    'devices': str(jax.devices()),
  }
