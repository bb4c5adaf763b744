#!/usr/bin/env bash
# The fuller train-step benchmark on one lent GPU (H100/H200), from the repo
# root, with `carry: [".whl", ".gpu_bundle"]`; results in $OUT/gpu_benchmark:
#   bash experiments/gpu/benchmark.sh            # ~6-8 minutes, stops itself by 9
#   bash experiments/gpu/benchmark.sh --smoke    # tiny models, any machine (CPU too)
# For the loop-versus-step check with MFU, run experiments/gpu/check.sh first.
# This one runs `experiments.benchmarks.training --preset=gpu --sections=step`:
# ResNet-50 @224 in bfloat16 (float32 parameters, float32 head), Adam, CE /
# ACE / ACE + 1e-3 x divergence at batch 80 (37 and 2 classes) and ACE +
# divergence at batch 192, and the `binary` config's step at its per-device
# batch; prints images/s and MFU (FLOPs per step from XLA's cost analysis of
# the lowered, not yet optimised, step / step time / the card's peak dense
# bf16 FLOP/s, experiments/benchmarks/training_mfu.py). Stops at once
# without a GPU (common.sh require_gpu). Then, time allowing, the map
# section (one einsum vs one backward per class, float32, batch 80 / 8).
# Extra arguments go to the benchmark (e.g. --models=resnet50:224:256:37).
set -euo pipefail
cd "$(dirname "$0")/../.."
source experiments/gpu/common.sh
budget=${BENCHMARK_BUDGET_S:-540}
start=$SECONDS
out=$out_root/gpu_benchmark
mkdir -p "$out"
smoke=0
extra=()
for arg in "$@"; do
  case "$arg" in
    --smoke) smoke=1 ;;
    *) extra+=("$arg") ;;
  esac
done
if [ "$smoke" = 1 ]; then export JAX_PLATFORMS=cpu; else require_gpu; fi
install_wheels
name=$(gpu_name)
peak=$(peak_tflops "$name")
echo "Card: ${name:-no GPU}; peak for MFU: $peak TFLOP/s (dense bf16)"
print_environment
left() { echo $((budget - (SECONDS - start))); }

if [ "$smoke" = 1 ]; then
  timeout "$(left)" "$python" -m experiments.benchmarks.training --smoke \
    --dtype=bfloat16 --sections=step,cams --repeats=2 --min_seconds=0 \
    --out="$out/smoke.json" ${extra[@]+"${extra[@]}"}
  exit 0
fi
timeout "$(left)" "$python" -m experiments.benchmarks.training --preset=gpu \
  --platform=cuda --dtype=bfloat16 --sections=step --peak_tflops="$peak" \
  --out="$out/step.json" ${extra[@]+"${extra[@]}"} \
  || echo "step section stopped (exit $?) after $((SECONDS - start)) s"
if [ "$(left)" -gt 60 ]; then
  timeout "$(left)" "$python" -m experiments.benchmarks.training --preset=gpu \
    --platform=cuda --sections=cams --out="$out/cams.json" \
    || echo "cams section stopped (exit $?): time budget"
else
  echo "Skipping the cams section: the step section used the time budget."
fi
