"""JPEG draft decoding: the draft size for a fraction of the target side, and
how far a draft decode's squashed image lies from the full decode's.

Used by the input benchmark (`input_pipeline --draft_fractions`) and its test;
a module without flags, so that tests can import it beside other benchmarks.
"""

from __future__ import annotations

import numpy as np

from cco_jax import data as data_lib


def draft_size(image_size: int, fraction: float) -> int | None:
  """The `draft_size` of `transforms.decode` for a fraction of the target
  side (None for 0: no draft)."""
  return max(1, round(image_size * fraction)) if fraction else None


def draft_difference(
  records, image_size: int, fraction: float, task: str = 'species'
) -> dict:
  """How far the squashed image of a JPEG draft decode lies from the full
  decode's: per image the mean |difference| over (S, S, 3) in [0, 1] units;
  returns their mean and maximum and how many images the draft reduced.

  `records`: `transforms.decode` inputs (encoded 'image' bytes, labels,
  'index', 'file_name').
  """
  diffs, reduced = [], 0

  def final(record, size):
    example = data_lib.decode(
      record, task=task, boundary_is_foreground=False, draft_size=size
    )
    squashed = data_lib.to_model_input(
      example,
      image_size=image_size,
      cam_size=(1, 1),
      mask_resize='nearest',
      normalize=False,
      with_pixel_mask=False,
    )
    return example['image'].size, squashed['image']

  for record in records:
    full_size, full = final(record, None)
    size, drafted = final(record, draft_size(image_size, fraction))
    reduced += size != full_size
    diffs.append(float(np.abs(drafted - full).mean()))
  return {
    'fraction': fraction,
    'images': len(diffs),
    'reduced_by_the_draft': reduced,
    'mean_abs_difference': float(np.mean(diffs)),
    'max_image_mean_abs_difference': float(np.max(diffs)),
  }
