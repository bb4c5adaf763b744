r"""Train-step cost and logit-sum identity of each backbone family.

`--measure=time` (the default): the library's train step (jitted, one device,
buffers donated) of each model of a preset on the same synthetic batch, the
CE control (`cam_faithful=False`, loss `ce`) and the method (faithful, ACE +
divergence); steps take turns; the table gives each one's median seconds,
images/s, XLA's FLOP count of the step per image and the compile time, with
the load average before and after (a loaded machine's times are not results).

  python -m experiments.benchmarks.backbones --preset=cpu --repeats=10 \
    --out=/tmp/backbones.json                  # ~15-25 min on 2 idle cores

`--measure=identity`: the largest `|sum of maps + b - logit|` (float32) and
`|logit - float64 reference|` (the head recomputed in float64 on the
backbone's own features) of each model, at initialisation and after
`--steps` ACE steps (Adam 1e-3) on the synthetic batch; cheap.

  python -m experiments.benchmarks.backbones --measure=identity --preset=cpu

Presets (8x8 maps of the faithful models, except `small`'s ConvNeXt: 4x4,
its stem downsamples by 4):
  cpu    128 px, batch 16: resnet18 (full width, 'imagenet' stem), vit_ti16
         and vit_s16 (patch 16), convnext_tiny (last_stage_stride=1).
  small  64 px, batch 32: the `pets.py:cpu` ResNet-18 (width 16, one block
         per stage), vit_ti16 at patch 8 and width 96 / depth 6, a
         convnext_tiny of one block per stage and width 32 (stride 1).
  smoke  16-32 px, batch 4, tiny widths: checks the script (tests).
"""

from __future__ import annotations

import functools
import json
import os
import platform
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cco_jax import models
from cco_jax import objectives
from cco_jax import train_step as step_lib
from experiments.benchmarks import steps


def define_flags() -> None:
  """The script's flags (defined only when run, so that tests can import it
  beside other benchmarks that define flags of the same names)."""
  flags.DEFINE_enum('preset', 'cpu', ['cpu', 'small', 'smoke'], '')
  flags.DEFINE_enum('measure', 'time', ['time', 'identity'], '')
  flags.DEFINE_integer('repeats', 10, 'Timed steps per run.')
  flags.DEFINE_integer('steps', 5, 'ACE steps before the identity.')
  flags.DEFINE_string('out', '', 'Where to write the JSON results.')


# preset -> (image size, batch, {label: (model.name, create_model options)}).
PRESETS = {
  'cpu': (
    128,
    16,
    {
      'resnet18': ('resnet18', {}),
      'vit_ti16': ('vit_ti16', {}),
      'vit_s16': ('vit_s16', {}),
      'convnext_tiny/s1': ('convnext_tiny', {'last_stage_stride': 1}),
    },
  ),
  'small': (
    64,
    32,
    {
      'resnet18 (cpu config)': (
        'resnet18',
        dict(num_filters=16, stem='strided', stage_sizes=(1, 1, 1, 1)),
      ),
      'vit_ti16 p8 w96 d6': (
        'vit_ti16',
        dict(patch_size=8, width=96, depth=6),
      ),
      'convnext_tiny 1x4 w32': (
        'convnext_tiny',
        dict(width=32, stage_sizes=(1, 1, 1, 1), last_stage_stride=1),
      ),
    },
  ),
  'smoke': (
    32,
    4,
    {
      'resnet18': (
        'resnet18',
        dict(num_filters=4, stem='small', stage_sizes=(1, 1)),
      ),
      'vit_ti16': (
        'vit_ti16',
        dict(patch_size=8, width=8, depth=1, num_heads=2),
      ),
      'convnext_tiny': ('convnext_tiny', dict(width=4, stage_sizes=(1, 1))),
    },
  ),
}
# (column, cam_faithful, config.loss).
RUNS = (
  ('ce_control', False, {'name': 'ce'}),
  ('ace_kld', True, {'name': 'ace_kld'}),
)


def synthetic_batch(model, image_size: int, batch: int, seed: int = 0):
  """Images, labels (2 classes) and a foreground mask on the model's grid
  (the top-left quarter)."""
  rng = np.random.default_rng(seed)
  height, width = models.cam_size(model, image_size)
  mask = np.zeros((batch, height, width), np.float32)
  mask[:, : max(height // 2, 1), : max(width // 2, 1)] = 1
  return jax.tree.map(
    jnp.asarray,
    {
      'image': rng.random((batch, image_size, image_size, 3), np.float32),
      'label': rng.integers(0, 2, batch).astype(np.int32),
      'mask': mask,
    },
  )


def _compile(model, image_size, batch, loss):
  return steps.compile_step(model, objectives.create(loss), image_size, batch)


def measure_time(preset: str, repeats: int) -> dict:
  """Median step seconds of each (model, run) of `preset`; steps interleaved."""
  image_size, batch_size, entries = PRESETS[preset]
  runs = {}
  for label, (name, options) in entries.items():
    for column, faithful, loss in RUNS:
      model = models.create_model(name, 2, cam_faithful=faithful, **options)
      batch = synthetic_batch(model, image_size, batch_size)
      compiled, state, compile_s, flops = _compile(
        model, image_size, batch, loss
      )
      state, _ = jax.block_until_ready(compiled(state, batch))  # Warm-up.
      runs[label, column] = dict(
        step=compiled,
        state=state,
        batch=batch,
        compile_s=compile_s,
        gflop_per_image=flops / batch_size / 1e9,
        cam_size=list(models.cam_size(model, image_size)),
        times=[],
      )
  load_start = os.getloadavg()
  for _ in range(repeats):
    for run in runs.values():
      start = time.perf_counter()
      run['state'], _ = jax.block_until_ready(
        run['step'](run['state'], run['batch'])
      )
      run['times'].append(time.perf_counter() - start)
  load_end = os.getloadavg()
  rows = {
    f'{label} {column}': {
      'median_s': float(np.median(run['times'])),
      'min_s': float(np.min(run['times'])),
      'images_per_s': batch_size / float(np.median(run['times'])),
      'gflop_per_image': run['gflop_per_image'],
      'compile_s': run['compile_s'],
      'cam_size': run['cam_size'],
    }
    for (label, column), run in runs.items()
  }
  return _environment(preset, image_size, batch_size) | {
    'repeats': repeats,
    'loadavg_start': [round(x, 2) for x in load_start],
    'loadavg_end': [round(x, 2) for x in load_end],
    'rows': rows,
  }


def _head_reference(features, params, faithful):
  """float64 logits of the shared head on the backbone's features."""
  z = np.asarray(features, np.float64)
  if 'head_norm' in params:
    source = z if faithful else z.mean((1, 2), keepdims=True)
    mean = source.mean(-1, keepdims=True)
    var = np.square(source - mean).mean(-1, keepdims=True)
    z = (z - mean) / np.sqrt(var + 1e-6)
    z = z * np.asarray(params['head_norm']['scale'], np.float64)
    z = z + np.asarray(params['head_norm']['bias'], np.float64)
  kernel = np.asarray(params['head']['kernel'], np.float64)
  bias = np.asarray(params['head'].get('bias', 0.0), np.float64)
  return z.mean((1, 2)) @ kernel + bias


def identity_errors(model, variables, images) -> dict:
  """`{'float32': max|sum M + b - s|, 'float64': max|s - reference|, ...}`."""
  captured = {}

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == 'features':
      captured['features'] = out
    return out

  import flax.linen as nn  # pylint: disable=import-outside-toplevel

  with nn.intercept_methods(interceptor):
    logits, maps = model.apply(variables, images, train=False)
  params = variables['params']
  bias = np.asarray(params['head'].get('bias', 0.0), np.float64)
  logits = np.asarray(logits, np.float64)
  recon = np.asarray(maps, np.float64).sum((1, 2)) + bias
  reference = _head_reference(captured['features'], params, model.cam_faithful)
  return {
    'float32': float(np.abs(recon - logits).max()),
    'float64': float(np.abs(logits - reference).max()),
    'max_abs_logit': float(np.abs(logits).max()),
  }


def measure_identity(preset: str, steps: int) -> dict:
  """Identity errors of each model of `preset`, at init and after ACE steps."""
  image_size, batch_size, entries = PRESETS[preset]
  rows = {}
  for label, (name, options) in entries.items():
    for faithful in (True, False):
      model = models.create_model(name, 2, cam_faithful=faithful, **options)
      batch = synthetic_batch(model, image_size, batch_size)
      objective = objectives.create({'name': 'ace'})
      state = step_lib.create_train_state(
        jax.random.key(0, impl='rbg'), model, image_size, optax.adam(1e-3)
      )
      variables = lambda s: {'params': s.params, 'batch_stats': s.batch_stats}
      init = identity_errors(model, variables(state), batch['image'])
      step = jax.jit(
        functools.partial(
          step_lib.train_step, objective=objective, axis_name=None
        )
      )
      row = rows[f'{label} {"faithful" if faithful else "control"}'] = {
        'init': init
      }
      if steps:
        for _ in range(steps):
          state, _ = step(state, batch)
        row[f'after_{steps}_ace_steps'] = identity_errors(
          model, variables(state), batch['image']
        )
  return _environment(preset, image_size, batch_size) | {
    'ace_steps': steps,
    'rows': rows,
  }


def _environment(preset, image_size, batch_size) -> dict:
  return {
    'preset': preset,
    'image_size': image_size,
    'batch': batch_size,
    'device': str(jax.devices()[0].device_kind),
    'machine': platform.processor() or platform.machine(),
    'cpus': os.cpu_count(),
    'jax': jax.__version__,
  }


def print_results(results: dict) -> None:
  head = (
    f'{results["preset"]}: {results["batch"]} x {results["image_size"]} px '
    f'on {results["device"]} ({results["cpus"]} CPUs)'
  )
  if 'loadavg_start' in results:
    print(
      f'{head}, load {results["loadavg_start"]} -> {results["loadavg_end"]}'
    )
    print(
      f'  {"model / run":34s} {"maps":>6s} {"GFLOP/img":>9s} '
      f'{"median s":>9s} {"img/s":>7s} {"compile s":>9s}'
    )
    for label, row in results['rows'].items():
      maps = 'x'.join(map(str, row['cam_size']))
      print(
        f'  {label:34s} {maps:>6s} {row["gflop_per_image"]:9.3f} '
        f'{row["median_s"]:9.4f} {row["images_per_s"]:7.1f} '
        f'{row["compile_s"]:9.1f}'
      )
    return
  print(f'{head}; identity errors (max abs), ACE steps {results["ace_steps"]}')
  for label, row in results['rows'].items():
    for when, errors in row.items():
      print(
        f'  {label:34s} {when:18s} float32 {errors["float32"]:.2e}  '
        f'vs float64 {errors["float64"]:.2e}  (|logit| <= '
        f'{errors["max_abs_logit"]:.3g})'
      )


def main(argv):
  del argv
  options = flags.FLAGS
  if options.measure == 'time':
    results = measure_time(options.preset, options.repeats)
  else:
    results = measure_identity(options.preset, options.steps)
  print_results(results)
  if options.out:
    with open(options.out, 'w') as f:
      json.dump(results, f, indent=1)


if __name__ == '__main__':
  define_flags()
  app.run(main)
