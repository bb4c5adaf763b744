#!/usr/bin/env bash
# Here (a machine with pip access), from the repo root: fetch the wheels a lent
# GPU machine lacks into .whl/, pack the Pets and Cats-vs-Dogs samples into
# .gpu_bundle/ with the FLOP counts of the check's train steps (flops.json,
# counted on a CPU lowering: experiments.benchmarks.training_flops), and the
# ISIC sample into .gpu_bundle_isic/. The folders are git-ignored; name them
# in the device tool's `carry` (docs/gpu.md). WHEEL_DIR, BUNDLE_DIR and
# ISIC_BUNDLE_DIR (experiments/gpu/common.sh) move them. PYTHON here needs
# the project's requirements (jax for the FLOP count).
# Packages with no wheel on PyPI (promise: sdist only) are built into wheels
# here; the folder is then checked complete (experiments.gpu.check_wheels).
set -euo pipefail
cd "$(dirname "$0")/../.."
source experiments/gpu/common.sh
# What the project needs beyond the image (jax 0.11.2, flax, optax, chex,
# orbax, absl, etils, pillow, numpy, matplotlib, protobuf, pyarrow, psutil,
# requests, tqdm, wrapt, attrs, cloudpickle, pyyaml, six: see check_wheels).
wheels=(
  tensorflow-datasets==4.9.10 array-record==0.8.6 grain==0.2.18
  ml-collections==1.1.0 tensorboardX==2.6.5 tensorflow-metadata==1.21.0
  dm-tree==0.1.10 immutabledict==4.3.1 promise==2.3 six==1.17.0
  simple-parsing==0.1.9 docstring-parser==0.18.0 termcolor==3.3.0
  toml==0.10.2 portpicker==1.6.0 googleapis-common-protos==1.76.0
)
rm -rf "$wheel_dir"
mkdir -p "$wheel_dir"
sdists=$(mktemp -d)
trap 'rm -rf "$sdists"' EXIT
for wheel in "${wheels[@]}"; do
  if ! "$python" -m pip download -q --no-deps --only-binary=:all: \
      --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
      --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 --platform any -d "$wheel_dir" "$wheel" \
      2>/dev/null; then
    echo "$wheel: no wheel on the index; building one from its sdist."
    mkdir -p "$sdists/$wheel"
    "$python" -m pip download -q --no-deps --no-binary=:all: -d "$sdists/$wheel" "$wheel"
    "$python" -m pip wheel -q --no-deps -w "$wheel_dir" "$sdists/$wheel"/*
  fi
done
"$python" -m experiments.gpu.check_wheels "$wheel_dir"
"$python" -m experiments.gpu.make_bundle --out="$bundle_dir" \
  --isic_out="$isic_bundle_dir" "$@"
JAX_PLATFORMS=cpu "$python" -m experiments.benchmarks.training_flops \
  --variant=binary --per_device_batches=128,256 --out="$bundle_dir/flops.json"
du -sh "$wheel_dir" "$bundle_dir" "$isic_bundle_dir"
