"""`cco_jax.models.ResNet` weights out, in torchvision's naming: the inverse of
`cco_jax.pretrained.load_resnet`.

`save_resnet(variables, path)` writes a `.safetensors` state dict (the names
and layouts of `pretrained.torch_names` / `pretrained.tensor_map`, conv
`HWIO` -> `OIHW`, head `(F, C)` -> `(C, F)`); a `cam_faithful=False` model
loads into torchvision's `resnetXX` and computes the same function.
"""

from __future__ import annotations

import re

import numpy as np

from cco_jax import pretrained


def _to_torch(value: np.ndarray, kind: str) -> np.ndarray:
  if kind == 'conv':
    return value.transpose(3, 2, 0, 1)  # HWIO -> OIHW.
  if kind == 'dense':
    return value.T
  return value


def to_state_dict(variables) -> dict[str, np.ndarray]:
  """`model`'s variables -> torchvision-named numpy state dict.

  The architecture (block type, stage of each block) is read from the tree:
  a block's stage is given by its first convolution's width. A faithful
  model's tree has no head bias and no final BatchNorm in its last block, so
  neither key is written; `num_batches_tracked` is written as 0 so that
  torchvision's `load_state_dict` (strict) accepts a control model's file.
  """
  params = variables['params']
  blocks = sorted(
    (k for k in params if re.fullmatch(r'(Bottleneck|Residual)Block_\d+', k)),
    key=lambda k: int(k.rsplit('_', 1)[1]),
  )
  if not blocks or 'conv_init' not in params or 'head' not in params:
    raise ValueError(
      'variables are not a models.ResNet tree (need conv_init, blocks, head); '
      f'got params keys {sorted(params)}.'
    )
  widths = [params[b]['Conv_0']['kernel'].shape[-1] for b in blocks]
  stage_sizes = [1]
  for previous, width in zip(widths, widths[1:], strict=False):
    if width == previous:
      stage_sizes[-1] += 1
    else:
      stage_sizes.append(1)
  block_name = blocks[0].rsplit('_', 1)[0]
  tensors = pretrained.tensor_map(
    pretrained.torch_names(
      stage_sizes, block_name == 'BottleneckBlock', block_name
    )
  )
  out = {}
  for key, (collection, path, kind) in tensors.items():
    node = variables.get(collection, {})
    for part in path:
      node = node.get(part) if hasattr(node, 'get') else None
      if node is None:
        break
    if node is None:
      continue
    out[key] = np.ascontiguousarray(_to_torch(np.asarray(node), kind))
    if key.endswith('.running_var'):
      out[key[: -len('running_var')] + 'num_batches_tracked'] = np.zeros(
        (), np.int64
      )
  return out


def save_resnet(variables, path: str) -> None:
  """Writes `variables` as a torchvision-named `.safetensors` state dict.

  A `cam_faithful=False` model with the 'imagenet' stem loads into
  torchvision's `resnetXX(num_classes=C)` with `load_state_dict` and computes
  the same function. `load_resnet(path, model)` into the model the variables
  came from gives them back exactly.
  """
  if not path.endswith('.safetensors'):
    raise ValueError(f'{path}: save_resnet writes .safetensors files only.')
  from safetensors import numpy as st_numpy

  st_numpy.save_file(to_state_dict(variables), path)
