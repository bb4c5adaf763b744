r"""FLOPs of a train step: counted by XLA on a CPU lowering, checked analytically.

On a GPU, `compiled.cost_analysis()` counts every cuDNN/cuBLAS custom call as
-1 FLOP (jax issue 22249), so the GPU's own count is meaningless for MFU.
The count here lowers the same step (`cco_jax.train_step.train_step` with the
config's objective, optimizer and batch layout, at one device's batch) for
the CPU and asks XLA's cost analysis of the lowered module: no compilation,
seconds even for ResNet-50. `prepare.sh` writes the counts the GPU check
needs into the bundle (`flops.json`), so the GPU spends nothing on them:

    python -m experiments.benchmarks.training_flops --variant=binary \
        --per_device_batches=128,256 --out=.gpu_bundle/flops.json

`analytic_step_flops` is the independent count the tests compare with:
2 x multiply-adds of every convolution and dense layer (kernel taps on
padding excluded, as XLA counts them) and of the head's all-class maps (one
forward), times 3 for the train step (the backward pass computes two
products of the same size per layer: input and weight gradients).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
import functools
import json
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cco_jax import model_config
from cco_jax import models
from cco_jax import optimizers
from cco_jax import train_setup
from cco_jax import train_step as step_lib

FLOPS_FILE = 'flops.json'
# Forward + backward (input and weight gradients) of a product layer.
TRAIN_OVER_FORWARD = 3


def compiled_flops(compiled) -> float:
  """FLOPs from XLA's cost analysis of a compiled (or lowered) program (NaN
  when the backend has none)."""
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return float('nan')
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  return float((analysis or {}).get('flops', float('nan')))


def batch_spec(
  config: ml_collections.ConfigDict,
  model: models.ResNet,
  batch: int,
) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes and dtypes of one device's training batch as the loop sends it:
  'image' `(batch, S, S, 3)` (uint8 with `data.device_preprocessing`, which
  adds 'flip' `(batch,)` when flipping), 'label' `(batch,)`, 'mask'
  `(batch, h, w)` at the CAM size."""
  size = config.data.image_size
  height, width = models.cam_size(model, size)
  on_device = config.data.get('device_preprocessing', False)
  spec = {
    'image': jax.ShapeDtypeStruct(
      (batch, size, size, 3), jnp.uint8 if on_device else jnp.float32
    ),
    'label': jax.ShapeDtypeStruct((batch,), jnp.int32),
    'mask': jax.ShapeDtypeStruct((batch, height, width), jnp.float32),
  }
  if on_device and config.data.get('augment_flip', False):
    spec['flip'] = jax.ShapeDtypeStruct((batch,), jnp.bool_)
  return spec


def config_step_flops(
  config: ml_collections.ConfigDict, batch: int, num_classes: int
) -> float:
  """XLA's FLOPs of the config's train step at `batch` examples (one device),
  from the lowered module (nothing is compiled or allocated)."""
  model = model_config.create_model(config, num_classes)
  tx = optimizers.create_optimizer(config.optimizer, 1, 1, 1)
  state = jax.eval_shape(
    lambda: step_lib.create_train_state(
      jax.random.key(0), model, config.data.image_size, tx
    )
  )
  step = jax.jit(
    functools.partial(
      step_lib.train_step,
      objective=train_setup.create_objective(config),
      axis_name=None,
      normalize=config.data.normalize,
    )
  )
  return compiled_flops(step.lower(state, batch_spec(config, model, batch)))


def _valid_taps(size: int, kernel: int, stride: int, padding) -> int:
  """Kernel taps that land inside the input, summed over the output
  positions of one spatial dimension (XLA counts no multiply with padding)."""
  if padding == 'VALID':
    low, out = 0, (size - kernel) // stride + 1
  elif padding == 'SAME':
    out = -(-size // stride)
    low = max((out - 1) * stride + kernel - size, 0) // 2
  else:
    low, high = padding
    out = (size + low + high - kernel) // stride + 1
  starts = np.arange(out)[:, None] * stride - low + np.arange(kernel)[None]
  return int(((starts >= 0) & (starts < size)).sum())


def _product_macs(module: nn.Module, inputs, outputs) -> int:
  """Multiply-adds of one convolution, dense or CAM-head call (padding
  excluded)."""
  if isinstance(module, models.CamHead):
    features, (logits, _) = inputs, outputs
    batch, height, width, channels = features.shape
    # Pooled features @ kernel, and the all-class maps (`cams.hirescam`).
    return batch * channels * logits.shape[-1] * (1 + height * width)
  channels = inputs.shape[-1] * outputs.shape[-1]
  if isinstance(module, nn.Dense):
    return math.prod(outputs.shape[:-1]) * channels
  kernel = tuple(module.kernel_size)
  strides = module.strides or (1,) * len(kernel)
  strides = (strides,) * len(kernel) if isinstance(strides, int) else strides
  padding = module.padding
  if isinstance(padding, str):
    padding = [padding] * len(kernel)
  taps = math.prod(
    _valid_taps(n, k, s, p)
    for n, k, s, p in zip(inputs.shape[1:-1], kernel, strides, padding)
  )
  return inputs.shape[0] * taps * channels // module.feature_group_count


def analytic_forward_flops(
  model: models.ResNet, image_size: int, batch: int
) -> float:
  """2 x multiply-adds of the convolutions, dense layers and the CAM head of
  one forward pass at `(batch, image_size, image_size, 3)`, by tracing the
  shapes (`jax.eval_shape`) and intercepting those modules' calls."""
  macs = []
  active = set()

  def count(next_fun, args, kwargs, context):
    module = context.module
    counted = context.method_name == '__call__' and isinstance(
      module, (nn.Conv, nn.Dense, models.CamHead)
    )
    if not counted or id(module) in active:
      return next_fun(*args, **kwargs)
    active.add(id(module))
    try:
      outputs = next_fun(*args, **kwargs)
    finally:
      active.discard(id(module))
    macs.append(_product_macs(module, args[0], outputs))
    return outputs

  images = jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.float32)

  def forward(x):
    variables = model.init(jax.random.key(0), x, train=False)
    with nn.intercept_methods(count):
      return model.apply(variables, x, train=False)

  jax.eval_shape(forward, images)
  return 2.0 * float(np.sum(macs, dtype=np.float64))


def analytic_step_flops(
  model: models.ResNet, image_size: int, batch: int
) -> float:
  """`TRAIN_OVER_FORWARD` x the analytic forward FLOPs: one train step."""
  return TRAIN_OVER_FORWARD * analytic_forward_flops(model, image_size, batch)


def cache_key(variant: str, per_device_batch: int) -> str:
  """The key of a step's count in `flops.json`: 'VARIANT@BATCH'."""
  return f'{variant}@{per_device_batch}'


def read_cache(path: str) -> dict:
  """`flops.json` as a dict of counts ({} when there is none)."""
  if not path or not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def count_variants(
  variant: str, batches: Sequence[int], num_classes: int = 2
) -> dict[str, dict]:
  """XLA's and the analytic count of pets.py `variant`'s step per batch."""
  from experiments.configs import pets  # pylint: disable=g-import-not-at-top

  config = pets.get_config(variant)
  model = model_config.create_model(config, num_classes)
  counts = {}
  for batch in batches:
    xla = config_step_flops(config, batch, num_classes)
    analytic = analytic_step_flops(model, config.data.image_size, batch)
    counts[cache_key(variant, batch)] = {
      'flops': xla,
      'gflops_per_image': xla / batch / 1e9,
      'analytic_flops': analytic,
      'xla_over_analytic': xla / analytic,
      'image_size': config.data.image_size,
      'model': config.model.name,
      'dtype': config.model.dtype,
      'counted_by': f'XLA cost analysis of the CPU lowering, jax {jax.__version__}',
    }
  return counts


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--variant', default='binary')
  parser.add_argument('--per_device_batches', default='128,256')
  parser.add_argument('--num_classes', type=int, default=2)
  parser.add_argument('--out', default=os.path.join('.gpu_bundle', FLOPS_FILE))
  args = parser.parse_args(argv)
  jax.config.update('jax_platforms', 'cpu')
  batches = [int(b) for b in args.per_device_batches.split(',')]
  counts = read_cache(args.out)
  counts.update(count_variants(args.variant, batches, args.num_classes))
  os.makedirs(os.path.dirname(args.out) or '.', exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump(counts, f, indent=2)
  for name, row in counts.items():
    print(
      f'{name}: {row["flops"] / 1e9:.1f} GFLOP per step '
      f'({row["gflops_per_image"]:.2f} per image; analytic '
      f'{row["analytic_flops"] / 1e9:.1f}, XLA / analytic '
      f'{row["xla_over_analytic"]:.3f})'
    )
  print(f'Wrote {args.out}')


if __name__ == '__main__':
  main()
