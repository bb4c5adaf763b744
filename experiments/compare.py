r"""ACE against the field's fixes on the grouped spurious-background benchmark.

    CCO_DETERMINISTIC=2 python -m experiments.compare --out=/work/compare \
        --source_dir=../shared/data/oxford-iiit-pet-sample

For each correlation in --correlations (default 1.0 and 0.95) it
  1. builds the benchmark (--benchmark, a plug-in: `compare_runs.py`; by
     default `spurious`: `cco_jax/data/spurious_groups.py`, held-out pets
     rendered on both backgrounds, 50 validation and 80 test images per
     group) into OUT/c<corr>/data;
  2. searches every `GRIDS` variant's coefficients at this correlation (seed
     --grid_seed), choosing them on validation two ways, with and without
     group labels, and widening an axis while a choice sits on its edge
     (`experiments/compare_grid.py`; OUT/c<corr>/grid.json);
  3. trains every variant in --variants at each of its choices for each seed
     in --seeds (the grid's runs are reused), --parallel at a time, each in
     its own process with CCO_DETERMINISTIC=--deterministic_threads (runs
     that repeat on other machines: `cco_jax/runtime/deterministic.py`);
     JTT in its two stages; finished runs are skipped, unfinished ones resume;
  4. evaluates each run on the test split at the checkpoint each selection
     rule names (worst_group, accuracy, last: `cco_jax.selection`) and, for
     --dfr_variants, with the head refit by DFR (`cco_jax.dfr`) on the last
     checkpoint; cached in WORKDIR/evaluation/compare_<rule>.json;
  5. writes OUT/table.md and OUT/table.json (`experiments/compare_table.py`:
     one table per protocol and correlation, with seed spreads, two-level
     bootstrap intervals, paired tests against ACE with Holm's correction;
     `experiments/compare_stats.py`), OUT/curves_c<corr>.png and
     OUT/maps_c<corr>.png.

`--steps` shortens every run alike, in runs of their own (named _t<steps>;
e.g. `--steps=40 --seeds=0 --variants=ce,ace` for a smoke run).
"""

from __future__ import annotations

import itertools
import json
import os

from absl import app
from absl import flags

from cco_jax import errors
from cco_jax.runtime import compilation_cache
from cco_jax.runtime import deterministic
from experiments import cli
from experiments import compare_grid
from experiments import compare_runs
from experiments import compare_table
from experiments import runs

DEFAULT_VARIANTS = (
  'ce_control',
  'ce',
  'ace',
  'ace_kld',
  'ace_swd',
  'rrr',
  'ce_bg_cam',
  'energy',
  'group_dro',
  'ce_reweighted',
  'jtt',
)


# One run's worst-group accuracy moved with sd(difference)/sqrt(2) = 0.025,
# 0.040 and 0.039 (worst-group, accuracy and last-checkpoint rules) between
# an Intel Xeon and an AMD EPYC (33 paired runs, docs/results.md): the
# largest of the three. DFR rows moved more (0.059, 6 runs).
MACHINE_SD = 0.04


def define_flags():
  flags.DEFINE_string('out', None, 'Output directory (data, runs, table).')
  flags.DEFINE_string(
    'benchmark',
    'spurious',
    'The benchmark plug-in: a module of experiments/configs '
    '(experiments/compare_runs.py says what it provides).',
  )
  flags.DEFINE_string(
    'source_dir',
    '../shared/data/oxford-iiit-pet-sample',
    "The benchmark's source data (for 'spurious': Oxford-IIIT Pet in the "
    "official layout); not given: the plug-in's SOURCE_DIR, if it has one.",
  )
  flags.DEFINE_list(
    'correlations',
    ['1.0', '0.95'],
    "Train correlations; not given: the plug-in's CORRELATIONS, if it has one.",
  )
  flags.DEFINE_list(
    'variants',
    list(DEFAULT_VARIANTS),
    "Variants to train; not given: the plug-in's DEFAULT_VARIANTS, if it has "
    'one.',
  )
  flags.DEFINE_list('seeds', ['0', '1', '2', '3', '4'], 'Training seeds.')
  flags.DEFINE_list(
    'dfr_variants', ['ce', 'ace'], 'Variants also evaluated with DFR.'
  )
  flags.DEFINE_integer('grid_seed', 0, 'Seed of the grid runs.')
  flags.DEFINE_integer('max_widen', 2, 'Widenings per grid axis and side.')
  flags.DEFINE_integer('steps', 0, 'Override num_train_steps (0 = config).')
  flags.DEFINE_integer('parallel', 2, 'Trainings at a time.')
  flags.DEFINE_integer(
    'deterministic_threads',
    2,
    'CCO_DETERMINISTIC of every training (0 = off; see '
    'cco_jax/runtime/deterministic.py).',
  )
  flags.DEFINE_integer(
    'data_seed',
    0,
    'Composes the benchmark (which pets go to which split and background); '
    'another value gives a re-composed benchmark.',
  )
  flags.DEFINE_integer('val_per_group', 50, 'Validation images per group.')
  flags.DEFINE_integer('test_per_group', 80, 'Test images per group.')
  flags.DEFINE_list(
    'figure_variants',
    ['ce', 'ace', 'rrr'],
    'Variants whose maps OUT/maps_c<corr>.png shows (first seed).',
  )
  flags.DEFINE_bool(
    'tables_only', False, 'Write the tables from the runs that exist.'
  )
  flags.DEFINE_float(
    'machine_sd',
    MACHINE_SD,
    "One run's cross-machine standard deviation of worst-group accuracy, "
    'carried into every bootstrap interval (measured: docs/results.md, '
    '"Runs that repeat"); 0 = intervals about this machine only.',
  )
  flags.mark_flags_as_required(['out'])


def ensure_data(out: str, correlation: float) -> str:
  """The benchmark at `correlation` (built and prepared once), and its
  counterfactual test where the plug-in has one."""
  f = flags.FLAGS
  plugin = compare_runs.benchmark()
  data_dir = os.path.join(out, compare_runs.corr_name(correlation), 'data')
  if not os.path.exists(os.path.join(data_dir, 'labels.csv')):
    sizes = {}
    if getattr(plugin, 'GROUP_SIZES_FROM_FLAGS', True):
      sizes = dict(
        val_per_group=f.val_per_group, test_per_group=f.test_per_group
      )
    plugin.build_benchmark(
      plugin_default('source_dir'),
      data_dir,
      correlation=correlation,
      seed=f.data_seed,
      **sizes,
    )
  prepare(data_dir)
  if hasattr(plugin, 'build_counterfactual'):
    counterfactual = compare_runs.counterfactual_dir(data_dir)
    if not os.path.exists(os.path.join(counterfactual, 'labels.csv')):
      plugin.build_counterfactual(
        plugin_default('source_dir'), data_dir, counterfactual
      )
    prepare(counterfactual)
  return data_dir


def prepare(data_dir: str) -> None:
  """Prepares a folder dataset of the benchmark into DATA_DIR/tfds, here,
  once: parallel trainings must not prepare it together."""
  from cco_jax import configuration  # pylint: disable=g-import-not-at-top
  from cco_jax import data  # pylint: disable=g-import-not-at-top

  plugin = compare_runs.benchmark()
  variants = getattr(plugin, 'DEFAULT_VARIANTS', None) or list(plugin.VARIANTS)
  config = plugin.get_config(variants[0])  # Every variant reads the same data.
  configuration.apply_overrides(
    config,
    {
      'data.manual_dir': data_dir,
      'data.tfds_data_dir': os.path.join(data_dir, 'tfds'),
    },
  )
  data.prepare_from_config(config.data)


class Trainer:
  """Trains (variant, setting, seed) items of one correlation."""

  def __init__(self, out, correlation, data_dir):
    f = flags.FLAGS
    self.out, self.correlation, self.data_dir = out, correlation, data_dir
    self.steps, self.parallel = f.steps, f.parallel
    self.env = {
      **cli.child_environment(),
      compilation_cache.COMPILATION_CACHE_ENV: os.path.join(out, 'xla_cache'),
    }
    if f.deterministic_threads:
      self.env[deterministic.ENV] = str(f.deterministic_threads)

  def train(self, items, after=None) -> list[str]:
    """Trains `items` [(variant, setting, seed)]; returns their workdirs.
    JTT's first stages train first, then every second stage with the rest."""
    c, out, data_dir, steps = (
      self.correlation, self.out, self.data_dir, self.steps,
    )  # fmt: skip
    first = {}
    for variant, setting, seed in items:
      if variant == 'jtt':
        t = int(dict(setting)['jtt.first_steps'])
        first[(t, seed)] = compare_runs.jtt_first_stage(
          out, c, t, data_dir, seed, steps
        )
    runs.train_all(list(first.values()), self.parallel, env=self.env)
    jobs = []
    for variant, setting, seed in items:
      if variant == 'jtt':
        compare_runs.prepare_jtt_data(out, c, setting, data_dir, seed, steps)
        jobs.append(
          compare_runs.jtt_second_stage(out, c, setting, data_dir, seed, steps)
        )
      else:
        jobs.append(
          compare_runs.job(out, c, variant, setting, data_dir, steps, seed)
        )
    runs.train_all(jobs, self.parallel, env=self.env, after=after)
    return [workdir for workdir, _ in jobs]


def grids(trainer: Trainer, variants, grid_seed: int, max_widen: int) -> dict:
  """Every grid variant's search at the trainer's correlation (all first
  grids trained together, then each widened on its own)."""
  searched = [v for v in variants if v in compare_runs.benchmark().GRIDS]
  initial = []
  for variant in searched:
    axes = compare_runs.benchmark().GRIDS[variant]
    for values in itertools.product(*(v for _, v in axes)):
      setting = tuple(zip((f for f, _ in axes), values))
      initial.append((variant, setting, grid_seed))
  trainer.train(initial)
  results = {}
  for variant in searched:
    results[variant] = compare_grid.search(
      variant,
      lambda settings, v=variant: trainer.train(
        [(v, s, grid_seed) for s in settings]
      ),
      max_widen=max_widen,
      max_steps=trainer.steps
      or compare_runs.benchmark().get_config(variant).num_train_steps,
    )
  return results


def choices(results: dict, variants) -> dict:
  """{variant: {protocol: setting}} (the empty setting without a grid)."""
  return {
    v: results[v]['chosen']
    if v in results
    else dict.fromkeys(compare_grid.PROTOCOLS, ())
    for v in variants
  }


def _number(kind, text: str, flag: str):
  """`kind(text)`, or a one-line error naming the flag."""
  try:
    return kind(text)
  except ValueError:
    raise errors.UserError(
      f'{flag}: {text!r} is not {"an integer" if kind is int else "a number"}'
      ' (comma-separated, e.g. --seeds=0,1,2 --correlations=0.95,1.0).'
    ) from None


# Flags whose default a benchmark plug-in may set (module attribute): what
# the flag says when it is given, the plug-in's value when not.
PLUGIN_DEFAULTS = {
  'source_dir': 'SOURCE_DIR',
  'variants': 'DEFAULT_VARIANTS',
  'correlations': 'CORRELATIONS',
  'dfr_variants': 'DFR_VARIANTS',
  'figure_variants': 'FIGURE_VARIANTS',
}


def plugin_default(flag: str):
  """The flag's value, or (not given) the plug-in's default for it."""
  f = flags.FLAGS
  if f[flag].present:
    return f[flag].value
  value = getattr(compare_runs.benchmark(), PLUGIN_DEFAULTS[flag], None)
  return f[flag].value if value is None else list(value)


def check_plugin() -> None:
  """The --benchmark module exists, and takes the flags given."""
  f = flags.FLAGS
  compare_runs.BENCHMARK = f.benchmark
  try:
    plugin = compare_runs.benchmark()
  except ImportError:
    raise app.UsageError(
      f'--benchmark={f.benchmark}: no module experiments/configs/'
      f'{f.benchmark}.py; name a config module there.'
    ) from None
  sized = [n for n in ('val_per_group', 'test_per_group') if f[n].present]
  if sized and not getattr(plugin, 'GROUP_SIZES_FROM_FLAGS', True):
    raise app.UsageError(
      f'--{sized[0]}: the {f.benchmark} benchmark takes its group sizes from '
      'its source data; leave the flag out (experiments/configs/'
      f'{f.benchmark}.py says what they are).'
    )


def main(argv):
  cli.no_arguments(argv)
  f = flags.FLAGS
  check_plugin()
  out = os.path.abspath(f.out)
  compilation_cache.enable_compilation_cache(os.path.join(out, 'xla_cache'))
  correlations = [
    _number(float, c, '--correlations') for c in plugin_default('correlations')
  ]
  seeds = [_number(int, s, '--seeds') for s in f.seeds]
  if not f.machine_sd >= 0:
    raise app.UsageError(
      f'--machine_sd={f.machine_sd}: give a standard deviation >= 0 (0 = '
      'intervals about this machine only).'
    )
  variants = plugin_default('variants')
  unknown = set(variants) - set(compare_runs.benchmark().VARIANTS)
  if unknown:
    raise app.UsageError(
      f'--variants: unknown {sorted(unknown)}; choose from '
      f'{sorted(compare_runs.benchmark().VARIANTS)}.'
    )
  chosen_at = {}
  for correlation in correlations:
    data_dir = ensure_data(out, correlation)
    trainer = Trainer(out, correlation, data_dir)
    path = compare_grid.grid_path(out, correlation)
    if f.tables_only and os.path.exists(path):
      results = compare_grid.read(path)
    elif f.tables_only:
      continue
    else:
      results = grids(trainer, variants, f.grid_seed, f.max_widen)
      compare_grid.write(path, results)
    chosen_at[correlation] = choices(results, variants)
    if f.tables_only:
      continue
    items = sorted(
      {
        (variant, setting, seed)
        for variant, by_protocol in chosen_at[correlation].items()
        for setting in by_protocol.values()
        for seed in seeds
      }
    )
    trainer.train(
      items,
      after=lambda w: compare_runs.evaluations(w, '', ()),
    )
  records = compare_table.collect(
    out, chosen_at, seeds, f.steps, tuple(plugin_default('dfr_variants'))
  )
  compare_table.write_outputs(
    out,
    records,
    chosen_at,
    plugin_default('figure_variants'),
    machine_sd=f.machine_sd,
  )
  print(json.dumps({'table': os.path.join(out, 'table.md')}), flush=True)


if __name__ == '__main__':
  define_flags()
  cli.run(main)
