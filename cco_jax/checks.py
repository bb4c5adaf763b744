"""Boundary checks with error messages that name the shapes and the fix.

Shape checks are static: under `jit` they run once, while tracing. Value checks
(labels in range, masks in [0, 1]) need concrete arrays and are skipped for
tracers, so none of this adds work to compiled code.
"""

from __future__ import annotations

import jax
import numpy as np


def _is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def check_rank(x, rank: int, name: str, layout: str) -> None:
  """Raises if `x` does not have `rank` dimensions (`layout` names them)."""
  if np.ndim(x) != rank:
    raise ValueError(
      f'{name} must have rank {rank} with layout {layout}; got shape '
      f'{np.shape(x)}.'
    )


def check_labels(
  labels, num_classes: int, batch: int, name: str = 'labels'
) -> None:
  """Raises unless `labels` is an integer `(batch,)` array in `[0, num_classes)`."""
  check_rank(labels, 1, name, '(B,)')
  if labels.shape[0] != batch:
    raise ValueError(
      f'{name} has batch size {labels.shape[0]} (shape {labels.shape}) but the '
      f'maps/logits have batch size {batch}.'
    )
  if not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(
      f'{name} must be integer class indices, got dtype {labels.dtype}; pass '
      'class ids, not one-hot vectors.'
    )
  if _is_concrete(labels) and labels.size:
    # On a host copy: np.min(jax_array) calls jax_array.min(), which a jit trace
    # stages even for a concrete array closed over by the traced function.
    values = np.asarray(labels)
    lo, hi = int(values.min()), int(values.max())
    if lo < 0 or hi >= num_classes:
      raise ValueError(
        f'{name} must lie in [0, {num_classes}) for {num_classes} classes; got '
        f'values in [{lo}, {hi}]. Check the task (species vs breed) and '
        'num_classes of the model.'
      )


def check_cams_and_labels(cams, labels) -> None:
  """Checks `(B, H, W, C)` maps against `(B,)` labels."""
  check_rank(cams, 4, 'cams', '(B, H, W, C)')
  check_labels(labels, cams.shape[-1], cams.shape[0])


def check_cams_and_mask(cams, fg_mask, name: str = 'fg_mask') -> None:
  """Checks that a `(B, H, W)` mask matches the maps' batch and resolution."""
  check_rank(cams, 4, 'cams', '(B, H, W, C)')
  check_rank(fg_mask, 3, name, '(B, H, W)')
  if tuple(fg_mask.shape) != tuple(cams.shape[:3]):
    raise ValueError(
      f'{name} has shape {tuple(fg_mask.shape)} but the maps have shape '
      f'{tuple(cams.shape)}: the mask must be (B, H, W) = '
      f'{tuple(cams.shape[:3])}, at the CAM resolution, not the image '
      'resolution. Resize it to the CAM grid (input_pipeline does this when '
      "given the model's cam_size)."
    )
  if _is_concrete(fg_mask) and fg_mask.size:
    values = np.asarray(fg_mask)  # host copy, as in check_labels
    lo, hi = float(values.min()), float(values.max())
    if lo < 0 or hi > 1:
      raise ValueError(
        f'{name} values must lie in [0, 1] (1 = object); got [{lo}, {hi}]. '
        'Convert trimaps to a binary or soft foreground mask first.'
      )


def check_logits_and_labels(logits, labels) -> None:
  """Checks `(B, C)` logits against `(B,)` labels."""
  check_rank(logits, 2, 'logits', '(B, C)')
  check_labels(labels, logits.shape[-1], logits.shape[0])


def check_same_shape(a, b, name_a: str, name_b: str) -> None:
  """Raises if two arrays differ in shape."""
  if tuple(np.shape(a)) != tuple(np.shape(b)):
    raise ValueError(
      f'{name_a} has shape {tuple(np.shape(a))} but {name_b} has shape '
      f'{tuple(np.shape(b))}; they must match.'
    )
