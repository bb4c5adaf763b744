"""The training benchmark's environment record and printed tables."""

from __future__ import annotations

import os
import platform
import sys

import jax
import numpy as np


def environment(added_flags: str) -> dict:
  """Machine, versions, backend, device kind and count, flags and load."""
  from importlib import metadata  # pylint: disable=g-import-not-at-top

  device = jax.devices()[0]
  return {
    'machine': platform.machine(),
    'processor': platform.processor(),
    'cpus': os.cpu_count(),
    'python': sys.version.split()[0],
    'jax': jax.__version__,
    'jaxlib': metadata.version('jaxlib'),
    'flax': metadata.version('flax'),
    'optax': metadata.version('optax'),
    'numpy': np.__version__,
    'backend': jax.default_backend(),
    'device_kind': device.device_kind,
    'device_count': jax.device_count(),
    'xla_flags': os.environ.get('XLA_FLAGS', ''),
    'cpu_xla_flags_added': added_flags,
    'loadavg_start': list(os.getloadavg()),
  }


def print_tables(results: dict) -> None:
  """The results as the entry point prints them."""
  env = results['environment']
  print(
    f'\n{env["backend"]} ({env["device_kind"]}), {env["cpus"]} CPUs, jax '
    f'{env["jax"]}, XLA_FLAGS={env["xla_flags"]!r}'
  )
  for entry in results.get('step', []):
    setting = entry['setting']
    print(
      f'\n[step] {setting["label"]}: {setting["name"]} @{setting["image_size"]} px, '
      f'batch {setting["batch"]}, {setting["num_classes"]} classes, '
      f'{"" if setting.get("cam_faithful", True) else "CE control architecture, "}'
      f'{entry["dtype"]}, '
      f'{"1x1 as dot" if entry.get("pointwise_as_dot", True) else "1x1 by nn.Conv"}, '
      f'maps {entry["cam_size"]}, median of {entry["repeats"]}, '
      f'load {entry["loadavg_start"]} -> {entry["loadavg_end"]}'
    )
    print(
      f'  {"objective":22s} {"median s":>9s} {"img/s":>8s} {"/ CE":>6s} '
      f'{"CPU s":>7s} {"compile s":>9s} {"GFLOP":>8s} {"TFLOP/s":>8s}'
      + (
        f' {"MFU":>6s}'
        if any('mfu' in r for r in entry['objectives'].values())
        else ''
      )
    )
    for key, row in entry['objectives'].items():
      ratio = f'{row["ratio_to_ce"]:.3f}' if 'ratio_to_ce' in row else '-'
      mfu = f' {row["mfu"]:6.1%}' if 'mfu' in row else ''
      print(
        f'  {key:22s} {row["median_s"]:9.3f} {row["images_per_s"]:8.1f} {ratio:>6s} '
        f'{row["cpu_s_median"]:7.2f} {row["lower_s"] + row["compile_s"]:9.1f} '
        f'{row["gflops_per_step"]:8.1f} {row["achieved_tflops"]:8.3f}{mfu}'
      )
  if 'cams' in results:
    cams = results['cams']
    print(f'\n[cams] load {cams["loadavg_start"]} -> {cams["loadavg_end"]}')
    for count, row in cams['features'].items():
      print(
        f'  C={count:>3s} features {row["features_shape"]}: einsum '
        f'{row["einsum_s"] * 1e3:.3f} ms; autodiff through the head: loop '
        f'{row["autodiff_head_loop_s"] * 1e3:.2f} ms ({row["ratio_loop_to_einsum"]:.0f}x), '
        f'vmap {row["autodiff_head_vmap_s"] * 1e3:.2f} ms '
        f'({row["ratio_vmap_to_einsum"]:.0f}x); max rel err '
        f'{max(row["max_rel_err_loop"], row["max_rel_err_vmap"]):.1e}'
      )
    net = cams['network']
    print(
      f'  whole network, batch {net["network_batch"]}: forward with all maps '
      f'{net["forward_with_maps_s"]:.3f} s; forward keeping the VJP '
      f'{net["forward_keeping_vjp_s"]:.3f} s'
    )
    for count, row in net['classes'].items():
      extra = (
        f'; backwards / einsum on the same features '
        f'{row["ratio_backwards_to_einsum"]:.0f}x'
      )
      print(
        f'  C={count:>3s}: {row["backward_passes"]} backward passes '
        f'{row["backwards_s"]:.3f} s ({row["backward_per_class_s"]:.3f} s each); '
        f'autodiff total / forward with maps '
        f'{row["ratio_autodiff_total_to_forward_with_maps"]:.1f}x{extra}; max rel err '
        f'{row["max_rel_err"]:.1e}'
      )
  for loop in results.get('loop', []):
    print_loop(loop)


def print_loop(loop: dict) -> None:
  """The loop section's lines for one per-device batch."""
  if 'skipped' in loop:
    print(f'\n[loop] skipped: {loop["skipped"]}')
    return
  setting = loop['setting']
  print(
    f'\n[loop] {setting["variant"]} config ({loop["model"]}, '
    f'{loop["dtype"]}) @{loop["image_size"]} px, batch {loop["batch"]} on '
    f'{loop["devices"]} device(s); steps {loop["window_steps"]} with '
    f'{loop["evaluations_in_window"]} evaluation(s), every '
    f'{setting["eval_every"]} steps, checkpoints every '
    f'{loop["checkpoint_every"]}; load {loop["loadavg_start"]} -> '
    f'{loop["loadavg_end"]}'
  )
  compile_ = loop['train_step_compile']
  print(
    f'  train step: {compile_["compiles"]} compile(s), '
    f'{compile_["compile_s"]:.1f} s, {compile_["cache_loads"]} cache load(s) '
    f'{compile_["cache_load_s"]:.1f} s; in the loop: '
    f'{loop["loop_compiles (eval, predict, ...)"]}; '
    f'{loop["gflops_per_device_step"]:.1f} GFLOP per device step '
    f'({loop["flops_source"]})'
  )
  for name in (
    'full_loop',
    'loop_without_evaluation',
    'step_alone',
    'input_pipeline_alone',
  ):
    row = loop[name]
    mfu = f'  MFU {row["mfu"]:6.1%}' if 'mfu' in row else ''
    tflops = row.get('achieved_tflops_per_device')
    tflops = f'  {tflops:8.3f} TFLOP/s/device' if tflops else ''
    print(
      f'  {name:22s} {row["images_per_s"]:9.1f} images/s '
      f'({row["images_per_s_per_device"]:.1f} per device){tflops}{mfu}'
    )
  print(
    f'  loop / step {loop["loop_over_step"]:.3f}; without evaluation '
    f'{loop["loop_without_evaluation_over_step"]:.3f}; evaluation share '
    f'{loop["evaluation_share"]:.1%}'
  )
