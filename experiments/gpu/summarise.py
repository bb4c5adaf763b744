r"""Prints the GPU check's numbers: images/s and MFU of the step and the loop.

    python -m experiments.gpu.summarise STEP_JSON LOOP_JSON --card=NAME

Reads what `experiments.benchmarks.training` wrote for `--sections=step`
and `--sections=loop` (either may be missing: a section that ran out of time)
and prints one line per measurement, e.g.

    card NVIDIA H200 | jax 0.11.2 | 1 device(s)
    step  binary_config ace_kld  2600.0 images/s per device  MFU 41.0 %
    loop  full_loop              2400.0 images/s per device  MFU 37.9 %
    loop  step_alone (pmapped)   2550.0 images/s per device  MFU 40.3 %
    loop / step 0.941
"""

from __future__ import annotations

import argparse
import json
import os


def _mfu(row: dict) -> str:
  return f'MFU {row["mfu"]:6.1%}' if 'mfu' in row else 'MFU -'


def summary_lines(step: dict | None, loop: dict | None, card: str) -> list[str]:
  """The summary of the two result files (None: that section did not finish)."""
  env = (step or loop or {}).get('environment', {})
  lines = [
    f'card {card} | jax {env.get("jax", "?")} | backend '
    f'{env.get("backend", "?")} | {env.get("device_count", "?")} device(s)'
  ]
  if step and step.get('step'):
    for entry in step['step']:
      label = entry['setting']['label']
      for key, row in entry['objectives'].items():
        lines.append(
          f'step  {label} {key} ({entry["dtype"]}, batch '
          f'{entry["setting"]["batch"]})  {row["images_per_s"]:9.1f} '
          f'images/s per device  {_mfu(row)}'
        )
  else:
    lines.append('step  no result (the section did not finish)')
  section = (loop or {}).get('loop')
  if section and 'skipped' not in section:
    for name, label in (
      ('full_loop', 'full_loop (train_and_evaluate)'),
      ('loop_without_evaluation', 'loop_without_evaluation'),
      ('step_alone', 'step_alone (pmapped, fixed batch)'),
    ):
      if name not in section:
        continue
      row = section[name]
      lines.append(
        f'loop  {label}  {row["images_per_s_per_device"]:9.1f} images/s '
        f'per device  {_mfu(row)}'
      )
    lines.append(
      f'loop / step {section["loop_over_step"]:.3f} (evaluation every '
      f'{section["setting"]["eval_every"]} steps included; batch '
      f'{section["batch"]}, {section["dtype"]}); evaluation share '
      f'{section.get("evaluation_share", float("nan")):.1%}'
    )
  else:
    reason = (section or {}).get('skipped', 'the section did not finish')
    lines.append(f'loop  no result ({reason})')
  return lines


def _read(path: str) -> dict | None:
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('step_json')
  parser.add_argument('loop_json')
  parser.add_argument('--card', default='?')
  args = parser.parse_args()
  for line in summary_lines(
    _read(args.step_json), _read(args.loop_json), args.card
  ):
    print(line)


if __name__ == '__main__':
  main()
