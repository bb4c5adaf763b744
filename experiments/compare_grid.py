"""The coefficient grids of `experiments.compare`, searched at each
correlation and chosen two ways. Not an entry point.

Every combination of a variant's `GRIDS` axes is trained once (seed
--grid_seed) and scored from its validation records, by two protocols:

  worst_group  (uses group labels) the highest validation worst-group
               accuracy the run reached; ties: the validation accuracy at
               that evaluation, then the mean worst-group accuracy over the
               run (`worst_group_score`);
  accuracy     (labels only) the highest validation accuracy; ties: the lower
               validation CE at that evaluation (`accuracy_score`).

While a protocol's choice sits on the edge of an axis, the axis is widened by
one value beyond that edge (the ratio of the edge's two values) and the new
combinations trained, up to `max_widen` times per axis side; a choice still
on an edge after that is reported as such (`on_edge`). OUT/c<corr>/grid.json
records every combination's scores, the widenings and both choices.
"""

from __future__ import annotations

from collections.abc import Callable
import itertools
import json
import os

import numpy as np

from cco_jax import metric_writers
from cco_jax import selection
from experiments import compare_runs

PROTOCOLS = ('worst_group', 'accuracy')
# Integer fields and their bounds (None: the run's step count). JTT's
# lambda_up stops at the paper's largest value, 100: each repeat is a row of
# the upsampled dataset.
INTEGER_FIELDS = {'jtt.first_steps': (10, None), 'jtt.factor': (2, 100)}


def worst_group_score(workdir: str) -> tuple[float, float, float]:
  """(best validation worst-group accuracy, validation accuracy there (the
  highest if tied), mean validation worst-group accuracy)."""
  evals = selection.evaluations(metric_writers.read_metrics(workdir))
  if not evals or 'eval_worst_group_accuracy' not in evals[0]:
    raise ValueError(f'{workdir}: no validation worst-group accuracy recorded.')
  worst = [r['eval_worst_group_accuracy'] for r in evals]
  best = max(worst)
  accuracy = max(
    r['eval_accuracy'] for r in evals if r['eval_worst_group_accuracy'] == best
  )
  return float(best), float(accuracy), float(np.mean(worst))


def accuracy_score(workdir: str) -> tuple[float, float]:
  """(best validation accuracy, minus the validation CE there)."""
  evals = selection.evaluations(metric_writers.read_metrics(workdir))
  if not evals:
    raise ValueError(f'{workdir}: no validation record.')
  best = max(evals, key=lambda r: (r['eval_accuracy'], -r.get('eval_ce', 0)))
  return float(best['eval_accuracy']), -float(best.get('eval_ce', 0.0))


SCORES = {'worst_group': worst_group_score, 'accuracy': accuracy_score}


def _widened(
  field: str, values: list[float], side: int, max_steps: int | None
) -> float | None:
  """The next value beyond `values`' edge (`side` -1: below, +1: above), or
  None where the field has no room."""
  a, b = (values[1], values[0]) if side < 0 else (values[-2], values[-1])
  value = b * (b / a)
  if field in INTEGER_FIELDS:
    low, high = INTEGER_FIELDS[field]
    high = max_steps if high is None else high
    value = float(max(low, round(value)))
    if value in values or (high is not None and value > high):
      return None
  return value


def search(
  variant: str,
  train: Callable[[list[compare_runs.Setting]], list[str]],
  max_widen: int = 2,
  max_steps: int | None = None,
) -> dict:
  """Searches `variant`'s grid; `train(settings)` trains those settings (if
  not yet) and returns their workdirs.

  Returns:
    {'fields', 'axes' (values searched), 'scores' {protocol: {name: score}},
     'chosen' {protocol: setting}, 'on_edge' {protocol: [fields]},
     'widened' [(field, value)]}.
  """
  grid = compare_runs.benchmark().GRIDS[variant]
  fields = [f for f, _ in grid]
  axes = {f: sorted(v) for f, v in grid}
  widened, used = (
    [],
    dict.fromkeys(((f, s) for f in fields for s in (-1, 1)), 0),
  )
  while True:
    settings = [
      tuple(zip(fields, values))
      for values in itertools.product(*(axes[f] for f in fields))
    ]
    workdirs = dict(zip(settings, train(settings)))
    scores = {
      p: {s: SCORES[p](workdirs[s]) for s in settings} for p in PROTOCOLS
    }
    chosen = {p: max(settings, key=lambda s: scores[p][s]) for p in PROTOCOLS}
    grew = False
    for p in PROTOCOLS:
      for field, value in chosen[p]:
        values = axes[field]
        side = -1 if value == values[0] else 1 if value == values[-1] else 0
        if not side or used[(field, side)] >= max_widen:
          continue
        new = _widened(field, values, side, max_steps)
        if new is None:
          continue
        used[(field, side)] += 1
        axes[field] = sorted(values + [new])
        widened.append((field, new))
        grew = True
    if not grew:
      break
  on_edge = {
    p: [
      f
      for f, v in chosen[p]
      if len(axes[f]) > 1 and v in (axes[f][0], axes[f][-1])
    ]
    for p in PROTOCOLS
  }
  return {
    'fields': fields,
    'axes': axes,
    'scores': {
      p: {compare_runs.value_name(s): list(v) for s, v in scores[p].items()}
      for p in PROTOCOLS
    },
    'chosen': {p: chosen[p] for p in PROTOCOLS},
    'on_edge': on_edge,
    'widened': widened,
  }


def write(path: str, results: dict) -> None:
  """OUT/c<corr>/grid.json: every variant's search (settings as names)."""
  serial = {
    variant: {
      **r,
      'chosen': {p: compare_runs.value_name(s) for p, s in r['chosen'].items()},
    }
    for variant, r in results.items()
  }
  with open(path, 'w') as f:
    json.dump(
      {
        'protocols': {
          'worst_group': 'best val worst-group acc, val acc there, mean val '
          'worst-group acc',
          'accuracy': 'best val acc, -val CE there',
        },
        'variants': serial,
      },
      f,
      indent=1,
    )


def read(path: str) -> dict:
  """`write`'s file, with settings back as tuples."""
  with open(path) as f:
    data = json.load(f)['variants']
  out = {}
  for variant, r in data.items():
    names = {
      compare_runs.value_name(s): s
      for s in (
        tuple(zip(r['fields'], vals))
        for vals in itertools.product(*(r['axes'][f] for f in r['fields']))
      )
    }
    out[variant] = {
      **r,
      'chosen': {p: names[n] for p, n in r['chosen'].items()},
    }
  return out


def exists(out: str, correlation: float) -> bool:
  return os.path.exists(grid_path(out, correlation))


def grid_path(out: str, correlation: float) -> str:
  return os.path.join(out, compare_runs.corr_name(correlation), 'grid.json')
