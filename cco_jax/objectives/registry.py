"""The registry: every objective `config.loss.name` can name.

To add an objective, write one file `cco_jax/objectives/<name>.py` with a
subclass of `core.Objective` (its name, supervision, `config.loss` keys as
fields, per-example terms and coefficients; `energy.py` is a short example)
and register its class in `OBJECTIVES` below. Nothing else changes: the
config's `loss` section (`default_config`), the train step, the data fields
(`supervision`) and the methods comparison read it from here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cco_jax import errors
from cco_jax.objectives import ace
from cco_jax.objectives import binary
from cco_jax.objectives import core
from cco_jax.objectives import cross_entropy
from cco_jax.objectives import energy
from cco_jax.objectives import groups
from cco_jax.objectives import mask_penalties

OBJECTIVES: tuple[type[core.Objective], ...] = (
  cross_entropy.CrossEntropy,
  ace.Ace,
  ace.AceDivergence,
  ace.CrossEntropyDivergence,
  ace.AceSlicedWasserstein,
  mask_penalties.RightForTheRightReasons,
  mask_penalties.BackgroundCamPenalty,
  groups.GroupDro,
  groups.ReweightedCrossEntropy,
  energy.Energy,
  binary.BinaryCrossEntropy,
  binary.AblatedBinaryCrossEntropy,
)
REGISTRY: Mapping[str, type[core.Objective]] = {
  objective.name: objective for objective in OBJECTIVES
}

# Objectives whose terms every run logs (without gradient): `ce` always, and
# `ace` and `kld` too when `config.loss.log_all_terms`.
MONITORS = ('ce', 'ace_kld')


def names() -> list[str]:
  """The registered objective names, sorted."""
  return sorted(REGISTRY)


def get(name: str) -> type[core.Objective]:
  """The class of objective `name`."""
  if name not in REGISTRY:
    raise errors.UserError(
      f'Unknown config.loss.name {name!r}; choose one of {names()} '
      '(--config.loss.name=NAME).'
    )
  return REGISTRY[name]


def supervision(name: str) -> tuple[str, ...]:
  """The batch entries objective `name` reads: () = neither masks nor groups."""
  return get(name).supervision


def head(name: str) -> str:
  """How objective `name` reads the logits: 'softmax' or 'sigmoid'."""
  return get(name).head


def default_config(name: str = 'ace_kld') -> dict[str, Any]:
  """A `config.loss` section: `name`, `log_all_terms` and every objective's
  keys with their defaults (a key several objectives read has one default)."""
  defaults = {'name': name, 'log_all_terms': True}
  for objective in OBJECTIVES:
    for field in objective.__dataclass_fields__.values():
      if field.name not in objective.config_keys():
        continue
      if defaults.setdefault(field.name, field.default) != field.default:
        raise ValueError(
          f'loss.{field.name} defaults to {field.default!r} in '
          f'{objective.__name__} but to {defaults[field.name]!r} elsewhere; '
          'give a shared key one default.'
        )
  get(name)
  return defaults


def create(loss: Mapping[str, Any], *, seed: int = 0) -> core.Objective:
  """The objective of a `config.loss` section (`loss['name']` and its keys).

  Keys of other objectives are ignored, except an option that switches on a
  feature of another family (`exclusive_options`, e.g. `cutmix_alpha > 0`
  with CE), which is an error. `seed` (`config.seed`) seeds per-step keys.
  """
  objective = get(loss['name'])
  _check_exclusive_options(objective, loss)
  logged = MONITORS if loss.get('log_all_terms', True) else MONITORS[:1]
  monitors = tuple(REGISTRY[name].from_config(loss) for name in logged)
  return objective.from_config(loss, seed=seed, monitors=monitors)


def _check_exclusive_options(
  objective: type[core.Objective], loss: Mapping[str, Any]
) -> None:
  for other in OBJECTIVES:
    for key, family in other.exclusive_options.items():
      value = loss.get(key, 0)
      if value > 0 and key not in objective.config_keys():
        owners = [o.name for o in OBJECTIVES if key in o.config_keys()]
        raise ValueError(
          f'loss.{key}={value} is an option of the {family} objectives '
          f'({", ".join(owners)}); loss.name is {objective.name!r}. Set '
          f'loss.{key}=0.'
        )
