"""Pure train and eval steps, written for `jax.pmap` over a named axis.

`train_step(state, batch, *, objective, axis_name)` computes the objective on
the per-pixel maps of one device's shard, averages gradients and metrics over
`axis_name` with `lax.pmean`, and applies the optimizer. BatchNorm statistics
are synchronised through the model's `bn_axis_name` (the same axis), so every
replica holds identical parameters and statistics, and a sharded step equals
the same step on one device with the whole batch.

A non-finite loss, gradient or updated parameter leaves the state unchanged and raises the
`nonfinite` metric, which the loop turns into an error naming the step.

Batches are dicts: `image` `(b, S, S, 3)` float, `mask` `(b, H, W)` in [0, 1]
at CAM resolution, `label` `(b,)` int. Training batches may carry `image`
uint8 and `flip` `(b,)` (`config.data.device_preprocessing`): the step first
scales, normalises and flips them on the device
(`cco_jax.data.device_transforms.finish_batch`). Eval batches add `weight` `(b,)`
(0 for padding). Under pmap each gets a leading device axis.

The step calls one interface, `cco_jax.objectives.Objective`, whatever the
objective: it checks the batch carries the objective's `supervision` (e.g.
`pixel_mask` `(b, S, S)` or `group` `(b,)`), gives it a PRNG key derived from
the step number and the replica when it `needs_rng` (so a resumed run draws the
same keys) and lets it `augment` the batch, computes the input gradient of its
`input_score` when it `needs_input_gradients` (differentiated again: a double
backward), and carries its state (`init_state`, e.g. Group DRO's weights) in
`TrainState.group_weights`.
"""

from __future__ import annotations

from collections.abc import Callable
import functools
from typing import Any

import flax
from flax.training import train_state
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cco_jax import metrics as metrics_lib
from cco_jax import objectives
from cco_jax.data import device_transforms

AXIS_NAME = 'batch'


class TrainState(train_state.TrainState):
  """Parameters, optimizer state and step, plus BatchNorm statistics (`{}`
  for models without BatchNorm: ViT, ConvNeXt) and the
  objective's state (`Objective.init_state`: Group DRO's weights `(G,)`, None
  for the others; the field keeps its name so that checkpoints restore)."""

  batch_stats: Any = None
  group_weights: Any = None


def create_train_state(
  rng: jax.Array,
  model: flax.linen.Module,
  image_size: int,
  tx: optax.GradientTransformation,
  objective_state: Any = None,
) -> TrainState:
  """Initialises a model and its optimizer (unreplicated, on the host's device).

  `objective_state`: the objective's `init_state()` (None: none).
  """
  images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  variables = jax.jit(functools.partial(model.init, train=False))(rng, images)
  state = TrainState.create(
    apply_fn=model.apply,
    params=variables['params'],
    batch_stats=variables.get('batch_stats', {}),
    tx=tx,
    group_weights=objective_state,
  )
  # A typed step counter: the step's output then has the input's types and a
  # second call does not retrace.
  return state.replace(step=jnp.zeros((), jnp.int32))


def _all_finite(*trees) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for t in trees for x in jax.tree.leaves(t)]
  return jnp.all(jnp.stack(leaves))


def _step_rng(seed: int, step: jax.Array, axis_name: str | None) -> jax.Array:
  """A key for this step (and replica): the same after a resume."""
  rng = jax.random.fold_in(jax.random.key(seed), step)
  if axis_name is not None:
    rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
  return rng


def train_step(
  state: TrainState,
  batch: dict,
  *,
  objective: objectives.Objective,
  axis_name: str | None = AXIS_NAME,
  normalize: bool | None = None,
) -> tuple[TrainState, dict]:
  """One (micro-)step of gradient descent on `objective`.

  Args:
    state: the replica's `TrainState`.
    batch: the replica's shard: `image`, `mask`, `label` (module docstring);
      uint8 `image` and `flip` are finished on the device first.
    objective: from `objectives.create`.
    axis_name: the mapped axis to average over, or None on a single device.
    normalize: `config.data.normalize`, for uint8 images (ImageNet mean/std);
      None is an error if the images are uint8.

  Returns:
    The new state and a dict of scalar metrics (loss, the objective's terms and
    the logged ones, accuracy, grad_norm, nonfinite), averaged over the axis.
  """
  batch = device_transforms.finish_batch(batch, normalize=normalize)
  objective.check_batch(batch)
  if state.group_weights is None and (
    jax.eval_shape(objective.init_state) is not None
  ):
    raise ValueError(
      f'Objective {objective.name!r} carries a state: create the train state '
      'with create_train_state(..., objective_state=objective.init_state()).'
    )
  rng = augment_rng = None
  if objective.needs_rng:
    rng, augment_rng = jax.random.split(
      _step_rng(objective.seed, state.step, axis_name)
    )
  batch = objective.augment(augment_rng, batch)

  def forward(params, images):
    (logits, cams), updates = state.apply_fn(
      {'params': params, 'batch_stats': state.batch_stats},
      images,
      train=True,
      mutable=['batch_stats'],
    )
    # A model without BatchNorm (ViT, ConvNeXt) updates no collection: its
    # `batch_stats` stay the empty dict `create_train_state` gave it.
    return logits, cams, updates.get('batch_stats', state.batch_stats)

  def loss_fn(params):
    input_grads = None
    if not objective.needs_input_gradients:
      logits, cams, batch_stats = forward(params, batch['image'])
    else:
      # One forward pass gives the outputs and, differentiated with respect to
      # the images, the input gradient the loss penalises (double backward).
      def score(images):
        outputs = forward(params, images)
        return objective.input_score(outputs[0]).sum(), outputs

      input_grads, (logits, cams, batch_stats) = jax.grad(score, has_aux=True)(
        batch['image']
      )
    loss, metrics, objective_state = objective(
      objectives.StepInputs(
        logits,
        cams,
        batch['label'],
        batch['mask'],
        batch=batch,
        input_grads=input_grads,
        state=state.group_weights,
        rng=rng,
        axis_name=axis_name,
      )
    )
    return loss, (batch_stats, metrics, logits, objective_state)

  grads, (batch_stats, metrics, logits, objective_state) = jax.grad(
    loss_fn, has_aux=True
  )(state.params)
  metrics = dict(
    metrics, accuracy=jnp.mean(jnp.argmax(logits, -1) == batch['label'])
  )
  if axis_name is not None:
    grads = jax.lax.pmean(grads, axis_name)
    metrics = jax.lax.pmean(metrics, axis_name)
  new_state = state.apply_gradients(
    grads=grads, batch_stats=batch_stats, group_weights=objective_state
  )
  finite = _all_finite(metrics['loss'], grads, new_state.params)
  new_state = jax.tree.map(
    functools.partial(jnp.where, finite), new_state, state
  )
  metrics['grad_norm'] = optax.tree.norm(grads)
  metrics['nonfinite'] = 1.0 - finite.astype(jnp.float32)
  return new_state, metrics


def eval_step(
  state: TrainState,
  batch: dict,
  *,
  axis_name: str | None = AXIS_NAME,
  num_groups: int = 0,
) -> dict:
  """Sums of evaluation quantities over a (padded) batch shard.

  Returns weighted sums (divide by `count` after summing over batches):
  `count`, `correct`, `ce`, pixel influence `net`/`fg`/`bg`, and the maximum
  relative identity error `identity_error` (a max, not a sum); with
  `num_groups > 1`, also `group_count` and `group_correct` `(num_groups,)`
  from `batch['group']`.
  """
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  logits, cams = state.apply_fn(variables, batch['image'], train=False)
  sums = metrics_lib.batch_sums(
    logits,
    cams,
    batch['label'],
    batch['mask'],
    batch['weight'],
    bias=state.params['head'].get('bias'),
    **(
      {'group': batch['group'], 'num_groups': num_groups}
      if num_groups > 1
      else {}
    ),
  )
  identity = sums.pop('identity_error')
  if axis_name is not None:
    sums = jax.lax.psum(sums, axis_name)
    identity = jax.lax.pmax(identity, axis_name)
  sums['identity_error'] = identity
  return sums


def predict_step(
  state: TrainState, images: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """Logits `(b, C)` and maps `(b, H, W, C)` of a batch (inference mode)."""
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  return state.apply_fn(variables, images, train=False)


def _device_sharding() -> jax.sharding.NamedSharding:
  """Leading axis over the local devices, named like the pmap axis.

  pmap returns arrays sharded over a mesh axis named `AXIS_NAME`; placing
  inputs the same way means the second call hits the first call's cache
  instead of retracing and recompiling.
  """
  mesh = jax.sharding.Mesh(jax.local_devices(), (AXIS_NAME,))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(AXIS_NAME))


def replicate(tree):
  """Copies every leaf to each local device (leading axis = devices)."""
  sharding, n = _device_sharding(), jax.local_device_count()
  return jax.tree.map(
    lambda x: jax.device_put(
      jnp.broadcast_to(x, (n,) + jnp.shape(x)), sharding
    ),
    tree,
  )


def _first_shard(x):
  """The device shard of `x` holding row 0 (no computation), else `x`."""
  if isinstance(x, jax.Array) and x.ndim:
    for shard in x.addressable_shards:
      index = shard.index[0]
      if (
        isinstance(index, slice)
        and (index.start or 0) == 0
        and shard.data.ndim == x.ndim
      ):
        return shard.data
  return x


def unreplicate(tree):
  """The first replica of every leaf, as host-side numpy arrays.

  One `jax.device_get` of the whole tree of first shards: the copies to the
  host overlap, and no leaf is indexed on the devices.
  """
  host = jax.device_get(jax.tree.map(_first_shard, tree))
  return jax.tree.map(lambda x: np.asarray(x[0]), host)


def shard(tree):
  """Places `(D, b, ...)` host arrays so that device d holds `[d]`."""
  sharding = _device_sharding()
  return jax.tree.map(lambda x: jax.device_put(x, sharding), tree)


def pmapped_train_step(
  objective: objectives.Objective,
  *,
  normalize: bool | None = None,
) -> Callable:
  """`train_step` pmapped over local devices, the state's buffers donated.

  `normalize` (`config.data.normalize`) is needed for uint8 batches.
  """
  return jax.pmap(
    functools.partial(
      train_step, objective=objective, axis_name=AXIS_NAME, normalize=normalize
    ),
    axis_name=AXIS_NAME,
    donate_argnums=(0,),
  )


def pmapped_eval_step(num_groups: int = 0) -> Callable:
  """`eval_step` pmapped over local devices (group sums if `num_groups > 1`)."""
  return jax.pmap(
    functools.partial(eval_step, axis_name=AXIS_NAME, num_groups=num_groups),
    axis_name=AXIS_NAME,
  )
