"""The run record: what a training run is, computed once, read by everything after.

When training starts, `RunRecord.from_data` computes from the splits it has
just opened the facts that restoring, evaluating, explaining and drawing need:
class and group names, split sizes, training examples per class and per group,
image and map size, input normalisation, and the dataset's name, version and
preparation options. Training writes it to `WORKDIR/run.json` and into every
checkpoint (`checkpointing.save(..., record=...)`). Nothing after training
reopens the data to learn what it is. The fields are documented in
`docs/run_record.md`.

A file is JSON with a `schema` number; `load` refuses a missing, malformed
or newer file in one line that names the file and the fix.
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
import json
import os
from typing import Any

from etils import epath
import ml_collections
import numpy as np

from cco_jax import errors
from cco_jax import model_config
from cco_jax import models
from cco_jax.data import config as data_config_lib
from cco_jax.data import info
from cco_jax.data import preparation
from cco_jax.data import sources
from cco_jax.data.sources import SplitSource

SCHEMA = 1
FILE_NAME = 'run.json'


class RecordError(errors.UserError):
  """A run record that is missing or cannot be read (a one-line message)."""


@dataclasses.dataclass(frozen=True)
class RunRecord:
  """What a training run is (module docstring; `docs/run_record.md`).

  Attributes:
    dataset: `config.data.name` ('oxford_iiit_pet', 'folder', ...).
    dataset_version: the prepared dataset's TFDS version.
    prepare_options: the `PrepareOptions` it was prepared with.
    task: `config.data.task`.
    class_names: the head's classes, in label order (C).
    group_names: the groups a batch's 'group' indexes (('all',) if none).
    split_sizes: examples per pipeline split ('train', 'validation'[,
      'test']).
    train_class_counts: training examples per class (C,).
    train_group_counts: training examples per group.
    image_size: S, the model's input side in pixels.
    cam_size: (h, w) of the maps.
    normalize: whether inputs are ImageNet-normalised.
    mean, std: the per-channel normalisation (identity when not normalised):
      model input = (pixels in [0, 1] - mean) / std.
    boundary_is_foreground: whether the trimap boundary counts as object.
    head: how the objective read the logits, 'softmax' or 'sigmoid' (one
      per class); None in records written before it was recorded (readers
      then ask the objective registry, `objectives.head(config.loss.name)`).
    schema: the file format's version (`SCHEMA`).
  """

  dataset: str
  dataset_version: str
  prepare_options: Mapping[str, Any]
  task: str
  class_names: tuple[str, ...]
  group_names: tuple[str, ...]
  split_sizes: Mapping[str, int]
  train_class_counts: tuple[int, ...]
  train_group_counts: tuple[int, ...]
  image_size: int
  cam_size: tuple[int, int]
  normalize: bool
  mean: tuple[float, float, float]
  std: tuple[float, float, float]
  boundary_is_foreground: bool
  head: str | None = None
  schema: int = SCHEMA

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @classmethod
  def from_data(
    cls,
    data_config: ml_collections.ConfigDict,
    splits: Mapping[str, SplitSource],
    *,
    cam_size: tuple[int, int],
    head: str | None = None,
  ) -> RunRecord:
    """The record of a run on `splits` (already open; must hold 'train').

    Args:
      data_config: `config.data`.
      splits: {split: SplitSource} of the primary dataset, as training opened
        them ('train', 'validation'[, 'test']).
      cam_size: (h, w) of the model's maps at `data_config.image_size`.
      head: 'softmax' or 'sigmoid', as the objective reads the logits.
    """
    train = splits['train']
    builder = train.builder
    names = info.class_names_of(builder, data_config.name, data_config.task)
    groups = info.group_names_of(builder)
    feature = preparation.dataset_entry(data_config.name).tasks[
      data_config.task
    ]
    labels = info.task_labels(train, feature)
    normalize = bool(data_config.normalize)
    return cls(
      dataset=data_config.name,
      dataset_version=str(builder.version),
      prepare_options=dataclasses.asdict(
        preparation.prepare_options(data_config)
      ),
      task=data_config.task,
      class_names=tuple(names),
      group_names=tuple(groups),
      split_sizes={split: len(source) for split, source in splits.items()},
      train_class_counts=tuple(
        int(n) for n in np.bincount(labels, minlength=len(names))
      ),
      train_group_counts=info.group_counts_of(train, len(groups)),
      image_size=int(data_config.image_size),
      cam_size=(int(cam_size[0]), int(cam_size[1])),
      normalize=normalize,
      mean=_floats(data_config_lib.IMAGENET_MEAN if normalize else (0, 0, 0)),
      std=_floats(data_config_lib.IMAGENET_STD if normalize else (1, 1, 1)),
      boundary_is_foreground=bool(data_config.boundary_is_foreground),
      head=head,
    )

  def to_json(self) -> dict:
    """The record as JSON values (tuples as lists)."""
    return json.loads(json.dumps(dataclasses.asdict(self)))

  def save(self, path: str | os.PathLike) -> None:
    """Writes the record as JSON to `path` (e.g. `WORKDIR/run.json`)."""
    epath.Path(path).write_text(json.dumps(self.to_json(), indent=2))

  @classmethod
  def load(cls, path: str | os.PathLike) -> RunRecord:
    """The record saved at `path`.

    Raises:
      RecordError: no file, not JSON, or not a record of this schema.
    """
    path = epath.Path(path)
    if not path.exists():
      raise RecordError(f'{path} does not exist; {FIX}')
    try:
      values = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise RecordError(f'{path} is not JSON ({e}); {FIX}') from None
    if not isinstance(values, dict):
      raise RecordError(f'{path}: a run record is a JSON object; {FIX}')
    if values.get('schema') != SCHEMA:
      raise RecordError(
        f'{path}: run record schema {values.get("schema")!r}, this library '
        f'reads schema {SCHEMA}; {FIX}'
      )
    fields = {f.name for f in dataclasses.fields(cls)}
    missing = fields - set(values) - _OPTIONAL
    unknown = set(values) - fields
    if missing or unknown:
      raise RecordError(
        f'{path}: run record fields missing {sorted(missing)}, unknown '
        f'{sorted(unknown)}; {FIX}'
      )
    return cls(
      **{k: tuple(v) if k in _TUPLES else v for k, v in values.items()}
    )


FIX = (
  'write it from the run\'s config with "python -m experiments.run_record '
  '--workdir=WORKDIR" (it opens the data once).'
)


def derive(config: ml_collections.ConfigDict) -> RunRecord:
  """The record of a run of `config`, for a workdir written before run
  records: opens the primary dataset's splits once."""
  primary = sources.OpenSplits(config.data).primary()
  builder = primary['train'].builder
  names = info.class_names_of(builder, config.data.name, config.data.task)
  model = model_config.create_model(config, len(names))
  from cco_jax import objectives  # pylint: disable=g-import-not-at-top

  return RunRecord.from_data(
    config.data,
    primary,
    cam_size=models.cam_size(model, config.data.image_size),
    head=objectives.head(config.loss.name),
  )


# Fields that records written before them lack (their default applies).
_OPTIONAL = frozenset({'head'})

# The tuple fields, which JSON stores as lists.
_TUPLES = (
  'class_names',
  'group_names',
  'train_class_counts',
  'train_group_counts',
  'cam_size',
  'mean',
  'std',
)


def _floats(values) -> tuple[float, float, float]:
  return tuple(float(v) for v in np.asarray(values, np.float64).reshape(3))


def path_of(workdir: str | os.PathLike) -> str:
  """`workdir/run.json`."""
  return os.path.join(os.fspath(workdir), FILE_NAME)
