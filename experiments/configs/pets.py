r"""Oxford-IIIT Pet: contrastive (ACE + divergence) training and its CE control.

Reproduces the setting of J. Setpal, "Crossing Cross-Entropy" (2024;
docs/method.md §7): a ResNet-50 at 224 px with the method's three changes,
trained from scratch with Adam 1e-3 at batch 80 on the foreground-masked
contrastive loss.

Variants (`--config=experiments/configs/pets.py:VARIANT`):
  binary     species (cat/dog), ResNet-50 @224 (bfloat16 compute,
             BatchNorm statistics per device and 256 images per device, as
             in all four paper-scale variants), ACE + divergence, 100 epochs.
             One V100 took ~4 h in the original work (batch 80); expect
             ~91.5% valid (paper draft). The original batch of 80:
             --config.per_device_batch_size=0
             --config.per_device_eval_batch_size=0.
  breeds     37 breeds, same loss, 227 epochs; the original work (effective
             batch 80: 20 x 4 accumulation, --config.per_device_batch_size=0
             --config.per_device_eval_batch_size=0
             --config.accumulation_steps=4) reached 51.5% valid accuracy.
  binary_ce  the cross-entropy control of `binary` (bias, final BN+ReLU, /32).
  breeds_ce  the cross-entropy control of `breeds`.
  cpu        a small faithful ResNet-18 (width 16, 64 px, 8x8 maps) that learns
             species in minutes on a 2-core CPU from the shared sample:
               python -m experiments.pets \
                 --config=experiments/configs/pets.py:cpu \
                 --workdir=/tmp/pets_cpu \
                 --config.data.manual_dir=../shared/data/oxford-iiit-pet-sample \
                 --config.data.ood_manual_dir=../shared/data/cats-vs-dogs-sample
  cpu_ce, cpu_ace  the `cpu` model with the CE control / ACE alone.
  binary_finetune, breeds_finetune  `binary` / `breeds` from a torchvision or
             timm ResNet-50 (--config.model.init_from=PATH; the method's
             surgery is applied): ImageNet-normalised inputs, Adam 1e-4
             with 1 warm-up epoch and cosine decay, 15 / 30 epochs.
  cpu_finetune  torchvision's ResNet-18 at 128 px (8x8 maps) on the shared
             sample, 5 epochs; --config.model.init_from=resnet18.safetensors.

Any field can be overridden on the command line (`--config.loss.name=ace`);
the config is locked, so a misspelt key is an error.
"""

import ml_collections

from cco_jax.data import config as data_config
from experiments import configs


def get_data_config() -> ml_collections.ConfigDict:
  """`config.data`: the library's defaults (`cco_jax.data.config`) and the
  RAM cache."""
  data = data_config.default_config()
  # Decode and squash each training image once and keep it in RAM (~150 kB at
  # 224 px: ~0.5 GB for Pets trainval); uncropped batches are then one array
  # gather (~1 % of a CPU step, thousands of images/s at 224 px): without it,
  # JPEG decoding (~150 images/s per core) would starve a GPU. Set False for
  # data that does not fit in RAM (then use num_workers for parallel decoding).
  data.cache_decoded = True
  return data


def get_default_config() -> ml_collections.ConfigDict:
  """The `binary` setting; variants change a few fields of it."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  # PRNG implementation ('' = JAX's default, threefry2x32). 'rbg' compiles far
  # faster on CPU (jax 0.10.2: ~2.6 s per parameter shape for threefry).
  config.rng_impl = ''
  config.data = get_data_config()

  config.model = ml_collections.ConfigDict()
  config.model.name = 'resnet50'
  config.model.cam_faithful = True
  config.model.num_filters = 64
  config.model.stem = 'imagenet'
  config.model.stage_sizes = ()  # () = the named depth.
  config.model.dtype = 'float32'  # 'bfloat16' for mixed precision.
  # 1x1 convolutions as matrix products (faster on CPU; same parameters).
  config.model.pointwise_as_dot = True
  # BatchNorm statistics averaged across devices at every training step
  # (one all-reduce per BN layer); False keeps them per device (as with one
  # device per replica) and averages them before evaluations and checkpoints.
  config.model.sync_batch_norm = True
  # A torchvision/timm ResNet state dict (.safetensors, .npz, .pth) to start
  # from, loaded by `cco_jax.pretrained` with the method's surgery when
  # cam_faithful; '' = random initialisation. Not read when resuming.
  config.model.init_from = ''

  config.loss = ml_collections.ConfigDict()
  config.loss.name = 'ace_kld'  # One of cco_jax.losses.OBJECTIVES.
  config.loss.ce_weight = 1.0
  config.loss.ace_weight = 1.0
  config.loss.kld_weight = 1e-3
  config.loss.cam_scale = 10.0
  config.loss.mask_scale = 50.0
  config.loss.divergence_form = (
    'talk'  # 'paper': weights (1e-3, 1), scales (50, 1).
  )
  config.loss.label_smoothing = 0.0
  config.loss.log_all_terms = True
  # The baselines (cco_jax.baseline_losses) and ACE's options.
  config.loss.rrr_weight = 1.0  # rrr: lambda of the input-gradient penalty.
  config.loss.bg_cam_weight = 0.1  # ce_bg_cam: lambda of sum |(1 - m) M_y|.
  config.loss.swd_weight = 5.0  # ace_swd: lambda and the SWD's settings.
  config.loss.swd_target_scale = 5.0
  config.loss.swd_spatial_scale = 10.0
  config.loss.swd_directions = 0  # 0 = the number of classes.
  config.loss.dro_step_size = 0.01  # group_dro: eta.
  # group_dro, ce_reweighted: training examples per group id (required).
  config.loss.group_counts = ()
  config.loss.cutmix_alpha = 0.0  # > 0: contrastive CutMix (ACE objectives).

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = 'adam'  # 'adam', 'adamw' or 'sgd'.
  config.optimizer.learning_rate = 1e-3
  config.optimizer.schedule = 'constant'  # Or 'cosine' (warmup + cosine decay).
  config.optimizer.warmup_epochs = 0.0
  config.optimizer.momentum = 0.9  # SGD only.
  config.optimizer.weight_decay = 0.0
  config.optimizer.grad_clip_norm = 0.0  # 0 = off.

  # Durations: num_train_steps > 0 overrides num_epochs.
  config.batch_size = 80  # Global batch per optimizer step (all devices).
  # > 0: the micro-batch is this many examples per device (the global batch
  # is per_device_batch_size x devices x accumulation_steps; batch_size is
  # not read), so a config means the same per device on 1 and 8 GPUs.
  config.per_device_batch_size = 0
  # > 0: the eval batch per device; 0 = per_device_batch_size if set, else
  # the global eval_batch_size.
  config.per_device_eval_batch_size = 0
  config.accumulation_steps = (
    1  # Micro-batches per step: batch_size/accum each.
  )
  config.num_epochs = 100.0
  config.num_train_steps = -1
  config.eval_batch_size = 80
  config.log_every_steps = 50
  # -1 = max(steps per epoch, ceil(padded validation examples / (3 x 0.05 x
  # micro-batch))): at least an epoch apart, and evaluation (an example costs
  # ~1/3 of a trained one) <= 5 % of the training time
  # (train_setup.default_eval_every).
  config.eval_every_steps = -1
  config.checkpoint_every_steps = -1  # -1 = at every evaluation.
  # Checkpoints written by a background thread (the steps go on); False
  # writes them before the next step.
  config.async_checkpoints = True
  # MiB per device for the validation batches kept on the devices (read and
  # decoded once per run); a split over it is read at every evaluation.
  config.eval_cache_mb = 512
  config.keep_checkpoints = 3  # The last k, plus the best by best_metric.
  # Validation 'accuracy', or (data with groups) 'worst_group_accuracy' or
  # 'average_group_accuracy': the metric that picks the best checkpoint.
  config.best_metric = 'accuracy'
  # Relative to max |logit| + 1; <= 0 = cams.identity_tolerance(float32).
  config.identity_tolerance = 1e-4
  config.num_figure_examples = 8
  config.figure_every_evals = 0  # 0 = figures at the end; N = every N-th eval.
  config.eval_ood = True  # Cats-vs-Dogs accuracy (species models only).
  return config


def _accelerated(config):
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


def _binary():
  return _accelerated(get_default_config())


def _breeds():
  config = _accelerated(get_default_config())
  config.data.task = 'breed'
  # The original's 80 = 4 x 20 (accumulated to fit a V100) is used only with
  # per_device_batch_size=0 and accumulation_steps=4; on an H200, 256 per
  # device in one micro-batch.
  config.batch_size = 80
  config.accumulation_steps = 1
  config.num_epochs = 227.0
  config.eval_ood = False
  return config


def _as_ce_control(config):
  config.model.cam_faithful = False
  config.loss.name = 'ce'
  return config


def _cpu():
  config = get_default_config()
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


def _cpu_ce():
  return _as_ce_control(_cpu())


def _cpu_ace():
  config = _cpu()
  config.loss.name = 'ace'
  return config


# The *_finetune variants refuse to start until the path is given.
INIT_FROM_REQUIRED = '(required: --config.model.init_from=PATH)'


def _finetune(config):
  """Start from ImageNet weights: their input statistics, a smaller learning
  rate with warm-up (the head is new), and fewer epochs."""
  config.model.init_from = INIT_FROM_REQUIRED
  config.data.normalize = True  # ImageNet mean/std, as the weights expect.
  config.optimizer.learning_rate = 1e-4
  config.optimizer.schedule = 'cosine'
  config.optimizer.warmup_epochs = 1.0
  return config


def _binary_finetune():
  config = _finetune(_binary())
  config.num_epochs = 15.0
  return config


def _breeds_finetune():
  config = _finetune(_breeds())
  config.num_epochs = 30.0
  return config


def _cpu_finetune():
  """Torchvision's ResNet-18 (full width, 'imagenet' stem) at 128 px: 8x8 maps."""
  config = _finetune(_cpu())
  config.model.num_filters = 64
  config.model.stem = 'imagenet'
  config.model.stage_sizes = ()
  config.data.image_size = 128
  config.num_epochs = 5.0
  config.optimizer.warmup_epochs = 0.5
  return config


VARIANTS = {
  'binary': _binary,
  'breeds': _breeds,
  'binary_ce': lambda: _as_ce_control(_binary()),
  'breeds_ce': lambda: _as_ce_control(_breeds()),
  'cpu': _cpu,
  'cpu_ce': _cpu_ce,
  'cpu_ace': _cpu_ace,
  'binary_finetune': _binary_finetune,
  'breeds_finetune': _breeds_finetune,
  'cpu_finetune': _cpu_finetune,
}


def get_config(variant: str = 'binary') -> ml_collections.ConfigDict:
  """Returns the locked config of a variant (see the module docstring)."""
  return configs.locked_variant(VARIANTS, variant)
