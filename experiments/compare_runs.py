"""The runs of `experiments.compare`: names, commands, JTT's two stages and
each run's evaluations. Not an entry point.

A run is (correlation, variant, setting, seed); a setting is a tuple of
(field, value) pairs from `experiments/configs/spurious.py:GRIDS` (empty:
the config's own values). Its directory is
OUT/c<corr>/runs/<variant>_<values>_s<seed>[_t<steps>].

The benchmark is a plug-in: a config module `experiments/configs/<name>.py`
(`--benchmark`, default `spurious`) that provides `VARIANTS` and `get_config`
(the trainer's config variants), `GRIDS` (`{variant: ((field, values), ...)}`),
`MINORITY_GROUPS` (the groups whose spurious feature disagrees with the label)
and `build_benchmark(source_dir, out_dir, *, correlation, val_per_group,
test_per_group, seed)` (writes the folder dataset at a correlation; `seed`
composes it); optionally `SOURCE_DIR`, `CORRELATIONS`, `DEFAULT_VARIANTS`,
`DFR_VARIANTS`, `FIGURE_VARIANTS` (defaults of the flags of those names),
`POSITIVE_CLASS` (scored by the tables' AUC), `REFERENCE` (the variant every
row is compared with; default 'ace'), `LABELS` (names of its variants in
tables), `GROUP_SIZES_FROM_FLAGS = False` (sizes fixed by the data) and
`build_counterfactual(source_dir, data_dir, out_dir)` (the benchmark with
each test image's spurious feature toggled; every evaluation then adds the
share of test predictions that flip, `counterfactual`).
A new benchmark supplies only that module (`isic_shortcut`: skin lesions
with pasted adhesive patches).

Each finished run is evaluated on the test split at the checkpoint each
selection rule names (`cco_jax.selection`: worst_group, accuracy, last), and
runs of the `DFR_BASES` variants also with their head refit by DFR
(`cco_jax.dfr`) on the last checkpoint; every evaluation is cached in
WORKDIR/evaluation/compare_<rule>.json with per-example predictions.
"""

from __future__ import annotations

import importlib
import json
import os

import numpy as np

from cco_jax import selection
from experiments import runs

# The benchmark plug-in: a module of experiments/configs (module docstring);
# `experiments.compare --benchmark` sets it once, before any run.
BENCHMARK = 'spurious'
RULES = tuple(selection.RULES)  # worst_group, accuracy, last
DFR = 'dfr_last'  # The DFR evaluation's name: DFR on the last checkpoint.
JTT_FIELDS = ('jtt.first_steps', 'jtt.factor')
# A correlation's counterfactual test (plug-ins with `build_counterfactual`):
# OUT/c<corr>/counterfactual, beside OUT/c<corr>/data.
COUNTERFACTUAL = 'counterfactual'

Setting = tuple[tuple[str, float], ...]
# The variants' names in tables and figures, in table order.
LABELS = {
  'ce_control': 'CE control (unfaithful arch.)',
  'ce': 'CE',
  'ace': 'ACE',
  'ace_kld': 'ACE + divergence',
  'ace_swd': 'ACE + SWD',
  'ace_cutmix': 'ACE + contrastive CutMix',
  'rrr': 'RRR',
  'ce_bg_cam': 'CE + background-CAM penalty',
  'energy': 'CE + Energy loss',
  'group_dro': 'Group DRO',
  'ce_reweighted': 'CE reweighted by group',
  'jtt': 'JTT',
}


def labels() -> dict:
  """Variant -> its name in tables and figures, in table order: the
  plug-in's `LABELS` (if any) first, then `LABELS`."""
  return {**getattr(benchmark(), 'LABELS', {}), **LABELS}


def benchmark():
  """The benchmark's config module (`BENCHMARK`)."""
  return importlib.import_module(f'experiments.configs.{BENCHMARK}')


def config_path() -> str:
  """The benchmark's config file, relative to the repository root."""
  return f'experiments/configs/{BENCHMARK}.py'


def corr_name(correlation: float) -> str:
  return f'c{round(correlation * 100):03d}'


def value_name(setting: Setting) -> str:
  """'default', or the values joined by '_' ('0.01_0.1')."""
  return '_'.join(f'{v:g}' for _, v in setting) or 'default'


def run_dir(
  out: str,
  correlation: float,
  variant: str,
  setting: Setting,
  seed: int,
  steps: int = 0,
) -> str:
  name = f'{variant}_{value_name(setting)}_s{seed}' + (
    f'_t{steps}' if steps else ''
  )
  return os.path.join(out, corr_name(correlation), 'runs', name)


def _data_overrides(data_dir: str) -> list[str]:
  return [
    f'data.manual_dir={data_dir}',
    f'data.tfds_data_dir={os.path.join(data_dir, "tfds")}',
  ]


def job(
  out: str,
  correlation: float,
  variant: str,
  setting: Setting,
  data_dir: str,
  steps: int,
  seed: int,
) -> tuple[str, list[str]]:
  """`(workdir, argv)` of a one-stage run (not JTT's second stage: `jtt`)."""
  overrides = _data_overrides(data_dir)
  overrides += [f'{field}={value:g}' for field, value in setting]
  if steps:
    overrides.append(f'num_train_steps={steps}')
  workdir = run_dir(out, correlation, variant, setting, seed, steps)
  return workdir, runs.command(
    'experiments.pets', config_path(), variant, workdir, seed, overrides
  )


def jtt_first_stage(out, correlation, first_steps, data_dir, seed, steps=0):
  """`(workdir, argv)` of JTT's first stage: CE for `first_steps` steps."""
  workdir = os.path.join(
    out, corr_name(correlation), 'runs', f'jtt_stage1_T{first_steps}_s{seed}'
  )
  overrides = _data_overrides(data_dir) + [
    f'num_train_steps={min(first_steps, steps or first_steps)}',
  ]
  return workdir, runs.command(
    'experiments.pets', config_path(), 'ce', workdir, seed, overrides
  )


def jtt_second_stage(
  out, correlation, setting: Setting, data_dir: str, seed: int, steps: int
) -> tuple[str, list[str]]:
  """`(workdir, argv)` of JTT's second stage on its upsampled dataset (the
  first stage must have finished: `prepare_jtt_data`)."""
  values = dict(setting)
  upsampled = jtt_data_dir(
    out, correlation, int(values['jtt.first_steps']), int(values['jtt.factor']),
    seed,
  )  # fmt: skip
  overrides = _data_overrides(upsampled)
  if steps:
    overrides.append(f'num_train_steps={steps}')
  workdir = run_dir(out, correlation, 'jtt', setting, seed, steps)
  return workdir, runs.command(
    'experiments.pets', config_path(), 'jtt', workdir, seed, overrides
  )


def jtt_data_dir(out, correlation, first_steps, factor, seed) -> str:
  return os.path.join(
    out,
    corr_name(correlation),
    'jtt_data',
    f'T{first_steps}_up{factor}_s{seed}',
  )


def prepare_jtt_data(
  out, correlation, setting: Setting, data_dir: str, seed: int, steps: int
) -> dict:
  """Writes and prepares JTT's upsampled dataset of `setting` and `seed` from
  its finished first stage (once); returns its summary (`jtt.json`)."""
  from cco_jax import configuration  # pylint: disable=g-import-not-at-top
  from cco_jax import data  # pylint: disable=g-import-not-at-top
  from cco_jax import jtt  # pylint: disable=g-import-not-at-top
  from cco_jax import restore  # pylint: disable=g-import-not-at-top

  values = dict(setting)
  first, factor = int(values['jtt.first_steps']), int(values['jtt.factor'])
  target = jtt_data_dir(out, correlation, first, factor, seed)
  summary_path = os.path.join(target, jtt.SUMMARY_FILE)
  if not os.path.exists(summary_path):
    stage1, _ = jtt_first_stage(out, correlation, first, data_dir, seed, steps)
    errors_path = os.path.join(stage1, 'jtt_errors.json')
    if not os.path.exists(errors_path):
      trained = restore.restore_model(stage1, step='last')
      with open(errors_path, 'w') as f:
        json.dump(jtt.train_errors(trained), f)
    with open(errors_path) as f:
      error_set = json.load(f)
    jtt.write_upsampled(data_dir, target, error_set, factor)
  config = benchmark().get_config('jtt')
  configuration.apply_overrides(
    config,
    {
      'data.manual_dir': target,
      'data.tfds_data_dir': os.path.join(target, 'tfds'),
    },
  )
  data.prepare_from_config(config.data)
  with open(summary_path) as f:
    summary = json.load(f)
  return {k: v for k, v in summary.items() if k != 'error_set'}


def evaluate(workdir: str, rule: str) -> dict:
  """The test report of the checkpoint `rule` names (or DFR's), cached."""
  from cco_jax import dfr  # pylint: disable=g-import-not-at-top
  from cco_jax import evaluation  # pylint: disable=g-import-not-at-top
  from cco_jax import metric_writers  # pylint: disable=g-import-not-at-top
  from cco_jax import restore  # pylint: disable=g-import-not-at-top

  path = os.path.join(
    workdir, evaluation.EVALUATION_DIR, f'compare_{rule}.json'
  )
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  config = evaluation.default_config()
  config.evaluators = ('classification', 'interventions', 'per_example')
  config.ood = False
  records = metric_writers.read_metrics(workdir)
  if rule == DFR:
    step = selection.select_step(records, 'last')
    refit, info = dfr.refit_head(restore.restore_model(workdir, step=step))
    model = dict(trained=refit)
  else:
    step = selection.select_step(records, rule)
    model, info = dict(step=step), None
    same = _report_of_step(os.path.dirname(path), step)
    if same is not None:  # Another rule chose this checkpoint: its report.
      _write_json(path, {**same, 'rule': rule})
      return {**same, 'rule': rule}
  report = evaluation.evaluate_checkpoint(workdir, config, **model).report
  if info is not None:
    report['dfr'] = info
  report['rule'] = rule
  # runs/<name> -> c<corr>/counterfactual
  counterfactual = os.path.join(
    os.path.dirname(os.path.dirname(workdir)), COUNTERFACTUAL
  )
  if os.path.exists(os.path.join(counterfactual, 'labels.csv')):
    config.evaluators = ('per_example',)
    other = evaluation.evaluate_checkpoint(
      workdir,
      config,
      data_overrides={
        'manual_dir': counterfactual,
        'tfds_data_dir': os.path.join(counterfactual, 'tfds'),
      },
      **model,
    ).report
    report['counterfactual'] = counterfactual_summary(
      report['per_example'], other['per_example']
    )
  _write_json(path, report)
  return report


def _report_of_step(directory: str, step: int) -> dict | None:
  """A cached report of checkpoint `step` under another selection rule (not
  DFR's, whose head differs), or None."""
  for rule in RULES:
    path = os.path.join(directory, f'compare_{rule}.json')
    if os.path.exists(path):
      with open(path) as f:
        report = json.load(f)
      if report.get('step') == step:
        return report
  return None


def _write_json(path: str, value: dict) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + '.tmp', 'w') as f:
    json.dump(value, f)
  os.replace(path + '.tmp', path)


def counterfactual_dir(data_dir: str) -> str:
  """Where a correlation's counterfactual test lives, beside its data."""
  return os.path.join(os.path.dirname(data_dir), COUNTERFACTUAL)


def counterfactual_summary(factual: dict, counter: dict) -> dict:
  """Flip rate and accuracy on the counterfactual test, from the two
  evaluations' per-example predictions (the same images in the same order)."""
  labels = np.asarray(factual['label'])
  if factual['index'] != counter['index'] or not np.array_equal(
    labels, counter['label']
  ):
    raise ValueError('The counterfactual test lists other images.')
  flipped = np.asarray(factual['prediction']) != np.asarray(
    counter['prediction']
  )
  groups = np.asarray(factual['group'])
  return {
    'flip_rate': float(flipped.mean()),
    'accuracy': float((np.asarray(counter['prediction']) == labels).mean()),
    'flip_rate_by_group': {
      str(g): float(flipped[groups == g].mean()) for g in np.unique(groups)
    },
  }


def evaluations(workdir: str, variant: str, dfr_variants) -> dict:
  """{rule: report} of a finished run (DFR too for `dfr_variants`)."""
  names = RULES + ((DFR,) if variant in dfr_variants else ())
  return {name: evaluate(workdir, name) for name in names}
