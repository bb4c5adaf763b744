"""The evaluation iterator: one pass over a split, every example exactly once
across all hosts, padded to whole batches (padding has weight 0).

Examples are decoded as in training (`pipeline.Decoded`, the same draft rule)
and finished on the host (float32 images, CAM masks on the grid, optional
pixel masks and file names), batched as (num_devices, per_device_batch, ...).
"""

from __future__ import annotations

from collections.abc import Iterator
import dataclasses
import functools

import grain
import ml_collections
import numpy as np

from cco_jax import errors
from cco_jax.data import batching
from cco_jax.data import pipeline
from cco_jax.data import transforms
from cco_jax.data.sources import SplitSource
from cco_jax.data.sources import load_split_sources

Batch = batching.Batch
Example = transforms.Example


@dataclasses.dataclass(frozen=True)
class _Padded:
  """A host's share of a split, padded with placeholders (a Grain source)."""

  decoded: pipeline.Decoded
  positions: np.ndarray  # int64 (P,): position in the split, -1 = padding.

  def __len__(self) -> int:
    return len(self.positions)

  def __getitem__(self, i: int) -> Example:
    position = int(self.positions[i])
    return {'padding': True} if position < 0 else self.decoded[position]


def _eval_example(
  example: Example,
  *,
  data_config: ml_collections.ConfigDict,
  cam_size: tuple[int, int],
  with_pixel_mask: bool,
  num_targets: int = 0,
) -> Example:
  size = data_config.image_size
  if example.get('padding'):
    out = {
      'image': np.zeros((size, size, 3), np.float32),
      'mask': np.zeros(cam_size, np.float32),
      'label': np.int32(0),
      'index': np.int32(-1),
      'group': np.int32(0),
      'file_name': '',
      'weight': np.float32(0),
    }
    if with_pixel_mask:
      out['pixel_mask'] = np.zeros((size, size), np.float32)
    if num_targets:
      out['targets'] = np.zeros((num_targets,), np.float32)
    return out
  out = transforms.to_model_input(
    example,
    image_size=size,
    cam_size=cam_size,
    mask_resize=data_config.mask_resize,
    normalize=data_config.normalize,
    with_pixel_mask=with_pixel_mask,
  )
  out['weight'] = np.float32(1)
  return out


def create_eval_iterator(
  data_config: ml_collections.ConfigDict,
  split: str,
  *,
  cam_size: tuple[int, int],
  global_batch_size: int,
  num_devices: int,
  process_index: int = 0,
  process_count: int = 1,
  with_pixel_mask: bool = False,
  with_file_name: bool = False,
  source: SplitSource | None = None,
) -> Iterator[Batch]:
  """One pass over a split, every example exactly once across all hosts.

  Args:
    data_config: `config.data` (`cco_jax.data.config`).
    split: 'train' (unaugmented), 'validation', 'test' or 'ood'.
    cam_size: (h, w) of the CAM grid.
    global_batch_size: examples per step over all hosts and devices.
    num_devices: local devices D of this host.
    process_index: this host; it reads positions process_index::process_count.
    process_count: number of hosts.
    with_pixel_mask: also yield 'pixel_mask' float32 (D, b, S, S), the
      foreground at image resolution (nearest), empty ones left empty.
    with_file_name: also yield 'file_name', a str array (D, b) ('' = padding);
      drop it before handing the batch to jax.
    source: the split, already open (`load_split_sources`); None opens it.

  Returns:
    An iterator of {'image': float32 (D, b, S, S, 3), 'mask': float32
    (D, b, h, w), 'label': int32 (D, b), 'group': int32 (D, b), 'weight':
    float32 (D, b) (1 = real example, 0 = padding), 'index': int32 (D, b)
    (position in the split, -1 = padding)}, with the optional keys above
    and, for multi-label data, 'targets' float32 (D, b, C) (multi-hot).
    Padding examples are zeros.

  Raises:
    ValueError: indivisible batch size, an empty split or a bad config.
  """
  cam_size = batching.check_cam_size(cam_size)
  per_device = batching.per_device_batch_size(
    global_batch_size, num_devices, process_count
  )
  if source is None:
    source = load_split_sources(data_config, [split])[split]
  if not len(source):
    raise errors.UserError(
      f'Split {split!r} is empty (validation_fraction='
      f'{data_config.validation_fraction}).'
    )
  positions = batching.eval_positions(
    len(source),
    per_host_batch=per_device * num_devices,
    process_index=process_index,
    process_count=process_count,
  )
  decoded = pipeline.Decoded(
    source,
    data_config.task,
    data_config.boundary_is_foreground,
    draft_size=pipeline.draft_size(data_config, training=False),
  )
  keys = ('image', 'mask', 'label', 'group', 'weight', 'index')
  keys += ('pixel_mask',) * with_pixel_mask + ('file_name',) * with_file_name
  num_targets = 0 if source.targets is None else source.targets.shape[1]
  keys += ('targets',) * (num_targets > 0)
  batches = (
    grain.MapDataset.source(_Padded(decoded, positions))
    .map(
      functools.partial(
        _eval_example,
        data_config=data_config,
        cam_size=cam_size,
        with_pixel_mask=with_pixel_mask,
        num_targets=num_targets,
      )
    )
    .batch(
      per_device * num_devices,
      batch_fn=functools.partial(
        batching.stack_for_devices, num_devices=num_devices, keys=keys
      ),
    )
  )
  return batching.iterate(
    batches, data_config.num_workers, data_config.prefetch
  )
