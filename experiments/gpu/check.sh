#!/usr/bin/env bash
# The one-command GPU check: on a lent H100/H200, from the repo root, with
# `carry: [".whl", ".gpu_bundle"]` (made here by experiments/gpu/prepare.sh):
#   bash experiments/gpu/check.sh            # stops itself by CHECK_BUDGET_S (290 s)
#   bash experiments/gpu/check.sh --smoke    # tiny model on the CPU (rehearsal)
# First, within seconds: nvidia-smi must list a GPU and JAX, pinned to CUDA,
# must see it; else it stops (exit 3) before spending device time. Then it
# prints the card, driver, versions and, for the `binary` config (ResNet-50
# @224, bfloat16, ACE + divergence) at 128 and 256 images per device:
#   step  the pmapped train step alone on one fixed batch on the device;
#   loop  what a user gets: `cco_jax.train.train_and_evaluate` on the Pets
#         sample (input pipeline, the same pmapped program, metric summaries,
#         evaluation every 20 steps, checkpoints at the default cadence),
#         timed over four evaluation periods;
# images/s, MFU, loop / step and the compile times, into $OUT/gpu_check/.
# The train step is compiled once per batch size (the loop runs the program
# the step timing compiled), the eval and predict steps once. MFU = FLOPs
# per step counted here on a CPU lowering (.gpu_bundle/flops.json,
# experiments.benchmarks.training_flops) / step time / the card's peak dense
# bf16 FLOP/s (experiments/benchmarks/training_mfu.py); none for an unknown
# card. The 256 batch is skipped, and says so, if less time is left than
# the 128 one took; the JSON is written after each batch size.
set -euo pipefail
cd "$(dirname "$0")/../.."
source experiments/gpu/common.sh
budget=${CHECK_BUDGET_S:-290}
smoke=0
if [ "${1:-}" = "--smoke" ]; then smoke=1; fi
start=$SECONDS
if [ "$smoke" = 1 ]; then
  export JAX_PLATFORMS=cpu
  args=(--smoke --platform=cpu)
else
  require_gpu
  args=(--preset=gpu --platform=cuda --dtype=bfloat16)
fi
install_wheels
name=$(gpu_name)
peak=$(peak_tflops "$name")
echo "Card: ${name:-no GPU}; peak for MFU: $peak TFLOP/s (dense bf16)"
print_environment
out=$out_root/gpu_check
mkdir -p "$out"
tfds_dir=${TFDS_DIR:-/tmp/cco_check_tfds}
quiet='orbax|checkpoint_manager|event_tracking|Generating|Shuffling|examples/s'
left() { echo $((budget - (SECONDS - start))); }
# The 256 batch starts only if more time is left than the 128 one took.
process_budget=$(($(left) - 15))
if [ "$process_budget" -lt 1 ]; then process_budget=1; fi
driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n 1 || true)
set +e
timeout "$(left)" "$python" -m experiments.benchmarks.training "${args[@]}" \
  --sections=loop --peak_tflops="$peak" --budget_s="$process_budget" \
  --flops_cache="$bundle_dir/flops.json" --pets_dir="$bundle_dir/pets" \
  --tfds_data_dir="$tfds_dir" --out="$out/loop.json" 2>&1 | grep -vE "$quiet"
status=${PIPESTATUS[0]}
set -e
echo "loop section: exit $status after $((SECONDS - start)) s"
"$python" -m experiments.gpu.summarise "$out/loop.json" \
  --card="${name:-no GPU}${driver:+, driver $driver}" \
  | tee "$out/summary.txt"
exit "$status"
