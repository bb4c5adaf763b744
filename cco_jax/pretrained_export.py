"""Weights out, in PyTorch's naming: the inverse of the loaders.

  * `save_resnet(variables, path)`: a `cco_jax.models.ResNet` as a
    torchvision state dict (the names and layouts of `pretrained.torch_names`
    / `pretrained.tensor_map`, conv `HWIO` -> `OIHW`, head `(F, C)` ->
    `(C, F)`), the inverse of `pretrained.load_resnet`;
  * `save_timm(variables, model, path)`: a `vit.ViT` or `convnext.ConvNeXt`
    as a timm state dict, the inverse of `pretrained_timm.convert` (each of
    its rules run backwards; the query/key/value kernels fused into
    `attn.qkv` again);
  * `save(variables, model, path)`: whichever fits the model.

A `cam_faithful=False` model (the control) loads into the PyTorch model it
came from (torchvision's `resnetXX`; timm's ViT with `global_pool='avg',
class_token=False` or ConvNeXt) with a strict `load_state_dict` and computes
the same function. A faithful model's file has no head bias (and, for a
ResNet, no final BatchNorm), and its head norm runs per position before the
pooling where timm's runs after it: the weights load back here exactly, but
not into the PyTorch model as the same function.
"""

from __future__ import annotations

import re

import numpy as np

from cco_jax import models
from cco_jax import pretrained
from cco_jax import pretrained_timm


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
  _write(to_state_dict(variables), path)


def to_timm_state_dict(variables, model) -> dict[str, np.ndarray]:
  """A `vit.ViT` / `convnext.ConvNeXt`'s variables -> timm-named numpy arrays.

  Every rule of `pretrained_timm.vit_rules` / `convnext_rules` backwards: a
  parameter the tree lacks (the faithful head's bias) is not written; the
  ViT's position embeddings are written at the model's own grid.

  Raises:
    ValueError: a parameter no rule names (the tree is not `model`'s).
  """
  params = pretrained.flatten(variables['params'])
  rules = pretrained_timm.rules_for(model, params, notes=[])
  unnamed = sorted(
    '/'.join(p) for p in set(params) - {rule.path for rule in rules}
  )
  if unnamed:
    raise ValueError(
      f'variables are not a {type(model).__name__} tree of this size: no '
      f'timm name for {unnamed}.'
    )
  parts: dict[str, list[np.ndarray]] = {}
  for rule in rules:
    if rule.path in params:
      value = rule.inverse(np.asarray(params[rule.path], np.float32))
      parts.setdefault(rule.key, []).append(value)
  return {
    key: np.ascontiguousarray(np.concatenate(values, axis=0))
    for key, values in parts.items()
  }


def save_timm(variables, model, path: str) -> None:
  """Writes a ViT / ConvNeXt's `variables` as a timm `.safetensors` state dict.

  `pretrained.load(path, model, image_size=...)` gives them back exactly; a
  control model (`cam_faithful=False`) loads strictly into the timm model of
  the same size (`docs/backbones.md`) and computes the same logits.
  """
  _write(to_timm_state_dict(variables, model), path)


def save(variables, model, path: str) -> None:
  """`save_resnet` or `save_timm`, whichever family `model` is."""
  if isinstance(model, models.ResNet):
    save_resnet(variables, path)
  else:
    save_timm(variables, model, path)


def _write(state_dict: dict[str, np.ndarray], path: str) -> None:
  if not path.endswith('.safetensors'):
    raise ValueError(f'{path}: weights are written as .safetensors only.')
  from safetensors import numpy as st_numpy

  st_numpy.save_file(state_dict, path)
