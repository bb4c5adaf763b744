"""The train step as the speed benchmarks compile it (not an entry point,
and defines no flags, so every benchmark can import it)."""

from __future__ import annotations

import functools
import time

import jax
import optax

from cco_jax import train_step as step_lib


def compile_step(model, objective, image_size, batch):
  """The library's train step of `objective` on `model`, jitted with the
  state donated and compiled for `batch`: (compiled, state, compile
  seconds, XLA's FLOP count of the step or 0)."""
  state = step_lib.create_train_state(
    jax.random.key(0, impl='rbg'),
    model,
    image_size,
    optax.adam(1e-3),
    objective_state=objective.init_state(),
  )
  step = jax.jit(
    functools.partial(step_lib.train_step, objective=objective, axis_name=None),
    donate_argnums=(0,),
  )
  start = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  seconds = time.perf_counter() - start
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return compiled, state, seconds, float((cost or {}).get('flops', 0.0))
