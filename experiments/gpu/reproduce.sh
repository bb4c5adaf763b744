#!/usr/bin/env bash
# On a lent GPU (H100/H200), from the repo root, after experiments/gpu/prepare.sh
# here and with `carry: [".whl", ".gpu_bundle"]`:
#   bash experiments/gpu/reproduce.sh [EPOCHS] [SEEDS]
# Trains the paper-scale species setting (ResNet-50 @224, batch 80, bfloat16)
# on the travelling Pets sample: the CE control (binary_ce) and ACE + divergence
# (binary), then evaluates both (test, interventions, Cats-vs-Dogs) and prints
# the same table as the CPU reproduction. Results land in $OUT (or /tmp).
# About 6-8 minutes of GPU time at 100 epochs of the 270-image sample.
set -euo pipefail
cd "$(dirname "$0")/../.."
epochs=${1:-100}
seeds=${2:-0}
out=${OUT:-/tmp}/gpu_reproduce
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
export PYTHONUNBUFFERED=1
python3 -m experiments.reproduce --out="$out" --only=species \
  --variants=binary_ce,binary --seeds="$seeds" --epochs="$epochs" \
  --pets_dir=.gpu_bundle/pets --cvd_dir=.gpu_bundle/cvd \
  --override=model.dtype=bfloat16 \
  --override=log_every_steps=20 2>&1 | grep -vE "orbax|checkpoint_manager|event_tracking"
cp "$out/table.md" "$out/table.json" "${OUT:-/tmp}/" 2>/dev/null || true
