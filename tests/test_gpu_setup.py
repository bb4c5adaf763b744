"""What the GPU scripts rely on: a complete wheel folder, the GPU XLA flags,
the persistent compilation cache, and the loop benchmark's timed window.

No GPU is needed: the flags are checked as environment edits (in subprocesses
where JAX must not have started), the cache on CPU, where JAX stores and
reloads compiled programs the same way.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
import zipfile

import pytest

from cco_jax.runtime import compilation_cache
from cco_jax.runtime import xla_gpu
from experiments.benchmarks import training_loop
from experiments.benchmarks import training_settings
from experiments.gpu import check_wheels

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------
# check_wheels
# ---------------------------------------------------------------------------


def write_wheel(folder, filename: str, requires: tuple[str, ...] = ()) -> str:
  """A minimal wheel: just its METADATA with `Requires-Dist` lines."""
  name, version = filename.split('-')[:2]
  path = os.path.join(folder, filename)
  lines = ['Metadata-Version: 2.1', f'Name: {name}', f'Version: {version}']
  lines += [f'Requires-Dist: {r}' for r in requires]
  with zipfile.ZipFile(path, 'w') as archive:
    archive.writestr(
      f'{name}-{version}.dist-info/METADATA', '\n'.join(lines) + '\n'
    )
  return path


def test_complete_folder_passes(tmp_path):
  paths = [
    write_wheel(
      tmp_path,
      'promise-2.3-py3-none-any.whl',
      ('six', 'typing; python_version < "3.5"'),
    ),
    write_wheel(tmp_path, 'six-1.17.0-py2.py3-none-any.whl'),
    write_wheel(
      tmp_path,
      'dm_tree-0.1.10-cp312-cp312-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl',
      ('absl-py>=0.6.1', 'numpy', 'pytest; extra == "test"'),
    ),
  ]
  assert check_wheels.problems(paths) == []


def test_sdist_missing_requirement_and_wrong_platform_are_named(tmp_path):
  sdist = tmp_path / 'promise-2.3.tar.gz'
  sdist.write_text('')
  paths = [
    str(sdist),
    # promise's wheel without six (the image failure this check prevents).
    write_wheel(tmp_path, 'promise-2.3-py3-none-any.whl', ('six',)),
    write_wheel(
      tmp_path, 'array_record-0.8.6-cp311-cp311-manylinux_2_17_x86_64.whl'
    ),
    write_wheel(tmp_path, 'grain-0.2.18-cp312-cp312-macosx_11_0_arm64.whl'),
    write_wheel(tmp_path, 'toml-0.10.2-py2.py3-none-any.whl'),
    write_wheel(tmp_path, 'toml-0.10.1-py2.py3-none-any.whl'),
  ]
  found = '\n'.join(check_wheels.problems(paths))
  assert 'promise-2.3.tar.gz: not a wheel' in found
  assert 'promise requires six' in found
  assert 'array_record-0.8.6-cp311' in found and 'CPython 3.12' in found
  assert 'grain-0.2.18-cp312-cp312-macosx_11_0_arm64.whl: no tag' in found
  assert 'toml: 2 versions' in found
  assert len(check_wheels.problems(paths)) == 5


def test_image_packages_cover_the_image_jax():
  for name in ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'attrs'):
    assert name in check_wheels.IMAGE_PACKAGES
  for name in ('tensorflow-datasets', 'grain', 'promise', 'six'):
    assert name not in check_wheels.IMAGE_PACKAGES


# ---------------------------------------------------------------------------
# runtime: GPU flags and compilation cache
# ---------------------------------------------------------------------------


def run_python(code: str, **env) -> str:
  """Runs `code` in a fresh interpreter (JAX not started) and returns stdout."""
  environment = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  environment.update(env)
  result = subprocess.run(
    [sys.executable, '-c', textwrap.dedent(code)],
    capture_output=True,
    text=True,
    env=environment,
    cwd=REPO,
    check=True,
  )
  return result.stdout.strip()


def test_gpu_flags_added_once_and_respect_the_user(monkeypatch):
  monkeypatch.delenv('XLA_FLAGS', raising=False)
  monkeypatch.delenv(xla_gpu.GPU_DISABLE_ENV, raising=False)
  added = xla_gpu.apply(force=True)
  assert added == ' '.join(xla_gpu.GPU_XLA_FLAGS)
  assert os.environ['XLA_FLAGS'] == added
  assert xla_gpu.apply(force=True) == ''  # Already there: not twice.
  monkeypatch.setenv(
    'XLA_FLAGS', '--xla_gpu_enable_latency_hiding_scheduler=false'
  )
  assert xla_gpu.apply(force=True) == ''
  assert os.environ['XLA_FLAGS'].endswith('=false')
  monkeypatch.delenv('XLA_FLAGS')
  monkeypatch.setenv(xla_gpu.GPU_DISABLE_ENV, '0')
  assert xla_gpu.apply(force=True) == ''
  assert 'XLA_FLAGS' not in os.environ


def test_gpu_flags_only_with_a_cuda_plugin(monkeypatch):
  monkeypatch.delenv('XLA_FLAGS', raising=False)
  monkeypatch.delenv(xla_gpu.GPU_DISABLE_ENV, raising=False)
  monkeypatch.setattr(xla_gpu, 'cuda_plugin_installed', lambda: False)
  assert xla_gpu.apply() == ''
  assert 'XLA_FLAGS' not in os.environ
  monkeypatch.setattr(xla_gpu, 'cuda_plugin_installed', lambda: True)
  assert xla_gpu.apply() == ' '.join(xla_gpu.GPU_XLA_FLAGS)


def test_gpu_flags_accepted_by_xla():
  """The flags parse: XLA aborts the process on an unknown flag."""
  out = run_python(
    """
    from cco_jax.runtime import xla_gpu
    added = xla_gpu.apply(force=True)
    import jax, jax.numpy as jnp
    print(added, float(jnp.ones(3).sum()))
    """
  )
  assert out.endswith('3.0') and 'latency_hiding' in out


def test_compilation_cache_stores_and_is_configurable(tmp_path, monkeypatch):
  monkeypatch.setenv(
    compilation_cache.COMPILATION_CACHE_ENV, str(tmp_path / 'env')
  )
  assert compilation_cache.compilation_cache_dir() == str(tmp_path / 'env')
  assert compilation_cache.compilation_cache_dir('') == ''
  assert compilation_cache.compilation_cache_dir('/x') == '/x'
  directory = tmp_path / 'cache'
  code = """
    from cco_jax.runtime import compilation_cache
    print(compilation_cache.enable_compilation_cache(None, min_compile_seconds=0))
    import jax, jax.numpy as jnp
    f = jax.jit(lambda x: jnp.sin(x) @ x.T + 1.0)
    print(float(f(jnp.ones((64, 64))).sum()))
    """
  first = run_python(
    code, **{compilation_cache.COMPILATION_CACHE_ENV: str(directory)}
  )
  assert first.splitlines()[0] == str(directory)
  stamps = {e.name: e.stat().st_mtime_ns for e in os.scandir(directory)}
  assert stamps, 'nothing was stored in the cache'
  second = run_python(
    code, **{compilation_cache.COMPILATION_CACHE_ENV: str(directory)}
  )
  assert second == first
  # Loaded, not compiled and stored again.
  assert {e.name: e.stat().st_mtime_ns for e in os.scandir(directory)} == stamps


# ---------------------------------------------------------------------------
# The loop benchmark's timed window
# ---------------------------------------------------------------------------


def test_loop_window_spans_whole_evaluation_periods():
  setting = training_settings.LoopSetting(
    'cpu', eval_every=40, log_every=10, evals=3
  )
  assert setting.window == (50, 170)
  assert setting.num_steps == 170


def test_window_rate_is_steps_over_seconds_of_the_window():
  # Logs every 10 steps; intervals (0,10] compile, (40,50] holds the first
  # evaluation's stall; the window (50, 90] takes 4 intervals.
  seconds = {
    10: 30.0,
    20: 1.0,
    30: 1.0,
    40: 1.0,
    50: 9.0,
    60: 1.0,
    70: 1.0,
    80: 1.0,
    90: 3.0,
    100: 1.0,
  }
  records = [{'step': 0, 'identity_error': 0.0}]
  for step, t in seconds.items():
    records.append(
      {'step': step, 'train_loss': 1.0, 'train_steps_per_second': 10 / t}
    )
    records.append({'step': step, 'eval_accuracy': 0.5})
  rate = training_loop.window_rate(records, 50, 90, eval_every=40)
  assert rate['steps_per_s'] == pytest.approx(40 / 6.0)
  # (80, 90] follows the evaluation at 80; the other three are quiet.
  assert rate['steps_per_s_without_evaluation'] == pytest.approx(10.0)
  assert rate['interval_steps_per_s'] == pytest.approx(
    [10, 10, 10, 10 / 3], abs=1e-4
  )
  with pytest.raises(ValueError, match='cover 40 of the 45 steps'):
    training_loop.window_rate(records, 50, 95)


# ---------------------------------------------------------------------------
# The check's summary
# ---------------------------------------------------------------------------


def _loop_entry(batch: int, step_rate: float, loop_rate: float) -> dict:
  rate = lambda r: {'images_per_s_per_device': r, 'images_per_s': r}
  return {
    'per_device_batch': batch,
    'dtype': 'bfloat16',
    'train_step_compile': {'compiles': 1, 'compile_s': 12.0, 'cache_loads': 0},
    'loop_compiles (eval, predict, ...)': {'compiles': 5, 'compile_s': 3.0},
    'gflops_per_device_step': 36.04 * batch,
    'flops_source': 'flops.json (CPU lowering)',
    'step_alone': {**rate(step_rate), 'mfu': 0.25},
    'full_loop': {**rate(loop_rate), 'mfu': 0.24},
    'loop_without_evaluation': rate(loop_rate),
    'input_pipeline_alone': rate(9000.0),
    'loop_over_step': loop_rate / step_rate,
    'setting': {'eval_every': 20},
    'evaluation_share': 0.01,
    'checkpoint_every': 500,
  }


def test_summary_prints_each_batch_size_and_names_a_skipped_one():
  from experiments.gpu import summarise  # pylint: disable=g-import-not-at-top

  results = {
    'environment': {'jax': '0.11.2', 'backend': 'gpu', 'device_count': 1},
    'loop': [
      _loop_entry(128, 100.0, 96.0),
      {
        'skipped': 'per-device batch 256: 40 s left in the budget, the '
        'previous batch size took 180 s'
      },
    ],
  }
  lines = summarise.summary_lines(results, 'CARD')
  assert lines[0] == 'card CARD | jax 0.11.2 | backend gpu | 1 device(s)'
  assert lines[1].startswith(
    'batch 128/device bfloat16: first train step call 1 compile(s) 12.0 s, '
    '0 cache load(s)'
  )
  assert 'GFLOP/step 4613.1 (flops.json (CPU lowering))' in lines[1]
  assert 'step  pmapped, fixed batch' in lines[2] and 'MFU  25.0%' in lines[2]
  assert '96.0 images/s per device  MFU  24.0%' in lines[3]
  assert lines[6].startswith('  loop / step 0.960 (evaluation every 20 steps')
  assert lines[-1] == (
    'loop  skipped: per-device batch 256: 40 s left in the budget, the '
    'previous batch size took 180 s'
  )
  # The section ran out of time: said so.
  assert summarise.summary_lines(None, 'CARD')[-1] == (
    'loop  no result (the section did not finish)'
  )


# ---------------------------------------------------------------------------
# No GPU: the check refuses at once
# ---------------------------------------------------------------------------


def _repo() -> str:
  return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(
  subprocess.run(
    'nvidia-smi -L', shell=True, capture_output=True, check=False
  ).returncode
  == 0,
  reason='a GPU is visible here',
)
def test_check_without_a_gpu_stops_within_a_minute_naming_the_problem(tmp_path):
  env = {
    **os.environ,
    'PYTHON': sys.executable,
    'OUT': str(tmp_path),
    'WHEEL_DIR': str(tmp_path / 'no_wheels'),
  }
  start = time.monotonic()
  done = subprocess.run(
    ['bash', 'experiments/gpu/check.sh'],
    cwd=_repo(),
    env=env,
    capture_output=True,
    text=True,
    timeout=60,
    check=False,
  )
  assert time.monotonic() - start < 60
  assert done.returncode == 3, done.stdout + done.stderr
  assert 'No GPU' in done.stderr and '--smoke' in done.stderr
  assert not (tmp_path / 'gpu_check').exists()  # Nothing ran.


def test_benchmark_pinned_to_cuda_without_one_stops_with_one_line(tmp_path):
  """The same guard inside the benchmark (`--platform=cuda`): a usage error
  naming the platform, before any section runs."""
  done = subprocess.run(
    [
      sys.executable,
      '-m',
      'experiments.benchmarks.training',
      '--platform=cuda',
      '--sections=loop',
      f'--out={tmp_path / "loop.json"}',
    ],
    cwd=_repo(),
    env={**os.environ, 'JAX_PLATFORMS': ''},
    capture_output=True,
    text=True,
    timeout=60,
    check=False,
  )
  assert done.returncode != 0
  assert '--platform=cuda: JAX sees no cuda device' in done.stderr
  assert 'Traceback' not in done.stderr
  assert not (tmp_path / 'loop.json').exists()


# ---------------------------------------------------------------------------
# Checkpoint cadence, MFU
# ---------------------------------------------------------------------------


@pytest.mark.parametrize('eval_every', [1, 7, 41, 250, 500, 777])
def test_default_checkpoint_cadence_lands_on_evaluations(eval_every):
  from cco_jax import train_setup  # pylint: disable=g-import-not-at-top

  assert train_setup.default_checkpoint_every(eval_every, 'cpu') == eval_every
  every = train_setup.default_checkpoint_every(eval_every, 'gpu')
  assert every % eval_every == 0
  assert every >= train_setup.CHECKPOINT_MIN_STEPS
  assert every - eval_every < train_setup.CHECKPOINT_MIN_STEPS  # The smallest.
  # The budget it is sized for: a save stalling 1 s, steps of 0.1 s.
  assert 1.0 / (every * 0.1) <= train_setup.CHECKPOINT_BUDGET


def test_resolve_schedule_checkpoints_less_often_on_accelerators(monkeypatch):
  import jax  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top

  from cco_jax import train_setup  # pylint: disable=g-import-not-at-top
  from experiments.configs import pets  # pylint: disable=g-import-not-at-top

  config = pets.get_config('cpu')
  with config.unlocked():
    config.eval_every_steps = 41
  assert isinstance(config, ml_collections.ConfigDict)
  cpu = train_setup.resolve_schedule(config, 3312, 368)
  assert (cpu.eval_every, cpu.checkpoint_every) == (41, 41)
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  gpu = train_setup.resolve_schedule(config, 3312, 368)
  assert (gpu.eval_every, gpu.checkpoint_every) == (41, 533)
  with config.unlocked():
    config.checkpoint_every_steps = 82  # Set: kept.
  assert train_setup.resolve_schedule(config, 3312, 368).checkpoint_every == 82


def test_gpu_variants_batch_per_device_and_keep_the_original_reachable():
  from experiments.configs import pets  # pylint: disable=g-import-not-at-top

  for variant in ('binary', 'breeds', 'binary_ce', 'breeds_ce'):
    config = pets.get_config(variant)
    assert config.per_device_batch_size == 256
    assert config.per_device_eval_batch_size == 256
    assert config.accumulation_steps == 1
    assert config.batch_size == 80  # With per_device_batch_size=0.


def test_peak_table_and_mfu():
  from experiments.benchmarks import (
    training_mfu,  # pylint: disable=g-import-not-at-top
  )

  assert training_mfu.peak_tflops('NVIDIA H200') == 989
  assert training_mfu.peak_tflops('NVIDIA H100 80GB HBM3') == 989
  assert training_mfu.peak_tflops('NVIDIA H100 PCIe') == 756
  assert training_mfu.peak_tflops('Tesla T4') == 0
  row = training_mfu.rate_row(10.0, 256, 1, 9.2256e12, 989.0)
  assert row['images_per_s'] == 2560.0
  assert row['achieved_tflops_per_device'] == pytest.approx(92.256)
  assert row['mfu'] == pytest.approx(92.256 / 989)
  assert 'mfu' not in training_mfu.rate_row(10.0, 256, 1, 1e12)
  assert 'achieved_tflops_per_device' not in training_mfu.rate_row(
    10.0, 256, 1, None
  )


def test_shared_programs_hand_the_compiled_functions_to_the_loop():
  """`train_and_evaluate` calls `train.build`: inside the context it gets
  the benchmark's pmapped functions, model and optimizer (so nothing is
  traced or compiled again), its own data; outside, the real `build`."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  import types  # pylint: disable=g-import-not-at-top

  from cco_jax import train_setup  # pylint: disable=g-import-not-at-top

  def fake_setup(tag):
    fields = {
      f.name: f'{f.name}_{tag}' for f in dataclasses.fields(train_setup.Setup)
    }
    return train_setup.Setup(**fields)

  module = types.SimpleNamespace(build=lambda config: fake_setup(config))
  original = module.build
  benchmark = fake_setup('benchmark')
  with training_loop.shared_programs(module, benchmark):
    loop = module.build('loop')
  assert module.build is original
  for name in ('p_train_step', 'p_eval_step', 'p_predict', 'model', 'tx'):
    assert getattr(loop, name) == getattr(benchmark, name)
  assert loop.train_iter == 'train_iter_loop'  # Its own data.
  assert loop.schedule == 'schedule_loop'


def test_loop_skips_a_batch_size_once_the_budget_is_spent(tmp_path):
  setting = training_settings.LoopSetting(
    'cpu', eval_every=4, log_every=2, per_device_batches=(128, 256)
  )
  entries = training_loop.run_loop(
    setting, str(tmp_path), '', budget_left=lambda: 0.0
  )
  assert entries == [
    {
      'skipped': f'per-device batch {b}: 0 s left in the budget, the '
      'previous batch size took 0 s'
    }
    for b in (128, 256)
  ]
  assert training_loop.run_loop(setting, str(tmp_path / 'none'), '') == [
    {'skipped': f'no Pets sample at {tmp_path / "none"}'}
  ]


@pytest.mark.parametrize(
  'left, second',
  [
    (40.0, {'timed': True}),
    (
      20.0,
      {
        'skipped': 'per-device batch 256: 20 s left in the budget, the '
        'previous batch size took 30 s'
      },
    ),
  ],
)
def test_loop_starts_a_batch_size_only_if_the_previous_ones_time_is_left(
  tmp_path, monkeypatch, left, second
):
  """The first batch size took 30 s: with 40 s left the second starts, with
  20 s left it is skipped, saying why."""
  clock = iter([0.0, 30.0, 100.0, 130.0])
  lefts = iter([500.0, left])
  monkeypatch.setattr(training_loop, 'loop_config', lambda *a, **k: None)
  monkeypatch.setattr(
    training_loop, 'time_loop', lambda *a, **k: {'timed': True}
  )
  setting = training_settings.LoopSetting(
    'cpu', eval_every=4, log_every=2, per_device_batches=(128, 256)
  )
  entries = training_loop.run_loop(
    setting,
    str(tmp_path),
    str(tmp_path),
    budget_left=lambda: next(lefts),
    clock=lambda: next(clock),
  )
  assert entries == [{'timed': True}, second]
