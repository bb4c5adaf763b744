#!/usr/bin/env bash
# The one-command GPU check: on a lent H100/H200, from the repo root, with
# `carry: [".whl", ".gpu_bundle"]` (made here by experiments/gpu/prepare.sh):
#   bash experiments/gpu/check.sh            # ~5-7 minutes, stops itself by 9
#   bash experiments/gpu/check.sh --smoke    # tiny models, any machine (CPU too)
# Prints the card, then images/s and model FLOP utilisation (MFU) of
#   step  the `binary` config's train step (ResNet-50 @224, batch 80 per
#         device, bfloat16 compute, ACE + divergence), jitted, on one fixed
#         batch already on the device;
#   loop  what a user gets: `cco_jax.train.train_and_evaluate` on the Pets
#         sample with the same config (input pipeline, pmapped step, metric
#         summaries, evaluation, figures and checkpoints every 40 steps, about
#         one epoch of full Pets), timed over three evaluation periods, next
#         to the same pmapped step alone on a fixed batch;
# and writes the JSON results and a summary to $OUT/gpu_check/.
# MFU = XLA's FLOPs of the step / step time / peak dense bf16 FLOP/s of the
# card (experiments/gpu/common.sh); 0 peak (unknown card): no MFU.
set -euo pipefail
cd "$(dirname "$0")/../.."
source experiments/gpu/common.sh
budget=${CHECK_BUDGET_S:-540}
smoke=0
if [ "${1:-}" = "--smoke" ]; then smoke=1; fi
start=$SECONDS
install_wheels
name=$(gpu_name)
peak=$(peak_tflops "$name")
echo "Card: ${name:-no GPU}; peak for MFU: $peak TFLOP/s (dense bf16)"
print_environment
out=$out_root/gpu_check
mkdir -p "$out"
tfds_dir=${TFDS_DIR:-/tmp/cco_check_tfds}
quiet='orbax|checkpoint_manager|event_tracking|Generating|Shuffling|examples/s'
if [ "$smoke" = 1 ]; then
  args=(--smoke --repeats=2 --min_seconds=0)
else
  args=(--preset=gpu --models=binary_config --min_seconds=5)
fi
left() { echo $((budget - (SECONDS - start))); }

set +e
timeout "$(left)" "$python" -m experiments.benchmarks.training "${args[@]}" \
  --sections=step --dtype=bfloat16 --peak_tflops="$peak" \
  --out="$out/step.json" 2>&1 | grep -vE "$quiet"
echo "step section: exit ${PIPESTATUS[0]} after $((SECONDS - start)) s"
timeout "$(left)" "$python" -m experiments.benchmarks.training "${args[@]}" \
  --sections=loop --dtype=bfloat16 --peak_tflops="$peak" \
  --pets_dir="$bundle_dir/pets" --tfds_data_dir="$tfds_dir" \
  --out="$out/loop.json" 2>&1 | grep -vE "$quiet"
echo "loop section: exit ${PIPESTATUS[0]} after $((SECONDS - start)) s"
set -e
"$python" -m experiments.gpu.summarise "$out/step.json" "$out/loop.json" \
  --card="${name:-no GPU}" | tee "$out/summary.txt"
