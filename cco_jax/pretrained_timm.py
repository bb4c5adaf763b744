"""timm ViT and ConvNeXt weights into `cco_jax.vit.ViT` / `cco_jax.convnext.ConvNeXt`.

`convert(state_dict, model, image_size=...)` maps a timm state dict onto the
model's variables and says what it did in a `pretrained.LoadReport`:

  * ViT: timm's `VisionTransformer(global_pool='avg', class_token=False)`
    (e.g. `timm.create_model('vit_small_patch16_224', global_pool='avg',
    class_token=False)`): `patch_embed.proj` -> `embedding`, `pos_embed` ->
    `pos_embedding` (resampled bilinearly to the model's token grid when the
    grids differ, as big_vision's `resample_posemb`), `blocks.k` ->
    `Transformer/encoderblock_k` (the fused `attn.qkv` split into flax's
    `query`/`key`/`value`, `(D, heads, D/heads)` each), `fc_norm` ->
    `head_norm`, `head` -> `head`. A class token or a final `norm` (timm's
    default ViTs) is refused by name: this ViT has neither.
  * ConvNeXt: timm's `convnext_tiny`/`convnext_small`: `stem.0/1` ->
    `stem_conv`/`stem_norm`, `stages.i.downsample.0/1` ->
    `stage{i}_downsample_norm`/`_conv`, `stages.i.blocks.j` ->
    `stage{i}_block{j}` (`conv_dw`, `norm`, `mlp.fc1/fc2` -> `fc1/fc2`,
    `gamma`), `head.norm` -> `head_norm`, `head.fc` -> `head`.

The surgery (docs/backbones.md): with `cam_faithful=True` the head bias is
dropped and timm's pooled-vector LayerNorm (`fc_norm` / `head.norm`) runs at
every position before the pooling with the same weights (reported in
`notes`); with `cam_faithful=False` the model computes timm's eval-mode
logits. A head of another class count (or none) starts fresh from `rng`.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from cco_jax import cam_head
from cco_jax import convnext
from cco_jax import errors
from cco_jax import pretrained
from cco_jax import vit

Transform = Callable[[np.ndarray], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Rule:
  """One file tensor (or a slice of it) -> one flax parameter.

  `inverse` maps the parameter back to the file's layout
  (`cco_jax.pretrained_export.to_timm_state_dict`); the rules of one fused
  tensor (`attn.qkv`) give its parts in order along axis 0.
  """

  key: str
  path: tuple[str, ...]
  transform: Transform
  inverse: Transform


def _copy(value: np.ndarray) -> np.ndarray:
  return value


def _conv(value: np.ndarray) -> np.ndarray:
  return value.transpose(2, 3, 1, 0)  # OIHW -> HWIO (depthwise: (7,7,1,C)).


def _conv_inverse(value: np.ndarray) -> np.ndarray:
  return value.transpose(3, 2, 0, 1)  # HWIO -> OIHW.


def _dense(value: np.ndarray) -> np.ndarray:
  return value.T  # (out, in) -> (in, out); its own inverse.


_INVERSE = {_conv: _conv_inverse, _dense: _dense, _copy: _copy}


def _linear(torch_key: str, path: tuple[str, ...], kernel) -> list[Rule]:
  return [
    Rule(f'{torch_key}.weight', (*path, 'kernel'), kernel, _INVERSE[kernel]),
    Rule(f'{torch_key}.bias', (*path, 'bias'), _copy, _copy),
  ]


def _norm(torch_key: str, path: tuple[str, ...]) -> list[Rule]:
  return [
    Rule(f'{torch_key}.weight', (*path, 'scale'), _copy, _copy),
    Rule(f'{torch_key}.bias', (*path, 'bias'), _copy, _copy),
  ]


def _head(fc_key: str, norm_key: str) -> list[Rule]:
  return [
    *_norm(norm_key, ('head_norm',)),
    *_linear(fc_key, ('head',), _dense),
  ]


def _attention(prefix: str, path, width: int, heads: int) -> list[Rule]:
  """timm's fused `qkv` (3D, D) and `proj` (D, D) as flax's attention."""
  per_head = width // heads
  rules = []
  for i, name in enumerate(('query', 'key', 'value')):
    rows = slice(i * width, (i + 1) * width)
    rules += [
      Rule(
        f'{prefix}.qkv.weight',
        (*path, name, 'kernel'),
        lambda v, r=rows: v[r].T.reshape(width, heads, per_head),
        lambda p: p.reshape(width, width).T,
      ),
      Rule(
        f'{prefix}.qkv.bias',
        (*path, name, 'bias'),
        lambda v, r=rows: v[r].reshape(heads, per_head),
        lambda p: p.reshape(width),
      ),
    ]
  rules += [
    Rule(
      f'{prefix}.proj.weight',
      (*path, 'out', 'kernel'),
      lambda v: v.T.reshape(heads, per_head, width),
      lambda p: p.reshape(width, width).T,
    ),
    Rule(f'{prefix}.proj.bias', (*path, 'out', 'bias'), _copy, _copy),
  ]
  return rules


def resample_posemb(value: np.ndarray, tokens: int) -> np.ndarray:
  """`(1, N, D)` position embeddings on a square grid -> `(1, tokens, D)`,
  bilinear on the grid (big_vision's `resample_posemb`)."""
  old, new = int(round(value.shape[1] ** 0.5)), int(round(tokens**0.5))
  if old * old != value.shape[1] or new * new != tokens:
    raise errors.UserError(
      f'pos_embed has {value.shape[1]} tokens and the model {tokens}: only '
      'square grids are resampled; use a square image size.'
    )
  grid = jnp.asarray(value.reshape(old, old, -1))
  grid = jax.image.resize(grid, (new, new, grid.shape[-1]), 'bilinear')
  return np.asarray(grid).reshape(1, tokens, -1)


def vit_rules(model: vit.ViT, tokens: int, notes: list[str]) -> list[Rule]:
  """The rules of a `vit.ViT` whose grid has `tokens` positions."""

  def posemb(value):
    if value.shape[1] != tokens:
      notes.append(
        f'pos_embed resampled from {value.shape[1]} to {tokens} tokens '
        '(bilinear on the grid).'
      )
      return resample_posemb(value, tokens)
    return value

  rules = [
    *_linear('patch_embed.proj', ('embedding',), _conv),
    Rule('pos_embed', ('pos_embedding',), posemb, _copy),
    *_head('head', 'fc_norm'),
  ]
  for k in range(model.depth):
    src, dst = f'blocks.{k}', ('Transformer', f'encoderblock_{k}')
    rules += [
      *_norm(f'{src}.norm1', (*dst, 'LayerNorm_0')),
      *_attention(
        f'{src}.attn',
        (*dst, 'MultiHeadDotProductAttention_0'),
        model.width,
        model.num_heads,
      ),
      *_norm(f'{src}.norm2', (*dst, 'LayerNorm_1')),
      *_linear(f'{src}.mlp.fc1', (*dst, 'MlpBlock_0', 'Dense_0'), _dense),
      *_linear(f'{src}.mlp.fc2', (*dst, 'MlpBlock_0', 'Dense_1'), _dense),
    ]
  return rules


def convnext_rules(model: convnext.ConvNeXt) -> list[Rule]:
  """The rules of a `convnext.ConvNeXt`."""
  rules = [
    *_linear('stem.0', ('stem_conv',), _conv),
    *_norm('stem.1', ('stem_norm',)),
    *_head('head.fc', 'head.norm'),
  ]
  for i, size in enumerate(model.stage_sizes):
    if i > 0:
      rules += [
        *_norm(f'stages.{i}.downsample.0', (f'stage{i}_downsample_norm',)),
        *_linear(
          f'stages.{i}.downsample.1', (f'stage{i}_downsample_conv',), _conv
        ),
      ]
    for j in range(size):
      src, dst = f'stages.{i}.blocks.{j}', (f'stage{i}_block{j}',)
      rules += [
        *_linear(f'{src}.conv_dw', (*dst, 'conv_dw'), _conv),
        *_norm(f'{src}.norm', (*dst, 'norm')),
        *_linear(f'{src}.mlp.fc1', (*dst, 'fc1'), _dense),
        *_linear(f'{src}.mlp.fc2', (*dst, 'fc2'), _dense),
        Rule(f'{src}.gamma', (*dst, 'gamma'), _copy, _copy),
      ]
  return rules


def rules_for(model, params, notes: list[str]) -> list[Rule]:
  """The rules of a ViT (its grid read from `params`' `pos_embedding`, flat
  paths as `pretrained.flatten` gives) or of a ConvNeXt."""
  if isinstance(model, vit.ViT):
    tokens = np.shape(params[('pos_embedding',)])[1]
    return vit_rules(model, tokens, notes)
  return convnext_rules(model)


def _unflatten(flat: dict[tuple[str, ...], np.ndarray]) -> dict:
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    for part in path[:-1]:
      node = node.setdefault(part, {})
    node[path[-1]] = value
  return tree


def _head_fc_key(model) -> str:
  return 'head.weight' if isinstance(model, vit.ViT) else 'head.fc.weight'


def convert(
  state_dict: dict[str, np.ndarray],
  model: cam_head.CamModel,
  *,
  image_size: int,
  rng: jax.Array | None = None,
  source: str = 'state dict',
):
  """Maps a timm ViT / ConvNeXt state dict onto `model`'s variables.

  Args:
    state_dict: key -> array in timm's naming (module docstring).
    model: a `vit.ViT` or `convnext.ConvNeXt` (`models.create_model`).
    image_size: the side of the model's square inputs (sets the ViT's grid).
    rng: key for a fresh head when the class count differs (None: key 0).
    source: how errors name the state dict.

  Returns:
    `({'params': ...}, report)`, float32 numpy arrays shaped as `model.init`.

  Raises:
    errors.UserError: naming every missing, unexpected or mis-shaped tensor.
  """
  images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  shapes = jax.eval_shape(
    lambda x: model.init(jax.random.key(0), x, train=False), images
  )
  target = pretrained.flatten(shapes['params'])
  report = pretrained.LoadReport()
  rules = rules_for(model, target, report.notes)
  if isinstance(model, vit.ViT):
    expected = "timm VisionTransformer(global_pool='avg', class_token=False)"
  else:
    expected = f'timm ConvNeXt with stage sizes {tuple(model.stage_sizes)}'
  state_dict = pretrained.strip_prefix(dict(state_dict))
  fc = _head_fc_key(model)
  classes = target[('head', 'kernel')].shape[1]
  headless = fc not in state_dict
  fresh_head = headless or np.shape(state_dict[fc])[0] != classes
  known = {rule.key for rule in rules}
  problems = {'missing': [], 'unexpected': [], 'shape': []}
  problems['unexpected'] = [k for k in state_dict if k not in known]
  values = {}
  for rule in rules:
    if rule.path[0] == 'head' and fresh_head:
      if rule.key in state_dict and not headless:
        report.dropped[rule.key] = (
          f'{np.shape(state_dict[fc])[0]}-class head; the model has '
          f'{classes} classes'
        )
      continue
    if rule.path not in target:  # The faithful head has no bias.
      if rule.key in state_dict:
        report.dropped[rule.key] = 'head bias (cam_faithful: no head bias)'
      continue
    if rule.key not in state_dict:
      problems['missing'].append(rule.key)
      continue
    value = rule.transform(np.asarray(state_dict[rule.key], np.float32))
    if value.shape != target[rule.path].shape:
      problems['shape'].append(
        f'{rule.key}: file {np.shape(state_dict[rule.key])} (as '
        f'{"/".join(rule.path)} {value.shape}), model '
        f'{target[rule.path].shape}'
      )
      continue
    values[rule.path] = np.ascontiguousarray(value)
    if rule.key not in report.loaded:
      report.loaded.append(rule.key)
  problems['missing'] = sorted(set(problems['missing']))
  if any(problems.values()):
    raise errors.UserError(
      pretrained.problem_lines(
        f'{source} does not fit the model ({type(model).__name__}, '
        f'{classes} classes)',
        problems,
        f'Expected a {expected} state dict of the same size as model.name '
        '(and model.width, depth, num_heads, patch_size, stage_sizes).',
      )
    )
  if fresh_head:
    if headless:
      report.notes.append(f'the file has no head ({fc}).')
    if rng is None:
      rng = jax.random.key(0)
      report.notes.append('fresh head drawn from key 0 (no rng given).')
    head = cam_head.CamHead(classes, use_bias=not model.cam_faithful)
    features = target[('head', 'kernel')].shape[0]
    fresh = head.init(rng, jnp.zeros((1, 1, 1, features), jnp.float32))
    for path, value in pretrained.flatten(fresh['params']).items():
      values[('head', *path)] = np.asarray(value)
      report.fresh.append('/'.join(('params', 'head', *path)))
  norm = 'fc_norm' if isinstance(model, vit.ViT) else 'head.norm'
  report.notes.append(
    f'{norm} runs at every position before the pooling (cam_faithful).'
    if model.cam_faithful
    else f'{norm} normalises the pooled vector (timm).'
  )
  leftover = sorted('/'.join(k) for k in set(target) - set(values))
  if leftover:  # A model tree these rules do not know: a bug, not input.
    raise errors.UserError(f'{source}: no tensor for {leftover}.')
  return {'params': _unflatten(values)}, report
