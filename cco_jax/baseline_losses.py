"""Losses of the field's baselines for spurious correlations, and ACE's SWD.

Each is a small pure function in the style of `cco_jax.losses`: arrays in,
per-example values `(B,)` out (callers reduce), options by keyword, shapes in
the docstring. `cco_jax.objectives` builds the objectives from them; the
supervision each needs:

  input_gradient_penalty  (rrr)            foreground masks at image resolution
  background_cam_penalty  (ce_bg_cam)      foreground masks at map resolution
  group_dro_loss          (group_dro)      group ids
  reweighted_cross_entropy (ce_reweighted) group ids and training group counts
  sliced_wasserstein      (ace_swd)        foreground masks at map resolution

Notation as in `cco_jax.losses`: `M` HiResCAMs `(B, H, W, C)`, `K_c = M_y - M_c`
the contrastive maps, `m` a foreground mask in [0, 1] (1 = object).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cco_jax import cams as cams_lib
from cco_jax import checks

Array = jax.Array


def log_probability_sum(logits: Array) -> Array:
  """`sum_c log softmax(logits)_c`, the score whose input gradient RRR limits.

  Args:
    logits: `(B, C)`.

  Returns:
    `(B,)`.
  """
  return jax.nn.log_softmax(logits, axis=-1).sum(-1)


def input_gradient_penalty(input_grads: Array, pixel_mask: Array) -> Array:
  """Right-for-the-right-reasons penalty (Ross, Hughes, Doshi-Velez 2017).

  `R = sum_{s,t,k} ((1 - m_st) dS/dx_stk)^2` with `S = sum_c log p_c` (see
  `log_probability_sum`): the squared input gradient outside the object. Ross
  et al. write it with an annotation `A = 1` on irrelevant inputs; here
  `A = 1 - m`. The `rrr` objective is `CE + rrr_weight * R`; training through it
  differentiates the input gradient again (a double backward).

  Args:
    input_grads: `(B, S, S, 3)` gradients of `S` with respect to the images.
    pixel_mask: `(B, S, S)` foreground mask at image resolution, in [0, 1].

  Returns:
    `(B,)` per-example penalties.
  """
  checks.check_rank(input_grads, 4, 'input_grads', '(B, S, S, 3)')
  if tuple(pixel_mask.shape) != tuple(input_grads.shape[:-1]):
    raise ValueError(
      f'pixel_mask has shape {tuple(pixel_mask.shape)}; expected '
      f'{tuple(input_grads.shape[:-1])} (the images without channels). Set '
      'data.pixel_masks=True so batches carry masks at image resolution.'
    )
  outside = (1 - pixel_mask.astype(input_grads.dtype))[..., None]
  return jnp.square(outside * input_grads).sum((1, 2, 3))


def background_cam_penalty(cams: Array, labels: Array, fg_mask: Array) -> Array:
  """L1 norm of the target class's map outside the object.

  `P = sum_{h,w} |(1 - m) M_y|`, the "penalise the explanation outside the
  mask" family (e.g. Rieger et al. 2020, Zhang et al. 2018's CAM losses), here on
  the exact map `M_y` whose pixels sum to the logit. The `ce_bg_cam` objective
  is `CE + bg_cam_weight * P`.

  Args:
    cams: `(B, H, W, C)` HiResCAMs.
    labels: `(B,)` integer targets.
    fg_mask: `(B, H, W)` foreground mask in [0, 1].

  Returns:
    `(B,)` per-example penalties.
  """
  checks.check_cams_and_mask(cams, fg_mask)
  target = jnp.take_along_axis(cams, labels[:, None, None, None], axis=-1)
  outside = 1 - fg_mask.astype(cams.dtype)
  return jnp.abs(outside * target[..., 0]).sum((1, 2))


def inverse_frequency_weights(group_counts: Sequence[int]) -> np.ndarray:
  """Per-group weights `w_g = n / (G' n_g)`, 0 for groups absent in training.

  `n = sum_g n_g`, `G'` the number of groups with `n_g > 0`. The mean weight
  over the training set is then 1, and a batch mean of `w_g CE` estimates the
  group-balanced loss `(1/G') sum_g E[CE | g]`.

  Args:
    group_counts: training examples per group, `(G,)` non-negative integers.

  Returns:
    `(G,)` float32 weights.
  """
  counts = np.asarray(group_counts, np.float64)
  if counts.ndim != 1 or counts.size == 0 or (counts < 0).any():
    raise ValueError(
      f'loss.group_counts must be a non-empty list of training examples per '
      f'group (>= 0); got {list(np.ravel(group_counts))}. Use the group '
      'counts of the training split.'
    )
  if counts.sum() == 0:
    raise ValueError('loss.group_counts are all 0; no group has examples.')
  present = counts > 0
  weights = np.where(
    present, counts.sum() / (present.sum() * np.maximum(counts, 1)), 0.0
  )
  return weights.astype(np.float32)


def reweighted_cross_entropy(
  logits: Array, labels: Array, groups: Array, group_weights: Array
) -> Array:
  """Cross-entropy with each example weighted by its group's weight.

  `w_{g_i} CE_i`, with `w = inverse_frequency_weights(counts)` for the
  `ce_reweighted` objective (importance weighting to a group-balanced training
  distribution, as in Sagawa et al. 2020's reweighting baseline).

  Args:
    logits: `(B, C)`.
    labels: `(B,)` integer targets.
    groups: `(B,)` integer group ids in `[0, G)`.
    group_weights: `(G,)` per-group weights.

  Returns:
    `(B,)` weighted per-example losses.
  """
  checks.check_logits_and_labels(logits, labels)
  log_p = jax.nn.log_softmax(logits, axis=-1)
  ce = -jnp.take_along_axis(log_p, labels[:, None], axis=-1)[:, 0]
  return jnp.asarray(group_weights, logits.dtype)[groups] * ce


def group_dro_loss(
  per_example: Array,
  groups: Array,
  group_weights: Array,
  step_size: float,
  axis_name: str | None = None,
) -> tuple[Array, Array, Array]:
  """Online Group DRO: one exponentiated-gradient step on the group weights.

  Sagawa, Koh, Hashimoto, Liang, "Distributionally Robust Neural Networks for
  Group Shifts" (ICLR 2020), Algorithm 1. With `L_g` the mean loss of group `g`
  in the (global) batch (0 for a group absent from it):

    q'_g = q_g exp(step_size L_g) / sum_k q_k exp(step_size L_k)
    loss = sum_g q'_g L_g        (q' carries no gradient)

  Under `pmap` the group sums and counts are summed over `axis_name`, so every
  replica computes the same `L` and `q'`; the returned local loss is scaled so
  that its mean over the axis is `sum_g q'_g L_g` (and so is its mean gradient).

  Args:
    per_example: `(b,)` per-example losses of this shard (e.g. CE).
    groups: `(b,)` integer group ids in `[0, G)`.
    group_weights: `(G,)` current weights `q` (a distribution).
    step_size: `eta` of the exponentiated-gradient step.
    axis_name: the mapped axis, or None on one device.

  Returns:
    `(loss, q', L)`: the scalar robust loss of this shard, the new weights `(G,)`
    and the group losses `(G,)` (no gradient).
  """
  num_groups = group_weights.shape[0]
  onehot = jax.nn.one_hot(groups, num_groups, dtype=per_example.dtype)
  sums = onehot.T @ per_example
  counts = onehot.sum(0)
  replicas = 1
  global_sums = jax.lax.stop_gradient(sums)
  if axis_name is not None:
    counts = jax.lax.psum(counts, axis_name)
    global_sums = jax.lax.psum(global_sums, axis_name)
    replicas = jax.lax.psum(1, axis_name)
  safe_counts = jnp.maximum(counts, 1)
  group_losses = global_sums / safe_counts
  logits = jnp.log(group_weights) + step_size * group_losses
  new_weights = jax.nn.softmax(logits)
  loss = replicas * (new_weights * sums / safe_counts).sum()
  return loss, new_weights, group_losses


def random_directions(rng: Array, num_directions: int, dims: int) -> Array:
  """`(num_directions, dims)` directions uniform on the unit sphere."""
  directions = jax.random.normal(rng, (num_directions, dims), jnp.float32)
  return directions / jnp.linalg.norm(directions, axis=1, keepdims=True)


def sliced_wasserstein(
  cams: Array,
  labels: Array,
  fg_mask: Array,
  directions: Array,
  target_scale: float = 5.0,
  spatial_scale: float = 10.0,
) -> Array:
  """Sliced-Wasserstein divergence of the contrastive maps from the mask.

  The `sliced_wasserstein` divergence of J. Setpal's contrastive-optimization
  code (`src/model/loss.py`), written anew. Each of the `N = HW` pixels is a
  point in `R^C`: the non-target contrasts `(K_c)_{c != y}` and a spatial
  coordinate `s m`. The target puts `t m / sum m` on every contrast
  coordinate (same spatial coordinate). For each direction `(u, 1)`, `u` a unit
  vector of `R^{C-1}` (a row of `directions`), both point clouds are projected
  and sorted (1-D optimal transport, equal weights), `D = target - map`, and

    f(D) = D                   D >= 0 (under-activation)
           sqrt(1 + |D|) - 1   D < 0, target value != 0 (over-activation)
           |D|                 D < 0, target value == 0 (background)

  averaged over directions and pixels. An empty mask gives an all-zero target.

  Args:
    cams: `(B, H, W, C)` HiResCAMs, `C >= 2`.
    labels: `(B,)` integer targets.
    fg_mask: `(B, H, W)` foreground mask in [0, 1].
    directions: `(D, C - 1)` unit directions (`random_directions`).
    target_scale: `t`, the target contrast mass per image.
    spatial_scale: `s`, the weight of the spatial coordinate.

  Returns:
    `(B,)` per-example divergences.
  """
  checks.check_cams_and_mask(cams, fg_mask)
  batch, height, width, num_classes = cams.shape
  if directions.ndim != 2 or directions.shape[1] != num_classes - 1:
    raise ValueError(
      f'directions has shape {tuple(directions.shape)}; expected (D, C - 1) '
      f'= (D, {num_classes - 1}) for cams {tuple(cams.shape)}.'
    )
  contrastive = cams_lib.contrastive_cams(cams, labels)
  # The C - 1 non-target channels, in class order: c + [c >= y].
  others = jnp.arange(num_classes - 1)[None, :]
  others = others + (others >= labels[:, None])
  flat = contrastive.reshape(batch, height * width, num_classes)
  flat = jnp.take_along_axis(flat, others[:, None, :], axis=2)
  mask = fg_mask.astype(cams.dtype).reshape(batch, height * width)
  directions = directions.astype(cams.dtype)
  spatial = spatial_scale * mask[:, None, :]
  mass = target_scale * mask / jnp.maximum(mask.sum(1, keepdims=True), 1e-12)
  target = mass[:, None, :] * directions.sum(1)[None, :, None] + spatial
  projected = jnp.einsum('bnk,dk->bdn', flat, directions) + spatial
  target = jnp.sort(target, axis=2)
  gap = target - jnp.sort(projected, axis=2)
  over = jnp.where(target != 0, jnp.sqrt(1 + jnp.abs(gap)) - 1, -gap)
  return jnp.where(gap >= 0, gap, over).mean((1, 2))
