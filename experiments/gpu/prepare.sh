#!/usr/bin/env bash
# Here (a machine with pip access), from the repo root: fetch the wheels a lent
# GPU machine lacks into .whl/ and pack the data samples into .gpu_bundle/.
# Both folders are git-ignored; name them in the device tool's `carry`. See docs/gpu.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
python=${PYTHON:-python3}
# The GPU image has jax, flax, optax, chex, orbax, absl, etils, pillow, numpy,
# matplotlib, protobuf, pyarrow, psutil, requests, tqdm, wrapt, cloudpickle, pyyaml.
wheels=(
  tensorflow-datasets==4.9.10 array-record==0.8.6 grain==0.2.18
  ml-collections==1.1.0 tensorboardX==2.6.5 tensorflow-metadata==1.21.0
  dm-tree==0.1.10 immutabledict==4.3.1 promise==2.3 simple-parsing==0.1.9
  docstring-parser==0.18.0 termcolor==3.3.0 toml==0.10.2 portpicker==1.6.0
  googleapis-common-protos==1.76.0
)
mkdir -p .whl
for wheel in "${wheels[@]}"; do
  "$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d .whl "$wheel" || \
  "$python" -m pip download -q --no-deps --no-binary=:none: -d .whl "$wheel"
done
"$python" -m experiments.gpu.make_bundle --out=.gpu_bundle "$@"
du -sh .whl .gpu_bundle
