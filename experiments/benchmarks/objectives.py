r"""Train-step time of every objective relative to CE, on one config's model.

Every objective of `cco_jax.objectives` (and ACE with contrastive
CutMix) runs the library's train step (jitted, one device, buffers donated) on
the same model and synthetic batch (images, map- and image-resolution masks,
labels, two groups); steps of the objectives take turns, and the table gives
each one's median and its ratio to CE's. `rrr` differentiates the input
gradient again (a double backward), which the ratio shows.

  python -m experiments.benchmarks.objectives --variant=cpu --repeats=15 \
    --out=/tmp/objectives.json
"""

from __future__ import annotations

import json
import os
import platform
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from cco_jax import model_config
from cco_jax import models
from cco_jax import objectives
from experiments.benchmarks import steps
from experiments.configs import pets

_VARIANT = flags.DEFINE_string('variant', 'cpu', 'A pets config variant.')
_BATCH = flags.DEFINE_integer('batch', 0, 'Batch size; 0 = the config.')
_REPEATS = flags.DEFINE_integer('repeats', 15, 'Timed steps per objective.')
_OUT = flags.DEFINE_string('out', '', 'Where to write the JSON results.')

# (label, loss name, `config.loss` overrides).
OBJECTIVES = (
  ('ce', 'ce', {}),
  ('ace', 'ace', {}),
  ('ace_kld', 'ace_kld', {}),
  ('ace_swd', 'ace_swd', {}),
  ('ace+cutmix', 'ace', {'cutmix_alpha': 1.0}),
  ('rrr', 'rrr', {}),
  ('ce_bg_cam', 'ce_bg_cam', {}),
  ('energy', 'energy', {}),
  ('group_dro', 'group_dro', {'group_counts': (3, 1)}),
  ('ce_reweighted', 'ce_reweighted', {'group_counts': (3, 1)}),
)


def synthetic_batch(model, image_size: int, batch: int, seed: int = 0):
  """Images, labels, masks at map and image resolution, and two groups."""
  rng = np.random.default_rng(seed)
  height, width = models.cam_size(model, image_size)
  pixel_mask = np.zeros((batch, image_size, image_size), np.float32)
  pixel_mask[:, : image_size // 2, : image_size // 2] = 1
  mask = np.zeros((batch, height, width), np.float32)
  mask[:, : height // 2, : width // 2] = 1
  return jax.tree.map(
    jnp.asarray,
    {
      'image': rng.random((batch, image_size, image_size, 3), np.float32),
      'label': rng.integers(0, 2, batch).astype(np.int32),
      'mask': mask,
      'pixel_mask': pixel_mask,
      'group': rng.integers(0, 2, batch).astype(np.int32),
    },
  )


def compile_objective(model, config, batch, name, overrides):
  objective = objectives.create(
    {**config.loss, 'name': name, 'log_all_terms': False, **overrides}
  )
  compiled, state, seconds, _ = steps.compile_step(
    model, objective, config.data.image_size, batch
  )
  return compiled, state, seconds


def main(argv):
  del argv
  config = pets.get_config(_VARIANT.value)
  batch_size = _BATCH.value or config.batch_size
  model = model_config.create_model(config, 2)
  batch = synthetic_batch(model, config.data.image_size, batch_size)
  runs = {}
  for label, name, overrides in OBJECTIVES:
    compiled, state, compile_s = compile_objective(
      model, config, batch, name, overrides
    )
    state, _ = jax.block_until_ready(compiled(state, batch))  # Warm-up.
    runs[label] = {'step': compiled, 'state': state, 'compile_s': compile_s}
    runs[label]['times'] = []
  load_start = os.getloadavg()[0]
  for _ in range(_REPEATS.value):
    for run in runs.values():
      start = time.perf_counter()
      run['state'], metrics = jax.block_until_ready(
        run['step'](run['state'], batch)
      )
      run['times'].append(time.perf_counter() - start)
      run['loss'] = float(metrics['loss'])
  ce = float(np.median(runs['ce']['times']))
  results = {
    'variant': _VARIANT.value,
    'image_size': config.data.image_size,
    'batch': batch_size,
    'cam_size': list(models.cam_size(model, config.data.image_size)),
    'device': str(jax.devices()[0].device_kind),
    'machine': platform.processor() or platform.machine(),
    'cpus': os.cpu_count(),
    'loadavg_start': round(load_start, 2),
    'loadavg_end': round(os.getloadavg()[0], 2),
    'repeats': _REPEATS.value,
    'objectives': {
      label: {
        'median_s': float(np.median(run['times'])),
        'min_s': float(np.min(run['times'])),
        'ratio_to_ce': float(np.median(run['times'])) / ce,
        'compile_s': run['compile_s'],
        'loss_last': run['loss'],
      }
      for label, run in runs.items()
    },
  }
  print(
    f'{results["variant"]}: {batch_size} x {config.data.image_size} px on '
    f'{results["device"]}, load {results["loadavg_start"]} -> '
    f'{results["loadavg_end"]}'
  )
  print(f'  {"objective":16s} {"median s":>9s} {"min s":>8s} {"/ CE":>6s}')
  for label, row in results['objectives'].items():
    print(
      f'  {label:16s} {row["median_s"]:9.4f} {row["min_s"]:8.4f} '
      f'{row["ratio_to_ce"]:6.2f}'
    )
  if _OUT.value:
    with open(_OUT.value, 'w') as f:
      json.dump(results, f, indent=1)


if __name__ == '__main__':
  app.run(main)
