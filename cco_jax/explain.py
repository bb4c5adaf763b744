"""Explanations for any image: the exact per-pixel answer to "why this class?".

For a model of `cco_jax.models` (global average pooling + dense head), the
logit of class `c` splits exactly into a HiResCAM and the head's bias
(docs/method.md, "the logit-sum identity"):

    s_c = sum_{h,w} M[h,w,c] + b_c,     M = einsum('hwf,fc->hwc', A, W) / (H W).

`Explainer(model, variables).explain(images)` runs ONE jitted forward pass per
batch and returns, per image, the logits, every class's map `M` and its sum,
the contrastive maps `K[..., c] = M[..., t] - M[..., c]` against the predicted
(or a given) class `t`, and the identity error `max_c |sum M + b - s|`; with a
foreground mask, the fg/bg split of `sum |K|` (`cco_jax.cams.pixel_influence`).
Images are `(B, S, S, 3)` arrays in the model's input space, or file paths,
which get the evaluation preprocessing (decode to RGB, squash to `S x S`
bilinearly, scale to [0, 1], ImageNet-normalise when the run did).

Channel-level decomposition (`Explainer.channels`): the map of class `c` is a
sum over feature channels `f` of `A[h,w,f] W[f,c] / (H W)`; the top-k channels
by |contribution| come with their own maps and the remainder, and the k maps
plus the remainder sum exactly to the class map.

Everything runs on one device (no pmap shapes); `Explainer.from_workdir`
restores a trained model (`cco_jax.restore`) and reads its run record (image
size, normalisation, classes); files are read by `cco_jax.data.transforms`.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import functools
import os

import flax.linen as nn
import jax
import numpy as np
from PIL import Image
import scipy.special

from cco_jax import cams as cams_lib
from cco_jax import head_features
from cco_jax import restore
from cco_jax.data import config as data_config
from cco_jax.data import transforms

DEFAULT_BATCH_SIZE = 32


# ----------------------------------------------------------------------------
# Inputs: model-space arrays (files are read by `cco_jax.data.transforms`).
# ----------------------------------------------------------------------------


def to_model_space(pixels: np.ndarray, *, normalize: bool) -> np.ndarray:
  """[0, 1] pixels `(..., 3)` -> the model's input space, float32."""
  pixels = np.asarray(pixels, np.float32)
  if normalize:
    return (pixels - data_config.IMAGENET_MEAN) / data_config.IMAGENET_STD
  return pixels


def to_pixel_space(images: np.ndarray, *, normalize: bool) -> np.ndarray:
  """Inverse of `to_model_space` (for display), float32 `(..., 3)`."""
  images = np.asarray(images, np.float32)
  if normalize:
    return images * data_config.IMAGENET_STD + data_config.IMAGENET_MEAN
  return images


def mask_to_cam_grid(masks: np.ndarray, cam_size: tuple[int, int]):
  """`(B, S, S)` masks -> `(B, h, w)` fraction of object pixels per cell."""
  masks = np.asarray(masks, np.float32)
  if masks.shape[1:] == tuple(cam_size):
    return masks
  return np.stack(
    [
      transforms.resize(
        Image.fromarray(m, mode='F'), cam_size, Image.Resampling.BOX
      )
      for m in masks
    ]
  ).astype(np.float32)


@dataclasses.dataclass
class Explanation:
  """What `Explainer.explain` returns; host arrays, leading axis B.

  Attributes:
    logits: `(B, C)`.
    probabilities: `(B, C)` as the objective read the logits: their softmax,
      or for a sigmoid head (`bce`, `ace_bce`) each class's own sigmoid.
    predicted: `(B,)` argmax class.
    target: `(B,)` the class the contrastive maps are taken against.
    bias: `(C,)` the head bias (zeros for a bias-free head).
    cams: `(B, h, w, C)` every class's HiResCAM.
    map_sums: `(B, C)` `cams.sum((1, 2))`.
    contrastive: `(B, h, w, C)` `cams[..., target] - cams`.
    identity_error: `(B,)` `max_c |map_sums + bias - logits|`.
    images: `(B, S, S, 3)` model inputs.
    paths: the file of each image (None for arrays).
    influence: with masks: `net`, `fg`, `bg`, `bg_share`, each `(B,)`, of
      `sum_c |contrastive|` (`cams.pixel_influence`); else None.
    cam_masks: with masks: `(B, h, w)` masks on the CAM grid; else None.
  """

  logits: np.ndarray
  probabilities: np.ndarray
  predicted: np.ndarray
  target: np.ndarray
  bias: np.ndarray
  cams: np.ndarray
  map_sums: np.ndarray
  contrastive: np.ndarray
  identity_error: np.ndarray
  images: np.ndarray
  paths: list | None = None
  influence: dict | None = None
  cam_masks: np.ndarray | None = None


@dataclasses.dataclass
class ChannelDecomposition:
  """A class map split over feature channels; host arrays, leading axis B.

  `maps.sum(-1) + rest == class_map` (up to float rounding).

  Attributes:
    channels: `(B, k)` channel indices, by decreasing |contribution|.
    contributions: `(B, k)` each channel's share of the logit, `maps.sum((1, 2))`.
    maps: `(B, h, w, k)` per-channel maps `A[..., f] w_f / (H W)`.
    rest: `(B, h, w)` the sum of the other channels' maps.
    class_map: `(B, h, w)` the full map (a HiResCAM, or a contrastive map).
  """

  channels: np.ndarray
  contributions: np.ndarray
  maps: np.ndarray
  rest: np.ndarray
  class_map: np.ndarray


def softmax(logits: np.ndarray) -> np.ndarray:
  """float64 softmax over the last axis of host logits `(..., C)` (computed in
  float64, `scipy.special.softmax`)."""
  return scipy.special.softmax(np.asarray(logits, np.float64), axis=-1)


def probabilities(logits: np.ndarray, head: str = 'softmax') -> np.ndarray:
  """float64 class probabilities of host logits `(..., C)`: `softmax` over
  the classes, or `sigmoid` per class (independent heads: they need not sum
  to one)."""
  if head == 'sigmoid':
    return scipy.special.expit(np.asarray(logits, np.float64))
  return softmax(logits)


def _registry_head(loss_name: str) -> str:
  """How objective `loss_name` reads the logits, for run records written
  before they recorded it (imports the objectives, which explaining a run
  whose record says otherwise never does)."""
  from cco_jax import objectives  # pylint: disable=g-import-not-at-top

  return objectives.head(loss_name)


def _bucket(n: int, batch_size: int) -> int:
  """Padded batch length: the next power of two, at most `batch_size`."""
  return min(batch_size, 1 << max(0, (n - 1).bit_length()))


class Explainer:
  """Explains a model's decisions on any images (module docstring).

  Args:
    model: a `cco_jax.models.ResNet` (any module returning `(logits, cams)`
      through a `CamHead`).
    variables: its `{'params': ..., 'batch_stats': ...}`.
    image_size: S for file inputs (required to explain files).
    normalize: whether the model expects ImageNet-normalised inputs.
    boundary_is_foreground: how trimap masks are read
      (`transforms.read_mask_file`).
    class_names: names of the classes (for reports).
    batch_size: images per forward pass (batches are padded to a power of two
      up to this, so only a few shapes compile).
  """

  def __init__(
    self,
    model: nn.Module,
    variables,
    *,
    image_size: int | None = None,
    normalize: bool = False,
    class_names: Sequence[str] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    boundary_is_foreground: bool = False,
  ):
    self.model = model
    self.variables = variables
    self.image_size = image_size
    self.normalize = normalize
    self.class_names = tuple(class_names) if class_names else None
    self.batch_size = batch_size
    self.boundary_is_foreground = boundary_is_foreground
    self.trained = None  # The `restore.TrainedModel`, when restored.
    # How the objective read the logits ('sigmoid' for bce / ace_bce runs).
    self.head = 'softmax'
    head = variables['params']['head']  # `models.CamHead`'s parameters.
    bias = head.get('bias')  # None for a bias-free (faithful) head.
    self.kernel = np.asarray(head['kernel'], np.float32)
    self.bias = (
      np.zeros(self.kernel.shape[1], np.float32)
      if bias is None
      else np.asarray(bias, np.float32)
    )
    self._forward = jax.jit(
      functools.partial(head_features.forward_with_features, model)
    )

  @classmethod
  def from_workdir(cls, workdir: str, *, step='best', **kwargs) -> Explainer:
    """Restores a trained model (`restore.restore_model`); `step`: 'best',
    'last' or an int."""
    return cls.from_trained(restore.restore_model(workdir, step=step), **kwargs)

  @classmethod
  def from_trained(cls, trained: restore.TrainedModel, **kwargs) -> Explainer:
    """From a `restore.TrainedModel`: image size, normalisation, classes and
    the trimap rule come from its run record."""
    record = trained.record
    explainer = cls(
      trained.model,
      trained.variables,
      image_size=record.image_size,
      normalize=record.normalize,
      class_names=record.class_names,
      boundary_is_foreground=record.boundary_is_foreground,
      **kwargs,
    )
    explainer.trained = trained
    explainer.head = record.head or _registry_head(trained.config.loss.name)
    return explainer

  def load(self, paths: Sequence[str]) -> np.ndarray:
    """Files -> `(B, S, S, 3)` model inputs (raises on the first bad file)."""
    if self.image_size is None:
      raise ValueError(
        'Explainer(image_size=...) is needed to explain files: the size the '
        'model was trained at (config.data.image_size).'
      )
    return np.stack(
      [
        transforms.read_image_file(
          p, image_size=self.image_size, normalize=self.normalize
        )
        for p in paths
      ]
    )

  def _as_images(self, images) -> tuple[np.ndarray, list | None]:
    if isinstance(images, (str, os.PathLike)):
      images = [images]
    if isinstance(images, (list, tuple)) and all(
      isinstance(p, (str, os.PathLike)) for p in images
    ):
      paths = [os.fspath(p) for p in images]
      return self.load(paths), paths
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(
        f'images must be (B, S, S, 3) arrays or file paths; got shape '
        f'{images.shape}. Add a batch axis for one image: images[None].'
      )
    return images, None

  def _masks(self, masks, batch: int) -> np.ndarray | None:
    if masks is None:
      return None
    if isinstance(masks, (list, tuple)) and all(
      isinstance(m, (str, os.PathLike)) for m in masks
    ):
      read = functools.partial(
        transforms.read_mask_file,
        image_size=self.image_size,
        boundary_is_foreground=self.boundary_is_foreground,
      )
      masks = np.stack([read(os.fspath(m)) for m in masks])
    masks = np.asarray(masks, np.float32)
    if masks.ndim != 3 or masks.shape[0] != batch:
      raise ValueError(
        f'masks must be ({batch}, S, S) (one per image, 1 = object) or '
        f'{batch} file paths; got shape {masks.shape}.'
      )
    return masks

  def forward(self, images: np.ndarray):
    """Host `(logits, cams, features)` of `(B, S, S, 3)` images, in batches of
    at most `batch_size` (padded, so each size compiles once)."""
    outputs = []
    for start in range(0, len(images), self.batch_size):
      chunk = images[start : start + self.batch_size]
      n = len(chunk)
      padded = np.zeros((_bucket(n, self.batch_size),) + chunk.shape[1:])
      padded[:n] = chunk
      result = self._forward(self.variables, padded.astype(np.float32))
      outputs.append([np.asarray(x)[:n] for x in result])
    return tuple(np.concatenate(parts) for parts in zip(*outputs))

  def explain(self, images, *, targets=None, masks=None) -> Explanation:
    """Explains every class of every image (module docstring).

    Args:
      images: `(B, S, S, 3)` model inputs, or file paths (one or a list).
      targets: None (the predicted class), an int, or `(B,)` ints: the class
        each contrastive map is taken against.
      masks: None, `(B, S, S)` or `(B, h, w)` foreground masks (1 = object),
        or B mask files: adds fg/bg influence.

    Returns:
      An `Explanation`.
    """
    images, paths = self._as_images(images)
    masks = self._masks(masks, len(images))
    logits, cams, _ = self.forward(images)
    predicted = logits.argmax(-1)
    num_classes = logits.shape[-1]
    if targets is None:
      target = predicted
    else:
      target = np.broadcast_to(np.asarray(targets, np.int64), predicted.shape)
      if target.min() < 0 or target.max() >= num_classes:
        raise ValueError(
          f'targets must be class indices in [0, {num_classes}); got '
          f'{np.unique(target).tolist()}.'
        )
    contrastive = np.asarray(cams_lib.contrastive_cams(cams, target))
    map_sums = cams.astype(np.float64).sum((1, 2))
    identity = np.abs(map_sums + self.bias - logits).max(-1)
    explanation = Explanation(
      logits=logits,
      probabilities=probabilities(logits, self.head).astype(np.float32),
      predicted=predicted,
      target=np.asarray(target),
      bias=self.bias,
      cams=cams,
      map_sums=map_sums,
      contrastive=contrastive,
      identity_error=identity,
      images=images,
      paths=paths,
    )
    if masks is not None:
      cam_masks = mask_to_cam_grid(masks, cams.shape[1:3])
      influence = {
        k: np.asarray(v, np.float64)
        for k, v in cams_lib.pixel_influence(contrastive, cam_masks).items()
      }
      with np.errstate(invalid='ignore', divide='ignore'):
        influence['bg_share'] = np.where(
          influence['net'] > 0, influence['bg'] / influence['net'], np.nan
        )
      explanation.influence, explanation.cam_masks = influence, cam_masks
    return explanation

  def channels(
    self, images, class_index, *, k: int = 8, against=None
  ) -> ChannelDecomposition:
    """Top-`k` channels of a class map (or a contrastive map) with their maps.

    Args:
      images: as `explain`.
      class_index: int or `(B,)` ints, the class `c` whose map is split.
      k: how many channels to return (clipped to the number of channels).
      against: None, or int / `(B,)` ints `t`: split the contrastive map
        `M[..., c] - M[..., t]` instead (kernel column `W_c - W_t`).

    Returns:
      A `ChannelDecomposition`.
    """
    images, _ = self._as_images(images)
    _, _, features = self.forward(images)
    batch, height, width, num_features = features.shape
    c = np.broadcast_to(np.asarray(class_index), (batch,))
    columns = self.kernel[:, c].T  # (B, F)
    if against is not None:
      t = np.broadcast_to(np.asarray(against), (batch,))
      columns = columns - self.kernel[:, t].T
    per_channel = features * columns[:, None, None, :] / (height * width)
    contributions = per_channel.sum((1, 2))  # (B, F)
    k = min(k, num_features)
    order = np.argsort(-np.abs(contributions), axis=-1, kind='stable')[:, :k]
    maps = np.take_along_axis(per_channel, order[:, None, None, :], -1)
    class_map = per_channel.sum(-1)
    return ChannelDecomposition(
      channels=order,
      contributions=np.take_along_axis(contributions, order, -1),
      maps=maps,
      rest=class_map - maps.sum(-1),
      class_map=class_map,
    )

  def class_name(self, index: int) -> str:
    if self.class_names and 0 <= index < len(self.class_names):
      return self.class_names[index]
    return str(index)


def explain(model, variables, images, **kwargs) -> Explanation:
  """One-off `Explainer(model, variables).explain(images, **kwargs)`."""
  return Explainer(model, variables).explain(images, **kwargs)
