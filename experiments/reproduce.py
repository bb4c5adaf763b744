r"""The CPU-scale reproduction table: datasets x objectives x seeds.

    python -m experiments.reproduce --out=/tmp/reproduce_cpu \
        --pets_dir=../shared/data/oxford-iiit-pet-sample \
        --cvd_dir=../shared/data/cats-vs-dogs-sample

For each dataset in {species: the Pets sample at --pets_dir, spurious: the
spurious-background benchmark made from it (docs/spurious.md), written to
OUT/data/spurious}, each objective in {cpu_ce: the cross-entropy control,
cpu_ace: ACE, cpu: ACE + divergence} (variants of experiments/configs/pets.py)
and each seed in --seeds, it
  1. trains `python -m experiments.pets --config=...:VARIANT` (a subprocess, log
     in WORKDIR/train.log) into WORKDIR = OUT/<dataset>_<variant>_s<seed>, unless
     WORKDIR/final_metrics.json exists (so an interrupted reproduction resumes;
     an unfinished run resumes from its last checkpoint);
  2. evaluates its best checkpoint (`cco_jax.evaluation.evaluate_checkpoint`,
     test split, all interventions, Cats-vs-Dogs) into
     WORKDIR/evaluation/report.json, unless that exists (--reevaluate redoes it);
     species models are also tested on the spurious benchmark's reversed test
     split (WORKDIR/evaluation/report_spurious_reversed.json) when it is built;
  3. writes OUT/table.md and OUT/table.json: per dataset and objective, the mean
     and sample standard deviation (ddof=1) over seeds of validation accuracy
     (best checkpoint, in distribution), Pets test accuracy, spurious
     reversed-test accuracy, Cats-vs-Dogs accuracy, background share of pixel
     influence (sum bg / sum net), flip rates under background noise and under
     foreground grey, and training wall time; plus the machine.

Each dataset has its own TFDS data dir (OUT/tfds/<dataset>), so the sample and
the benchmark never clash. --epochs overrides num_epochs; --override passes any
further `--config.KEY=VALUE` to training (e.g. `--override=data.image_size=32`
for a smoke run). --only selects a subset by dataset and/or variant names,
e.g. `--only=spurious` or `--only=species,cpu_ace`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

from absl import flags
from absl import logging

from cco_jax import errors
from experiments import cli
from experiments import results_tables
from experiments import runs

DATASETS = ('species', 'spurious')
VARIANTS = {'cpu_ce': 'CE control', 'cpu_ace': 'ACE', 'cpu': 'ACE + divergence'}
# Every variant the table can name (--variants), e.g. the paper-scale ones that
# experiments/gpu/reproduce.sh trains on a GPU.
LABELS = {
  **VARIANTS,
  'binary_ce': 'CE control (ResNet-50)',
  'binary': 'ACE + divergence (ResNet-50)',
  'breeds_ce': 'CE control (ResNet-50, 37 breeds)',
  'breeds': 'ACE + divergence (ResNet-50, 37 breeds)',
}
REPORT = 'report.json'
CROSS_REPORT = 'report_spurious_reversed.json'

_OUT = flags.DEFINE_string('out', None, 'Output directory (runs, data, table).')
_SEEDS = flags.DEFINE_list('seeds', ['0', '1', '2'], 'Training seeds.')
_EPOCHS = flags.DEFINE_float(
  'epochs', None, "Override num_epochs (default: the variant's, 20)."
)
_PETS_DIR = flags.DEFINE_string(
  'pets_dir',
  '../shared/data/oxford-iiit-pet-sample',
  'Oxford-IIIT Pet in the official layout.',
)
_CVD_DIR = flags.DEFINE_string(
  'cvd_dir',
  '../shared/data/cats-vs-dogs-sample',
  'Cats-vs-Dogs (PetImages/{Cat,Dog}).',
)
_ONLY = flags.DEFINE_list(
  'only',
  [],
  'Subset: dataset names (species, spurious) '
  'and/or variant names (cpu_ce, cpu_ace, cpu).',
)
_VARIANTS = flags.DEFINE_list(
  'variants',
  list(VARIANTS),
  f'Variants of experiments/configs/pets.py to train, among {sorted(LABELS)}.',
)
_OVERRIDE = flags.DEFINE_multi_string(
  'override',
  [],
  'Extra training config overrides KEY=VALUE (without "config.").',
)
_CORRELATION = flags.DEFINE_float(
  'correlation', 0.9, 'Train correlation of the spurious benchmark.'
)
_REEVALUATE = flags.DEFINE_bool(
  'reevaluate', False, 'Evaluate again even where a report exists.'
)
flags.mark_flags_as_required(['out'])


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """One training run of the table."""

  dataset: str
  variant: str
  seed: int

  @property
  def name(self) -> str:
    return f'{self.dataset}_{self.variant}_s{self.seed}'


def select_runs(
  only: list[str],
  seeds: list[int],
  variants: list[str] | tuple[str, ...] = tuple(VARIANTS),
) -> list[RunSpec]:
  """The runs of `DATASETS` x `variants` x `seeds` that `only` selects.

  Raises:
    ValueError: an `only` name that is neither a dataset nor a variant, or an
      unknown variant.
  """
  unknown_variants = set(variants) - set(LABELS)
  if unknown_variants:
    raise errors.UserError(
      f'--variants names {sorted(unknown_variants)} are unknown; '
      f'choose among {sorted(LABELS)}.'
    )
  unknown = set(only) - set(DATASETS) - set(variants)
  if unknown:
    raise errors.UserError(
      f'--only names {sorted(unknown)} are unknown; use datasets '
      f'{DATASETS} and/or variants {tuple(variants)}.'
    )
  datasets = [d for d in DATASETS if d in only] or list(DATASETS)
  variants = [v for v in variants if v in only] or list(variants)
  return [RunSpec(d, v, s) for d in datasets for v in variants for s in seeds]


def dataset_dir(dataset: str, out: str, pets_dir: str) -> str:
  return (
    os.path.abspath(pets_dir)
    if dataset == 'species'
    else os.path.join(out, 'data', 'spurious')
  )


def ensure_spurious(out: str, pets_dir: str, correlation: float) -> str:
  """Builds the spurious benchmark under OUT/data/spurious once."""
  from cco_jax.data import spurious  # pylint: disable=g-import-not-at-top

  target = dataset_dir('spurious', out, pets_dir)
  if not os.path.exists(os.path.join(target, spurious.METADATA_FILE)):
    logging.info('Writing the spurious benchmark to %s.', target)
    spurious.make_benchmark(
      pets_dir, target, correlation=correlation, seed=0, overwrite=True
    )
  return target


def train_command(
  spec: RunSpec,
  workdir: str,
  *,
  data_dir: str,
  cvd_dir: str,
  tfds_dir: str,
  epochs: float | None,
  overrides: list[str],
) -> list[str]:
  """The `python -m experiments.pets` command line of a run."""
  settings = [
    f'data.manual_dir={data_dir}',
    f'data.ood_manual_dir={os.path.abspath(cvd_dir)}',
    f'data.tfds_data_dir={tfds_dir}',
  ]
  if epochs is not None:
    settings.append(f'num_epochs={epochs}')
  return runs.command(
    'experiments.pets',
    'experiments/configs/pets.py',
    spec.variant,
    workdir,
    spec.seed,
    settings + list(overrides),
  )


def evaluate(
  spec: RunSpec,
  workdir: str,
  *,
  spurious_dir: str | None,
  spurious_tfds: str,
  reevaluate: bool,
) -> dict:
  """The run's evaluation reports ({'report', 'spurious_reversed'}), cached."""
  from cco_jax import evaluation  # pylint: disable=g-import-not-at-top

  out = os.path.join(workdir, evaluation.EVALUATION_DIR)
  os.makedirs(out, exist_ok=True)

  def cached(file_name, data_overrides=None, **settings):
    path = os.path.join(out, file_name)
    if reevaluate or not os.path.exists(path):
      start = time.time()
      config = evaluation.default_config()
      config.update(settings)
      report = evaluation.evaluate_checkpoint(
        workdir, config, data_overrides=data_overrides
      ).report
      report['evaluation_seconds'] = time.time() - start
      with open(path, 'w') as f:
        json.dump(report, f, indent=2)
    with open(path) as f:
      return json.load(f)

  reports = {'report': cached(REPORT, split='test')}
  if spec.dataset == 'species' and spurious_dir:
    reports['spurious_reversed'] = cached(
      CROSS_REPORT,
      {'manual_dir': spurious_dir, 'tfds_data_dir': spurious_tfds},
      split='test',
      ood=False,
      evaluators=('classification',),
    )
  return reports


def run_record(spec: RunSpec, workdir: str, reports: dict) -> dict:
  """The table's numbers of one run (None where not applicable)."""
  report = reports['report']
  cross = reports.get('spurious_reversed')
  is_spurious = spec.dataset == 'spurious'
  return {
    'run': spec.name,
    'dataset': spec.dataset,
    'variant': spec.variant,
    'seed': spec.seed,
    'step': report['step'],
    'validation_accuracy': report['checkpoint_metrics'].get('eval_accuracy'),
    'pets_test_accuracy': None if is_spurious else report['accuracy'],
    'spurious_reversed_accuracy': (
      report['accuracy']
      if is_spurious
      else cross['accuracy']
      if cross
      else None
    ),
    'ood_accuracy': report['ood']['accuracy'] if report.get('ood') else None,
    'ood_count': report['ood']['count'] if report.get('ood') else None,
    'bg_share': report['bg_share'],
    'bg_share_mean_of_images': report['bg_share_mean'],
    'background_noise_flip': report['perturbations']['background_noise'][
      'flip_rate'
    ],
    'foreground_gray_flip': report['perturbations']['foreground_gray'][
      'flip_rate'
    ],
    'relative_foreground_sensitivity': report.get(
      'relative_foreground_sensitivity'
    ),
    'train_seconds': runs.train_seconds(workdir),
    'evaluation_seconds': report.get('evaluation_seconds'),
  }


COLUMNS = (
  ('validation_accuracy', 'valid acc (in-dist.)'),
  ('pets_test_accuracy', 'Pets test acc'),
  ('spurious_reversed_accuracy', 'spurious reversed-test acc'),
  ('ood_accuracy', 'Cats-vs-Dogs acc'),
  ('bg_share', 'bg share of influence'),
  ('background_noise_flip', 'bg-noise flip rate'),
  ('foreground_gray_flip', 'fg-grey flip rate'),
  ('train_seconds', 'train time (s)'),
)


def aggregate(records: list[dict]) -> list[dict]:
  """Mean and sample std (ddof=1; 0 for one seed) per dataset and variant."""
  rows = []
  for dataset in DATASETS:
    for variant in dict.fromkeys(r['variant'] for r in records):
      group = [
        r
        for r in records
        if r['dataset'] == dataset and r['variant'] == variant
      ]
      if not group:
        continue
      row = {
        'dataset': dataset,
        'variant': variant,
        'objective': LABELS[variant],
        'seeds': [r['seed'] for r in group],
      }
      for key, _ in COLUMNS + (
        ('relative_foreground_sensitivity', ''),
        ('bg_share_mean_of_images', ''),
      ):
        row[key] = results_tables.seed_stat(r[key] for r in group)
      rows.append(row)
  return rows


def markdown_table(
  rows: list[dict], machine: dict, total_seconds: float
) -> str:
  """The table as markdown, with its legend."""
  header = ['dataset', 'objective', 'seeds'] + [title for _, title in COLUMNS]
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  for row in rows:
    cells = [row['dataset'], row['objective'], str(len(row['seeds']))]
    cells += [results_tables.cell(row[key], key) for key, _ in COLUMNS]
    lines.append('| ' + ' | '.join(cells) + ' |')
  legend = [
    '',
    'Mean ± sample std (ddof=1) over seeds; best checkpoint by validation '
    'accuracy. species = the Pets sample; spurious = the spurious-background '
    'benchmark (docs/spurious.md), whose test split IS the reversed test. '
    'For species models the spurious reversed-test accuracy is a transfer test '
    '(they never saw the synthetic backgrounds). bg share = sum bg / sum net '
    'of |contrastive map| (cco_jax.evaluation); flip rates: share of test '
    'predictions changed by Gaussian background noise / by greying the object.',
    '',
    f'Machine: {machine["platform"]}, {machine["cpu_count"]} CPUs, '
    f'JAX {machine["jax"]} on {machine["devices"]}. Training wall time, all runs '
    f'of this table: {total_seconds / 60:.1f} min (runs skipped as already '
    'trained count with their recorded time).',
  ]
  return '\n'.join(lines + legend) + '\n'


def main(argv):
  cli.no_arguments(argv)
  out = os.path.abspath(_OUT.value)
  specs = select_runs(
    _ONLY.value, [int(s) for s in _SEEDS.value], _VARIANTS.value
  )
  spurious_dir = None
  if any(s.dataset == 'spurious' for s in specs) or os.path.exists(
    dataset_dir('spurious', out, _PETS_DIR.value)
  ):
    spurious_dir = ensure_spurious(out, _PETS_DIR.value, _CORRELATION.value)
  records = []
  for spec in specs:
    workdir = os.path.join(out, spec.name)
    tfds_dir = os.path.join(out, 'tfds', spec.dataset)
    command = train_command(
      spec,
      workdir,
      data_dir=dataset_dir(spec.dataset, out, _PETS_DIR.value),
      cvd_dir=_CVD_DIR.value,
      tfds_dir=tfds_dir,
      epochs=_EPOCHS.value,
      overrides=_OVERRIDE.value,
    )
    runs.train(workdir, command)
    reports = evaluate(
      spec,
      workdir,
      spurious_dir=spurious_dir,
      spurious_tfds=os.path.join(out, 'tfds', 'spurious'),
      reevaluate=_REEVALUATE.value,
    )
    records.append(run_record(spec, workdir, reports))
    logging.info('%s: %s', spec.name, json.dumps(records[-1]))
  rows = aggregate(records)
  machine = results_tables.machine_info()
  total = sum(r['train_seconds'] or 0.0 for r in records)
  with open(os.path.join(out, 'table.json'), 'w') as f:
    json.dump(
      {
        'rows': rows,
        'runs': records,
        'machine': machine,
        'total_train_seconds': total,
        'argv': sys.argv,
      },
      f,
      indent=2,
    )
  table = markdown_table(rows, machine, total)
  with open(os.path.join(out, 'table.md'), 'w') as f:
    f.write(table)
  print(table, flush=True)
  print(os.path.join(out, 'table.md'), flush=True)


if __name__ == '__main__':
  cli.run(main)
