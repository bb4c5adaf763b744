r"""The PyTorch reference for the JAX train step's speed (optional).

    pip install torch torchvision          # NOT a dependency of cco-jax
    python -m experiments.benchmarks.torch_reference --model=resnet18 --size=128 --batch=32 \
        --classes=2 --threads=2

Times one training step (forward, loss, backward, Adam) of a torchvision ResNet
with the method's three changes (last stage without downsampling, bias-free head,
no final BatchNorm/ReLU in the last block; docs/method.md §5), on random images,
labels and masks, for cross-entropy and for ACE + 1e-3 x divergence written the
way the reference PyTorch code does (maps by an einsum of the last activations
with the head kernel). Warm-up excluded, median of --repeats, objectives taking
turns. Prints a table like `experiments.benchmarks.training` and writes JSON.

It needs only torch, torchvision and numpy; it imports nothing from cco_jax, so
it runs in a separate virtual environment.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F
import torchvision


def faithful_resnet(name: str, num_classes: int) -> nn.Module:
  """torchvision ResNet with stride-1 last stage, bias-free head, no final BN/ReLU."""
  model = getattr(torchvision.models, name)(num_classes=num_classes)
  first = model.layer4[0]
  bottleneck = isinstance(first, torchvision.models.resnet.Bottleneck)
  (first.conv2 if bottleneck else first.conv1).stride = (
    1,
    1,
  )  # torchvision v1.5 blocks.
  if first.downsample is not None:
    first.downsample[0].stride = (1, 1)
  last = model.layer4[-1]
  final_bn = 'bn3' if bottleneck else 'bn2'
  setattr(last, final_bn, nn.Identity())

  def forward_without_relu(x, block=last, final_bn=final_bn):
    identity = x
    out = block.relu(block.bn1(block.conv1(x)))
    if final_bn == 'bn3':
      out = block.relu(block.bn2(block.conv2(out)))
      out = block.conv3(out)
    else:
      out = block.conv2(out)
    if block.downsample is not None:
      identity = block.downsample(x)
    return out + identity

  last.forward = forward_without_relu
  model.fc = nn.Linear(model.fc.in_features, num_classes, bias=False)
  return model


def features_and_maps(model: nn.Module, images: torch.Tensor):
  """Logits (pool + dense) and all-class HiResCAMs (B, C, H, W) by one einsum."""
  x = model.maxpool(model.relu(model.bn1(model.conv1(images))))
  x = model.layer4(model.layer3(model.layer2(model.layer1(x))))
  logits = model.fc(x.mean((2, 3)))
  maps = torch.einsum('bfhw,cf->bchw', x, model.fc.weight) / (
    x.shape[2] * x.shape[3]
  )
  return logits, maps


def ace_kld_loss(
  logits, maps, labels, masks, kld_weight=1e-3, mask_scale=50.0, cam_scale=10.0
):
  """ACE + kld_weight x divergence (docs/method.md §3-4), batch-mean."""
  del logits
  batch, classes = maps.shape[:2]
  target = maps[torch.arange(batch), labels][:, None]  # (B, 1, H, W)
  contrast = target - maps  # (B, C, H, W)
  m = masks[:, None]
  d = (m * contrast).sum((2, 3)) - ((1 - m) * contrast).abs().sum((2, 3))
  ace = F.cross_entropy(-d, labels)
  p = torch.softmax((mask_scale * masks).flatten(1), -1).view_as(masks)[:, None]
  log_q = torch.log_softmax(cam_scale * contrast.flatten(2), -1).view_as(
    contrast
  )
  kld = -(m * p * log_q).sum((1, 2, 3)).mean()
  return ace + kld_weight * kld


def ce_loss(logits, maps, labels, masks):
  del maps, masks
  return F.cross_entropy(logits, labels)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--model', default='resnet18')
  parser.add_argument('--size', type=int, default=128)
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--classes', type=int, default=2)
  parser.add_argument('--threads', type=int, default=2)
  parser.add_argument('--repeats', type=int, default=7)
  parser.add_argument(
    '--channels_last',
    action='store_true',
    help='NHWC memory format (oneDNN often prefers it).',
  )
  parser.add_argument(
    '--stock',
    action='store_true',
    help="torchvision's ResNet unchanged (last stage downsamples: maps "
    'of size/32; head with bias): the published 1.3 s/step '
    "reference matches; NOT the method's architecture.",
  )
  parser.add_argument('--out', default='/tmp/benchmark_torch.json')
  args = parser.parse_args()
  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  cam = args.size // (
    32 if args.stock else 16
  )  # The last stage keeps the resolution.
  images = torch.rand(args.batch, 3, args.size, args.size)
  labels = torch.randint(0, args.classes, (args.batch,))
  masks = (torch.rand(args.batch, cam, cam) < 0.4).float()
  runs = {}
  for name, loss_fn in (('ce', ce_loss), ('ace_kld', ace_kld_loss)):
    model = (
      getattr(torchvision.models, args.model)(num_classes=args.classes)
      if args.stock
      else faithful_resnet(args.model, args.classes)
    ).train()
    if args.channels_last:
      model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    runs[name] = dict(
      model=model, optimizer=optimizer, loss_fn=loss_fn, times=[]
    )
  batch_images = (
    images.to(memory_format=torch.channels_last)
    if args.channels_last
    else images
  )

  def step(run):
    run['optimizer'].zero_grad(set_to_none=True)
    logits, maps = features_and_maps(run['model'], batch_images)
    loss = run['loss_fn'](logits, maps, labels, masks)
    loss.backward()
    run['optimizer'].step()
    return float(loss.detach())

  for run in runs.values():
    step(run)  # Warm-up.
  for _ in range(args.repeats):
    for run in runs.values():
      start = time.perf_counter()
      run['loss'] = step(run)
      run['times'].append(time.perf_counter() - start)
  ce_median = float(np.median(runs['ce']['times']))
  results = {
    'environment': {
      'torch': torch.__version__,
      'torchvision': torchvision.__version__,
      'threads': torch.get_num_threads(),
      'cpus': os.cpu_count(),
      'machine': platform.machine(),
      'loadavg': list(os.getloadavg()),
      'mkldnn': torch.backends.mkldnn.is_available(),
    },
    'setting': vars(args),
    'cam_size': [cam, cam],
    'objectives': {},
  }
  print(
    f'torch {torch.__version__}, {torch.get_num_threads()} threads, {args.model} '
    f'@{args.size} px, batch {args.batch}, {args.classes} classes, maps {cam}x{cam}, '
    f'channels_last={args.channels_last}, stock={args.stock}, median of {args.repeats}, load '
    f'{os.getloadavg()[0]:.2f}'
  )
  print(f'  {"objective":10s} {"median s":>9s} {"img/s":>8s} {"/ CE":>6s}')
  for name, run in runs.items():
    median = float(np.median(run['times']))
    results['objectives'][name] = {
      'median_s': median,
      'times_s': [round(t, 4) for t in run['times']],
      'images_per_s': args.batch / median,
      'ratio_to_ce': median / ce_median,
      'loss_last': run['loss'],
    }
    print(
      f'  {name:10s} {median:9.3f} {args.batch / median:8.1f} {median / ce_median:6.3f}'
    )
  with open(args.out, 'w') as f:
    json.dump(results, f, indent=2)
  print(f'Wrote {args.out}')


if __name__ == '__main__':
  main()
