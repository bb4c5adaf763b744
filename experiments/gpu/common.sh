# Shared by the GPU scripts (sourced, from the repo root). Settings by
# environment variable, so that the same scripts run on this CPU machine
# (the simulated image, docs/gpu.md) and on a lent GPU:
#   PYTHON      interpreter (default python3: the image's, with jax 0.11.2)
#   WHEEL_DIR   wheels to install offline (default .whl)
#   SITE_DIR    where they are installed (default /tmp/site, on PYTHONPATH)
#   BUNDLE_DIR  Pets and Cats-vs-Dogs samples, flops.json (default .gpu_bundle)
#   ISIC_BUNDLE_DIR  the ISIC sample (default .gpu_bundle_isic)
#   OUT         results (default /tmp); the device tool brings $OUT back
#   CCO_COMPILATION_CACHE  persistent XLA compilation cache (default
#               /tmp/cco_jax_compilation_cache; '' = off)
python=${PYTHON:-python3}
wheel_dir=${WHEEL_DIR:-.whl}
site_dir=${SITE_DIR:-/tmp/site}
bundle_dir=${BUNDLE_DIR:-.gpu_bundle}
isic_bundle_dir=${ISIC_BUNDLE_DIR:-.gpu_bundle_isic}
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

# Peak dense bfloat16 tensor-core TFLOP/s of a card, for MFU (0: unknown):
# the table in experiments/benchmarks/training_mfu.py (no JAX import).
peak_tflops() {
  "$python" -m experiments.benchmarks.training_mfu "$1"
}

# Stops the script (exit 3, one line saying why) unless nvidia-smi lists a
# GPU and JAX, pinned to CUDA (JAX_PLATFORMS=cuda, exported for what
# follows), sees it: a CUDA plugin that fails to load would otherwise fall
# back to the CPU silently. Takes seconds; at most 60.
require_gpu() {
  if ! nvidia-smi -L >/dev/null 2>&1; then
    echo "No GPU: nvidia-smi is missing or lists no GPU. Run this on a lent GPU machine (or add --smoke to rehearse on a CPU)." >&2
    exit 3
  fi
  export JAX_PLATFORMS=cuda
  if ! timeout 60 "$python" -c "
import sys
try:
  import jax
  print('JAX sees', jax.devices())
except Exception as e:
  sys.exit(f'No GPU for JAX: JAX_PLATFORMS=cuda fails ({type(e).__name__}: {e}). Is the CUDA plugin (jax-cuda13-plugin) installed for $python?')
"; then
    echo "Stopped before spending device time: JAX does not see the GPU (or took over 60 s to say)." >&2
    exit 3
  fi
}

print_environment() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null \
    || echo "nvidia-smi: none (no GPU)"
  "$python" -c "import sys, jax, flax; print('python', sys.version.split()[0], '| jax', jax.__version__, '| flax', flax.__version__, '|', jax.devices())"
}
