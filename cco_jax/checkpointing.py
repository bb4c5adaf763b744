"""Orbax checkpoints of the train state and the data iterator's position.

One `CheckpointManager` in `workdir/checkpoints` keeps the last `keep`
checkpoints plus the best one by validation accuracy. Each checkpoint holds
`state` (params, batch statistics, optimizer state, step; saved unreplicated, so
it restores on any number of devices), `rng`, and `data` (the input iterator's
state, as JSON), so a resumed run sees exactly the batches it had not seen.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

BEST_METRIC = 'eval_accuracy'


def create_manager(workdir: str, keep: int = 3) -> ocp.CheckpointManager:
  """A manager keeping the last `keep` steps and the best by `BEST_METRIC`."""
  best = lambda metrics: metrics[BEST_METRIC]
  policy = checkpoint_managers.AnyPreservationPolicy(
    [
      checkpoint_managers.LatestN(n=keep),
      checkpoint_managers.BestN(
        get_metric_fn=best, n=1, keep_checkpoints_without_metrics=False
      ),
    ]
  )
  options = ocp.CheckpointManagerOptions(
    preservation_policy=policy,
    best_fn=best,
    best_mode='max',
    enable_async_checkpointing=False,
    create=True,
  )
  return ocp.CheckpointManager(
    os.path.join(os.path.abspath(workdir), 'checkpoints'),
    options=options,
    item_names=('state', 'rng', 'data'),
  )


def save(
  manager: ocp.CheckpointManager,
  step: int,
  state: Any,
  rng: jax.Array,
  data_state: dict,
  metrics: dict | None = None,
) -> None:
  """Saves an unreplicated `state`, the RNG key and the iterator state.

  `data_state` is what the iterator's `get_state()` returned: JSON-compatible
  data, or JSON text as `str`/`bytes` (restored as `str`).
  """
  rng_data = np.asarray(jax.random.key_data(rng))
  if isinstance(data_state, bytes):
    data_state = data_state.decode()
  data = {'iterator': data_state, 'rng_impl': str(jax.random.key_impl(rng))}
  manager.save(
    step,
    args=ocp.args.Composite(
      state=ocp.args.StandardSave(jax.device_get(state)),
      rng=ocp.args.StandardSave({'key_data': rng_data}),
      data=ocp.args.JsonSave(data),
    ),
    metrics=metrics,
    force=True,
  )
  manager.wait_until_finished()


def restore(
  manager: ocp.CheckpointManager, template_state: Any, step: int | None = None
) -> tuple[Any, jax.Array, dict, int]:
  """Restores `(state, rng, data_state, step)` at `step` (default: latest).

  `template_state` is an unreplicated state of the right structure (e.g. a
  freshly created one); its arrays give the shapes and dtypes to restore to.
  """
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f'No checkpoint in {manager.directory}.')
  abstract = jax.tree.map(
    ocp.utils.to_shape_dtype_struct, jax.device_get(template_state)
  )
  restored = manager.restore(
    step,
    args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract),
      rng=ocp.args.StandardRestore(),
      data=ocp.args.JsonRestore(),
    ),
  )
  data = restored['data']
  rng = jax.random.wrap_key_data(
    np.asarray(restored['rng']['key_data'], np.uint32), impl=data['rng_impl']
  )
  return restored['state'], rng, data['iterator'], step
