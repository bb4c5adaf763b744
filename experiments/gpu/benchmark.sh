#!/usr/bin/env bash
# Train-step speed on one lent GPU (H100/H200), from the repo root, one command:
#   bash experiments/gpu/benchmark.sh            # ~5 minutes, results in $OUT (or /tmp)
#   bash experiments/gpu/benchmark.sh --smoke    # tiny models, any machine (CPU too)
# Runs `experiments.benchmarks.training --preset=gpu`: ResNet-50 @224 in bfloat16 (float32
# parameters, float32 head), Adam, CE / ACE / ACE + 1e-3 x divergence at batch 80
# (37 and 2 classes) and ACE + divergence at batch 192; prints images/s and model
# FLOP utilisation (FLOPs per step from XLA's cost analysis of the compiled step,
# divided by the step time and the GPU's peak). Then, time allowing, the map
# section (one einsum vs one backward per class, float32, batch 80 / 8).
# Peak assumed: dense bfloat16 tensor-core throughput at boost clock, no sparsity:
# 989 TFLOP/s for H100 SXM and H200, 756 for H100 PCIe; other GPUs: no MFU.
# Installs nothing from the internet: if this Python's JAX has no GPU backend,
# wheels in .whl/ (jax[cuda12] and friends, see experiments/gpu/prepare.sh) are
# installed offline into /tmp/site.
set -euo pipefail
cd "$(dirname "$0")/../.."
python=${PYTHON:-python3}
out=${OUT:-/tmp}/gpu_benchmark
mkdir -p "$out"
smoke=0
extra=()
for arg in "$@"; do
  case "$arg" in
    --smoke) smoke=1 ;;
    *) extra+=("$arg") ;;
  esac
done
export PYTHONUNBUFFERED=1

if [ "$smoke" = 1 ]; then
  "$python" -m experiments.benchmarks.training --smoke --dtype=bfloat16 --sections=step,cams \
    --repeats=2 --out="$out/smoke.json" ${extra[@]+"${extra[@]}"}
  exit 0
fi

if ! "$python" -c "import jax, sys; sys.exit(jax.default_backend() != 'gpu')" 2>/dev/null; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
fi
name=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 || true)
case "$name" in
  *H100*PCIe*) peak=756 ;;
  *H100*|*H200*) peak=989 ;;
  *) peak=0 ;;
esac
echo "GPU: ${name:-none found}; peak assumed for MFU: ${peak} TFLOP/s (bf16 dense)"
"$python" -c "import jax; print('jax', jax.__version__, jax.devices())"

start=$SECONDS
"$python" -m experiments.benchmarks.training --preset=gpu --dtype=bfloat16 --sections=step \
  --peak_tflops="$peak" --out="$out/step.json" ${extra[@]+"${extra[@]}"}
left=$((300 - (SECONDS - start)))
if [ "$left" -gt 60 ]; then
  timeout "$left" "$python" -m experiments.benchmarks.training --preset=gpu --sections=cams \
    --out="$out/cams.json" || echo "cams section stopped after ${left} s (time budget)"
else
  echo "Skipping the cams section: the step section used the time budget."
fi
cp "$out"/*.json "${OUT:-/tmp}/" 2>/dev/null || true
