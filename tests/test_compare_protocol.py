"""The comparison protocol: selection rules, grid widening, JTT's upsampled
data and the statistics of the tables.

Selection and widening run on written metrics records (the rules read
nothing else); the statistics are checked against definitions (identical
methods differ by exactly 0, a shared per-seed effect cancels in the paired
difference, intervals cover the mean); JTT's dataset against its rows and
links.
"""

import csv
import json
import os
from pathlib import Path
import subprocess
import sys

import numpy as np
import pytest
import synthetic_data

from cco_jax import errors
from cco_jax import jtt
from cco_jax import selection
from experiments import compare_grid
from experiments import compare_runs
from experiments import compare_stats
from experiments import compare_table
from experiments.configs import spurious as spurious_configs

REPO = Path(__file__).resolve().parents[1]


def _record(step, acc, worst=None, ce=1.0):
  r = {'step': step, 'eval_accuracy': acc, 'eval_ce': ce}
  if worst is not None:
    r['eval_worst_group_accuracy'] = worst
  return r


def test_rules_and_their_tie_breaks():
  records = [
    {'step': 10, 'train_loss': 1.0},
    _record(20, 0.7, 0.3, ce=0.9),
    _record(40, 0.8, 0.5, ce=0.7),
    _record(60, 0.8, 0.5, ce=0.6),  # Ties 40 on both: lower CE wins.
    _record(80, 0.9, 0.2, ce=0.8),
    _record(100, 0.6, 0.5, ce=0.5),
  ]
  assert selection.select_step(records, 'worst_group') == 60
  assert selection.select_step(records, 'accuracy') == 80
  assert selection.select_step(records, 'last') == 100
  same = [_record(20, 0.8, 0.5), _record(40, 0.8, 0.5)]
  assert selection.select_step(same, 'worst_group') == 20  # Then earlier.
  with pytest.raises(errors.UserError, match='needs group metrics'):
    selection.select_step([_record(20, 0.8)], 'worst_group')
  with pytest.raises(errors.UserError, match="Unknown selection rule 'best'"):
    selection.select_step(records, 'best')
  with pytest.raises(errors.UserError, match='never evaluated'):
    selection.select_step([{'step': 3, 'train_loss': 1.0}], 'last')


def _fake_trainer(tmp_path, score_of):
  """A `train(settings)` writing metrics whose validation scores are
  `score_of(setting values)`: (worst-group, accuracy)."""
  trained = []

  def train(settings):
    out = []
    for setting in settings:
      workdir = tmp_path / compare_runs.value_name(setting)
      if not workdir.exists():
        workdir.mkdir()
        trained.append(setting)
        worst, acc = score_of(dict(setting))
        with open(workdir / 'metrics.jsonl', 'w') as f:
          f.write(json.dumps(_record(20, acc, worst)) + '\n')
      out.append(str(workdir))
    return out

  return train, trained


def test_grid_widens_while_the_choice_sits_on_an_edge(tmp_path, monkeypatch):
  monkeypatch.setitem(
    spurious_configs.GRIDS,
    'rrr',
    (('loss.rrr_weight', (0.1, 1.0, 10.0)),),
  )

  # Worst-group peaks at 1000 (beyond the grid: two widenings reach it),
  # accuracy at 0.1 (the lower edge: one widening below, then it is inside).
  def score(values):
    w = values['loss.rrr_weight']
    return 1 - abs(np.log10(w) - 3) / 10, 1 - abs(np.log10(w) + 1) / 10

  train, trained = _fake_trainer(tmp_path, score)
  result = compare_grid.search('rrr', train, max_widen=2)
  assert result['axes']['loss.rrr_weight'] == pytest.approx(
    [0.01, 0.1, 1.0, 10.0, 100.0, 1000.0]
  )
  assert dict(result['chosen']['worst_group'])['loss.rrr_weight'] == (
    pytest.approx(1000.0)
  )
  assert dict(result['chosen']['accuracy'])['loss.rrr_weight'] == (
    pytest.approx(0.1)
  )
  # 1000 is the edge and the upper side's widenings are spent: reported.
  assert result['on_edge'] == {'worst_group': ['loss.rrr_weight'],
                               'accuracy': []}  # fmt: skip
  assert len(trained) == 6  # Every value trained once.
  path = tmp_path / 'grid.json'
  compare_grid.write(str(path), {'rrr': result})
  assert compare_grid.read(str(path))['rrr']['chosen'] == result['chosen']


def test_grid_widens_integer_axes_within_bounds(tmp_path, monkeypatch):
  monkeypatch.setitem(
    spurious_configs.GRIDS,
    'jtt',
    (('jtt.first_steps', (20, 60, 120)), ('jtt.factor', (5, 20))),
  )
  train, _ = _fake_trainer(
    tmp_path, lambda v: (v['jtt.first_steps'] / 1000, v['jtt.factor'] / 100)
  )
  result = compare_grid.search('jtt', train, max_widen=3, max_steps=300)
  steps = result['axes']['jtt.first_steps']
  assert max(steps) <= 300 and all(float(s).is_integer() for s in steps)
  assert result['axes']['jtt.factor'] == [5, 20, 80]  # 320 > 100.


def test_upsampled_dataset(tmp_path):
  data = tmp_path / 'data'
  (data / 'images' / 'sub').mkdir(parents=True)
  (data / 'masks' / 'sub').mkdir(parents=True)
  rows = [
    ('a.jpg', 'cat', 'train', 'g0'),
    ('sub/b.jpg', 'dog', 'train', 'g1'),
    ('c.jpg', 'dog', 'train', 'g1'),
    ('d.jpg', 'cat', 'validation', 'g0'),
  ]
  for image, *_ in rows:
    (data / 'images' / image).write_bytes(image.encode())
    (data / 'masks' / (os.path.splitext(image)[0] + '.png')).write_bytes(b'm')
  with open(data / 'labels.csv', 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(('image', 'label', 'split', 'group'))
    writer.writerows(rows)
  out = tmp_path / 'up'
  summary = jtt.write_upsampled(str(data), str(out), ['sub/b.jpg'], 4)
  assert summary['error_set_size'] == 1
  assert (summary['train_rows'], summary['train_rows_upsampled']) == (3, 6)
  with open(out / 'labels.csv') as f:
    written = list(csv.DictReader(f))
  images = [r['image'] for r in written]
  assert images.count('sub/b.jpg') == 1
  copies = [i for i in images if i.startswith('sub/b-jtt')]
  assert len(copies) == 3
  for image in copies:
    row = next(r for r in written if r['image'] == image)
    assert (row['label'], row['split'], row['group']) == ('dog', 'train', 'g1')
    assert (out / 'images' / image).read_bytes() == b'sub/b.jpg'
    assert os.path.samefile(out / 'images' / image, data / 'images/sub/b.jpg')
    assert (out / 'masks' / (image[:-4] + '.png')).exists()
  assert [r['image'] for r in written if r['split'] == 'validation'] == [
    'd.jpg'
  ]
  with pytest.raises(ValueError, match='not train rows'):
    jtt.write_upsampled(str(data), str(tmp_path / 'x'), ['d.jpg'], 2)
  with pytest.raises(ValueError, match='factor'):
    jtt.write_upsampled(str(data), str(tmp_path / 'x'), [], 0)


def _correct(rng, n, accuracy):
  return rng.random(n) < accuracy


def test_statistics_of_identical_and_shifted_methods():
  rng = np.random.default_rng(0)
  groups = np.repeat([0, 1, 2, 3], [30, 30, 20, 20])
  seeds = [0, 1, 2, 3, 4]
  ace = {s: _correct(rng, 100, 0.6) for s in seeds}
  better = {s: ace[s] | _correct(rng, 100, 0.5) for s in seeds}
  out = compare_stats.compare_rows(
    {'ace': ace, 'same': dict(ace), 'better': better}, groups, 'ace'
  )
  assert out['ace']['versus'] is None
  same = out['same']['versus']
  assert same['mean_difference'] == 0 and same['ci'] == [0.0, 0.0]
  assert same['ties'] == 5 and same['p'] == 1.0
  wg = out['ace']['worst_group']
  per_seed = [min(ace[s][groups == g].mean() for g in range(4)) for s in seeds]
  assert wg['mean'] == pytest.approx(np.mean(per_seed))
  assert wg['ci'][0] <= wg['mean'] <= wg['ci'][1]
  b = out['better']['versus']
  assert b['mean_difference'] >= 0 and b['wins'] + b['ties'] == 5
  assert b['ci'][0] <= b['mean_difference'] <= b['ci'][1]
  assert b['p_holm'] >= b['p']  # Holm never lowers a p-value.
  with pytest.raises(ValueError, match='same test split'):
    compare_stats.compare_rows({'ace': {0: ace[0][:50]}}, groups, 'ace')


def test_interval_widens_with_fewer_seeds():
  rng = np.random.default_rng(3)
  groups = np.repeat([0, 1], 60)
  many = {s: _correct(rng, 120, 0.3 + 0.1 * (s % 3)) for s in range(9)}
  few = {s: many[s] for s in range(3)}
  wide = compare_stats.compare_rows({'m': few}, groups, 'ace')['m']
  narrow = compare_stats.compare_rows({'m': many}, groups, 'ace')['m']
  width = lambda r: np.diff(r['worst_group']['ci'])[0]
  assert width(wide) > width(narrow)


@pytest.mark.parametrize('sigma', [0.02, 0.05])
def test_machine_spread_is_carried_into_the_intervals(sigma):
  """A run that is the same on every image draw (all images of a group right
  or wrong alike) has a zero-width interval on one machine; with a
  cross-machine deviation N(0, sigma) per run, a one-seed interval is that
  normal's: mean +- 1.96 sigma. Means, t-tests and signs do not move."""
  groups = np.repeat([0, 1, 2], [10, 12, 14])
  fixed = np.r_[np.ones(10), np.zeros(12), np.ones(14)].astype(bool)
  rng = np.random.default_rng(int(sigma * 100))
  runs = {
    'ace': {0: fixed},
    'm': {s: _correct(rng, 36, 0.5) for s in range(4)},
    'r': {s: _correct(rng, 36, 0.6) for s in range(4)},
  }
  flat = compare_stats.compare_rows(runs, groups, 'r')
  spread = compare_stats.compare_rows(runs, groups, 'r', machine_sd=sigma)
  assert flat['ace']['worst_group']['ci'] == [0.0, 0.0]
  low, high = spread['ace']['worst_group']['ci']
  assert low == pytest.approx(-1.96 * sigma, rel=0.1)
  assert high == pytest.approx(1.96 * sigma, rel=0.1)
  for method in ('m', 'r'):
    a, b = flat[method]['worst_group'], spread[method]['worst_group']
    assert a['mean'] == b['mean'] and a['per_seed'] == b['per_seed']
  a, b = flat['m']['versus'], spread['m']['versus']
  for key in ('mean_difference', 't', 'p', 'p_holm', 'wins', 'ties'):
    assert a[key] == b[key], key
  with pytest.raises(ValueError, match='machine_sd=-1'):
    compare_stats.compare_rows(runs, groups, 'r', machine_sd=-1)


def run_compare(*flags: str) -> subprocess.CompletedProcess:
  """`python -m experiments.compare FLAGS` from the repository root."""
  return subprocess.run(
    [sys.executable, '-m', 'experiments.compare', *flags],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=1200,
  )


def test_compare_end_to_end(tmp_path, synthetic_pets_dir):
  """`experiments.compare` on a tiny benchmark: grids, seeds, every
  selection rule, DFR, and tables whose statistics match the runs."""
  out = tmp_path / 'compare'
  result = run_compare(
    f'--out={out}',
    f'--source_dir={synthetic_pets_dir}',
    '--correlations=1.0',
    '--variants=ace,ace_kld',
    '--seeds=0,1',
    '--dfr_variants=ace',
    '--figure_variants=ace',
    '--steps=4',
    '--max_widen=0',
    '--val_per_group=2',
    '--test_per_group=3',
    '--deterministic_threads=1',
  )
  assert result.returncode == 0, result.stderr[-3000:]
  table = json.loads((out / 'table.json').read_text())
  assert set(table['tables']) == {'1/groups', '1/labels', '1/labels_last'}
  groups = {r['method']: r for r in table['tables']['1/groups']}
  assert set(groups) == {'ace', 'ace+dfr', 'ace_kld'}
  assert groups['ace']['versus'] is None
  for row in groups.values():
    assert row['seeds'] == [0, 1]
    low, high = row['worst_group']['ci']
    assert low <= row['worst_group']['mean'] <= high
  # Recompute one row's worst-group accuracy from the stored correctness.
  test = table['test']['1']
  group = np.asarray(test['group'])
  runs = [
    r for r in table['runs'] if r['variant'] == 'ace' and 'worst_group' in
    r['protocols']
  ]  # fmt: skip
  per_seed = []
  for r in sorted(runs, key=lambda r: r['seed']):
    correct = np.array([c == '1' for c in r['rules']['worst_group']['correct']])
    per_seed.append(min(correct[group == g].mean() for g in np.unique(group)))
    assert r['environment'][0]['deterministic_threads'] == 1
  assert groups['ace']['worst_group']['mean'] == pytest.approx(
    np.mean(per_seed)
  )
  # Every run kept every evaluated checkpoint: each rule's step was restored.
  for r in table['runs']:
    steps = {rule: n['step'] for rule, n in r['rules'].items()}
    assert steps['last'] == 4 and set(steps) >= {'worst_group', 'accuracy'}
  text = (out / 'table.md').read_text()
  assert 'ACE + DFR' in text and 'Grid at c100' in text
  # Two classes: every evaluation has the test AUC of the second class.
  for r in table['runs']:
    assert all(0.0 <= n['auc'] <= 1.0 for n in r['rules'].values())
  assert '| AUC |' in text


@pytest.mark.parametrize('names', [('benign', 'melanoma'), ('melanoma', 'x')])
def test_binary_auc_scores_the_plugins_positive_class(names, monkeypatch):
  monkeypatch.setattr(compare_runs, 'BENCHMARK', 'isic_shortcut')
  rng = np.random.default_rng(len(names[1]))
  labels = rng.integers(0, 2, 40)
  p = rng.uniform(size=40)
  rows = {'label': labels.tolist(), 'probabilities': np.c_[1 - p, p].tolist()}
  positive = names.index('melanoma')
  scores = np.c_[1 - p, p][:, positive]
  pos, neg = scores[labels == positive], scores[labels != positive]
  pairs = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
  assert compare_table.binary_auc(rows, names) == pytest.approx(pairs.mean())
  assert compare_table.binary_auc(rows, ('a', 'b', 'c')) is None


def test_isic_shortcut_plugin_end_to_end(tmp_path):
  """The skin-lesion plug-in through `experiments.compare`: its own source,
  correlations and variants by default, the benchmark built balanced, AUC
  of melanoma in the table; group-size flags refused in one line."""
  source = tmp_path / 'isic'
  synthetic_data.write_isic_source(source, n=60, size=64)
  out = tmp_path / 'compare'
  common = (
    '--benchmark=isic_shortcut',
    f'--out={out}',
    f'--source_dir={source}',
  )
  refused = run_compare(*common, '--val_per_group=3')
  assert refused.returncode != 0 and 'Traceback' not in refused.stderr
  assert '--val_per_group: the isic_shortcut benchmark' in refused.stderr
  result = run_compare(
    *common,
    '--variants=ace',  # Two rows: test_compare_end_to_end.
    '--seeds=0',
    '--dfr_variants=',
    '--figure_variants=ace',
    '--steps=4',
    '--max_widen=0',
    '--deterministic_threads=1',
  )
  assert result.returncode == 0, result.stderr[-3000:]
  meta = json.loads((out / 'c095' / 'data' / 'shortcut.json').read_text())
  assert meta['test'] == 'balanced' and meta['correlation'] == 0.95
  table = json.loads((out / 'table.json').read_text())
  rows = {r['method']: r for r in table['tables']['0.95/groups']}
  assert set(rows) == {'ace'}
  for r in table['runs']:
    for n in r['rules'].values():
      assert 0.0 <= n['auc'] <= 1.0 and 0.0 <= n['counterfactual_flip'] <= 1.0


def test_counterfactual_summary_counts_flips_per_group():
  factual = {
    'index': [0, 1, 2, 3, 4],
    'label': [0, 0, 1, 1, 1],
    'group': ['a', 'a', 'b', 'b', 'b'],
    'prediction': [0, 1, 1, 1, 0],
  }
  counter = {**factual, 'prediction': [0, 0, 0, 1, 0]}
  summary = compare_runs.counterfactual_summary(factual, counter)
  assert summary['flip_rate'] == pytest.approx(2 / 5)
  assert summary['accuracy'] == pytest.approx(3 / 5)
  assert summary['flip_rate_by_group'] == pytest.approx({'a': 0.5, 'b': 1 / 3})
  with pytest.raises(ValueError, match='other images'):
    compare_runs.counterfactual_summary(factual, {**counter, 'index': [4] * 5})


@pytest.mark.parametrize('name', ['spurious', 'isic_shortcut', 'backbones'])
def test_benchmark_plugins_keep_the_contract(name, monkeypatch):
  """What `experiments.compare` reads of a plug-in is there and consistent:
  every named variant exists and builds, every grid field is a config field
  (or JTT's), the reference is a variant, group names are the builder's."""
  import importlib  # pylint: disable=g-import-not-at-top

  plugin = importlib.import_module(f'experiments.configs.{name}')
  monkeypatch.setattr(compare_runs, 'BENCHMARK', name)
  variants = set(plugin.VARIANTS)
  for attribute in ('DEFAULT_VARIANTS', 'DFR_VARIANTS', 'FIGURE_VARIANTS'):
    assert set(getattr(plugin, attribute, ())) <= variants, attribute
  assert getattr(plugin, 'REFERENCE', 'ace') in variants
  assert set(getattr(plugin, 'LABELS', {})) <= variants
  assert set(plugin.GRIDS) <= variants
  for variant, axes in plugin.GRIDS.items():
    config = plugin.get_config(variant).to_dict()
    for field, values in axes:
      if field in compare_runs.JTT_FIELDS:
        continue
      section, key = field.split('.')
      assert key in config[section] and len(values) >= 2, field
  for variant in variants:
    assert plugin.get_config(variant).data.name == 'folder'
  assert callable(plugin.build_benchmark) and len(plugin.MINORITY_GROUPS) == 2
  for correlation in getattr(plugin, 'CORRELATIONS', ('1.0',)):
    assert 0.5 <= float(correlation) <= 1.0
  assert variants <= set(compare_runs.labels())  # Every row has a name.


def test_a_checkpoint_two_rules_choose_is_evaluated_once(tmp_path, monkeypatch):
  """Rules that choose the same step share one evaluation (its report,
  relabelled); a rule choosing another step gets its own."""
  from cco_jax import evaluation  # pylint: disable=g-import-not-at-top

  workdir = tmp_path / 'run'
  workdir.mkdir()
  records = [  # Step 40 is best on both validation rules; 60 is the last.
    {'step': s, 'eval_accuracy': a, 'eval_worst_group_accuracy': w}
    for s, a, w in ((20, 0.5, 0.2), (40, 0.7, 0.4), (60, 0.6, 0.3))
  ]
  (workdir / 'metrics.jsonl').write_text(
    ''.join(json.dumps(r) + '\n' for r in records)
  )
  calls = []

  class Evaluated:
    def __init__(self, step):
      self.report = {'step': step, 'accuracy': step / 100}

  def fake(workdir_, config, step=None, **kwargs):
    del workdir_, config, kwargs
    calls.append(step)
    return Evaluated(step)

  monkeypatch.setattr(evaluation, 'evaluate_checkpoint', fake)
  reports = compare_runs.evaluations(str(workdir), 'ace', ())
  assert calls == [40, 60]
  assert reports['worst_group']['step'] == reports['accuracy']['step'] == 40
  assert reports['last'] == {'step': 60, 'accuracy': 0.6, 'rule': 'last'}
  assert reports['accuracy'] == {**reports['worst_group'], 'rule': 'accuracy'}
  # Cached: a second pass evaluates nothing.
  assert compare_runs.evaluations(str(workdir), 'ace', ()) == reports
  assert calls == [40, 60]
