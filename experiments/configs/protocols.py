"""The training protocols the dataset configs share, as overrides of the
library's schema (`cco_jax.config_schema.default_config()`).

  paper()           the schema's defaults (ResNet-50 @224, ACE + divergence,
                    Adam 1e-3, batch 80, 100 epochs; docs/method.md §7) with
                    decoded training images kept in RAM.
  accelerated(c)    bfloat16 compute, BatchNorm statistics per device.
  small_cpu()       the small faithful ResNet-18 (width 16, one block per
                    stage, 'strided' stem) at 64 px that learns on a CPU.
  as_ce_control(c)  the cross-entropy control (unfaithful architecture).
  as_ace(c)         ACE alone.
  objective(base, name, faithful=True, **loss)
                    a variant maker: `base()` trained with objective `name`
                    and these loss fields (the comparison benchmarks' rows).
  finetune(c)       from ImageNet weights (--config.model.init_from=PATH).
"""

import ml_collections

from cco_jax import config_schema

# The finetune variants refuse to start until the path is given.
INIT_FROM_REQUIRED = '(required: --config.model.init_from=PATH)'


def paper() -> ml_collections.ConfigDict:
  """The schema's defaults, with the RAM cache of decoded training images."""
  config = config_schema.default_config()
  # Decode and squash each training image once and keep it in RAM (~150 kB at
  # 224 px: ~0.5 GB for Pets trainval); uncropped batches are then one array
  # gather (~1 % of a CPU step, thousands of images/s at 224 px): without it,
  # JPEG decoding (~150 images/s per core) would starve a GPU. Set False for
  # data that does not fit in RAM (then use num_workers for parallel decoding).
  config.data.cache_decoded = True
  return config


def accelerated(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Paper-scale variants run on GPUs/TPUs: bfloat16 compute in the backbone
  (parameters, the head and its maps stay float32; `models.CamHead`),
  BatchNorm statistics per device (no all-reduce per BN layer and step), and
  256 images per device (estimated, not measured: a ResNet-50 @224 step in
  bfloat16 at 256 holds ~30-40 GB of activations, a quarter of a 141 GB
  H200; on 8 GPUs it is 2,048 images a step).
  The original work's global batch of 80: --config.per_device_batch_size=0
  --config.per_device_eval_batch_size=0."""
  config.model.dtype = 'bfloat16'
  config.model.sync_batch_norm = False
  config.per_device_batch_size = 256
  config.per_device_eval_batch_size = 256
  return config


def small_cpu() -> ml_collections.ConfigDict:
  """A small faithful ResNet-18 (width 16, 64 px, 8x8 maps) for CPUs."""
  config = paper()
  config.model.name = 'resnet18'
  config.model.num_filters = 16
  config.model.stem = 'strided'
  config.model.stage_sizes = (1, 1, 1, 1)
  config.data.image_size = 64
  config.batch_size = 32
  config.eval_batch_size = 64
  config.num_epochs = 20.0
  config.log_every_steps = 10
  config.num_figure_examples = 6
  config.rng_impl = 'rbg'
  return config


def as_ce_control(
  config: ml_collections.ConfigDict,
) -> ml_collections.ConfigDict:
  """Cross-entropy on the unfaithful architecture (bias, final BN+ReLU, /32)."""
  config.model.cam_faithful = False
  config.loss.name = 'ce'
  return config


def as_ace(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  config.loss.name = 'ace'
  return config


def objective(base, name: str, faithful: bool = True, **loss):
  """A variant maker (no arguments -> config): `base()` with loss `name`,
  `model.cam_faithful = faithful` and the loss fields `loss`."""

  def make() -> ml_collections.ConfigDict:
    config = base()
    config.model.cam_faithful = faithful
    config.loss.name = name
    for key, value in loss.items():
      config.loss[key] = value
    return config

  return make


def finetune(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Start from ImageNet weights: their input statistics, a smaller learning
  rate with warm-up (the head is new), and fewer epochs."""
  config.model.init_from = INIT_FROM_REQUIRED
  config.data.normalize = True  # ImageNet mean/std, as the weights expect.
  config.optimizer.learning_rate = 1e-4
  config.optimizer.schedule = 'cosine'
  config.optimizer.warmup_epochs = 1.0
  return config
