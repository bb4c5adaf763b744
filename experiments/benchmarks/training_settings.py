"""What the training benchmark times: step, map and loop settings, and the presets.

`preset(name, smoke)` gives the settings of `--preset=cpu|gpu` (or `--smoke`)
of `python -m experiments.benchmarks.training`; `parse_setting` reads a
`--models` entry; `build_model` makes a setting's model. See
`experiments/benchmarks/training.py` for what each section measures.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
from pathlib import Path
from typing import Any

from absl import app
import jax.numpy as jnp

from cco_jax import models

SHARED_DATA = Path(__file__).resolve().parents[2].parent / 'shared' / 'data'
SECTIONS = ('step', 'cams', 'loop')
MAX_REPEATS = 200
OBJECTIVES = ('ce', 'ace', 'ace_kld')


# ----------------------------------------------------------------------------
# Settings.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StepSetting:
  """A model and batch to time train steps on."""

  label: str
  name: str  # A models.STAGE_SIZES name, or 'config:VARIANT' (experiments/configs/pets.py).
  image_size: int
  batch: int
  num_classes: int
  num_filters: int = 64
  stem: str = 'imagenet'
  stage_sizes: tuple[int, ...] = ()
  objectives: tuple[str, ...] = OBJECTIVES
  # False: the CE control (last stage downsamples, head bias, final BN + ReLU),
  # i.e. the unchanged torchvision architecture of the PyTorch reference figures.
  cam_faithful: bool = True


@dataclasses.dataclass(frozen=True)
class CamSetting:
  """Shapes for the map section."""

  name: str
  image_size: int
  batch: int  # Features-level comparison.
  network_batch: int  # Whole-network comparison.
  classes: tuple[int, ...]
  num_filters: int = 64
  stem: str = 'imagenet'
  stage_sizes: tuple[int, ...] = ()
  network_repeats: int = 1


@dataclasses.dataclass(frozen=True)
class LoopSetting:
  """The config the loop trains, and the cadence its timed window spans.

  `train.train_and_evaluate` runs `(evals + 1) * eval_every + log_every`
  steps. Its log records give steps/s per `log_every` steps, measured between
  the synchronising log calls, so each evaluation's stall (evaluation, figures,
  checkpoint) lands in the interval after it. The timed window starts after
  the first evaluation's interval (which also compiles the eval and predict
  steps) and holds `evals` whole evaluation periods. `per_device_batches`:
  the loop runs once per entry with `config.per_device_batch_size` set to it
  (empty: once, with the config's own batch).
  """

  variant: str  # experiments/configs/pets.py variant.
  eval_every: int
  log_every: int
  evals: int = 2
  overrides: tuple[tuple[str, Any], ...] = ()
  per_device_batches: tuple[int, ...] = ()

  @property
  def window(self) -> tuple[int, int]:
    """Steps `(start, end]` of the timed window."""
    start = self.eval_every + self.log_every
    return start, start + self.evals * self.eval_every

  @property
  def num_steps(self) -> int:
    return self.window[1]


@dataclasses.dataclass(frozen=True)
class Preset:
  steps: tuple[StepSetting, ...]
  cams: CamSetting
  sections: tuple[str, ...]
  repeats: int
  loop: LoopSetting


def pets_config(variant: str):
  from experiments.configs import (
    pets as pets_config,  # pylint: disable=g-import-not-at-top
  )

  return pets_config.get_config(variant)


def config_setting(variant: str, label: str, **overrides) -> StepSetting:
  """The step setting of a pets.py variant's model, at its per-device batch."""
  config = pets_config(variant)
  model = config.model
  fields = dict(
    label=label,
    name=f'config:{variant}',
    image_size=config.data.image_size,
    batch=config.per_device_batch_size or config.batch_size,
    num_classes=2,
    num_filters=model.num_filters,
    stem=model.stem,
    stage_sizes=tuple(model.stage_sizes),
  )
  fields.update(overrides)
  return StepSetting(**fields)


def preset(name: str, smoke: bool) -> Preset:
  """The settings of a preset (`smoke` shrinks everything to seconds)."""
  if smoke:
    tiny = dict(num_filters=8, stem='strided', stage_sizes=(1, 1, 1, 1))
    return Preset(
      steps=(
        StepSetting(
          'tiny_resnet18',
          'resnet18',
          32,
          4,
          2,
          objectives=('ce', 'ace_kld'),
          **tiny,
        ),
      ),
      cams=CamSetting(
        'resnet50', 32, batch=2, network_batch=1, classes=(2, 5), **tiny
      ),
      sections=SECTIONS,
      repeats=2,
      loop=LoopSetting(
        'cpu',
        eval_every=4,
        log_every=2,
        evals=1,
        overrides=(
          ('data.image_size', 32),
          ('model.num_filters', 4),
          ('batch_size', 8),
          ('eval_batch_size', 16),
          ('num_figure_examples', 2),
        ),
      ),
    )
  if name == 'cpu':
    return Preset(
      steps=(
        StepSetting('resnet18_128', 'resnet18', 128, 32, 2),
        StepSetting(
          'resnet18_128_control',
          'resnet18',
          128,
          32,
          2,
          objectives=('ce',),
          cam_faithful=False,
        ),
        config_setting('cpu', 'cpu_config'),
        StepSetting('resnet50_224_b8_c37', 'resnet50', 224, 8, 37),
        StepSetting(
          'resnet50_224_b8_c37_control',
          'resnet50',
          224,
          8,
          37,
          objectives=('ce',),
          cam_faithful=False,
        ),
      ),
      cams=CamSetting(
        'resnet50', 224, batch=8, network_batch=1, classes=(2, 37)
      ),
      sections=SECTIONS,
      repeats=7,
      # One epoch of full Pets (3,312 training images) at batch 32 is ~103
      # steps: evaluation (validation split, figures, checkpoint) that often.
      loop=LoopSetting('cpu', eval_every=100, log_every=10, evals=1),
    )
  return Preset(
    steps=(
      # The model, batch and objective the loop section trains.
      config_setting('binary', 'binary_config', objectives=('ace_kld',)),
      StepSetting('resnet50_224_b80_c37', 'resnet50', 224, 80, 37),
      StepSetting(
        'resnet50_224_b80_c2',
        'resnet50',
        224,
        80,
        2,
        objectives=('ce', 'ace_kld'),
      ),
      StepSetting(
        'resnet50_224_b192_c37',
        'resnet50',
        224,
        192,
        37,
        objectives=('ace_kld',),
      ),
    ),
    cams=CamSetting(
      'resnet50',
      224,
      batch=80,
      network_batch=8,
      classes=(2, 37),
      network_repeats=3,
    ),
    sections=('step', 'cams', 'loop'),
    repeats=20,
    # The paper-scale `binary` config (ResNet-50 @224, bfloat16, ACE +
    # divergence) at two per-device batches. Evaluation every 20 steps: full
    # Pets' default cadence (`train_setup.default_eval_every`, 3,312 train and
    # 368 validation images) is 25 steps at 128 per device and 14 at 256.
    loop=LoopSetting(
      'binary',
      eval_every=20,
      log_every=10,
      evals=4,
      per_device_batches=(128, 256),
    ),
  )


def parse_setting(spec: str, settings: Sequence[StepSetting]) -> StepSetting:
  """A preset label, or NAME:SIZE:BATCH:CLASSES."""
  for setting in settings:
    if setting.label == spec:
      return setting
  parts = spec.split(':')
  if len(parts) != 4 or parts[0] not in models.STAGE_SIZES:
    raise app.UsageError(
      f'--models entry {spec!r} is neither a preset label '
      f'({[s.label for s in settings]}) nor NAME:SIZE:BATCH:CLASSES with NAME in '
      f'{sorted(models.STAGE_SIZES)}.'
    )
  name, size, batch, classes = parts[0], *map(int, parts[1:])
  return StepSetting(spec.replace(':', '_'), name, size, batch, classes)


def build_model(
  setting: StepSetting | CamSetting,
  dtype=jnp.float32,
  pointwise_as_dot: bool = True,
) -> models.ResNet:
  """The setting's model (CamSettings get 2 classes; callers clone)."""
  name = setting.name
  if name.startswith('config:'):
    name = pets_config(name.split(':', 1)[1]).model.name
  return models.create_model(
    name,
    getattr(setting, 'num_classes', 2),
    cam_faithful=getattr(setting, 'cam_faithful', True),
    dtype=dtype,
    num_filters=setting.num_filters,
    stem=setting.stem,
    stage_sizes=setting.stage_sizes or None,
    pointwise_as_dot=pointwise_as_dot,
  )
