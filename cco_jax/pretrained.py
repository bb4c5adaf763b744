"""Torchvision/timm ResNet weights into `cco_jax.models.ResNet`; any family: `load`.

`load_resnet(path, model, rng=...)` reads a ResNet-18/34/50/101/152 state dict
in torchvision's naming (timm's `resnet*` models use the same names) from
`.safetensors`, `.npz` or (with torch installed) `.pth`/`.pt`, and returns the
`{'params', 'batch_stats'}` of `model` (a `models.create_model(...)` with the
'imagenet' stem). Every tensor is mapped (conv `OIHW` -> `HWIO`, BatchNorm
`weight/bias/running_mean/running_var` -> `scale/bias/mean/var`, `fc` `(C, F)`
-> head `(F, C)`); anything missing, unexpected or of the wrong shape is an
error that lists the names. `cco_jax.pretrained_export.save_resnet` is the
inverse.

With `cam_faithful=False` and 1,000 classes the model computes torchvision's
eval-mode forward (the padding in `models` is torchvision's). With
`cam_faithful=True` the method's changes (J. Setpal, "Crossing Cross-Entropy"
(2024); docs/method.md) are applied to the pretrained network: the last
stage runs at stride 1 with its weights unchanged, the head bias and the last
block's final BatchNorm are dropped. A head whose class count differs from
the file's is initialised fresh from `rng`. `LoadReport` says what was
dropped or fresh, and `load_resnet` logs it.

`load(path, model, image_size=...)` loads any family: ResNets here, timm's
ViT (`global_pool='avg'`, `class_token=False`) and ConvNeXt in
`cco_jax.pretrained_timm`, with the same `LoadReport`.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from cco_jax import errors
from cco_jax import models
from cco_jax import vit

# Suffixes of the BatchNorm tensors, and where each goes in the flax tree.
_BN = {
  'weight': ('params', 'scale'),
  'bias': ('params', 'bias'),
  'running_mean': ('batch_stats', 'mean'),
  'running_var': ('batch_stats', 'var'),
}
_IGNORED = re.compile(r'(^|\.)num_batches_tracked$')
_TORCH_CONVERT = (
  "python -c \"import torch, safetensors.torch as st; sd = torch.load('{path}',"
  " map_location='cpu'); st.save_file({{k: v.contiguous() for k, v in "
  "sd.items()}}, '{stem}.safetensors')\""
)


@dataclasses.dataclass
class LoadReport:
  """What `convert` did besides copying tensors one to one.

  Attributes:
    loaded: file keys copied into the model.
    dropped: file key -> why it was not used (the method's surgery, or a head
      of another class count).
    fresh: flax paths ('params/head/kernel') initialised from `rng`.
    ignored: file keys with no meaning here (`num_batches_tracked`).
    notes: changes that keep the weights (the last stage's stride).
  """

  loaded: list[str] = dataclasses.field(default_factory=list)
  dropped: dict[str, str] = dataclasses.field(default_factory=dict)
  fresh: list[str] = dataclasses.field(default_factory=list)
  ignored: list[str] = dataclasses.field(default_factory=list)
  notes: list[str] = dataclasses.field(default_factory=list)

  def __str__(self) -> str:
    lines = [f'{len(self.loaded)} tensors loaded.']
    lines += [f'dropped {k}: {why}' for k, why in self.dropped.items()]
    lines += [f'fresh {p} (random initialisation)' for p in self.fresh]
    lines += self.notes
    if self.ignored:
      lines.append(f'ignored {len(self.ignored)} num_batches_tracked.')
    return '\n'.join(lines)


def torch_names(
  stage_sizes, bottleneck: bool, block_name: str
) -> dict[str, tuple[str, ...]]:
  """Torchvision key prefix -> flax module path, for every conv/BN/fc.

  `block_name` is the flax class name of the blocks ('BottleneckBlock' or
  'ResidualBlock'); flax numbers blocks across stages, torchvision per stage.
  """
  names = {'conv1': ('conv_init',), 'bn1': ('bn_init',), 'fc': ('head',)}
  convs = 3 if bottleneck else 2
  k = 0
  for i, size in enumerate(stage_sizes):
    for j in range(size):
      block = f'{block_name}_{k}'
      prefix = f'layer{i + 1}.{j}'
      for c in range(convs):
        names[f'{prefix}.conv{c + 1}'] = (block, f'Conv_{c}')
        names[f'{prefix}.bn{c + 1}'] = (block, f'BatchNorm_{c}')
      if j == 0:  # torchvision: a projection whenever shape changes.
        names[f'{prefix}.downsample.0'] = (block, 'conv_proj')
        names[f'{prefix}.downsample.1'] = (block, 'norm_proj')
      k += 1
  return names


def tensor_map(names: dict[str, tuple[str, ...]]):
  """File key -> (collection, flax path, kind) for every tensor of `names`."""
  out = {}
  for prefix, path in names.items():
    if prefix == 'fc':
      out['fc.weight'] = ('params', (*path, 'kernel'), 'dense')
      out['fc.bias'] = ('params', (*path, 'bias'), 'copy')
    elif '.bn' in f'.{prefix}' or prefix.endswith('downsample.1'):
      for suffix, (collection, leaf) in _BN.items():
        out[f'{prefix}.{suffix}'] = (collection, (*path, leaf), 'copy')
    else:
      out[f'{prefix}.weight'] = ('params', (*path, 'kernel'), 'conv')
  return out


def _to_flax(value: np.ndarray, kind: str) -> np.ndarray:
  if kind == 'conv':
    return value.transpose(2, 3, 1, 0)  # OIHW -> HWIO.
  if kind == 'dense':
    return value.T  # (C, F) -> (F, C).
  return value


def flatten(tree, prefix=()) -> dict[tuple[str, ...], Any]:
  """A nested dict of arrays -> `{path tuple: leaf}`."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict) or hasattr(value, 'items'):
      out.update(flatten(value, (*prefix, key)))
    else:
      out[(*prefix, key)] = value
  return out


def variable_shapes(model: models.ResNet):
  """`model.init`'s variables as `ShapeDtypeStruct`s (no FLOPs)."""
  images = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  return jax.eval_shape(
    lambda x: model.init(jax.random.key(0), x, train=False), images
  )


def strip_prefix(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Drops a `module.` (DistributedDataParallel) prefix shared by every key."""
  for prefix in ('module.', 'model.'):
    if state_dict and all(k.startswith(prefix) for k in state_dict):
      return {k[len(prefix) :]: v for k, v in state_dict.items()}
  return state_dict


def convert(
  state_dict: dict[str, np.ndarray],
  model: models.ResNet,
  *,
  rng: jax.Array | None = None,
  source: str = 'state dict',
) -> tuple[dict, LoadReport]:
  """Maps a torchvision-named state dict onto `model`'s variables.

  Args:
    state_dict: key -> array, torchvision naming (see `torch_names`).
    model: a `models.ResNet` with the 'imagenet' stem.
    rng: key for a fresh head when the file's class count differs (None:
      `jax.random.key(0)`, noted in the report).
    source: how errors name the state dict (the file path).

  Returns:
    `({'params': ..., 'batch_stats': ...}, report)`: float32 numpy arrays
    with the structure of `model.init`, and what was dropped or fresh.

  Raises:
    ValueError: naming every missing, unexpected or mis-shaped tensor.
  """
  if model.stem != 'imagenet':
    raise errors.UserError(
      f"{source}: torchvision's ResNets have the 'imagenet' stem (7x7/2 conv "
      f'and max-pool); the model has stem={model.stem!r}. Create it with '
      "stem='imagenet' (config: --config.model.stem=imagenet)."
    )
  state_dict = strip_prefix(dict(state_dict))
  shapes = variable_shapes(model)
  target = {
    (collection, *path): leaf
    for collection in shapes
    for path, leaf in flatten(shapes[collection]).items()
  }
  tensors = tensor_map(
    torch_names(
      model.stage_sizes,
      model.block_cls is models.BottleneckBlock,
      model.block_cls.__name__,
    )
  )
  report = LoadReport()
  values, problems = {}, {'missing': [], 'unexpected': [], 'shape': []}
  head_kernel = ('params', 'head', 'kernel')
  # A head of another class count, or none (timm's num_classes=0), is fresh.
  headless = 'fc.weight' not in state_dict and 'fc.bias' not in state_dict
  fresh_head = headless or (
    'fc.weight' in state_dict
    and np.shape(state_dict['fc.weight'])[0] != target[head_kernel].shape[1]
  )
  for key in state_dict:
    if _IGNORED.search(key):
      report.ignored.append(key)
    elif key not in tensors:
      problems['unexpected'].append(key)
  for key, (collection, path, kind) in tensors.items():
    where = (collection, *path)
    if fresh_head and key.startswith('fc.'):
      if key in state_dict and 'fc.weight' in state_dict:
        report.dropped[key] = (
          f'{np.shape(state_dict["fc.weight"])[0]}-class head; the model '
          f'has {target[head_kernel].shape[1]} classes'
        )
      continue
    if where not in target:  # Removed by the method's changes.
      if key in state_dict:
        report.dropped[key] = (
          'head bias (cam_faithful: no head bias)'
          if key == 'fc.bias'
          else "last block's final BatchNorm (cam_faithful)"
        )
      continue
    if key not in state_dict:
      problems['missing'].append(key)
      continue
    value = _to_flax(np.asarray(state_dict[key], np.float32), kind)
    if value.shape != target[where].shape:
      problems['shape'].append(
        f'{key}: file {np.shape(state_dict[key])} (as {"/".join(where)} '
        f'{value.shape}), model {target[where].shape}'
      )
      continue
    values[where] = value
    report.loaded.append(key)
  if any(problems.values()):
    raise errors.UserError(_problem_message(source, model, problems))
  if fresh_head:
    if headless:
      report.notes.append('the file has no head (fc).')
    if rng is None:
      rng = jax.random.key(0)
      report.notes.append('fresh head drawn from key 0 (no rng given).')
    values.update(_fresh_head(model, target, rng))
    report.fresh += [
      '/'.join(k) for k in sorted(target) if k[:2] == ('params', 'head')
    ]
  if model.cam_faithful:
    report.notes.append(
      'last stage runs at stride 1 (cam_faithful); its weights are unchanged.'
    )
  leftover = sorted('/'.join(k) for k in set(target) - set(values))
  if leftover:  # A model tree this mapping does not know: a bug, not input.
    raise errors.UserError(f'{source}: no tensor for {leftover}.')
  variables = {
    collection: jax.tree_util.tree_map_with_path(
      lambda p, _, c=collection: np.ascontiguousarray(
        values[(c, *(k.key for k in p))]
      ),
      shapes[collection],
    )
    for collection in shapes
  }
  return variables, report


def problem_lines(head: str, problems: dict[str, list[str]], hint: str) -> str:
  """`head:` then one line per kind of problem (20 names at most), then `hint`."""
  lines = [f'{head}:']
  labels = {
    'missing': 'missing keys',
    'unexpected': 'unexpected keys',
    'shape': 'shape mismatches',
  }
  for kind, items in problems.items():
    if items:
      shown = ', '.join(items[:20]) + (' ...' if len(items) > 20 else '')
      lines.append(f'  {len(items)} {labels[kind]}: {shown}')
  lines.append(f'  {hint}')
  return '\n'.join(lines)


def _problem_message(source, model, problems) -> str:
  return problem_lines(
    f'{source} does not fit the model ({len(model.stage_sizes)} stages of '
    f'{tuple(model.stage_sizes)} {model.block_cls.__name__}s, '
    f'{model.num_filters} filters, {model.num_classes} classes)',
    problems,
    'Expected a torchvision/timm resnet18/34/50/101/152 state dict whose '
    'depth matches model.name and with model.num_filters=64, '
    'stage_sizes=() (the named depth).',
  )


def _fresh_head(model, target, rng) -> dict:
  """The model's own head initialisation (`models.CamHead`), from `rng`."""
  features = target[('params', 'head', 'kernel')].shape[0]
  head = models.CamHead(model.num_classes, use_bias=not model.cam_faithful)
  params = head.init(rng, jnp.zeros((1, 1, 1, features), jnp.float32))
  return {
    ('params', 'head', *k): np.asarray(v)
    for k, v in flatten(params['params']).items()
  }


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """Key -> numpy array from `.safetensors`, `.npz` or `.pth`/`.pt`."""
  if not os.path.exists(path):
    raise FileNotFoundError(
      f'No file {path!r}: set model.init_from (--config.model.init_from=PATH) '
      'to a torchvision/timm ResNet state dict (.safetensors, .npz, .pth).'
    )
  ext = os.path.splitext(path)[1].lower()
  if ext == '.safetensors':
    try:
      from safetensors import numpy as st_numpy
    except ImportError as e:
      raise ImportError(
        f'Reading {path} needs the safetensors package: pip install '
        'safetensors.'
      ) from e
    return dict(st_numpy.load_file(path))
  if ext == '.npz':
    with np.load(path, allow_pickle=False) as data:
      return {k: data[k] for k in data.files}
  if ext in ('.pth', '.pt'):
    return _read_torch(path)
  raise errors.UserError(
    f'{path}: unknown extension {ext!r}; expected .safetensors, .npz, .pth '
    'or .pt.'
  )


def _read_torch(path: str) -> dict[str, np.ndarray]:
  try:
    import torch
  except ImportError as e:
    stem = os.path.splitext(path)[0]
    raise ImportError(
      f'Reading {path} needs torch, which is not installed. Convert it to '
      'safetensors where torch is installed (pip install torch safetensors):'
      f'\n  {_TORCH_CONVERT.format(path=path, stem=stem)}\nand pass '
      f'{stem}.safetensors instead.'
    ) from e
  state_dict = torch.load(path, map_location='cpu', weights_only=True)
  for key in ('state_dict', 'model', 'model_state_dict'):
    if isinstance(state_dict.get(key), dict):
      state_dict = state_dict[key]  # A training checkpoint around the weights.
      break
  return {
    k: v.detach().float().numpy() if v.is_floating_point() else v.numpy()
    for k, v in state_dict.items()
    if isinstance(v, torch.Tensor)
  }


def load_resnet(
  path: str, model: models.ResNet, *, rng: jax.Array | None = None
) -> dict:
  """Reads a torchvision/timm ResNet file into `model`'s variables.

  Args:
    path: `.safetensors`, `.npz` or `.pth`/`.pt` (needs torch) state dict.
    model: `models.create_model('resnet18'...'resnet152', num_classes, ...)`
      with the 'imagenet' stem, 64 filters and the named depth.
    rng: key for a fresh head if the file's class count differs (None:
      `jax.random.key(0)`).

  Returns:
    `{'params': ..., 'batch_stats': ...}` for `model.apply`. What was dropped
    or initialised fresh is logged (`convert` returns it as a `LoadReport`).
  """
  variables, report = convert(
    read_state_dict(path), model, rng=rng, source=path
  )
  logging.info('Loaded %s:\n%s', path, report)
  return variables


def load(
  path: str,
  model: models.CamModel,
  *,
  image_size: int,
  rng: jax.Array | None = None,
) -> dict:
  """Reads a pretrained file into the variables of `model`, any family.

  ResNets: `load_resnet` (torchvision/timm names); ViT and ConvNeXt:
  `cco_jax.pretrained_timm.convert` (timm names; `image_size` sets the
  ViT's token grid). What was dropped, fresh or changed is logged.

  Returns:
    `{'params': ...}` plus `'batch_stats'` for a ResNet.
  """
  if isinstance(model, models.ResNet):
    return load_resnet(path, model, rng=rng)
  from cco_jax import pretrained_timm  # pylint: disable=import-outside-toplevel

  variables, report = pretrained_timm.convert(
    read_state_dict(path), model, image_size=image_size, rng=rng, source=path
  )
  logging.info('Loaded %s:\n%s', path, report)
  return variables


def init_train_state(state, model: models.CamModel, path: str, rng: jax.Array):
  """`state` with parameters and statistics from `path` ('' = unchanged).

  The trainer's hook for `config.model.init_from`: the optimizer state is
  re-initialised for the loaded parameters; `rng` initialises a fresh head.
  A ViT's token grid is read from the state's `pos_embedding`.
  """
  if not path:
    return state
  image_size = 64  # Any size: a ResNet's or ConvNeXt's shapes ignore it.
  if isinstance(model, vit.ViT):
    tokens = int(round(state.params['pos_embedding'].shape[1] ** 0.5))
    image_size = tokens * model.patch_size
  variables = load(path, model, image_size=image_size, rng=rng)
  return state.replace(
    params=variables['params'],
    batch_stats=variables.get('batch_stats', {}),
    opt_state=state.tx.init(variables['params']),
  )
