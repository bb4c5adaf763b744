"""The one schema of the training config: every key, its default and meaning.

`default_config()` is owned by the library; `experiments/configs/*` start from
it and override fields (they never add any). The sections, in the order a run
reads them:

  top level    seed and PRNG (`_seed`), durations and batches (`_schedule`),
               cadences of logging, evaluation, checkpoints and figures
               (`_cadence`), the checks and evaluations (`_checks`);
  data         `cco_jax.data.config.default_config()` (its own schema);
  model        the model and its initialisation (`_model`);
  loss         the objective and its coefficients (`_loss`);
  optimizer    optax optimizer and learning-rate schedule (`_optimizer`).

Nowhere else is a default written: the library reads `config.key`, never
`config.get(key, default)`. Two entry points into the library fill gaps:
  * `check_known(config)` refuses a key the schema lacks (one line naming it
    and the closest known key);
  * `complete(config_or_dict, source)` returns a full config: the keys a
    config lacks (a `config.json` saved before a key existed) come from the
    defaults, and a log line names them;
  * `load_saved(path)` reads a run's `config.json` that way; a key the schema
    no longer has is dropped with a warning (the record of an old run, not a
    user's mistake).
"""

from __future__ import annotations

from collections.abc import Mapping
import difflib
import json
from typing import Any

from absl import logging
from etils import epath
import ml_collections

from cco_jax import errors
from cco_jax.data import config as data_config


def _seed(config: ml_collections.ConfigDict) -> None:
  config.seed = 0
  # PRNG implementation ('' = JAX's default, threefry2x32). 'rbg' compiles far
  # faster on CPU (jax 0.10.2: ~2.6 s per parameter shape for threefry).
  config.rng_impl = ''


def _model() -> ml_collections.ConfigDict:
  """`config.model`: the model of `cco_jax.models` (every family)."""
  model = ml_collections.ConfigDict()
  # A name of cco_jax.models.names(): resnet18 ... resnet152, vit_ti16,
  # vit_s16, vit_b16, convnext_tiny, convnext_small (docs/backbones.md).
  model.name = 'resnet50'
  # The method's architecture (no head bias; ResNet: no final BN + ReLU, no
  # /32 at the last stage; ViT/ConvNeXt: the head's LayerNorm per position
  # before pooling); False = the cross-entropy control's architecture.
  model.cam_faithful = True
  model.num_filters = 64  # ResNet: width of the first stage.
  model.stem = 'imagenet'  # ResNet: 'imagenet' (7x7/2 + max-pool), 'strided'.
  # ResNet, ConvNeXt: blocks per stage; () = the named depth.
  model.stage_sizes = ()
  model.patch_size = 0  # ViT: patch side; 0 = 16. Must divide image_size.
  # ViT: token width; ConvNeXt: first-stage channels; 0 = the named size.
  model.width = 0
  model.depth = 0  # ViT: encoder blocks; 0 = the named size (12).
  model.num_heads = 0  # ViT: attention heads; 0 = the named size.
  # ConvNeXt: 1 = the last stage keeps the resolution (finer maps, as the
  # faithful ResNet); 0 = 2, timm's downsampling.
  model.last_stage_stride = 0
  model.dtype = 'float32'  # 'bfloat16' for mixed precision.
  # 1x1 convolutions as matrix products (faster on CPU; same parameters).
  model.pointwise_as_dot = True
  # BatchNorm statistics averaged across devices at every training step
  # (one all-reduce per BN layer); False keeps them per device (as with one
  # device per replica) and averages them before evaluations and checkpoints.
  model.sync_batch_norm = True
  # A torchvision/timm ResNet state dict (.safetensors, .npz, .pth) to start
  # from, loaded by `cco_jax.pretrained` with the method's surgery when
  # cam_faithful; '' = random initialisation. Not read when resuming.
  model.init_from = ''
  return model


def _loss() -> ml_collections.ConfigDict:
  """`config.loss`: the objective (`loss.name`, one of
  `cco_jax.objectives.names()`) and the keys of every objective with their
  defaults.

  The objectives declare their own keys and defaults (the fields of each class
  in `cco_jax/objectives/`, with their docstrings): a new objective's keys
  appear here without an edit. The default, `ace_kld` in the talk's setting:
  ace_weight 1, kld_weight 1e-3, cam_scale 10, mask_scale 50, divergence_form
  'talk' ('paper': weights (1e-3, 1), scales (50, 1)). group_dro and
  ce_reweighted need group_counts, filled from the data when empty.
  """
  # Imported here: the objectives are training code, and modules that only
  # read a saved config (restore, evaluation) must not load them.
  from cco_jax import objectives  # pylint: disable=import-outside-toplevel

  return ml_collections.ConfigDict(objectives.default_config('ace_kld'))


def _optimizer() -> ml_collections.ConfigDict:
  """`config.optimizer`: `cco_jax.optimizers.create_optimizer`."""
  optimizer = ml_collections.ConfigDict()
  optimizer.name = 'adam'  # 'adam', 'adamw' or 'sgd'.
  optimizer.learning_rate = 1e-3
  optimizer.schedule = 'constant'  # Or 'cosine' (warmup + cosine decay).
  optimizer.warmup_epochs = 0.0
  optimizer.momentum = 0.9  # SGD only.
  optimizer.weight_decay = 0.0
  optimizer.grad_clip_norm = 0.0  # 0 = off.
  return optimizer


def _schedule(config: ml_collections.ConfigDict) -> None:
  """Durations and batch sizes: num_train_steps > 0 overrides num_epochs."""
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
  config.num_train_steps = -1  # -1 = from num_epochs.
  config.eval_batch_size = 80


def _cadence(config: ml_collections.ConfigDict) -> None:
  """How often a run logs, evaluates, checkpoints and draws (in steps)."""
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
  # Validation 'accuracy', 'mean_auc' (the mean ROC AUC of the auc_tasks,
  # evaluation/auc.py), or (data with groups) 'worst_group_accuracy' or
  # 'average_group_accuracy': the metric that picks the best checkpoint.
  config.best_metric = 'accuracy'
  # Class names, each scored against the rest by ROC AUC at every validation
  # (eval_mean_auc, eval_auc_<task>); () = none unless best_metric is
  # 'mean_auc' (then every class, or the second of two). Costs one more
  # forward pass over the split per evaluation.
  config.auc_tasks = ()
  # Stop once the validation best_metric has not improved for this many
  # evaluations (0 = train for the whole budget).
  config.early_stopping_patience = 0
  config.num_figure_examples = 8  # Rows of the CAM figure; 0 = no figures.
  config.figure_every_evals = 0  # 0 = figures at the end; N = every N-th eval.


def _checks(config: ml_collections.ConfigDict) -> None:
  """The identity check and the final evaluations."""
  # Relative to max |logit| + 1; <= 0 = cams.identity_tolerance(float32).
  config.identity_tolerance = 1e-4
  config.eval_ood = True  # Cats-vs-Dogs accuracy (species models only).


def default_config(*, loss: bool = True) -> ml_collections.ConfigDict:
  """The full training config with every key at its default (unlocked).

  `loss=False` leaves out the `loss` section (its defaults are declared by
  the objectives, training code: see `load_saved`).

  The defaults are the paper's `binary` setting (docs/method.md §7): a
  ResNet-50 at 224 px with the method's three changes, ACE + divergence,
  Adam 1e-3, batch 80, 100 epochs.
  """
  config = ml_collections.ConfigDict()
  _seed(config)
  config.data = data_config.default_config()
  config.model = _model()
  if loss:
    config.loss = _loss()
  config.optimizer = _optimizer()
  _schedule(config)
  _cadence(config)
  _checks(config)
  return config


# ----------------------------------------------------------------------------
# Unknown and missing keys.
# ----------------------------------------------------------------------------


def flatten(tree: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  """{'model.name': value, ...}: the dotted leaf keys of a nested mapping."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


def _as_dict(config: ml_collections.ConfigDict | Mapping[str, Any]) -> dict:
  if isinstance(config, ml_collections.ConfigDict):
    return config.to_dict()
  return dict(config)


def unknown_keys(config: ml_collections.ConfigDict | Mapping[str, Any]):
  """The dotted keys of `config` the schema does not have, sorted."""
  known = flatten(default_config().to_dict())
  return sorted(set(flatten(_as_dict(config))) - set(known))


def missing_keys(config: ml_collections.ConfigDict | Mapping[str, Any]):
  """The dotted keys of the schema that `config` lacks, sorted."""
  known = flatten(default_config().to_dict())
  return sorted(set(known) - set(flatten(_as_dict(config))))


def check_known(config: ml_collections.ConfigDict | Mapping[str, Any]) -> None:
  """Refuses keys the schema lacks.

  Raises:
    errors.UserError: one line naming the first unknown key, the closest
      known one and where keys are defined.
  """
  unknown = unknown_keys(config)
  if not unknown:
    return
  known = flatten(default_config().to_dict())
  close = difflib.get_close_matches(unknown[0], known, n=1)
  hint = f' (did you mean {close[0]!r}?)' if close else ''
  raise errors.UserError(
    f'config key {unknown[0]!r} is not in the training config schema{hint}'
    f'{f" ({len(unknown)} unknown: {unknown})" if len(unknown) > 1 else ""}; '
    'configs override the keys of cco_jax.config_schema.default_config() '
    'and add none.'
  )


def _to_tuples(value):
  """JSON lists back to tuples, as the config files write them."""
  if isinstance(value, Mapping):
    return {k: _to_tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_to_tuples(v) for v in value)
  return value


def _merge(defaults: dict, given: Mapping[str, Any]) -> dict:
  merged = dict(defaults)
  for key, value in given.items():
    if (
      isinstance(value, Mapping)
      and key in defaults
      and isinstance(defaults[key], dict)
    ):
      merged[key] = _merge(defaults[key], value)
    else:
      merged[key] = value
  return merged


def log_missing(config: Mapping[str, Any], source: str) -> list[str]:
  """Logs (and returns) the schema's keys `config` lacks, naming `source`."""
  missing = missing_keys(config)
  if missing:
    logging.info(
      '%s lacks %d key(s) added since it was written; they take their '
      'defaults: %s.',
      source,
      len(missing),
      ', '.join(missing),
    )
  return missing


def complete(
  config: ml_collections.ConfigDict | Mapping[str, Any], source: str = 'config'
) -> ml_collections.ConfigDict:
  """`config` with the keys it lacks at their defaults; unknown keys refused.

  For configs written before a key existed (an old `workdir/config.json`,
  JSON-decoded: lists become tuples): the filled keys are logged, naming
  `source`. A config with every key comes back equal (a new, unlocked copy).

  Raises:
    errors.UserError: a key the schema lacks (`check_known`).
  """
  check_known(config)
  given = _to_tuples(_as_dict(config))
  log_missing(given, source)
  return ml_collections.ConfigDict(_merge(default_config().to_dict(), given))


def _without(tree: Mapping[str, Any], dotted: list[str]) -> dict:
  """A copy of `tree` without the dotted leaf keys `dotted`."""
  out = {}
  for key, value in tree.items():
    inner = [k[len(key) + 1 :] for k in dotted if k.startswith(f'{key}.')]
    if isinstance(value, Mapping):
      out[key] = _without(value, inner)
    elif key not in dotted:
      out[key] = value
  return out


def load_saved(
  path: str | epath.PathLike, *, complete_loss: bool = True
) -> ml_collections.ConfigDict:
  """The full config of a run's `config.json` (`complete`, logged).

  `complete_loss=False` (a trained model used, not trained: restore,
  evaluation, explanation) keeps `loss` as saved: its defaults are the
  objectives' own (`cco_jax.objectives`, training code that using a model
  must not load), and using a trained model never reads them.

  Raises:
    FileNotFoundError: `path` does not exist.
  """
  path = epath.Path(path)
  saved = json.loads(path.read_text())
  loss = None if complete_loss else saved.pop('loss', {})
  schema = default_config(loss=complete_loss).to_dict()
  flat_schema = flatten(schema)
  unknown = sorted(set(flatten(saved)) - set(flat_schema))
  if unknown:
    logging.warning(
      '%s has keys this version does not know; ignored: %s.',
      path,
      ', '.join(unknown),
    )
    saved = _without(saved, unknown)
  given = _to_tuples(saved)
  missing = sorted(set(flat_schema) - set(flatten(given)))
  if missing:
    logging.info(
      '%s lacks %d key(s) added since it was written; they take their '
      'defaults: %s.',
      path,
      len(missing),
      ', '.join(missing),
    )
  config = ml_collections.ConfigDict(_merge(schema, given))
  if loss is not None:
    config.loss = ml_collections.ConfigDict(_to_tuples(loss))
  return config
