"""Test-wide setup: several virtual CPU devices, so pmap is tested for real.

XLA reads the flag once, when JAX initialises its backends, so it must be set
before anything imports jax.
"""

import os

NUM_TEST_DEVICES = 4

_flag = f'--xla_force_host_platform_device_count={NUM_TEST_DEVICES}'
if _flag not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + _flag).strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# Threefry random bits take seconds to compile per shape on CPU with jax 0.10.2,
# which dominates model initialisation in tests; RBG keys compile ~10x faster.
# Tests that care about the PRNG pass explicit keys.
os.environ.setdefault('JAX_DEFAULT_PRNG_IMPL', 'rbg')
