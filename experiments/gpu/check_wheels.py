r"""Checks that a wheel folder completes the GPU image: installable offline.

    python -m experiments.gpu.check_wheels .whl

A lent GPU machine cannot download anything; `experiments/gpu/*.sh` install
the folder with `pip install --no-index --no-deps`. That succeeds only if
  * every file is a wheel (an sdist there is silently never installed),
  * each wheel suits CPython 3.12 on x86-64 Linux (py3-none-any, abi3 or
    cp312 manylinux x86_64),
  * each distribution appears once (two versions stop the whole install), and
  * every requirement of every wheel (for Python 3.12 on Linux, no extras) is
    either another wheel of the folder or a package of the image
    (`IMAGE_PACKAGES`, as read on the image in November 2026).
Exits with status 1 and names each problem otherwise. Needs `packaging`.
"""

from __future__ import annotations

from collections.abc import Iterable
import email.parser
import os
import re
import sys
import zipfile

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.utils import parse_wheel_filename

# Python packages of the lent GPU image ('cuda'), from the device notes
# (/work/.library/device/KINDS.md, read 2026-11-17); jax there is 0.11.2.
# `six` is listed there but left out here, so it travels as a wheel: an
# independent simulation of the image lacked it (promise needs it).
IMAGE_PACKAGES = frozenset(
  canonicalize_name(name)
  for name in """
  absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc
  anyio attrs botorch build certifi charset-normalizer chex click cloudpickle
  cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
  cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils
  execnet filelock flatbuffers flax fonttools formulaic frozenlist fsspec
  gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize
  hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt
  jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader
  lightning lightning-utilities linear-operator lineax llvmlite lxml markdown
  markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath
  msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx
  ninja numba numba-cuda numpy numpyro nvidia-ml-py onnx onnx-ir onnxruntime
  onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
  orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy
  portalocker prometheus-client propcache protobuf psutil pyarrow pybind11
  py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest
  pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
  python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu
  safetensors scikit-build-core scikit-image scikit-learn scipy seaborn
  sentencepiece sentence-transformers setuptools shellingham simplejson
  sortedcontainers statsmodels sympy tabulate tensorboard
  tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
  tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics
  torchvision tqdm transformers treescope triton typer typing-extensions
  typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray
  xxhash yarl zipp
  """.split()
)
# Marker environment of the image's Python.
ENVIRONMENT = {
  'python_version': '3.12',
  'python_full_version': '3.12.3',
  'implementation_name': 'cpython',
  'platform_python_implementation': 'CPython',
  'sys_platform': 'linux',
  'platform_system': 'Linux',
  'platform_machine': 'x86_64',
  'os_name': 'posix',
  'extra': '',
}
_MANYLINUX = re.compile(r'^(manylinux(1|2010|2014|_2_\d+))_x86_64$')


def suits_image(filename: str) -> bool:
  """Whether a wheel's tags include one CPython 3.12 x86-64 Linux accepts."""
  _, _, _, tags = parse_wheel_filename(filename)
  for tag in tags:
    python_ok = tag.interpreter in ('py3', 'cp312') or (
      tag.abi == 'abi3' and tag.interpreter.startswith('cp3')
    )
    abi_ok = tag.abi in ('none', 'abi3', 'cp312')
    platform_ok = tag.platform == 'any' or bool(_MANYLINUX.match(tag.platform))
    if python_ok and abi_ok and platform_ok:
      return True
  return False


def requirements(path: str) -> list[Requirement]:
  """The wheel's `Requires-Dist` entries that apply on the image."""
  with zipfile.ZipFile(path) as archive:
    name = next(
      n for n in archive.namelist() if n.endswith('.dist-info/METADATA')
    )
    metadata = email.parser.Parser().parsestr(archive.read(name).decode())
  found = []
  for line in metadata.get_all('Requires-Dist') or []:
    requirement = Requirement(line)
    if requirement.marker is None or requirement.marker.evaluate(ENVIRONMENT):
      found.append(requirement)
  return found


def problems(paths: Iterable[str]) -> list[str]:
  """Every reason the folder's files would not install and import offline."""
  found, wheels, versions = [], {}, {}
  for path in sorted(paths):
    filename = path.rsplit('/', 1)[-1]
    if not filename.endswith('.whl'):
      found.append(
        f'{filename}: not a wheel; `pip install .whl/*.whl` skips it. Build '
        'one with `pip wheel --no-deps` (experiments/gpu/prepare.sh does).'
      )
      continue
    name, version, _, _ = parse_wheel_filename(filename)
    versions.setdefault(name, []).append(str(version))
    wheels[name] = path
    if not suits_image(filename):
      found.append(
        f'{filename}: no tag for CPython 3.12 on x86-64 Linux; download the '
        'cp312 manylinux x86_64 (or py3-none-any) wheel instead.'
      )
  for name, listed in versions.items():
    if len(listed) > 1:
      found.append(
        f'{name}: {len(listed)} versions ({", ".join(listed)}); keep one.'
      )
  for name, path in sorted(wheels.items()):
    for requirement in requirements(path):
      needed = canonicalize_name(requirement.name)
      if needed not in wheels and needed not in IMAGE_PACKAGES:
        found.append(
          f'{name} requires {requirement} , which is neither in the folder '
          'nor on the GPU image; add its wheel to experiments/gpu/prepare.sh.'
        )
  return found


def main(argv: list[str]) -> int:
  if len(argv) != 2:
    print(f'usage: {argv[0]} WHEEL_DIR', file=sys.stderr)
    return 2
  folder = argv[1]
  paths = [os.path.join(folder, f) for f in os.listdir(folder)]
  if not paths:
    print(f'{folder} is empty.', file=sys.stderr)
    return 1
  issues = problems(paths)
  for issue in issues:
    print(f'ERROR: {issue}', file=sys.stderr)
  if not issues:
    print(
      f'{len(paths)} wheels in {folder}: all for CPython 3.12 x86-64 Linux, '
      'one version each, every requirement in the folder or on the image.'
    )
  return 1 if issues else 0


if __name__ == '__main__':
  sys.exit(main(sys.argv))
