"""Does the model decide from the object? Interventions and pixel influence.

Everything here is measured on a trained checkpoint, on one evaluation split,
with the foreground mask of each image at image resolution (`pixel_mask`,
`(..., S, S)`, 1 = the object, `trimap == 1` or `trimap != 2` as the model was
trained; the trimap's boundary ring counts as background otherwise).

Interventions (`PERTURBATIONS`), each a pure function of a batch:

  background_noise  every background pixel is replaced by Gaussian noise around
                    mid-grey, `clip(0.5 + noise_std * N(0, 1), 0, 1)` per pixel
                    and channel in [0, 1] pixel space; the noise of an example
                    depends only on `(seed, its position in the split)`.
  background_gray   every background pixel becomes flat grey 0.5.
  background_swap   the background comes from another image of the same split:
                    example p gets the pixels of donor q = `donor_positions`
                    (a fixed single cycle through the split, so q != p) at the
                    same coordinates wherever BOTH p's and q's masks are
                    background; where p is background but q shows its own
                    object, the pixel is flat grey (no second animal is pasted).
  foreground_gray   every object pixel becomes flat grey 0.5; the background is
                    untouched (a model that uses only the object falls to chance).

Grey and noise are defined in [0, 1] pixel space and mapped like the images
when `config.data.normalize` is set. Pixels on the untouched side are copied
exactly (`np.where`, no blending), so each intervention changes only its region.

For each intervention: `accuracy` and `flip_rate`, the share of examples whose
predicted class differs from the prediction on the clean image. A model that
ignores its input has flip rate 0 everywhere; one that looks only at the object
has flip rate 0 under every background intervention.

Relative foreground sensitivity (RFS): our reading of the paper draft's measure,
    RFS = flip(foreground_gray) / (flip(foreground_gray) + flip(background_gray)),
the share of the decision changes caused by removing the object among those
caused by removing the object or (equally, with the same grey) the background.
1 = only the object matters, 0 = only the background; None when neither flips.

Pixel influence (METHOD.md §8, `cco_jax.cams.pixel_influence`) per image on the
contrastive maps K of the true class at CAM resolution, with the training mask
`mask` `(h, w)`: `net = sum |K|`, `fg = sum m |K|`, `bg = sum (1 - m) |K|`. The
background share is reported two ways: `bg_share_mean`, the mean over images of
`bg / net`, and `bg_share_of_sums`, `sum bg / sum net` (what training logs as
`eval_bg_share`). The average influence map is the mean over images of
`sum_c |K| / sum_{h,w,c} |K|`, `(h, w)`, summing to 1.

`evaluate_checkpoint(workdir)` rebuilds the model from `workdir/config.json`,
restores the best checkpoint (by validation accuracy; the latest if none has
metrics) and returns all of the above, plus Cats-vs-Dogs accuracy for species
models, as a JSON-able dict. Evaluation runs on the host's local devices with
the pmapped `train_step.predict_step`; run it as a single process.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
import dataclasses
import json
import math
import os
from typing import Any

from absl import logging
import jax
import ml_collections
import numpy as np

from cco_jax import cams as cams_lib
from cco_jax import checkpointing
from cco_jax import data as input_pipeline
from cco_jax import models
from cco_jax import optimizers
from cco_jax import train
from cco_jax import train_step as step_lib
from cco_jax.data.sources import prepared_source  # noqa: F401
from cco_jax.data.sources import resolve_data_dir

GRAY = 0.5
DEFAULT_NOISE_STD = 0.25
DEFAULT_SEED = 0
EVALUATION_DIR = 'evaluation'
# Salt of the donor cycle of `background_swap`; fixed so results are comparable.
_DONOR_SALT = 0x5EED

Batch = dict[str, np.ndarray]
# images (..., S, S, 3) -> (logits (..., C), cams (..., h, w, C)), host arrays.
PredictFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


# ----------------------------------------------------------------------------
# Pixel-space helpers and the interventions.
# ----------------------------------------------------------------------------


def to_model_space(pixels: np.ndarray, *, normalize: bool) -> np.ndarray:
  """[0, 1] pixels `(..., 3)` -> the model's input space (ImageNet-normalised
  when `normalize`), float32."""
  pixels = np.asarray(pixels, np.float32)
  if normalize:
    return (pixels - input_pipeline.IMAGENET_MEAN) / input_pipeline.IMAGENET_STD
  return pixels


def to_pixel_space(images: np.ndarray, *, normalize: bool) -> np.ndarray:
  """Inverse of `to_model_space` (for display), float32 `(..., 3)`."""
  images = np.asarray(images, np.float32)
  if normalize:
    return images * input_pipeline.IMAGENET_STD + input_pipeline.IMAGENET_MEAN
  return images


def _check_images_and_mask(images: np.ndarray, pixel_mask: np.ndarray) -> None:
  if np.ndim(images) < 3 or np.shape(images)[-1] != 3:
    raise ValueError(
      f'images must be (..., S, S, 3); got shape {np.shape(images)}.'
    )
  if np.shape(pixel_mask) != np.shape(images)[:-1]:
    raise ValueError(
      f'pixel_mask must be (..., S, S) matching images {np.shape(images)}; got '
      f'{np.shape(pixel_mask)}. Use the `pixel_mask` of create_eval_iterator('
      '..., with_pixel_mask=True), not the CAM-resolution `mask`.'
    )


def replace_background(
  images: np.ndarray, pixel_mask: np.ndarray, fill: np.ndarray | float
) -> np.ndarray:
  """Object pixels of `images`, `fill` elsewhere.

  Args:
    images: `(..., S, S, 3)`.
    pixel_mask: `(..., S, S)`, 1 (> 0.5) = object.
    fill: anything broadcastable to `images` (a scalar, `(3,)`, a full image).

  Returns:
    float32 `(..., S, S, 3)`; object pixels are bit-identical to `images`.
  """
  _check_images_and_mask(images, pixel_mask)
  keep = np.asarray(pixel_mask)[..., None] > 0.5
  return np.where(keep, images, fill).astype(np.float32)


def replace_foreground(
  images: np.ndarray, pixel_mask: np.ndarray, fill: np.ndarray | float
) -> np.ndarray:
  """Background pixels of `images`, `fill` on the object (shapes as
  `replace_background`); background pixels are bit-identical."""
  _check_images_and_mask(images, pixel_mask)
  keep = np.asarray(pixel_mask)[..., None] <= 0.5
  return np.where(keep, images, fill).astype(np.float32)


def gray_fill(*, normalize: bool) -> np.ndarray:
  """`(3,)`: grey 0.5 in the model's input space."""
  return to_model_space(np.full(3, GRAY, np.float32), normalize=normalize)


def noise_fill(
  indices: np.ndarray,
  image_size: int,
  *,
  seed: int,
  std: float,
  normalize: bool,
) -> np.ndarray:
  """Gaussian noise images, one per example, seeded by its split position.

  Args:
    indices: `(...)` int positions in the split (-1 = padding).
    image_size: S.
    seed: the evaluation seed.
    std: standard deviation in [0, 1] pixel space (mean 0.5, clipped to [0, 1]).
    normalize: map to the ImageNet-normalised space.

  Returns:
    float32 `(..., S, S, 3)`.
  """
  indices = np.asarray(indices)
  flat = [
    np.random.default_rng([seed % 2**32, int(i) % 2**32]).standard_normal(
      (image_size, image_size, 3), np.float32
    )
    for i in indices.reshape(-1)
  ]
  noise = np.stack(flat).reshape(indices.shape + (image_size, image_size, 3))
  return to_model_space(
    np.clip(GRAY + std * noise, 0.0, 1.0), normalize=normalize
  )


def donor_positions(
  positions: np.ndarray, num_examples: int, *, seed: int
) -> np.ndarray:
  """The donor of each split position for `background_swap`.

  A seeded permutation `order` of `range(num_examples)` is read as one cycle:
  the donor of `order[k]` is `order[(k + 1) % num_examples]`. So the map is a
  permutation of the split with no fixed point (for `num_examples >= 2`), and
  it depends only on `(num_examples, seed)`, not on the batch size.

  Args:
    positions: `(...)` ints in `[0, num_examples)`; negative (padding) -> 0.
    num_examples: size of the split.
    seed: the evaluation seed.

  Returns:
    `(...)` int64 donor positions.
  """
  if num_examples < 1:
    raise ValueError(f'num_examples must be >= 1; got {num_examples}.')
  order = np.random.default_rng([seed % 2**32, _DONOR_SALT]).permutation(
    num_examples
  )
  donor_of = np.empty(num_examples, np.int64)
  donor_of[order] = np.roll(order, -1)
  return donor_of[np.clip(np.asarray(positions), 0, num_examples - 1)]


def swap_background(
  images: np.ndarray,
  pixel_mask: np.ndarray,
  donor_images: np.ndarray,
  donor_pixel_masks: np.ndarray,
  *,
  normalize: bool,
) -> np.ndarray:
  """The object of `images` on the background of `donor_images`.

  Output pixel = the image's own where its mask is 1; the donor's where both
  masks are 0; grey 0.5 where the image's mask is 0 and the donor's is 1.

  Args:
    images, donor_images: `(..., S, S, 3)`.
    pixel_mask, donor_pixel_masks: `(..., S, S)`, 1 = object.
    normalize: the images are ImageNet-normalised (for the grey).

  Returns:
    float32 `(..., S, S, 3)`.
  """
  _check_images_and_mask(donor_images, donor_pixel_masks)
  if np.shape(donor_images) != np.shape(images):
    raise ValueError(
      f'donor_images {np.shape(donor_images)} must match images '
      f'{np.shape(images)}.'
    )
  donor_bg = replace_foreground(
    donor_images, donor_pixel_masks, gray_fill(normalize=normalize)
  )
  return replace_background(images, pixel_mask, donor_bg)


@dataclasses.dataclass(frozen=True)
class Context:
  """What the interventions need besides the batch.

  Attributes:
    normalize: images are ImageNet-normalised (`config.data.normalize`).
    seed: seeds the noise and the donor cycle.
    noise_std: standard deviation of `background_noise` in pixel space.
    donors: `positions (...) -> (images (..., S, S, 3), pixel_masks (..., S, S))`
      of the donors of those split positions; None disables `background_swap`.
  """

  normalize: bool = False
  seed: int = DEFAULT_SEED
  noise_std: float = DEFAULT_NOISE_STD
  donors: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None


def _background_noise(batch: Batch, context: Context) -> np.ndarray:
  fill = noise_fill(
    batch['index'],
    batch['image'].shape[-2],
    seed=context.seed,
    std=context.noise_std,
    normalize=context.normalize,
  )
  return replace_background(batch['image'], batch['pixel_mask'], fill)


def _background_gray(batch: Batch, context: Context) -> np.ndarray:
  return replace_background(
    batch['image'], batch['pixel_mask'], gray_fill(normalize=context.normalize)
  )


def _background_swap(batch: Batch, context: Context) -> np.ndarray:
  if context.donors is None:
    raise ValueError(
      'background_swap needs Context.donors (a reader of the '
      'split by position); see `SplitReader`.'
    )
  donor_images, donor_masks = context.donors(batch['index'])
  return swap_background(
    batch['image'],
    batch['pixel_mask'],
    donor_images,
    donor_masks,
    normalize=context.normalize,
  )


def _foreground_gray(batch: Batch, context: Context) -> np.ndarray:
  return replace_foreground(
    batch['image'], batch['pixel_mask'], gray_fill(normalize=context.normalize)
  )


@dataclasses.dataclass(frozen=True)
class Perturbation:
  """An intervention: `apply(batch, context) -> images` on `region`."""

  region: str  # 'background' or 'foreground': the pixels it changes.
  apply: Callable[[Batch, Context], np.ndarray]


# The one place where interventions are registered.
PERTURBATIONS: Mapping[str, Perturbation] = {
  'background_noise': Perturbation('background', _background_noise),
  'background_gray': Perturbation('background', _background_gray),
  'background_swap': Perturbation('background', _background_swap),
  'foreground_gray': Perturbation('foreground', _foreground_gray),
}


# ----------------------------------------------------------------------------
# Per-batch quantities (pure, NumPy).
# ----------------------------------------------------------------------------


def flip_rate(
  clean_logits: np.ndarray, logits: np.ndarray, weight: np.ndarray | None = None
) -> float:
  """Weighted share of examples whose argmax differs: `(N, C)`, `(N, C)`, `(N,)`."""
  changed = np.argmax(clean_logits, -1) != np.argmax(logits, -1)
  weight = np.ones(changed.shape, np.float32) if weight is None else weight
  return float((weight * changed).sum() / max(float(weight.sum()), 1e-12))


def relative_foreground_sensitivity(
  flip_foreground: float, flip_background: float
) -> float | None:
  """`flip_fg / (flip_fg + flip_bg)`, None when both are 0 (module docstring)."""
  total = flip_foreground + flip_background
  return None if total <= 0 else flip_foreground / total


def pixel_influence(
  cams: np.ndarray, labels: np.ndarray, cam_mask: np.ndarray
) -> dict[str, np.ndarray]:
  """Per-image influence of the true class's contrastive maps.

  Args:
    cams: `(N, h, w, C)` HiResCAMs.
    labels: `(N,)` int true classes.
    cam_mask: `(N, h, w)` foreground in [0, 1] at CAM resolution.

  Returns:
    `(N,)` float64 arrays: `net`, `fg`, `bg` (`cco_jax.cams.pixel_influence`,
    `net == fg + bg`), `bg_share` = bg / net (NaN where net == 0), and `map`
    `(N, h, w)`: `sum_c |K|` normalised to sum to 1 (0 where net == 0).
  """
  contrastive = cams_lib.contrastive_cams(
    np.asarray(cams, np.float32), np.asarray(labels, np.int32)
  )
  influence = {
    k: np.asarray(v, np.float64)
    for k, v in cams_lib.pixel_influence(
      contrastive, np.asarray(cam_mask, np.float32)
    ).items()
  }
  magnitude = np.abs(np.asarray(contrastive, np.float64)).sum(-1)
  total = magnitude.sum((1, 2))
  with np.errstate(invalid='ignore', divide='ignore'):
    influence['bg_share'] = np.where(total > 0, influence['bg'] / total, np.nan)
    influence['map'] = np.where(
      total[:, None, None] > 0, magnitude / total[:, None, None], 0.0
    )
  return influence


def _log_softmax(logits: np.ndarray) -> np.ndarray:
  logits = np.asarray(logits, np.float64)
  shifted = logits - logits.max(-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


# ----------------------------------------------------------------------------
# Evaluating a stream of batches.
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class Evaluation:
  """What `evaluate_batches` returns.

  Attributes:
    report: JSON-able metrics (see `evaluate_batches`).
    influence_map: `(h, w)` average normalised influence (None without maps).
    mean_mask: `(h, w)` average CAM-resolution foreground mask.
    examples: the kept examples (`keep_positions`): `image`, `pixel_mask`,
      `mask`, `label`, `cams`, `prediction`, and per intervention
      `image_<name>` and `prediction_<name>` (host arrays, leading axis N).
  """

  report: dict
  influence_map: np.ndarray | None = None
  mean_mask: np.ndarray | None = None
  examples: dict = dataclasses.field(default_factory=dict)


class _Tally:
  """Weighted sums (scalars or arrays) accumulated over batches."""

  def __init__(self):
    self.sums: dict[str, Any] = {}

  def add(self, sums: Mapping[str, Any]) -> None:
    for key, value in sums.items():
      self.sums[key] = self.sums.get(key, 0.0) + value

  def get(self, key, default=0.0):
    return self.sums.get(key, default)


def _flat(x: np.ndarray, lead: int = 2) -> np.ndarray:
  """Merges the first `lead` axes (device, batch) into one."""
  x = np.asarray(x)
  return x.reshape((-1,) + x.shape[lead:])


def _clean_sums(
  logits: np.ndarray, labels: np.ndarray, weight: np.ndarray
) -> dict:
  """Weighted count, correct and cross-entropy: `(..., C)`, `(...)`, `(...)`."""
  ce = -np.take_along_axis(_log_softmax(logits), labels[..., None], -1)[..., 0]
  return {
    'count': weight.sum(),
    'correct': (weight * (np.argmax(logits, -1) == labels)).sum(),
    'ce': (weight * ce).sum(),
  }


def _influence_sums(
  cams: np.ndarray, labels: np.ndarray, cam_mask: np.ndarray, weight: np.ndarray
) -> dict:
  """Weighted sums of `pixel_influence` over a `(D, b, ...)` batch.

  `share`/`map` sum only over images with some influence (`share_count`);
  `mask` sums the CAM masks (for the average mask).
  """
  w = weight.reshape(-1)
  influence = pixel_influence(_flat(cams), labels.reshape(-1), _flat(cam_mask))
  valid = w * (influence['net'] > 0)
  return {
    **{k: (w * influence[k]).sum() for k in ('net', 'fg', 'bg')},
    'share': np.nansum(valid * influence['bg_share']),
    'share_count': valid.sum(),
    'map': np.tensordot(valid, influence['map'], 1),
    'mask': np.tensordot(w, _flat(cam_mask).astype(np.float64), 1),
  }


def _perturbation_sums(
  name: str,
  predictions: np.ndarray,
  clean: np.ndarray,
  labels: np.ndarray,
  weight: np.ndarray,
) -> dict:
  return {
    f'{name}/correct': (weight * (predictions == labels)).sum(),
    f'{name}/flips': (weight * (predictions != clean)).sum(),
  }


def _influence_report(
  tally: _Tally, count: float
) -> tuple[dict, np.ndarray, np.ndarray]:
  """(report['influence'], influence map `(h, w)`, mean mask `(h, w)`)."""
  share_count = float(tally.get('share_count'))
  net, bg = float(tally.get('net')), float(tally.get('bg'))
  influence_map = (
    tally.get('map') / share_count
    if share_count
    else np.zeros_like(tally.get('mask'))
  )
  report = {
    'net': net / count,
    'fg': float(tally.get('fg')) / count,
    'bg': bg / count,
    'bg_share_mean': float(tally.get('share')) / share_count
    if share_count
    else None,
    'bg_share_of_sums': bg / net if net > 0 else None,
    'num_images_without_influence': int(round(count - share_count)),
    'map': np.round(influence_map, 6).tolist(),
  }
  return report, influence_map, tally.get('mask') / count


def evaluate_batches(
  predict: PredictFn,
  batches: Iterable[Batch],
  *,
  perturbations: Mapping[str, Perturbation] | None = None,
  context: Context | None = None,
  positions: np.ndarray | None = None,
  with_influence: bool = True,
  keep_positions: np.ndarray | None = None,
) -> Evaluation:
  """Accuracy, interventions and pixel influence over evaluation batches.

  Args:
    predict: images `(D, b, S, S, 3)` -> (logits `(D, b, C)`, cams
      `(D, b, h, w, C)`), e.g. a pmapped `predict_step` bound to a state.
    batches: from `create_eval_iterator(..., with_pixel_mask=True)`: `image`,
      `pixel_mask`, `mask`, `label`, `weight`, `index`, each `(D, b, ...)`.
    perturbations: interventions to run (default: all of `PERTURBATIONS`;
      `{}` = clean accuracy only).
    context: see `Context`.
    positions: evaluate only these split positions (None = all); batches
      without any of them are skipped.
    with_influence: compute pixel influence and the average map.
    keep_positions: split positions whose arrays to keep (for figures).

  Returns:
    An `Evaluation` whose report holds `count`, `accuracy`, `ce`, one
    `{accuracy, flip_rate, region}` dict per intervention under
    `perturbations`, `relative_foreground_sensitivity` (when both grey
    interventions ran) and, when `with_influence`, `influence` (`net`, `fg`,
    `bg` means, `bg_share_mean`, `bg_share_of_sums`,
    `num_images_without_influence`, `map`).

  Raises:
    ValueError: no example was evaluated.
  """
  context = context or Context()
  perturbations = PERTURBATIONS if perturbations is None else perturbations
  tally = _Tally()
  kept: dict[str, list] = {}
  for batch in batches:
    index, labels = np.asarray(batch['index']), np.asarray(batch['label'])
    weight = np.asarray(batch['weight'], np.float64)
    if positions is not None:
      weight = weight * np.isin(index, positions)
      if not weight.any():
        continue
    logits, cams = (np.asarray(x) for x in predict(batch['image']))
    clean = np.argmax(logits, -1)
    tally.add(_clean_sums(logits, labels, weight))
    if with_influence:
      tally.add(_influence_sums(cams, labels, batch['mask'], weight))
    fields = {
      'image': batch['image'],
      'pixel_mask': batch['pixel_mask'],
      'mask': batch['mask'],
      'label': labels,
      'cams': cams,
      'prediction': clean,
    }
    for name, perturbation in perturbations.items():
      images = perturbation.apply(batch, context)
      predictions = np.argmax(np.asarray(predict(images)[0]), -1)
      tally.add(_perturbation_sums(name, predictions, clean, labels, weight))
      fields.update(
        {f'image_{name}': images, f'prediction_{name}': predictions}
      )
    if keep_positions is not None:
      chosen = (weight.reshape(-1) > 0) & np.isin(
        index.reshape(-1), keep_positions
      )
      for key, value in fields.items():
        kept.setdefault(key, []).extend(_flat(value)[chosen])
  count = float(tally.get('count'))
  if count <= 0:
    raise ValueError(
      'No example was evaluated: the split is empty or no '
      'position was selected (num_examples = 0?).'
    )
  report = {
    'count': int(round(count)),
    'accuracy': float(tally.get('correct')) / count,
    'ce': float(tally.get('ce')) / count,
    'perturbations': {
      name: {
        'accuracy': float(tally.get(f'{name}/correct')) / count,
        'flip_rate': float(tally.get(f'{name}/flips')) / count,
        'region': perturbation.region,
      }
      for name, perturbation in perturbations.items()
    },
  }
  flips = {k: v['flip_rate'] for k, v in report['perturbations'].items()}
  if 'foreground_gray' in flips and 'background_gray' in flips:
    report['relative_foreground_sensitivity'] = relative_foreground_sensitivity(
      flips['foreground_gray'], flips['background_gray']
    )
  evaluation = Evaluation(
    report=report, examples={k: np.stack(v) for k, v in kept.items() if v}
  )
  if with_influence:
    report['influence'], evaluation.influence_map, evaluation.mean_mask = (
      _influence_report(tally, count)
    )
  return evaluation


# ----------------------------------------------------------------------------
# A trained run: config, data locations, model, checkpoint.
# ----------------------------------------------------------------------------


def _lists_to_tuples(value):
  if isinstance(value, dict):
    return {k: _lists_to_tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_lists_to_tuples(v) for v in value)
  return value


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The training config saved in `workdir/config.json`.

  JSON has no tuples, so every list comes back as a tuple (as the config files
  write them, e.g. `model.stage_sizes`); `data` fields the file lacks (written
  by an older version) get `input_pipeline.default_config()` values.

  Raises:
    FileNotFoundError: `workdir/config.json` does not exist.
  """
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise FileNotFoundError(
      f'{path} does not exist: --workdir must be the directory of a training '
      'run (python -m experiments.pets --workdir=...), which writes it.'
    )
  with open(path) as f:
    raw = _lists_to_tuples(json.load(f))
  data = input_pipeline.default_config().to_dict()
  data.update(raw.get('data', {}))
  raw['data'] = data
  return ml_collections.ConfigDict(raw)


@dataclasses.dataclass
class LoadedRun:
  """A restored training run, ready to predict.

  Attributes:
    config: the run's config (with the evaluation's data overrides).
    workdir: the run's directory.
    state: the restored state, replicated over local devices.
    step: the restored step; `checkpoint` says 'best' or 'latest'.
    cam_size: `(h, w)` of the maps.
    predict: images `(D, b, S, S, 3)` -> host (logits, cams).
  """

  config: ml_collections.ConfigDict
  workdir: str
  state: Any
  step: int
  checkpoint: str
  cam_size: tuple[int, int]
  predict: PredictFn


def restore_run(
  workdir: str, config: ml_collections.ConfigDict | None = None
) -> LoadedRun:
  """Rebuilds the model of `workdir` and restores its best checkpoint.

  Best = `CheckpointManager.best_step()` (highest validation accuracy among
  kept checkpoints); when no checkpoint has metrics, the latest.

  Raises:
    FileNotFoundError: no config.json or no checkpoint.
  """
  config = load_config(workdir) if config is None else config
  if not os.path.isdir(os.path.join(workdir, 'checkpoints')):
    raise FileNotFoundError(
      f'{workdir}/checkpoints does not exist: train first '
      '(python -m experiments.pets --workdir=...).'
    )
  model = train.create_model(config, input_pipeline.num_classes(config.data))
  # Only the state's structure, shapes and dtypes matter (no initialisation is
  # compiled or run); the optimizer's step counts don't change its structure.
  tx = optimizers.create_optimizer(
    config.optimizer, 1, 1, config.accumulation_steps
  )
  rng = jax.random.key(0, impl=config.rng_impl or None)
  template = jax.eval_shape(
    lambda: step_lib.create_train_state(rng, model, config.data.image_size, tx)
  )
  manager = checkpointing.create_manager(workdir, config.keep_checkpoints)
  best = manager.best_step()
  step = best if best is not None else manager.latest_step()
  if step is None:
    raise FileNotFoundError(
      f'No checkpoint in {manager.directory}: train first.'
    )
  state, _, _, step = checkpointing.restore(manager, template, step)
  manager.close()
  state = step_lib.replicate(state)
  p_predict = jax.pmap(step_lib.predict_step)

  def predict(images):
    logits, cams = p_predict(
      state, step_lib.shard(np.asarray(images, np.float32))
    )
    return np.asarray(logits), np.asarray(cams)

  return LoadedRun(
    config=config,
    workdir=workdir,
    state=state,
    step=int(step),
    checkpoint='best' if best is not None else 'latest',
    cam_size=models.cam_size(model, config.data.image_size),
    predict=predict,
  )


class SplitReader:
  """Random access to a split's examples by position, as the eval pipeline
  renders them (`image` `(S, S, 3)`, `pixel_mask` `(S, S)`)."""

  def __init__(
    self,
    data_config: ml_collections.ConfigDict,
    split: str,
    *,
    cam_size: tuple[int, int],
  ):
    self._config = data_config
    self._cam_size = tuple(cam_size)
    self._source = input_pipeline.load_split_sources(data_config, [split])[
      split
    ]

  def __len__(self) -> int:
    return len(self._source)

  def example(self, position: int) -> dict:
    config = self._config
    decoded = input_pipeline.decode(
      self._source[int(position)],
      task=config.task,
      boundary_is_foreground=config.boundary_is_foreground,
      draft_size=config.image_size,
    )
    return input_pipeline.to_model_input(
      decoded,
      image_size=config.image_size,
      cam_size=self._cam_size,
      mask_resize=config.mask_resize,
      normalize=config.normalize,
      with_pixel_mask=True,
    )

  def donors(
    self, positions: np.ndarray, *, seed: int
  ) -> tuple[np.ndarray, np.ndarray]:
    """Donor images `(..., S, S, 3)` and pixel masks `(..., S, S)` of
    `positions` (`donor_positions`)."""
    positions = np.asarray(positions)
    donors = donor_positions(positions, len(self), seed=seed).reshape(-1)
    examples = [self.example(p) for p in donors]
    size = self._config.image_size
    images = np.stack([e['image'] for e in examples]).reshape(
      positions.shape + (size, size, 3)
    )
    masks = np.stack([e['pixel_mask'] for e in examples]).reshape(
      positions.shape + (size, size)
    )
    return images, masks


def subset_positions(total: int, num_examples: int | None) -> np.ndarray | None:
  """`num_examples` evenly spaced positions of a split of `total` (sorted int64),
  or None (= all) when `num_examples` is None or >= total.

  Evenly spaced, not the first ones: splits are stored in list order (Pets by
  breed, Cats-vs-Dogs all cats first), so a prefix would hold one class.
  """
  if num_examples is None or num_examples >= total:
    return None
  if num_examples < 0:
    raise ValueError(f'num_examples must be >= 0 or None; got {num_examples}.')
  return np.floor(
    np.arange(num_examples) * (total / max(num_examples, 1))
  ).astype(np.int64)


def _eval_batch_size(requested: int) -> int:
  """`requested` rounded up to a multiple of the local device count."""
  devices = jax.local_device_count()
  return max(devices, -(-requested // devices) * devices)


def evaluate_split(
  run: LoadedRun,
  data_config: ml_collections.ConfigDict,
  split: str,
  *,
  perturb: bool = True,
  with_influence: bool = True,
  num_examples: int | None = None,
  seed: int = DEFAULT_SEED,
  noise_std: float = DEFAULT_NOISE_STD,
  eval_batch_size: int | None = None,
  keep_examples: int = 0,
) -> Evaluation:
  """`evaluate_batches` on one split of `data_config` with `run`'s model."""
  batches = input_pipeline.create_eval_iterator(
    data_config,
    split,
    cam_size=run.cam_size,
    global_batch_size=_eval_batch_size(
      eval_batch_size or run.config.eval_batch_size
    ),
    num_devices=jax.local_device_count(),
    with_pixel_mask=True,
  )
  context = Context(
    normalize=data_config.normalize, seed=seed, noise_std=noise_std
  )
  total = input_pipeline.num_examples(data_config, split)
  positions = subset_positions(total, num_examples)
  evaluated = np.arange(total) if positions is None else positions
  chosen = subset_positions(len(evaluated), keep_examples)
  keep = evaluated if chosen is None else evaluated[chosen]
  if perturb:
    reader = SplitReader(data_config, split, cam_size=run.cam_size)
    context = dataclasses.replace(
      context, donors=lambda where: reader.donors(where, seed=seed)
    )
  return evaluate_batches(
    run.predict,
    batches,
    perturbations=None if perturb else {},
    context=context,
    positions=positions,
    with_influence=with_influence,
    keep_positions=keep if keep_examples else None,
  )


def _checkpoint_metrics(workdir: str, step: int) -> dict:
  """`eval_*` metrics logged at `step` in metrics.jsonl (empty if none)."""
  path = os.path.join(workdir, 'metrics.jsonl')
  found = {}
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        record = json.loads(line)
        if record.get('step') == step:
          found.update(
            {k: v for k, v in record.items() if k.startswith('eval_')}
          )
  return found


def _json_safe(value):
  if isinstance(value, dict):
    return {k: _json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_json_safe(v) for v in value]
  if isinstance(value, (np.floating, float)):
    return None if not math.isfinite(float(value)) else float(value)
  if isinstance(value, np.integer):
    return int(value)
  return value


@dataclasses.dataclass
class CheckpointEvaluation:
  """`run_checkpoint_evaluation`'s result: the report and the split's arrays."""

  report: dict
  evaluation: Evaluation
  class_names: tuple[str, ...]


def run_checkpoint_evaluation(
  workdir: str,
  *,
  split: str = 'test',
  manual_dir: str | None = None,
  ood_manual_dir: str | None = None,
  tfds_data_dir: str | None = None,
  ood_tfds_data_dir: str | None = None,
  num_examples: int | None = None,
  with_ood: bool = True,
  perturb: bool = True,
  seed: int = DEFAULT_SEED,
  noise_std: float = DEFAULT_NOISE_STD,
  eval_batch_size: int | None = None,
  keep_examples: int = 0,
) -> CheckpointEvaluation:
  """`evaluate_checkpoint`, also returning the arrays that figures need."""
  if jax.process_count() > 1:
    raise ValueError(
      'evaluate_checkpoint sums over one host only; run it as a '
      'single process (without --jax_distributed).'
    )
  config = load_config(workdir)
  data = config.data
  overrides = {
    'manual_dir': manual_dir,
    'ood_manual_dir': ood_manual_dir,
    'tfds_data_dir': tfds_data_dir,
  }
  data.update({k: v for k, v in overrides.items() if v is not None})
  scratch = os.path.join(workdir, EVALUATION_DIR)
  data.manual_dir, data.tfds_data_dir = resolve_data_dir(
    data.name, data.manual_dir, data.tfds_data_dir, scratch
  )
  run = restore_run(workdir, config)
  logging.info(
    'Evaluating %s at step %d (%s checkpoint) on %r.',
    workdir,
    run.step,
    run.checkpoint,
    split,
  )
  evaluation = evaluate_split(
    run,
    data,
    split,
    perturb=perturb,
    num_examples=num_examples,
    seed=seed,
    noise_std=noise_std,
    eval_batch_size=eval_batch_size,
    keep_examples=keep_examples,
  )
  report = {
    'workdir': os.path.abspath(workdir),
    'step': run.step,
    'checkpoint': run.checkpoint,
    'checkpoint_metrics': _checkpoint_metrics(workdir, run.step),
    'split': split,
    'num_examples_limit': num_examples,
    'seed': seed,
    'noise_std': noise_std,
    'task': data.task,
    'num_classes': input_pipeline.num_classes(data),
    'model': {
      'name': config.model.name,
      'cam_faithful': config.model.cam_faithful,
      'num_filters': config.model.num_filters,
      'image_size': data.image_size,
      'cam_size': list(run.cam_size),
    },
    'loss': config.loss.name,
    'data': {
      'manual_dir': data.manual_dir,
      'tfds_data_dir': data.tfds_data_dir,
    },
    **evaluation.report,
    'ood': None,
  }
  if with_ood and data.task == 'species':
    # The pipeline reads both datasets from `tfds_data_dir`: the OOD split gets
    # a config of its own whose data dir is resolved for Cats-vs-Dogs alone.
    ood = ml_collections.ConfigDict(data.to_dict())
    ood.ood_manual_dir, ood.tfds_data_dir = resolve_data_dir(
      input_pipeline.OOD_DATASET,
      ood.ood_manual_dir,
      ood_tfds_data_dir or data.tfds_data_dir,
      scratch,
    )
    result = evaluate_split(
      run,
      ood,
      'ood',
      perturb=False,
      with_influence=False,
      num_examples=num_examples,
      eval_batch_size=eval_batch_size,
    )
    report['ood'] = {
      'accuracy': result.report['accuracy'],
      'ce': result.report['ce'],
      'count': result.report['count'],
      'manual_dir': ood.ood_manual_dir,
      'tfds_data_dir': ood.tfds_data_dir,
    }
  return CheckpointEvaluation(
    report=_json_safe(report),
    evaluation=evaluation,
    class_names=input_pipeline.class_names(data),
  )


def evaluate_checkpoint(
  workdir: str,
  *,
  split: str = 'test',
  manual_dir: str | None = None,
  ood_manual_dir: str | None = None,
  tfds_data_dir: str | None = None,
  ood_tfds_data_dir: str | None = None,
  num_examples: int | None = None,
  with_ood: bool = True,
  perturb: bool = True,
  seed: int = DEFAULT_SEED,
  noise_std: float = DEFAULT_NOISE_STD,
  eval_batch_size: int | None = None,
) -> dict:
  """Evaluates the best checkpoint of a training run; returns a JSON-able report.

  Args:
    workdir: a training run's directory (config.json, checkpoints/).
    split: 'test', 'validation' or 'train' (unaugmented).
    manual_dir, ood_manual_dir, tfds_data_dir: override `config.data` (None =
      as trained). A data dir that already holds a dataset from another source
      is not touched: that dataset is prepared under
      `workdir/evaluation/tfds_<hash>` instead (`resolve_data_dir`).
    ood_tfds_data_dir: where to look for Cats-vs-Dogs first (None = the
      primary data dir); resolved as above.
    num_examples: only `num_examples` evenly spaced examples of the split
      (and of the OOD set; `subset_positions`); None = all.
    with_ood: also Cats-vs-Dogs accuracy (species models only).
    perturb: run the interventions (False: clean accuracy and influence only).
    seed, noise_std: of the interventions (module docstring).
    eval_batch_size: None = the run's, rounded up to a multiple of the devices.

  Returns:
    {workdir, step, checkpoint ('best'/'latest'), checkpoint_metrics, split,
    count, accuracy, ce, perturbations: {name: {accuracy, flip_rate, region}},
    relative_foreground_sensitivity, influence: {net, fg, bg, bg_share_mean,
    bg_share_of_sums, num_images_without_influence, map}, ood: {accuracy, ce,
    count, ...} or None, and the settings used}. NaNs become None.
  """
  return run_checkpoint_evaluation(
    workdir,
    split=split,
    manual_dir=manual_dir,
    ood_manual_dir=ood_manual_dir,
    tfds_data_dir=tfds_data_dir,
    ood_tfds_data_dir=ood_tfds_data_dir,
    num_examples=num_examples,
    with_ood=with_ood,
    perturb=perturb,
    seed=seed,
    noise_std=noise_std,
    eval_batch_size=eval_batch_size,
  ).report
