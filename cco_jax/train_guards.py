"""Guards of the training loop: stop a run before it saves a diverged state.

The loop calls them before anything is evaluated or saved:
`check_finite_steps` on the per-step non-finite flags of the train step,
`check_identity_error` on the logit-sum identity error (at the start and
after a restore), `check_evaluation` on each validation evaluation before its
checkpoint. They raise `NonFiniteLoss` or `IdentityViolation` with a message
naming the step and the cause; the loop adds the last good checkpoint
(`last_good_checkpoint`: the newest that restores and verifies).

The identity error is `max |sum_{h,w} M + b - s| / (max |s| + 1)`
(J. Setpal, "Crossing Cross-Entropy" (2024); docs/method.md), compared with
`config.identity_tolerance`, or where that is unset (None or <= 0) with
`cams.identity_tolerance(float32)`: the head computes in float32 whatever the
backbone's dtype (`models.CamHead`).
"""

from __future__ import annotations

from absl import logging
import jax.numpy as jnp
import ml_collections
import numpy as np

from cco_jax import cams
from cco_jax import checkpointing


class IdentityViolation(RuntimeError):
  """The model's maps no longer sum to its logits."""


class NonFiniteLoss(FloatingPointError):
  """A step produced a non-finite loss or gradient."""


def identity_tolerance(config: ml_collections.ConfigDict) -> float:
  """`config.identity_tolerance`, or the float32 head's bound where unset."""
  tolerance = config.identity_tolerance
  if tolerance is None or tolerance <= 0:
    return cams.identity_tolerance(jnp.float32)
  return float(tolerance)


def check_finite_steps(step_metrics: list[dict], first_step: int) -> None:
  """Raises `NonFiniteLoss` naming the first of steps first_step+1.. flagged.

  Args:
    step_metrics: per-step metrics of the pmapped train step; each has a
      replicated `nonfinite` flag of shape `(devices,)`.
    first_step: the step before the first of `step_metrics`.
  """
  for i, metrics in enumerate(step_metrics):
    if np.asarray(metrics['nonfinite'])[0] > 0:
      raise NonFiniteLoss(
        f'Non-finite loss or gradient at step {first_step + i + 1} (the '
        'train step kept the previous state).'
      )


def check_identity_error(error: float, tolerance: float, when: str) -> None:
  """Raises `IdentityViolation` unless `error <= tolerance` (NaN fails)."""
  if not error <= tolerance:
    raise IdentityViolation(
      f'The logit-sum identity fails {when}: max |sum(maps) + bias - logits| / '
      f'(max|logits| + 1) = {error:.3g} > identity_tolerance = '
      f'{tolerance:.3g}. The maps no longer explain the logits: '
      'check the head (pooling + dense only) and the compute dtype.'
    )


def check_evaluation(config, results: dict, step: int) -> None:
  """Stops before a checkpoint of a state whose evaluation is not sound."""
  bad = [k for k in ('ce', 'identity_error') if not np.isfinite(results[k])]
  if bad:
    raise NonFiniteLoss(
      f'The validation {" and ".join(bad)} at step {step} is not finite '
      f'({", ".join(f"{k}={results[k]}" for k in bad)}): the model diverged.'
    )
  tolerance = identity_tolerance(config)
  if results['identity_error'] > tolerance:
    raise IdentityViolation(
      f'The logit-sum identity fails at step {step}: max relative error '
      f'{results["identity_error"]:.3g} > identity_tolerance = '
      f'{tolerance:.3g} on the validation split; the '
      'parameters have grown out of float precision (the model diverged).'
    )


def last_good_checkpoint(manager, template_state) -> str:
  """The newest checkpoint that restores and verifies its checksums, in words.

  Waits for a background save first; reads (and verifies) the checkpoints
  newest first, so a corrupt one is never named as good.

  Args:
    manager: the run's `orbax.checkpoint.CheckpointManager`.
    template_state: an unreplicated state of the checkpoints' structure.
  """
  try:
    checkpointing.wait(manager)
  except OSError as e:
    logging.error('%s', e)
  try:
    restored = checkpointing.restore_newest(manager, template_state)
  except FileNotFoundError:
    return (
      f'No checkpoint was saved in {manager.directory} before it, so there '
      'is no good state to resume from.'
    )
  except ValueError as e:
    return f'No good state to resume from: {e}'
  skipped = ''
  if restored.unrestorable:
    skipped = (
      f' Newer steps {sorted(restored.unrestorable)} do not restore (they '
      'will be set aside when the run starts again).'
    )
  return (
    f'The last good checkpoint is step {restored.step} in {manager.directory} '
    f'(it restores and its checksums verify; nothing after it was saved).'
    f'{skipped}'
  )
