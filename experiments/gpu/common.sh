# Shared by the GPU scripts (sourced, from the repo root). Settings by
# environment variable, so that the same scripts run on this CPU machine
# (the simulated image, docs/gpu.md) and on a lent GPU:
#   PYTHON      interpreter (default python3: the image's, with jax 0.11.2)
#   WHEEL_DIR   wheels to install offline (default .whl)
#   SITE_DIR    where they are installed (default /tmp/site, on PYTHONPATH)
#   BUNDLE_DIR  data samples (default .gpu_bundle)
#   OUT         results (default /tmp); the device tool brings $OUT back
#   CCO_COMPILATION_CACHE  persistent XLA compilation cache (default
#               /tmp/cco_jax_compilation_cache; '' = off)
python=${PYTHON:-python3}
wheel_dir=${WHEEL_DIR:-.whl}
site_dir=${SITE_DIR:-/tmp/site}
bundle_dir=${BUNDLE_DIR:-.gpu_bundle}
out_root=${OUT:-/tmp}
export PYTHONUNBUFFERED=1
export CCO_COMPILATION_CACHE=${CCO_COMPILATION_CACHE-/tmp/cco_jax_compilation_cache}
# JAX's own variable, so that the subprocesses of experiments.reproduce use it.
if [ -n "$CCO_COMPILATION_CACHE" ]; then
  export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$CCO_COMPILATION_CACHE}
fi
# Allocate GPU memory as needed: reproduce trains and evaluates in separate
# processes, and a first one holding 75 % of the card starves the second.
export XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-false}

# Installs every wheel of $wheel_dir into $site_dir (no index, no dependency
# resolution: the folder is complete, experiments.gpu.check_wheels says so).
install_wheels() {
  if ! ls "$wheel_dir"/*.whl >/dev/null 2>&1; then
    echo "No wheels in $wheel_dir: using the packages installed for $python."
    return 0
  fi
  local start=$SECONDS
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target "$site_dir" "$wheel_dir"/*.whl
  export PYTHONPATH=$site_dir${PYTHONPATH:+:$PYTHONPATH}
  echo "Installed $(ls "$wheel_dir"/*.whl | wc -l) wheels into $site_dir in $((SECONDS - start)) s."
}

# The card's name ('' without nvidia-smi).
gpu_name() {
  nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 || true
}

# Peak dense bfloat16 tensor-core TFLOP/s of a card, for MFU (0: unknown).
# H100 SXM and H200: 989 at boost clock; H100 PCIe: 756 (NVIDIA data sheets).
peak_tflops() {
  case "$1" in
    *H100*PCIe*) echo 756 ;;
    *H100*|*H200*) echo 989 ;;
    *) echo 0 ;;
  esac
}

print_environment() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
    || echo "nvidia-smi: none (no GPU)"
  "$python" -c "import sys, jax, flax; print('python', sys.version.split()[0], '| jax', jax.__version__, '| flax', flax.__version__, '|', jax.devices())"
}
