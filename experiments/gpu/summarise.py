r"""Prints the GPU check's numbers: images/s and MFU of the step and the loop.

    python -m experiments.gpu.summarise LOOP_JSON --card=NAME

Reads what `experiments.benchmarks.training --sections=loop` wrote (missing:
the section did not finish) and prints, per per-device batch, the pmapped
step alone and the real loop (images/s per device, MFU), loop / step, the
compile times and where the FLOPs came from, in this form (X: figures):

    card NAME | jax VERSION | backend gpu | 1 device(s)
    batch 128/device bfloat16: first train step call N compile(s) X s, N
      cache load(s); in the loop N more compiles, X s; GFLOP/step X (...)
      step  pmapped, fixed batch        X images/s per device  MFU X%
      loop  train_and_evaluate          X images/s per device  MFU X%
      loop  without the evaluations     X images/s per device  MFU X%
      input pipeline alone X images/s
      loop / step X (evaluation every 20 steps; evaluation share X%;
      checkpoints every 500 steps)
"""

from __future__ import annotations

import argparse
import json
import os


def _mfu(row: dict) -> str:
  return f'MFU {row["mfu"]:6.1%}' if 'mfu' in row else 'MFU -'


def _rate(label: str, row: dict) -> str:
  return (
    f'  {label:34s}{row["images_per_s_per_device"]:9.1f} images/s per device  '
    f'{_mfu(row)}'
  )


def loop_lines(entry: dict) -> list[str]:
  """The lines of one per-device batch's loop entry."""
  if 'skipped' in entry:
    return [f'loop  skipped: {entry["skipped"]}']
  compile_ = entry['train_step_compile']
  others = entry['loop_compiles (eval, predict, ...)']
  return [
    f'batch {entry["per_device_batch"]}/device {entry["dtype"]}: first train '
    f'step call {compile_["compiles"]} compile(s) {compile_["compile_s"]:.1f} s'
    f', {compile_["cache_loads"]} cache load(s); in the loop '
    f'{others["compiles"]} more compiles, {others["compile_s"]:.1f} s; '
    f'GFLOP/step {entry["gflops_per_device_step"]:.1f} ({entry["flops_source"]})',
    _rate('step  pmapped, fixed batch', entry['step_alone']),
    _rate('loop  train_and_evaluate', entry['full_loop']),
    _rate('loop  without the evaluations', entry['loop_without_evaluation']),
    f'  input pipeline alone {entry["input_pipeline_alone"]["images_per_s"]:.1f} '
    'images/s',
    f'  loop / step {entry["loop_over_step"]:.3f} (evaluation every '
    f'{entry["setting"]["eval_every"]} steps; evaluation share '
    f'{entry["evaluation_share"]:.1%}; checkpoints every '
    f'{entry["checkpoint_every"]} steps)',
  ]


def summary_lines(results: dict | None, card: str) -> list[str]:
  """The summary of the loop results (None: the section did not finish)."""
  env = (results or {}).get('environment', {})
  lines = [
    f'card {card} | jax {env.get("jax", "?")} | backend '
    f'{env.get("backend", "?")} | {env.get("device_count", "?")} device(s)'
  ]
  entries = (results or {}).get('loop')
  if not entries:
    return lines + ['loop  no result (the section did not finish)']
  for entry in entries:
    lines += loop_lines(entry)
  return lines


def _read(path: str) -> dict | None:
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('loop_json')
  parser.add_argument('--card', default='?')
  args = parser.parse_args()
  for line in summary_lines(_read(args.loop_json), args.card):
    print(line)


if __name__ == '__main__':
  main()
