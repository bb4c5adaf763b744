r"""Peak throughput of the cards, and images/s, TFLOP/s and MFU of a rate.

MFU (model FLOP utilisation) = FLOPs of one device's step (counted on a CPU
lowering, `training_flops`) x steps/s / the card's peak dense bfloat16
FLOP/s. The GPU scripts look the peak up by the name `nvidia-smi` prints:

    python -m experiments.benchmarks.training_mfu "NVIDIA H200"   # -> 989
"""

from __future__ import annotations

import sys

# Peak dense bfloat16 tensor-core TFLOP/s at boost clock (NVIDIA data
# sheets; the sparse figures are twice these). First match wins.
PEAK_TFLOPS = (
  ('H100 PCIe', 756.0),
  ('H100', 989.0),  # SXM and NVL.
  ('H200', 989.0),
  ('A100', 312.0),
)


def peak_tflops(card: str) -> float:
  """Peak dense bf16 TFLOP/s of the card named `card` (0: unknown)."""
  for name, peak in PEAK_TFLOPS:
    if all(part in card for part in name.split()):
      return peak
  return 0.0


def rate_row(
  steps_per_s: float,
  batch: int,
  devices: int,
  flops: float | None,
  peak: float = 0.0,
) -> dict:
  """Images/s (all devices and per device), and with one device's step
  `flops` its achieved TFLOP/s and, with a `peak` (TFLOP/s), the MFU."""
  row = {
    'steps_per_s': steps_per_s,
    'images_per_s': steps_per_s * batch,
    'images_per_s_per_device': steps_per_s * batch / devices,
  }
  if flops is not None:
    row['achieved_tflops_per_device'] = flops * steps_per_s / 1e12
    if peak:
      row['mfu'] = row['achieved_tflops_per_device'] / peak
  return row


if __name__ == '__main__':
  print(f'{peak_tflops(" ".join(sys.argv[1:])):g}')
