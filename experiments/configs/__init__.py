"""Experiment configs: one module per dataset, each a table of named variants.

Every module defines `VARIANTS` ({name: function returning a ConfigDict}) and
`get_config(variant)`, which `--config=experiments/configs/<module>.py:<variant>`
calls; `locked_variant` is the shared body of those `get_config`s. Each
variant starts from the library's schema (`cco_jax.config_schema`), through
the shared protocols of `protocols.py`, and overrides fields; none adds one.
"""

from collections.abc import Callable, Mapping

import ml_collections


def locked_variant(
  variants: Mapping[str, Callable[[], ml_collections.ConfigDict]],
  variant: str,
) -> ml_collections.ConfigDict:
  """The locked config of `variants[variant]`, or a ValueError naming them."""
  if variant not in variants:
    raise ValueError(
      f'Unknown variant {variant!r}; choose one of {sorted(variants)}.'
    )
  config = variants[variant]()
  config.lock()
  return config
