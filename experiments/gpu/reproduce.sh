#!/usr/bin/env bash
# On a lent GPU (H100/H200), from the repo root, after experiments/gpu/prepare.sh
# here and with `carry: [".whl", ".gpu_bundle"]`:
#   bash experiments/gpu/reproduce.sh [EPOCHS=100] [SEEDS=0] [reproduce flags...]
# Trains the paper-scale species setting (ResNet-50 @224, bfloat16, the
# original work's batch of 80: the GPU variants' 256 per device would be
# nearly the whole 270-image training split in one step) on the travelling
# Pets sample: the CE control (binary_ce) and ACE + divergence
# (binary), then evaluates both (test, interventions, Cats-vs-Dogs) and prints
# the same table as the CPU reproduction. Results land in $OUT/gpu_reproduce.
# Evaluation, figures and checkpoints every 30 steps (10 epochs of the
# 270-image sample), not every epoch (3 steps). Stops itself after
# REPRODUCE_BUDGET_S (default 560 s) and prints what finished; not yet run
# on a GPU (docs/gpu.md). VARIANTS and DTYPE change the variants and compute
# dtype (the CPU rehearsal: ALLOW_CPU=1 VARIANTS=cpu_ce,cpu DTYPE=float32).
set -euo pipefail
cd "$(dirname "$0")/../.."
source experiments/gpu/common.sh
epochs=${1:-100}
seeds=${2:-0}
shift $(($# > 2 ? 2 : $#))
budget=${REPRODUCE_BUDGET_S:-560}
variants=${VARIANTS:-binary_ce,binary}
dtype=${DTYPE:-bfloat16}
out=$out_root/gpu_reproduce
start=$SECONDS
if [ "${ALLOW_CPU:-0}" = 1 ]; then export JAX_PLATFORMS=cpu; else require_gpu; fi
install_wheels
print_environment
set +e
timeout $((budget - (SECONDS - start))) "$python" -m experiments.reproduce \
  --out="$out" --only=species --variants="$variants" --seeds="$seeds" \
  --epochs="$epochs" --pets_dir="$bundle_dir/pets" --cvd_dir="$bundle_dir/cvd" \
  --override=model.dtype="$dtype" --override=log_every_steps=10 \
  --override=eval_every_steps=30 --override=checkpoint_every_steps=30 \
  --override=per_device_batch_size=0 --override=per_device_eval_batch_size=0 \
  "$@" 2>&1 \
  | grep -vE "orbax|checkpoint_manager|event_tracking|Generating|Shuffling"
status=${PIPESTATUS[0]}
set -e
echo "reproduce: exit $status after $((SECONDS - start)) s"
cat "$out/table.md" 2>/dev/null || echo "No table: no run finished."
cp "$out/table.md" "$out/table.json" "$out_root/" 2>/dev/null || true
exit "$status"
