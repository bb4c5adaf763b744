"""Orbax checkpoints of the train state and the data iterators' positions.

One `CheckpointManager` in `workdir/checkpoints` keeps the last `keep`
checkpoints plus the best one by validation accuracy. Each checkpoint holds
`state` (params, batch statistics, optimizer state, step; saved unreplicated, so
it restores on any number of devices), `rng`, and `data`: every host's input
iterator state (JSON, a list indexed by `jax.process_index()`, gathered from all
hosts before the primary host writes it), so a resumed run sees exactly the
batches it had not seen, on every host; and, when given, `run`: the run record
(`cco_jax.run_record`, JSON).

Each checkpoint also holds `integrity`: the SHA-256 of every array and of the
iterator state (`integrity.checksums`), verified after every restore, so a
checkpoint whose files were corrupted (bytes flipped inside a data file decode
without error) is never restored.

`restore_newest` falls back to older checkpoints when the newest cannot be read
(a truncated file, a missing `_METADATA`, a missing item, a checksum mismatch)
and reports which steps were bad and why; `set_aside` moves such steps out of the manager's way
(to `workdir/unrestorable_checkpoints/`), never deleting them. A save that fails
(e.g. a full disk) raises an `OSError` naming the path and the free space.

With `create_manager(..., async_save=True)` (the training loop's manager) a
save returns once the state is on the host and writes it in a background
thread; a failure of that write surfaces as the same `OSError`, naming the
failed step, at the next `save` or at `wait` (call it before reading the
checkpoints, before the final evaluation and before closing).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from cco_jax import errors
from cco_jax import integrity
from cco_jax import save_failures

BEST_METRIC = 'eval_accuracy'
UNRESTORABLE_DIR = 'unrestorable_checkpoints'


def create_manager(
  workdir: str,
  keep: int = 3,
  best_metric: str = BEST_METRIC,
  async_save: bool = False,
) -> ocp.CheckpointManager:
  """A manager keeping the last `keep` steps and the best by `best_metric`
  (a key of the metrics saved with each checkpoint, higher is better).

  `async_save`: `save` returns before the files are written (a background
  thread writes them); `wait` blocks until they are.
  """
  best = lambda metrics: metrics[best_metric]
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
    enable_async_checkpointing=async_save,
    create=True,
  )
  return ocp.CheckpointManager(
    _absolute(workdir) / 'checkpoints',
    options=options,
    item_names=('state', 'rng', 'data', 'integrity', 'run'),
  )


def _absolute(workdir: str | os.PathLike) -> epath.Path:
  """`workdir` as an absolute `epath.Path` (local, or e.g. `gs://...`)."""
  path = epath.Path(workdir)
  return path if path.is_absolute() else path.absolute()


def _gather_json(text: str) -> list[str]:
  """Every host's `text`, in process order (one element on a single host)."""
  if jax.process_count() == 1:
    return [text]
  data = np.frombuffer(text.encode(), np.uint8)
  lengths = multihost_utils.process_allgather(np.int64(len(data)))
  padded = np.zeros(int(np.max(lengths)), np.uint8)
  padded[: len(data)] = data
  gathered = multihost_utils.process_allgather(padded)
  return [
    bytes(row[:n]).decode()
    for row, n in zip(np.asarray(gathered), np.asarray(lengths))
  ]


def save(
  manager: ocp.CheckpointManager,
  step: int,
  state: Any,
  rng: jax.Array,
  data_state: dict | str | bytes,
  metrics: dict | None = None,
  loop_state: dict | None = None,
  record: dict | None = None,
) -> None:
  """Saves an unreplicated `state`, the RNG key and this host's iterator state
  (and the run record `record`, JSON values, as the item 'run').

  Every host must call it (the iterator states are gathered from all hosts).
  `data_state` is what the iterator's `get_state()` returned: JSON-compatible
  data, or JSON text as `str`/`bytes` (restored as `str`). `loop_state`:
  JSON-compatible data of the training loop, the same on every host
  (restored as `Restored.loop_state`). The `integrity` item holds the
  checksums of all of it (`integrity.checksums`), verified at restore.

  Raises:
    OSError: the write failed (disk full, no permission, ...): the message
      names the checkpoint path, the free space and the cause; the errno is
      the underlying one. Earlier checkpoints are untouched. With an
      asynchronous manager, a failed background save of an earlier step
      raises here too (naming that step), before this one starts.
  """
  rng_data = np.asarray(jax.random.key_data(rng))
  if isinstance(data_state, bytes):
    data_state = data_state.decode()
  iterators = [json.loads(s) for s in _gather_json(json.dumps(data_state))]
  data = {'iterators': iterators, 'rng_impl': str(jax.random.key_impl(rng))}
  if loop_state is not None:
    data['loop'] = loop_state
  host_state = jax.device_get(state)
  checked = {
    'state': host_state,
    'rng': {'key_data': rng_data},
    'data_json': data,
  }
  if record is not None:
    checked['run_json'] = record
  items = dict(
    state=ocp.args.StandardSave(host_state),
    rng=ocp.args.StandardSave({'key_data': rng_data}),
    data=ocp.args.JsonSave(data),
    integrity=ocp.args.JsonSave(integrity.checksums(checked)),
  )
  if record is not None:
    items['run'] = ocp.args.JsonSave(record)
  wait(manager)  # A failed background save of an earlier step raises here.
  try:
    manager.save(
      step,
      args=ocp.args.Composite(**items),
      metrics=metrics,
      force=True,
    )
  except Exception as e:  # pylint: disable=broad-except
    raise save_failures.save_error(manager, step, e) from None


def wait(manager: ocp.CheckpointManager) -> None:
  """Blocks until the manager's background save (if any) is written.

  Raises:
    OSError: that save failed; as `save`'s, naming the failed step's path.
  """
  try:
    manager.wait_until_finished()
  except Exception as e:  # pylint: disable=broad-except
    partial = save_failures.partial_steps(epath.Path(manager.directory))
    raise save_failures.save_error(
      manager, partial[0] if partial else None, e
    ) from None


@dataclasses.dataclass
class Restored:
  """What `restore_newest` found."""

  state: Any
  rng: jax.Array
  data_state: Any
  step: int
  # Newer steps that could not be restored: {step: reason}.
  unrestorable: dict[int, str]
  # What `save` got as `loop_state` ({} when none was saved).
  loop_state: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class _Step:
  """One restored checkpoint."""

  state: Any
  rng: jax.Array
  iterator: Any
  loop_state: dict


def _restore_step(
  manager: ocp.CheckpointManager,
  abstract: Any,
  step: int,
  need_iterator: bool = True,
) -> _Step:
  """Restores `step` and verifies its checksums (`integrity.verify`).

  Raises on anything unrestorable: a missing item or file, undecodable data,
  a checksum mismatch (`integrity.ChecksumMismatch`), or another number of
  processes (unless not `need_iterator`).
  """
  verified = (epath.Path(manager.directory) / str(step) / 'integrity').exists()
  items = {
    'state': ocp.args.StandardRestore(abstract),
    'rng': ocp.args.StandardRestore(),
    'data': ocp.args.JsonRestore(),
  }
  if verified:
    items['integrity'] = ocp.args.JsonRestore()
  # The run record (checkpoints written before run records have none).
  recorded = (epath.Path(manager.directory) / str(step) / 'run').exists()
  if recorded:
    items['run'] = ocp.args.JsonRestore()
  restored = manager.restore(step, args=ocp.args.Composite(**items))
  missing = [k for k in items if restored[k] is None]
  if missing:
    raise FileNotFoundError(f'item(s) {missing} missing')
  data = restored['data']
  if verified:
    checked = {
      'state': restored['state'],
      'rng': restored['rng'],
      'data_json': data,
    }
    if recorded:
      checked['run_json'] = restored['run']
    integrity.verify(checked, restored['integrity'])
  else:
    logging.warning(
      'Checkpoint %s/%d has no checksums (written before checkpoints had '
      'them): restored without verifying its arrays.',
      manager.directory,
      step,
    )
  rng = jax.random.wrap_key_data(
    np.asarray(restored['rng']['key_data'], np.uint32), impl=data['rng_impl']
  )
  loop_state = data.get('loop', {})
  if 'iterators' in data:
    iterators = data['iterators']
    if len(iterators) != jax.process_count():
      if not need_iterator:  # E.g. evaluation: only the state matters.
        return _Step(restored['state'], rng, None, loop_state)
      raise errors.UserError(
        f'written by {len(iterators)} process(es), restored by '
        f'{jax.process_count()}: resume with the same number of processes'
      )
    iterator = iterators[jax.process_index()]
  else:  # Written before per-host states: one host's state.
    iterator = data['iterator']
  return _Step(restored['state'], rng, iterator, loop_state)


def _abstract(template_state: Any) -> Any:
  return jax.tree.map(
    ocp.utils.to_shape_dtype_struct, jax.device_get(template_state)
  )


def _reason(error: BaseException) -> str:
  message = error.args[0] if error.args else ''
  text = str(message if isinstance(error, KeyError) else error)
  text = text.strip().splitlines()
  return f'{type(error).__name__}: {text[0] if text else ""}'[:300]


def restore(
  manager: ocp.CheckpointManager, template_state: Any, step: int | None = None
) -> tuple[Any, jax.Array, Any, int]:
  """Restores `(state, rng, data_state, step)` at `step` (default: newest).

  With an explicit `step`, `data_state` is None when the checkpoint was
  written by another number of processes (the state restores anywhere).

  `template_state` is an unreplicated state of the right structure (e.g. a
  freshly created one, or `jax.eval_shape` of one); its arrays give the shapes
  and dtypes to restore to. Without `step`, falls back to older checkpoints
  when newer ones cannot be read (`restore_newest`).

  Raises:
    FileNotFoundError: no checkpoint (or no such step).
    ValueError: the checkpoint(s) cannot be restored; the reason is named.
  """
  if step is None:
    r = restore_newest(manager, template_state)
    return r.state, r.rng, r.data_state, r.step
  if step not in manager.all_steps():
    raise FileNotFoundError(
      f'No checkpoint of step {step} in {manager.directory} (steps there: '
      f'{list(manager.all_steps())}).'
    )
  try:
    found = _restore_step(
      manager, _abstract(template_state), step, need_iterator=False
    )
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(
      f'The checkpoint {manager.directory}/{step} cannot be restored: '
      f'{_reason(e)}'
    ) from e
  return found.state, found.rng, found.iterator, step


def restore_newest(
  manager: ocp.CheckpointManager, template_state: Any
) -> Restored:
  """The newest checkpoint that restores; newer unreadable ones are reported.

  Each unreadable step is logged (step and reason) and listed in
  `Restored.unrestorable`; nothing is deleted or moved here.

  Raises:
    FileNotFoundError: there is no checkpoint.
    ValueError: no checkpoint restores (e.g. the config's model differs from
      the one that wrote them); every step's reason is listed.
  """
  steps = sorted(manager.all_steps(), reverse=True)
  if not steps:
    raise FileNotFoundError(f'No checkpoint in {manager.directory}.')
  abstract = _abstract(template_state)
  bad = {}
  for step in steps:
    try:
      found = _restore_step(manager, abstract, step)
    except Exception as e:  # pylint: disable=broad-except
      bad[step] = _reason(e)
      logging.warning(
        'Checkpoint %s/%d cannot be restored (%s); trying an older one.',
        manager.directory,
        step,
        bad[step],
      )
      continue
    return Restored(
      found.state, found.rng, found.iterator, step, bad, found.loop_state
    )
  raise ValueError(
    f'No checkpoint in {manager.directory} can be restored: '
    + '; '.join(f'step {s}: {r}' for s, r in bad.items())
  )


def set_aside(manager: ocp.CheckpointManager, steps) -> list[str]:
  """Moves unrestorable `steps` to `workdir/unrestorable_checkpoints/`.

  They are kept for inspection (never deleted) but no longer shadow the good
  checkpoints or block saving those steps again. Only the primary host moves
  files; returns the new paths. Reloads the manager.
  """
  moved = []
  directory = epath.Path(manager.directory)
  target_dir = directory.parent / UNRESTORABLE_DIR
  if jax.process_index() == 0:
    for step in steps:
      source = directory / str(step)
      if not source.exists():
        continue
      target_dir.mkdir(parents=True, exist_ok=True)
      target = target_dir / str(step)
      suffix = 1
      while target.exists():
        target = target_dir / f'{step}.{suffix}'
        suffix += 1
      source.rename(target)
      logging.warning(
        'Moved the unrestorable checkpoint %s to %s (kept, not deleted).',
        source,
        target,
      )
      moved.append(str(target))
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('cco_jax.checkpointing.set_aside')
  manager.reload()
  return moved
