r"""ACE against the field's fixes on the grouped spurious-background benchmark.

    python -m experiments.compare --out=/work/compare \
        --pets_dir=../shared/data/oxford-iiit-pet-sample

For each correlation in --correlations (default 0.95 and 1.0) it
  1. builds the benchmark (`cco_jax/data/spurious_groups.py`: groups =
     species x background kind; train at the correlation, validation and test
     with the four groups in equal numbers) into OUT/c<corr>/data;
  2. grid: trains each variant of experiments/configs/spurious.py that has a
     `GRIDS` entry at every grid value with seed --grid_seed, and keeps the
     value whose run reached the highest validation worst-group accuracy
     (ties: the validation accuracy there, then the mean worst-group accuracy
     over the run's evaluations; `compare_table.validation_score`);
     OUT/c<corr>/grid.json
     records every value's score. --grid_from=0.95 makes other correlations
     reuse that correlation's choices instead of searching again;
  3. trains every variant in --variants at its chosen value for each seed in
     --seeds (runs are named variant, value, seed: the grid's run of the
     chosen value is reused), `--parallel` trainings at a time, each in its
     own process (log in WORKDIR/train.log); a run with final_metrics.json is
     not trained again, an unfinished one resumes;
  4. evaluates the best checkpoint (highest validation worst-group accuracy,
     chosen by the training loop) and the last one on the test split
     (classification and interventions, `cco_jax.evaluation`), cached in
     WORKDIR/evaluation/compare_<best|last>.json;
  5. writes OUT/table.md and OUT/table.json (means ± sample std over seeds,
     and which differences from ACE exceed the spread), OUT/curves_c<corr>
     .png (training loss against step, mean over seeds, one line per variant)
     and OUT/maps_c<corr>.png (minority-group test images explained by the
     --figure_variants, one colour scale), and the grid's scores and
     choices in table.md.

Every number comes from these runs; `--steps` changes the schedule of all
variants alike, in runs of their own (named ..._t<steps>; e.g. `--steps=40
--seeds=0` for a smoke run).
"""

from __future__ import annotations

import json
import os

from absl import app
from absl import flags
import numpy as np

from cco_jax import errors
from cco_jax.runtime import compilation_cache
from experiments import cli
from experiments import compare_table
from experiments import runs
from experiments.configs import spurious as spurious_configs

CONFIG = 'experiments/configs/spurious.py'
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
)


def define_flags():
  flags.DEFINE_string('out', None, 'Output directory (data, runs, table).')
  flags.DEFINE_string(
    'pets_dir',
    '../shared/data/oxford-iiit-pet-sample',
    'Oxford-IIIT Pet in the official layout.',
  )
  flags.DEFINE_list('correlations', ['0.95', '1.0'], 'Train correlations.')
  flags.DEFINE_list('variants', list(DEFAULT_VARIANTS), 'Variants to train.')
  flags.DEFINE_list('seeds', ['0', '1', '2', '3', '4'], 'Training seeds.')
  flags.DEFINE_multi_string(
    'seeds_for', [], 'CORR=S1,S2,...: other seeds at one correlation.'
  )
  flags.DEFINE_multi_string(
    'variants_for', [], 'CORR=V1,V2,...: other variants at one correlation.'
  )
  flags.DEFINE_integer('grid_seed', 0, 'Seed of the grid runs.')
  flags.DEFINE_string(
    'grid_from', None, 'Reuse the grid choices of this correlation.'
  )
  flags.DEFINE_integer('steps', 0, 'Override num_train_steps (0 = config).')
  flags.DEFINE_integer('parallel', 2, 'Trainings at a time.')
  flags.DEFINE_list(
    'figure_variants',
    ['ce_control', 'ace', 'rrr'],
    'Variants whose maps OUT/maps_c<corr>.png shows (first seed, best '
    'checkpoint).',
  )
  flags.mark_flags_as_required(['out'])


def corr_name(correlation: float) -> str:
  return f'c{round(correlation * 100):03d}'


def value_name(value) -> str:
  return 'default' if value is None else f'{value:g}'


def run_dir(
  out: str, correlation: float, variant: str, value, seed: int, steps: int = 0
):
  """OUT/c<corr>/runs/<variant>_<value>_s<seed>[_t<steps> if --steps]."""
  name = f'{variant}_{value_name(value)}_s{seed}' + (
    f'_t{steps}' if steps else ''
  )
  return os.path.join(out, corr_name(correlation), 'runs', name)


def ensure_data(out: str, pets_dir: str, correlation: float) -> str:
  """The benchmark at `correlation` (built once)."""
  from cco_jax import configuration  # pylint: disable=g-import-not-at-top
  from cco_jax import data  # pylint: disable=g-import-not-at-top
  from cco_jax.data import (
    spurious_groups,  # pylint: disable=g-import-not-at-top
  )

  data_dir = os.path.join(out, corr_name(correlation), 'data')
  if not os.path.exists(os.path.join(data_dir, 'labels.csv')):
    spurious_groups.make_group_benchmark(
      pets_dir, data_dir, correlation=correlation, overwrite=True
    )
  # Prepared here, once: parallel trainings must not prepare it together.
  config = spurious_configs.get_config('ace')
  configuration.apply_overrides(
    config,
    {
      'data.manual_dir': data_dir,
      'data.tfds_data_dir': os.path.join(data_dir, 'tfds'),
    },
  )
  data.prepare_from_config(config.data)
  return data_dir


def job(
  out: str,
  correlation: float,
  variant: str,
  value,
  data_dir: str,
  steps: int,
  seed: int,
) -> tuple[str, list[str]]:
  """The `(workdir, argv)` of one run; `value` sets the variant's `GRIDS`
  coefficient (None: the config's own)."""
  overrides = [
    f'data.manual_dir={data_dir}',
    f'data.tfds_data_dir={os.path.join(data_dir, "tfds")}',
  ]
  if value is not None:
    overrides.append(f'{spurious_configs.GRIDS[variant][0]}={value}')
  if steps:
    overrides.append(f'num_train_steps={steps}')
  workdir = run_dir(out, correlation, variant, value, seed, steps)
  return workdir, runs.command(
    'experiments.pets', CONFIG, variant, workdir, seed, overrides
  )


def evaluate(workdir: str, which: str) -> dict:
  """Test-split report of the 'best' or 'last' checkpoint (cached)."""
  from cco_jax import evaluation  # pylint: disable=g-import-not-at-top

  path = os.path.join(
    workdir, evaluation.EVALUATION_DIR, f'compare_{which}.json'
  )
  if not os.path.exists(path):
    config = evaluation.default_config()
    config.evaluators = ('classification', 'interventions')
    config.ood = False
    report = evaluation.evaluate_checkpoint(workdir, config, step=which).report
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
      json.dump(report, f, indent=1)
  with open(path) as f:
    return json.load(f)


def train_all(out: str, jobs: list[tuple], parallel: int, evaluate_runs=False):
  """Trains the jobs with one shared compilation cache (seeds of a variant
  compile once), evaluating each finished run while the others train."""
  runs.train_all(
    jobs,
    parallel,
    env={
      compilation_cache.COMPILATION_CACHE_ENV: os.path.join(out, 'xla_cache')
    },
    after=evaluate_both if evaluate_runs else None,
  )


def evaluate_both(workdir: str) -> dict:
  """{'best': report, 'last': report} of a run (`evaluate`)."""
  return {
    which: evaluate(workdir, which) for which in compare_table.CHECKPOINTS
  }


def grid_choices(out, correlation, data_dir, variants, seed, steps, parallel):
  """{variant: value} chosen on validation worst-group accuracy."""
  jobs = []
  for variant in variants:
    if variant in spurious_configs.GRIDS:
      for value in spurious_configs.GRIDS[variant][1]:
        jobs.append(
          job(out, correlation, variant, value, data_dir, steps, seed)
        )
  train_all(out, jobs, parallel)
  scores, choices = {}, {}
  for variant in variants:
    if variant not in spurious_configs.GRIDS:
      choices[variant] = None
      continue
    values = spurious_configs.GRIDS[variant][1]
    scores[variant] = {
      value_name(v): compare_table.validation_score(
        run_dir(out, correlation, variant, v, seed, steps)
      )
      for v in values
    }
    best = max(values, key=lambda v: scores[variant][value_name(v)])
    choices[variant] = best
  record = {
    'field': {v: spurious_configs.GRIDS[v][0] for v in scores},
    'score': compare_table.SCORE,
    'scores': scores,
    'chosen': {v: value_name(c) for v, c in choices.items()},
  }
  with open(os.path.join(out, corr_name(correlation), 'grid.json'), 'w') as f:
    json.dump(record, f, indent=1)
  return choices


def _number(kind, text: str, flag: str):
  """`kind(text)`, or a one-line error naming the flag."""
  try:
    return kind(text)
  except ValueError:
    raise errors.UserError(
      f'{flag}: {text!r} is not {"an integer" if kind is int else "a number"}'
      ' (comma-separated, e.g. --seeds=0,1,2 --correlations=0.95,1.0).'
    ) from None


def main(argv):
  cli.no_arguments(argv)
  f = flags.FLAGS
  out = os.path.abspath(f.out)
  correlations = [_number(float, c, '--correlations') for c in f.correlations]
  seeds_at = dict.fromkeys(
    correlations, [_number(int, s, '--seeds') for s in f.seeds]
  )
  for text in f.seeds_for:
    correlation, _, listed = text.partition('=')
    seeds_at[_number(float, correlation, '--seeds_for')] = [
      _number(int, s, '--seeds_for') for s in listed.split(',')
    ]
  variants_at = dict.fromkeys(correlations, list(f.variants))
  for text in f.variants_for:
    correlation, _, listed = text.partition('=')
    variants_at[_number(float, correlation, '--variants_for')] = listed.split(
      ','
    )
  for variants in [f.variants, f.figure_variants, *variants_at.values()]:
    unknown = sorted(set(variants) - set(spurious_configs.VARIANTS))
    if unknown:
      raise errors.UserError(
        f'variants {unknown} are unknown; choose among '
        f'{sorted(spurious_configs.VARIANTS)} (--variants, --variants_for, '
        '--figure_variants).'
      )
  compilation_cache.enable_compilation_cache(os.path.join(out, 'xla_cache'))
  chosen_by = {}
  if f.grid_from is not None and float(f.grid_from) not in correlations:
    raise app.UsageError('--grid_from must be one of --correlations.')
  order = sorted(
    correlations, key=lambda c: c != float(f.grid_from or correlations[0])
  )
  for correlation in order:
    data_dir = ensure_data(out, f.pets_dir, correlation)
    if f.grid_from is not None and float(f.grid_from) in chosen_by:
      choices = chosen_by[float(f.grid_from)]
    else:
      choices = grid_choices(
        out, correlation, data_dir, f.variants, f.grid_seed, f.steps,
        f.parallel,
      )  # fmt: skip
    chosen_by[correlation] = choices
    jobs = []
    for variant in variants_at[correlation]:
      for seed in seeds_at[correlation]:
        jobs.append(
          job(
            out,
            correlation,
            variant,
            choices[variant],
            data_dir,
            f.steps,
            seed,
          )  # fmt: skip
        )
    train_all(out, jobs, f.parallel, evaluate_runs=True)
  records = []
  for correlation in correlations:
    for variant in variants_at[correlation]:
      value = chosen_by[correlation][variant]
      for seed in seeds_at[correlation]:
        workdir = run_dir(out, correlation, variant, value, seed, f.steps)
        records.append(
          compare_table.run_record(
            workdir,
            correlation,
            variant,
            value_name(value),
            seed,
            evaluate_both(workdir),
          )
        )
  compare_table.write_outputs(out, records)
  for correlation in correlations:
    seed = seeds_at[correlation][0]
    compare_table.save_maps_figure(
      os.path.join(out, f'maps_{corr_name(correlation)}.png'),
      os.path.join(out, corr_name(correlation), 'data'),
      {
        compare_table.LABELS[v]: run_dir(
          out, correlation, v, chosen_by[correlation][v], seed, f.steps
        )
        for v in f.figure_variants
        if v in variants_at[correlation]
      },
    )
  print(json.dumps({'table': os.path.join(out, 'table.md')}), flush=True)


if __name__ == '__main__':
  define_flags()
  np.set_printoptions(precision=4)
  cli.run(main)
