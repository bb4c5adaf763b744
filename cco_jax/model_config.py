"""The model of a config: `create_model(config, num_classes)`.

Training (`train_setup`) and restoring (`restore`) build the model of
`config.model` with this one function, so a restored model is the trained one;
it imports nothing of the training loop.
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections

from cco_jax import errors
from cco_jax import models

DTYPES = {
  'float32': jnp.float32,
  'bfloat16': jnp.bfloat16,
  'float16': jnp.float16,
}


def create_model(
  config: ml_collections.ConfigDict,
  num_classes: int,
  bn_axis_name: str | None = None,
) -> models.CamModel:
  """The model of `config.model`.

  `bn_axis_name`: the pmap axis over which BatchNorm averages its batch
  statistics in training; ignored (None: statistics per device) when
  `config.model.sync_batch_norm` is False, and by families without
  BatchNorm (ViT, ConvNeXt).
  """
  if not config.model.get('sync_batch_norm', True):
    bn_axis_name = None
  if config.model.dtype not in DTYPES:
    raise errors.UserError(
      f'Unknown model.dtype {config.model.dtype!r}; choose one of '
      f'{sorted(DTYPES)}.'
    )
  return models.create_model(
    config.model.name,
    num_classes,
    cam_faithful=config.model.cam_faithful,
    dtype=DTYPES[config.model.dtype],
    num_filters=config.model.num_filters,
    stem=config.model.stem,
    stage_sizes=tuple(config.model.stage_sizes) or None,
    bn_axis_name=bn_axis_name,
    pointwise_as_dot=config.model.get('pointwise_as_dot', True),
    patch_size=config.model.patch_size,
    width=config.model.width,
    depth=config.model.depth,
    num_heads=config.model.num_heads,
    last_stage_stride=config.model.last_stage_stride,
  )
