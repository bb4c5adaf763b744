r"""Speed of the train step (CE, ACE, ACE + divergence), of the maps, and of the loop.

    python -m experiments.benchmarks.training --preset=cpu --out=/tmp/benchmark_cpu.json
    python -m experiments.benchmarks.training --preset=gpu --dtype=bfloat16 --out=...
    python -m experiments.benchmarks.training --smoke --out=/tmp/smoke.json   # ~1 min, any machine

Sections (--sections, default all of the preset's):
  step  Train-step time of the library's `train_step` (jit, buffers donated,
        `block_until_ready`) for each objective on the same model and batch:
        'ce' (cross-entropy of the logits), 'ace' (`ablated_cross_entropy`),
        'ace_kld' (`ablated_cross_entropy` + 1e-3 x `cam_divergence`), with
        Adam (lr 1e-3). The objectives take turns step by step (so load that
        drifts hits all alike); the compile call and one warm-up step are
        excluded; medians over --repeats. Also: trace+lower and compile time,
        FLOPs per step (XLA cost analysis of the lowered, not yet
        optimised module), achieved FLOP/s and, with
        --peak_tflops, model FLOP utilisation (MFU).
  cams  All-class HiResCAMs by one einsum (`cams.hirescam`) versus per-class
        autodiff (gradient of logit c times activation, summed over channels),
        (a) on given last-stage features, backward through the head only
        (a Python loop of one jitted gradient per class, and a vmap over
        classes), and (b) as post-hoc tools do it: one forward through the
        network, then per class one backward through the whole network (to
        the parameters, like `loss.backward()`), compared with the network's
        forward pass, which yields the maps by the einsum. The maps of both
        methods are checked equal.
  loop  What a user gets: `cco_jax.train.train_and_evaluate` itself (Grain
        input on the Pets sample, pmapped step, metric summaries, evaluation
        of the validation split, figures and checkpoints at the config's
        cadence), timed from its own log records over whole evaluation
        periods after the first (`training_settings.LoopSetting`); beside it
        the same pmapped program on one fixed device batch (the bare step:
        the loop runs the functions it compiled, one compile per batch size)
        and the input pipeline alone; once per per-device batch of the
        preset. Images/s, TFLOP/s per device (FLOPs from --flops_cache, or a
        CPU lowering when on the CPU: `training_flops`) and, with
        --peak_tflops, MFU of loop and step; compile times. --loop_eval_every
        sets the evaluation cadence.

Presets:
  cpu    step: create_model('resnet18', num_classes=2) at 128 px, batch 32;
         the `cpu` config's model (64 px, batch 32); ResNet-50 @224, batch 8,
         37 classes; and, CE only, the two ResNets as the CE control
         (cam_faithful=False: the unchanged architecture, whose last stage
         downsamples, a quarter of the last stage's FLOPs), to compare with
         `experiments.benchmarks.torch_reference --stock`. cams: ResNet-50 @224
         features (8, 14, 14, 2048), C = 2 and 37; whole network at batch 1.
         loop: `cpu` config, evaluation every 100 steps, one period timed.
  gpu    step: the `binary` config's model (ResNet-50 @224, its per-device
         batch, 2 classes, ACE + divergence: label binary_config), ResNet-50
         @224 (--dtype, bfloat16 for mixed precision), batch 80 with 37 and 2
         classes, and 37 classes at batch 192 (ACE + divergence only). cams:
         features (80, 14, 14, 2048); network batch 8. loop: the `binary`
         config at 128 and 256 images per device, evaluation every 20 steps,
         four periods timed.
  --smoke  a tiny ResNet (CE and ACE + divergence only), tiny maps, a 32 px
         loop (10 steps, evaluation every 4) and 2 repeats: checks that
         everything runs (each step still takes ~20 s to compile on a busy
         2-core CPU), not speed.

On CPU, `cco_jax.runtime.xla_cpu`'s XLA flag is applied (as `experiments.pets`
does) unless --nocpu_xla_tuning; on GPU, its GPU flags (`cco_jax.runtime.xla_gpu`),
and the persistent compilation cache of --compilation_cache or
$CCO_COMPILATION_CACHE; --compare_cpu_xla times every objective both
without and with it, in the same process. Timings on a shared machine are
noisy: the load average is recorded with every section.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path
import time

from absl import app
from absl import flags
import jax.numpy as jnp

from cco_jax.runtime import compilation_cache
from cco_jax.runtime import xla_cpu
from cco_jax.runtime import xla_gpu
from experiments.benchmarks import training_flops
from experiments.benchmarks import training_report
from experiments.benchmarks import training_run
from experiments.benchmarks import training_settings as settings_lib
from experiments.benchmarks import training_steps

_PRESET = flags.DEFINE_enum(
  'preset', 'cpu', ['cpu', 'gpu'], 'Which settings to time.'
)
_SMOKE = flags.DEFINE_bool(
  'smoke', False, 'Tiny models, few repeats (tests, first check).'
)
_OUT = flags.DEFINE_string(
  'out', '/tmp/benchmark.json', 'Where to write the JSON results.'
)
_REPEATS = flags.DEFINE_integer(
  'repeats', None, 'Timed steps per objective (default: preset).'
)
_MIN_SECONDS = flags.DEFINE_float(
  'min_seconds',
  10.0,
  'Time at least this many seconds of steps per objective '
  f'(more repeats for short steps, at most {training_steps.MAX_REPEATS}); 0 = exactly --repeats.',
)
_MODELS = flags.DEFINE_list(
  'models',
  None,
  "Step settings to run: labels of the preset's settings (e.g. "
  'resnet18_128,cpu_config) or NAME:SIZE:BATCH:CLASSES (e.g. resnet50:224:80:37).',
)
_OBJECTIVES = flags.DEFINE_list(
  'objectives',
  None,
  "Objectives to time (default: each setting's; ce is needed for the ratios).",
)
_SECTIONS = flags.DEFINE_list(
  'sections', None, f'Any of {settings_lib.SECTIONS} (default: preset).'
)
_DTYPE = flags.DEFINE_enum(
  'dtype',
  'float32',
  ['float32', 'bfloat16'],
  'Backbone compute dtype for the step section.',
)
_PEAK_TFLOPS = flags.DEFINE_float(
  'peak_tflops',
  0.0,
  'Peak dense TFLOP/s of the device for MFU (0: not reported). '
  'H100 SXM / H200: 989 (bfloat16 dense), 495 (TF32).',
)
_CPU_XLA_TUNING = flags.DEFINE_bool(
  'cpu_xla_tuning', True, 'Apply cco_jax.runtime.xla_cpu (as experiments.pets).'
)
_COMPARE_CPU_XLA = flags.DEFINE_bool(
  'compare_cpu_xla',
  False,
  'Time each objective compiled without and with the CPU '
  'tuning (implies --nocpu_xla_tuning for the process-wide flag).',
)
_POINTWISE_AS_DOT = flags.DEFINE_bool(
  'pointwise_as_dot',
  True,
  'Models run 1x1 convolutions as matrix products '
  '(`ops.Conv`, the default); --nopointwise_as_dot times plain nn.Conv.',
)
_PETS_DIR = flags.DEFINE_string(
  'pets_dir',
  str(settings_lib.SHARED_DATA / 'oxford-iiit-pet-sample'),
  'Oxford-IIIT Pet sample (official layout) for the loop.',
)
_TFDS_DATA_DIR = flags.DEFINE_string(
  'tfds_data_dir',
  '',
  "Prepared data for the loop; '' = a fresh temporary directory.",
)
_LOOP_EVAL_EVERY = flags.DEFINE_integer(
  'loop_eval_every',
  None,
  "Evaluate every N steps in the loop section (default: the preset's, "
  'one epoch of full Pets).',
)
_LOOP_OVERRIDES = flags.DEFINE_multi_string(
  'loop_override',
  [],
  'KEY=VALUE config overrides of the loop (e.g. num_figure_examples=0), '
  'values parsed as Python literals where they can be.',
)
_FLOPS_CACHE = flags.DEFINE_string(
  'flops_cache',
  '',
  'flops.json of `experiments.benchmarks.training_flops` (counts on a CPU '
  "lowering) for the loop's MFU; '' = count on the CPU backend, none on a GPU.",
)
_BUDGET_S = flags.DEFINE_float(
  'budget_s',
  0.0,
  'Seconds this process may take: a further loop batch size starts only if '
  'more are left than the previous one took (each needs its own compile; '
  '0 = no limit). Results are written after each section and batch size, so '
  'a time limit keeps what finished.',
)
_PLATFORM = flags.DEFINE_enum(
  'platform',
  None,
  ['cpu', 'cuda'],
  'Run on this JAX platform only, and stop at once when it has no device '
  '(default: JAX chooses, falling back to the CPU).',
)
_COMPILATION_CACHE = flags.DEFINE_string(
  'compilation_cache',
  None,
  'Persistent XLA compilation cache directory (default: '
  f'${compilation_cache.COMPILATION_CACHE_ENV} if set; "" = off).',
)


# ----------------------------------------------------------------------------
# Main.
# ----------------------------------------------------------------------------
def _parse_overrides(items) -> dict:
  """KEY=VALUE strings to a dict, values as Python literals where they parse."""
  overrides = {}
  for item in items:
    key, sep, value = item.partition('=')
    if not sep:
      raise app.UsageError(f'--loop_override {item!r} is not KEY=VALUE.')
    try:
      overrides[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      overrides[key] = value
  return overrides


def _apply_cpu_flags() -> str:
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top

  if xla_bridge.backends_are_initialized():
    raise RuntimeError('JAX started before the XLA flags were set.')
  added = xla_gpu.apply()  # Only where a CUDA plugin is installed.
  if _CPU_XLA_TUNING.value and not _COMPARE_CPU_XLA.value:
    added = f'{added} {xla_cpu.apply()}'
  return added.strip()


def _require_platform(platform: str | None) -> None:
  """Pins JAX to `platform` and stops with one line when it has no device
  (a CUDA plugin that fails to load would otherwise fall back to the CPU)."""
  if platform is None:
    return
  import jax  # pylint: disable=g-import-not-at-top

  jax.config.update('jax_platforms', platform)
  try:
    devices = jax.devices()
  except Exception as e:  # pylint: disable=broad-except
    # RuntimeError (no plugin) or, jax 0.10.2, AssertionError (no backend).
    raise app.UsageError(
      f'--platform={platform}: JAX sees no {platform} device '
      f'({type(e).__name__}: {e}). Run on a machine where it does (is the '
      'CUDA plugin installed?), or drop --platform.'
    ) from None
  print(f'Devices: {devices}', flush=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  start = time.monotonic()
  added = _apply_cpu_flags()
  _require_platform(_PLATFORM.value)
  cache = compilation_cache.enable_compilation_cache(_COMPILATION_CACHE.value)
  if cache:
    print(f'Persistent compilation cache: {cache}')
  chosen = settings_lib.preset(_PRESET.value, _SMOKE.value)
  settings = (
    [settings_lib.parse_setting(spec, chosen.steps) for spec in _MODELS.value]
    if _MODELS.value
    else list(chosen.steps)
  )
  sections = tuple(_SECTIONS.value or chosen.sections)
  unknown = set(sections) - set(settings_lib.SECTIONS)
  if unknown:
    raise app.UsageError(
      f'Unknown --sections {sorted(unknown)}; choose from {settings_lib.SECTIONS}.'
    )
  budget = _BUDGET_S.value
  out = Path(_OUT.value)
  out.parent.mkdir(parents=True, exist_ok=True)

  def save(results: dict) -> None:  # Partial results survive a time limit.
    out.write_text(json.dumps(results, indent=2))

  results = training_run.run(
    chosen,
    settings,
    sections,
    _REPEATS.value or chosen.repeats,
    added_flags=added,
    dtype=jnp.dtype(_DTYPE.value).type,
    objectives=_OBJECTIVES.value,
    compare_cpu_xla=_COMPARE_CPU_XLA.value,
    peak_tflops=_PEAK_TFLOPS.value,
    pets_dir=_PETS_DIR.value,
    tfds_data_dir=_TFDS_DATA_DIR.value,
    loop_eval_every=_LOOP_EVAL_EVERY.value,
    loop_overrides=_parse_overrides(_LOOP_OVERRIDES.value),
    pointwise_as_dot=_POINTWISE_AS_DOT.value,
    min_seconds=_MIN_SECONDS.value,
    flops_cache=training_flops.read_cache(_FLOPS_CACHE.value),
    budget_left=(lambda: budget - (time.monotonic() - start))
    if budget
    else None,
  )
  training_report.print_tables(results)
  save(results)
  print(f'Wrote {_OUT.value}')


if __name__ == '__main__':
  app.run(main)
