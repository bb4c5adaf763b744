"""Process setup, one job per module (the entry points call them in
`experiments.cli`; XLA reads its flags once, before JAX starts its backends):

  xla_cpu            XLA CPU flags (convolutions off YNNPACK), after checking
                     that the installed jaxlib knows the option.
  xla_gpu            XLA GPU flags (latency-hiding scheduler) where a CUDA
                     plugin is installed.
  compilation_cache  the persistent compilation cache ($CCO_COMPILATION_CACHE).
  distributed        joining a run over several hosts (`jax.distributed`).
  workdir_lock       one run per workdir (`WorkdirLock`, `WorkdirInUse`).
  log_filter         no Orbax INFO flood, no repeated dataset lines.
"""
