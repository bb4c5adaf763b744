#!/usr/bin/env bash
# The paper-scale ISIC run, for the second call on a lent H100/H200, from the
# repo root, after experiments/gpu/prepare.sh here and with
# `carry: [".whl", ".gpu_bundle_isic"]`:
#   bash experiments/gpu/isic.sh [EPOCHS=20]    # stops itself by ISIC_BUDGET_S (470 s)
# Trains ResNet-50 @224 in bfloat16, 256 images per device, on the ISIC 2017
# sample's diagnoses (melanoma, nevus, seborrheic keratosis; 1,543 training
# images after the validation carve-out) with the lesion masks as the
# object: the CE control (isic.py:default_ce) and ACE + divergence
# (isic.py:default), both at once on the one GPU (`experiments.isic
# --parallel=2`), then evaluates each on the test split (286 images): test
# accuracy, balanced accuracy and per-class recall, background share of the
# maps, background-noise and background-swap flip rates, accuracy with the
# background swapped. Prints the table; everything lands in $OUT/gpu_isic.
# EPOCHS: 20 by default, what the budget should allow by this estimate (not
# measured): startup, wheels and data preparation ~1 min; each training
# process compiles its train, eval and predict steps (~2-3 min, the two in
# parallel); 20 epochs are ~120 steps of 256 per model, ~31,000 images each,
# under a minute at >= 1,000 images/s for the two together; the evaluation
# (one process, both runs) ~1.5 min. If the budget stops it after training,
# `experiments.isic ... --notrain` (the command below) evaluates the saved
# checkpoints in a further call. Not yet run on a GPU (docs/gpu.md).
# The CPU rehearsal: ALLOW_CPU=1 VARIANTS=cpu_ce,cpu bash experiments/gpu/isic.sh 1
# (VARIANTS: variants of experiments/configs/isic.py; extra arguments after
# EPOCHS go to experiments.isic, e.g. --override=data.image_size=32).
set -euo pipefail
cd "$(dirname "$0")/../.."
source experiments/gpu/common.sh
epochs=${1:-20}
shift $(($# > 0 ? 1 : 0))
budget=${ISIC_BUDGET_S:-470}
variants=${VARIANTS:-default_ce,default}
out=$out_root/gpu_isic
start=$SECONDS
if [ "${ALLOW_CPU:-0}" = 1 ]; then export JAX_PLATFORMS=cpu; else require_gpu; fi
install_wheels
print_environment
mkdir -p "$out"
set +e
timeout $((budget - (SECONDS - start))) "$python" -m experiments.isic \
  --out="$out" --data_dir="$isic_bundle_dir" --variants="$variants" \
  --seeds=0 --parallel=2 --epochs="$epochs" --nofigures "$@" 2>&1 \
  | grep -vE "orbax|checkpoint_manager|event_tracking|Generating|Shuffling"
status=${PIPESTATUS[0]}
set -e
echo "isic: exit $status after $((SECONDS - start)) s ($epochs epochs asked)"
for run in "$out"/*_s0; do
  [ -f "$run/wall_time.json" ] && echo "$(basename "$run"): $(cat "$run/wall_time.json")"
done
# experiments.isic printed the table; a copy next to $OUT's other results.
cp "$out/table.md" "$out/table.json" "$out_root/" 2>/dev/null \
  || echo "No table: no run was evaluated."
exit "$status"
