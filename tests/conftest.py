"""Test-wide setup: several virtual CPU devices (so pmap is tested for real), and
the session-scoped data fixtures.

XLA reads its flags once, when JAX initialises its backends, so they must be
set before anything imports jax. Every data directory lives at a fixed name
under pytest's session temp dir, so each dataset is written and prepared once
per run (once per worker under pytest-xdist, whose workers have their own
temp dirs).

The flags (`xla_flags.for_devices`) also compile at optimisation level 0, to
save time (`CCO_TEST_XLA_OPTIMIZE=1` compiles as users do).
"""

import os

import xla_flags

NUM_TEST_DEVICES = 4


for _flag in xla_flags.for_devices(NUM_TEST_DEVICES).split():
  if _flag not in os.environ.get('XLA_FLAGS', ''):
    os.environ['XLA_FLAGS'] = (
      os.environ.get('XLA_FLAGS', '') + ' ' + _flag
    ).strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# Threefry random bits take seconds to compile per shape on CPU with jax 0.10.2,
# which dominates model initialisation in tests; RBG keys compile ~10x faster.
# Tests that care about the PRNG pass explicit keys.
os.environ.setdefault('JAX_DEFAULT_PRNG_IMPL', 'rbg')

# pylint: disable=g-import-not-at-top,wrong-import-position
from pathlib import Path  # noqa: E402
import shutil  # noqa: E402

import pytest  # noqa: E402
from synthetic_data import REAL_CATS_VS_DOGS  # noqa: E402
from synthetic_data import REAL_PETS  # noqa: E402
from synthetic_data import SHARED_DATA  # noqa: E402
from synthetic_data import data_config  # noqa: E402
from synthetic_data import write_synthetic_cats_vs_dogs  # noqa: E402
from synthetic_data import write_synthetic_pets  # noqa: E402

from cco_jax import data as data_lib  # noqa: E402


def _session_dir(tmp_path_factory, name: str, write=None) -> Path:
  """`name` under the session temp dir, written by `write(path)` only once."""
  path = tmp_path_factory.getbasetemp() / name
  done = path.parent / f'{name}.done'
  if not done.exists():
    if path.exists():
      shutil.rmtree(path)
    path.mkdir()
    if write is not None:
      write(path)
    done.touch()
  return path


@pytest.fixture(scope='session', autouse=True)
def compilation_cache(tmp_path_factory) -> Path | None:
  """One persistent XLA compilation cache for the whole run, empty at start.

  Many tests build the same tiny models and steps (the `cpu` config at 32 px,
  width 4) through fresh `jax.jit` / `jax.pmap` wrappers, each of which
  compiles again; with the cache, an identical program is compiled once per
  run and loaded from disk after that. Loaded executables are the compiled
  programs themselves, so no result changes. `CCO_TEST_COMPILATION_CACHE=0`
  turns it off. Subprocesses are not affected (they get no cache unless a test
  gives them one).
  """
  if os.environ.get('CCO_TEST_COMPILATION_CACHE', '1') == '0':
    yield None
    return
  import jax  # pylint: disable=g-import-not-at-top

  path = tmp_path_factory.getbasetemp() / 'xla_compilation_cache'
  path.mkdir(exist_ok=True)
  saved = {
    name: getattr(jax.config, name)
    for name in (
      'jax_compilation_cache_dir',
      'jax_persistent_cache_min_compile_time_secs',
    )
  }
  jax.config.update('jax_compilation_cache_dir', str(path))
  # Eager ops (milliseconds each) are not worth a file; model programs are.
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.2)
  yield path
  for name, value in saved.items():
    jax.config.update(name, value)


@pytest.fixture(scope='session')
def synthetic_pets_dir(tmp_path_factory) -> Path:
  return _session_dir(tmp_path_factory, 'pets_manual', write_synthetic_pets)


@pytest.fixture(scope='session')
def synthetic_cvd_dir(tmp_path_factory) -> Path:
  return _session_dir(
    tmp_path_factory, 'cvd_manual', write_synthetic_cats_vs_dogs
  )


@pytest.fixture(scope='session')
def synthetic_data_dir(
  tmp_path_factory, synthetic_pets_dir, synthetic_cvd_dir
) -> Path:
  """A TFDS data dir holding both synthetic datasets, prepared."""
  data_dir = _session_dir(tmp_path_factory, 'tfds_synthetic')
  data_lib.prepare_dataset(
    'oxford_iiit_pet',
    manual_dir=str(synthetic_pets_dir),
    data_dir=str(data_dir),
  )
  data_lib.prepare_dataset(
    'cats_vs_dogs', manual_dir=str(synthetic_cvd_dir), data_dir=str(data_dir)
  )
  return data_dir


@pytest.fixture(scope='session')
def synthetic_config(synthetic_pets_dir, synthetic_cvd_dir, synthetic_data_dir):
  """A factory of data configs over the prepared synthetic data."""

  def make(**overrides):
    return data_config(
      manual_dir=str(synthetic_pets_dir),
      ood_manual_dir=str(synthetic_cvd_dir),
      tfds_data_dir=str(synthetic_data_dir),
      **overrides,
    )

  return make


@pytest.fixture(scope='session')
def real_data_dir(tmp_path_factory) -> Path:
  """An empty TFDS data dir for the real samples (prepared by the tests)."""
  if not (REAL_PETS.is_dir() and REAL_CATS_VS_DOGS.is_dir()):
    pytest.skip(
      f'Real data samples not found under {SHARED_DATA} (set CCO_SHARED_DATA).'
    )
  return _session_dir(tmp_path_factory, 'tfds_real')


@pytest.fixture(scope='session')
def real_config(real_data_dir):
  """A factory of data configs over the real samples, prepared once."""
  data_lib.prepare_dataset(
    'oxford_iiit_pet', manual_dir=str(REAL_PETS), data_dir=str(real_data_dir)
  )
  data_lib.prepare_dataset(
    'cats_vs_dogs',
    manual_dir=str(REAL_CATS_VS_DOGS),
    data_dir=str(real_data_dir),
  )

  def make(**overrides):
    return data_config(
      manual_dir=str(REAL_PETS),
      ood_manual_dir=str(REAL_CATS_VS_DOGS),
      tfds_data_dir=str(real_data_dir),
      **overrides,
    )

  return make


# Files whose tests train in subprocesses for a minute or more each (the
# comparison, preemption, multi-host and reproducibility end-to-end runs),
# collected first: with two workers, a long test collected last would leave
# one worker running it alone at the end of the suite. Within a file, and for
# every other file, the order is pytest's.
_FIRST = (
  'test_compare_protocol.py',
  'test_preemption.py',
  'test_multihost.py',
  'test_reproducibility.py',
)


def pytest_collection_modifyitems(items):
  def rank(item):
    name = item.path.name
    return _FIRST.index(name) if name in _FIRST else len(_FIRST)

  items.sort(key=rank)
