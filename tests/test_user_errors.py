"""A first hour of mistakes, in real processes: every user mistake in every
`experiments.*` command ends in ONE line on stderr, `<command>: error: ...`,
that names the fix, and a non-zero exit; no traceback.

One small folder dataset (synthetic, written here) is prepared and trained
for two steps once per module; the mistakes then run against it. The only
other stderr lines allowed are the commands' own absl INFO records (progress
such as "Using folder_dataset at ..."): no warning, no traceback, no library
output, and the error is the last line.
"""

from __future__ import annotations

import base64
import html.parser
import io
import json
import os
from pathlib import Path
import re
import shutil
import subprocess
import sys

import browser
import numpy as np
from PIL import Image
import pytest
import xla_flags

REPO = Path(__file__).resolve().parents[1]
# An absl INFO record: 'I1203 12:47:48.604739 140513713601408 cli.py:238] ...'.
INFO_RECORD = re.compile(r'^I\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+:\d+\] ')
CLASSES = ('apple', 'pear')


def run_command(module, args, *, devices=1, timeout=240):
  env = dict(
    os.environ,
    XLA_FLAGS=xla_flags.for_devices(devices),
    JAX_PLATFORMS='cpu',
    PYTHONPATH=str(REPO),
  )
  return subprocess.run(
    [sys.executable, '-m', module, *args],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def the_error_line(result, module: str) -> str:
  """The one error line of a failed command (asserts the rules above)."""
  stderr = result.stderr
  assert result.returncode != 0, (result.stdout[-2000:], stderr[-2000:])
  assert 'Traceback' not in stderr, stderr[-4000:]
  lines = [line for line in stderr.splitlines() if line.strip()]
  others = [line for line in lines if not INFO_RECORD.match(line)]
  assert len(others) == 1, stderr[-4000:]
  assert lines[-1] == others[0], stderr[-4000:]
  assert others[0].startswith(f'{module}: error: '), others[0]
  return others[0]


# ----------------------------------------------------------------------------
# One tiny world: a folder dataset, its prepared copy, a trained workdir.
# ----------------------------------------------------------------------------


def _write_pair(root: Path, name: str, seed: int, size=(40, 40)) -> None:
  rng = np.random.default_rng(seed)
  pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
  Image.fromarray(pixels).save(root / 'images' / name, quality=90)
  mask = np.zeros((size[1], size[0]), np.uint8)
  mask[size[1] // 4 : 3 * size[1] // 4, size[0] // 4 : 3 * size[0] // 4] = 255
  Image.fromarray(mask).save(root / 'masks' / f'{Path(name).stem}.png')


def write_folder(root: Path) -> Path:
  """A 'folder' dataset: 2 classes, 8 train and 2 test images each."""
  (root / 'images').mkdir(parents=True)
  (root / 'masks').mkdir()
  lines = ['image,label,split']
  for c, label in enumerate(CLASSES):
    for i in range(10):
      name = f'{label}_{i}.jpg'
      _write_pair(root, name, seed=10 * c + i)
      lines.append(f'{name},{label},{"train" if i < 8 else "test"}')
  (root / 'labels.csv').write_text('\n'.join(lines) + '\n')
  return root


def variant(world: dict, name: str, edit) -> str:
  """A copy of the good folder with `edit(root)` applied; returns its path."""
  root = world['tmp'] / name
  if not root.exists():
    shutil.copytree(world['root'], root, symlinks=True)
    edit(root)
  return str(root)


@pytest.fixture(scope='module')
def world(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('first_hour')
  root = write_folder(tmp / 'root')
  tfds_dir = tmp / 'tfds'
  workdir = tmp / 'run'
  train = [
    '--config=experiments/configs/folder.py:cpu',
    f'--config.data.manual_dir={root}',
    f'--config.data.tfds_data_dir={tfds_dir}',
    '--config.data.image_size=32',
    '--config.batch_size=8',
    '--config.eval_batch_size=8',
    '--config.num_train_steps=2',
  ]
  result = run_command('experiments.pets', [*train, f'--workdir={workdir}'])
  assert result.returncode == 0, result.stderr[-4000:]
  unfinished = tmp / 'unfinished'  # A run's config without checkpoints.
  unfinished.mkdir()
  shutil.copy(workdir / 'config.json', unfinished / 'config.json')
  shutil.copy(workdir / 'run.json', unfinished / 'run.json')
  return {
    'tmp': tmp,
    'root': root,
    'tfds': tfds_dir,
    'run': workdir,
    'unfinished': unfinished,
    'train': train,
  }


# ----------------------------------------------------------------------------
# Ways to break a dataset.
# ----------------------------------------------------------------------------


def _header_without_split(root: Path) -> None:
  rows = (root / 'labels.csv').read_text().splitlines()
  (root / 'labels.csv').write_text(
    '\n'.join(','.join(r.split(',')[:2]) for r in rows) + '\n'
  )


def _latin1(root: Path) -> None:
  text = (root / 'labels.csv').read_text().replace('apple_0', 'pomme_é')
  (root / 'labels.csv').write_bytes(text.encode('latin-1'))


def _semicolons(root: Path) -> None:
  text = (root / 'labels.csv').read_text().replace(',', ';')
  (root / 'labels.csv').write_text(text)


def _broken_line_endings(root: Path) -> None:
  rows = (root / 'labels.csv').read_text().splitlines()
  # A line feed, a stray blank and a carriage return between rows.
  (root / 'labels.csv').write_bytes(('\n \r'.join(rows) + '\n').encode())


def _bad_rows(root: Path) -> None:
  text = (root / 'labels.csv').read_text()
  text = text.replace('pear_1.jpg,pear,train', 'pear_1.jpg,pear,training')
  (root / 'labels.csv').write_text(text + 'ghost.jpg,apple,train\n')


def _missing_mask(root: Path) -> None:
  (root / 'masks' / 'apple_3.png').unlink()


def _one_pixel_image(root: Path) -> None:
  Image.new('RGB', (1, 1)).save(root / 'images' / 'apple_2.jpg')
  Image.new('L', (1, 1)).save(root / 'masks' / 'apple_2.png')


def _symlink_loop(root: Path) -> None:
  loop = root / 'images' / 'pear_4.jpg'
  loop.unlink()
  os.symlink(loop.name, loop)  # The link points at itself.


# ----------------------------------------------------------------------------
# The mistakes: (id, module, args(world) -> list, fragments the line holds).
# ----------------------------------------------------------------------------


def _train(w, *extra, workdir=None):
  return [*w['train'], f'--workdir={workdir or w["tmp"] / "new_run"}', *extra]


def _folder(w, name, edit, *extra):
  """Training on a broken copy of the folder (prepared on first use)."""
  root = variant(w, name, edit)
  return [
    '--config=experiments/configs/folder.py:cpu',
    f'--config.data.manual_dir={root}',
    f'--config.data.tfds_data_dir={w["tmp"] / "tfds_broken"}',
    f'--workdir={w["tmp"] / ("run_" + name)}',
    *extra,
  ]


def _prepare(w, name, edit, *extra):
  root = variant(w, name, edit) if edit else name
  return [
    '--dataset=folder',
    f'--manual_dir={root}',
    f'--data_dir={w["tmp"] / "tfds_broken"}',
    *extra,
  ]


def _explain(w, *extra, workdir=None):
  images = str(w['root'] / 'images' / 'apple_0.jpg')
  return [
    f'--workdir={workdir or w["run"]}',
    f'--out={w["tmp"] / "why"}',
    *extra,
  ] + ([images] if not any(not e.startswith('--') for e in extra) else [])


PETS = 'experiments.pets'
PREPARE = 'experiments.prepare'
EVALUATE = 'experiments.evaluate'
EXPLAIN = 'experiments.explain'

MISTAKES = [
  # Training: the config.
  (
    'unknown objective',
    PETS,
    lambda w: _train(w, '--config.loss.name=nope'),
    ['--config.loss.name='],
  ),
  (
    'unknown optimizer',
    PETS,
    lambda w: _train(w, '--config.optimizer.name=adamm'),
    ['--config.optimizer.name=', "'adam'"],
  ),
  (
    'unknown model',
    PETS,
    lambda w: _train(w, '--config.model.name=resnet7'),
    ['--config.model.name=', 'resnet18'],
  ),
  (
    'misspelt override',
    PETS,
    lambda w: _train(w, '--config.model.num_filterz=8'),
    ["'num_filterz'", 'Did you mean "num_filters"'],
  ),
  (
    'text for a number',
    PETS,
    lambda w: _train(w, '--config.batch_size=abc'),
    ['--config.batch_size=abc', 'give an integer'],
  ),
  (
    'unknown variant',
    PETS,
    lambda w: [
      '--config=experiments/configs/folder.py:gpu',
      '--workdir=/tmp/x',
    ],
    ["'gpu'", 'choose one of'],
  ),
  ('no workdir', PETS, lambda w: w['train'], ['--workdir', 'required']),
  (
    'batch and accumulation',
    PETS,
    lambda w: _train(
      w, '--config.batch_size=7', '--config.accumulation_steps=2'
    ),
    ['--config.batch_size to a multiple'],
  ),
  (
    'batch larger than the data',
    PETS,
    lambda w: _train(w, '--config.batch_size=64'),
    ['fewer than one batch', '--config.batch_size='],
  ),
  (
    'resume with another config',
    PETS,
    lambda w: _train(w, '--config.model.num_filters=8', workdir=w['run']),
    ['model.num_filters: 16 -> 8', 'new --workdir'],
  ),
  (
    'resume with fewer steps',
    PETS,
    lambda w: _train(w, '--config.num_train_steps=1', workdir=w['run']),
    ['already trained 2 steps', 'Ask for at least 2'],
  ),
  (
    'missing pretrained weights',
    PETS,
    lambda w: _train(
      w, '--config.model.init_from=/nowhere/resnet18.safetensors'
    ),
    ['--config.model.init_from=PATH'],
  ),
  (
    'workdir inside a file',
    PETS,
    lambda w: _train(w, workdir=w['root'] / 'labels.csv' / 'run'),
    ['labels.csv/run', 'is a file, not a folder'],
  ),
  # Training: the data.
  (
    'folder that does not exist',
    PETS,
    lambda w: _train(w, '--config.data.manual_dir=/nowhere/data'),
    ['does not exist', 'config.data.manual_dir'],
  ),
  (
    'labels.csv without split',
    PETS,
    lambda w: _folder(w, 'nosplit', _header_without_split),
    ["lacks ['split']", 'image,label,split'],
  ),
  (
    'missing mask',
    PETS,
    lambda w: _folder(w, 'nomask', _missing_mask),
    ['apple_3.png', '--missing_masks=all_ones'],
  ),
  # Preparing.
  (
    'prepare a folder without --manual_dir',
    PREPARE,
    lambda w: ['--dataset=folder'],
    ['--manual_dir'],
  ),
  (
    'prepare an unknown dataset',
    PREPARE,
    lambda w: ['--dataset=imagenet'],
    ['--dataset=imagenet', 'oxford_iiit_pet'],
  ),
  (
    'bad folder rows',
    PREPARE,
    lambda w: _prepare(w, 'badrows', _bad_rows),
    ['ghost.jpg', "unknown split 'training'", 'Fix them and prepare again'],
  ),
  (
    'Latin-1 labels.csv',
    PREPARE,
    lambda w: _prepare(w, 'latin1', _latin1),
    ['labels.csv: not UTF-8', 'line 2', 'save it as UTF-8'],
  ),
  (
    'semicolon-separated labels.csv',
    PREPARE,
    lambda w: _prepare(w, 'semicolons', _semicolons),
    ['separated by semicolons', 'with commas'],
  ),
  (
    'broken line endings',
    PREPARE,
    lambda w: _prepare(w, 'crlf', _broken_line_endings),
    ['20 blank rows', 'mixes line endings', 'dos2unix'],
  ),
  (
    'a 1x1 image',
    PREPARE,
    lambda w: _prepare(w, 'tiny', _one_pixel_image),
    ['apple_2.jpg', '1x1 pixels', '--skip_bad_images'],
  ),
  (
    'a symlink loop',
    PREPARE,
    lambda w: _prepare(w, 'loop', _symlink_loop),
    ['pear_4.jpg is a symlink loop'],
  ),
  (
    'Pets folder in another layout',
    PREPARE,
    lambda w: [
      '--dataset=oxford_iiit_pet',
      f'--manual_dir={w["root"]}',
      f'--data_dir={w["tmp"] / "tfds_pets"}',
    ],
    ['lacks', 'official layout', '--manual_dir'],
  ),
  # Evaluating.
  (
    'evaluate a missing workdir',
    EVALUATE,
    lambda w: ['--workdir=/nowhere/run'],
    ['config.json does not exist', 'python -m experiments.pets'],
  ),
  (
    'evaluate before training',
    EVALUATE,
    lambda w: [f'--workdir={w["unfinished"]}'],
    ['train first'],
  ),
  (
    'evaluate a step not kept',
    EVALUATE,
    lambda w: [f'--workdir={w["run"]}', '--step=7'],
    ['kept steps: [2]', '--step=best'],
  ),
  (
    'unknown evaluator',
    EVALUATE,
    lambda w: [f'--workdir={w["run"]}', '--evaluators=accuracy'],
    ["['accuracy']", 'classification'],
  ),
  # Explaining.
  (
    'explain without images',
    EXPLAIN,
    lambda w: [f'--workdir={w["run"]}', f'--out={w["tmp"] / "why"}'],
    ['at least one image'],
  ),
  (
    'explain into a file',
    EXPLAIN,
    lambda w: _explain(w, workdir=w['run'])
    + [f'--out={w["root"] / "labels.csv"}'],
    ['labels.csv: exists and is not a folder'],
  ),
  (
    'explain an unknown class',
    EXPLAIN,
    lambda w: _explain(w, '--classes=plum'),
    ["'plum'", "['apple', 'pear']"],
  ),
  (
    'explain with a missing masks folder',
    EXPLAIN,
    lambda w: _explain(w, '--masks=/nowhere/masks'),
    ['leave --masks out'],
  ),
  (
    'explain with labels of another dataset',
    EXPLAIN,
    lambda w: _explain(w, '--labels=experiments/configs/__init__.py'),
    ['__init__.py:', 'image,label header'],
  ),
  (
    'explain missing files',
    EXPLAIN,
    lambda w: _explain(w, '/nowhere/a.jpg', '/nowhere/*.png'),
    [
      '2 image(s) could not be explained',
      'no file matches',
      'Fix or leave out',
    ],
  ),
  # The other commands.
  (
    'spurious benchmark without Pets',
    'experiments.make_spurious',
    lambda w: ['--pets_dir=/nowhere', f'--out_dir={w["tmp"] / "sp"}'],
    ['/nowhere', 'official layout'],
  ),
  (
    'compare an unknown variant',
    'experiments.compare',
    lambda w: [f'--out={w["tmp"] / "cmp"}', '--variants=ace,acee'],
    ["['acee']", 'choose from'],
  ),
  (
    'compare with a seed that is not a number',
    'experiments.compare',
    lambda w: [f'--out={w["tmp"] / "cmp"}', '--seeds=0,one'],
    ["--seeds: 'one' is not an integer"],
  ),
  (
    'compare machines with a missing table',
    'experiments.compare_machines',
    lambda w: [f'--a={w["tmp"] / "none.json"}', f'--b={w["tmp"] / "b.json"}'],
    ['none.json: not a readable table.json', 'OUT/table.json'],
  ),
  (
    'ISIC shortcut benchmark without ISIC',
    'experiments.make_isic_shortcut',
    lambda w: ['--isic_dir=/nowhere', f'--out_dir={w["tmp"] / "isc"}'],
    ['/nowhere has no labels.csv', 'folder layout'],
  ),
  (
    'ISIC shortcut from other labels',
    'experiments.make_isic_shortcut',
    lambda w: [f'--isic_dir={w["root"]}', f'--out_dir={w["tmp"] / "isc"}'],
    ["labels ['apple', 'pear']", 'expected melanoma'],
  ),
  (
    'reproduce an unknown variant',
    'experiments.reproduce',
    lambda w: [f'--out={w["tmp"] / "rep"}', '--variants=cpuu'],
    ["['cpuu']", 'choose among'],
  ),
  (
    'isic table of an unknown variant',
    'experiments.isic',
    lambda w: [f'--out={w["tmp"] / "isic"}', '--variants=cpu,cpuu'],
    ["['cpuu']", 'choose among'],
  ),
  (
    'run record of a missing workdir',
    'experiments.run_record',
    lambda w: ['--workdir=/nowhere/run'],
    ['config.json does not exist'],
  ),
]


@pytest.mark.parametrize(
  'module, make_args, fragments',
  [pytest.param(m, a, f, id=name) for name, m, a, f in MISTAKES],
)
def test_a_mistake_is_one_line_naming_the_fix(
  world, module, make_args, fragments
):
  line = the_error_line(run_command(module, make_args(world)), module)
  for fragment in fragments:
    assert fragment in line, line


def test_there_are_at_least_25_mistakes_over_every_command():
  assert len(MISTAKES) >= 25
  modules = {m for _, m, _, _ in MISTAKES}
  entry_points = {
    f'experiments.{p.stem}'
    for p in (REPO / 'experiments').glob('*.py')
    if re.search(r"^if __name__ == '__main__':", p.read_text(), re.M)
  }
  assert entry_points <= modules, entry_points - modules


def test_a_batch_that_does_not_divide_the_devices(world):
  line = the_error_line(
    run_command(PETS, _train(world, '--config.batch_size=7'), devices=2), PETS
  )
  assert 'number of devices (2)' in line and 'config.batch_size' in line


def test_offline_download_fails_fast_naming_both_fixes(world):
  """No network route: an unresolvable host and a refused port. The
  subprocess timeout is the issue's bound (30 s)."""
  for mirror in ('http://pets-mirror.invalid/pets', 'http://127.0.0.1:1/pets'):
    result = run_command(
      PREPARE,
      [
        '--dataset=oxford_iiit_pet',
        f'--data_dir={world["tmp"] / "tfds_offline"}',
        f'--download_mirror={mirror}',
      ],
      timeout=30,
    )
    line = the_error_line(result, PREPARE)
    assert '--manual_dir=DIR' in line and '--download_mirror=URL' in line
    assert mirror in line


def test_verbose_keeps_the_traceback(world):
  result = run_command(EVALUATE, ['--workdir=/nowhere/run', '--verbose'])
  assert result.returncode != 0
  assert 'Traceback' in result.stderr and 'config.json' in result.stderr


def test_prepare_options_reach_training(world):
  """What `prepare` was given is used by training: a folder with a missing
  mask, prepared with --missing_masks=all_ones, trains with the README's
  command (no data flag repeated) and records the option in config.json."""
  root = variant(world, 'prepared_with_options', _missing_mask)
  data_dir = world['tmp'] / 'tfds_options'
  prepared = run_command(
    PREPARE,
    [
      '--dataset=folder',
      f'--manual_dir={root}',
      f'--data_dir={data_dir}',
      '--missing_masks=all_ones',
    ],
  )
  assert prepared.returncode == 0, prepared.stderr[-3000:]
  assert json.loads(prepared.stdout.strip().splitlines()[-1])['train'] > 0
  workdir = world['tmp'] / 'run_options'
  trained = run_command(
    PETS,
    [
      '--config=experiments/configs/folder.py:cpu',
      f'--config.data.manual_dir={root}',
      f'--config.data.tfds_data_dir={data_dir}',
      '--config.data.image_size=32',
      '--config.batch_size=8',
      '--config.eval_batch_size=8',
      '--config.num_train_steps=1',
      f'--workdir={workdir}',
    ],
  )
  assert trained.returncode == 0, trained.stderr[-3000:]
  assert "config.data.missing_masks='all_ones'" in trained.stderr
  saved = json.loads((workdir / 'config.json').read_text())
  assert saved['data']['missing_masks'] == 'all_ones'


# ----------------------------------------------------------------------------
# What the first hour reads after training: the report and TensorBoard.
# ----------------------------------------------------------------------------


def _image_tags(workdir: Path) -> dict[str, tuple[int, int]]:
  """{tag: (step, PNG height)} of the image summaries in workdir/tensorboard."""
  from cco_jax import event_files  # pylint: disable=g-import-not-at-top

  found = {}
  for path in (workdir / 'tensorboard').glob(event_files.PATTERN):
    for event in event_files.read_events(path.read_bytes()):
      for value in event.summary.value:
        if value.HasField('image'):
          found[value.tag] = (int(event.step), value.image.height)
  return found


@pytest.fixture(scope='module')
def evaluation(world):
  """`experiments.evaluate` of the trained run: (result, report path)."""
  result = run_command(
    EVALUATE,
    [f'--workdir={world["run"]}', '--evaluators=classification'],
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return result, Path(result.stdout.strip().splitlines()[-1])


def test_evaluation_report_has_per_class_numbers_and_figures_in_tensorboard(
  world, evaluation
):
  result, path = evaluation
  report = json.loads(path.read_text())
  per_class = report['per_class']
  confusion = np.array(per_class['confusion'])
  assert confusion.shape == (2, 2) and confusion.sum() == report['count']
  assert per_class['count'] == report['count'] == 4  # The test split.
  recall = [per_class['recall'][name] for name in CLASSES]
  np.testing.assert_allclose(
    recall, np.diag(confusion) / confusion.sum(1), rtol=1e-12
  )
  assert per_class['accuracy'] == pytest.approx(report['accuracy'])
  # Folder data has no Cats-vs-Dogs: the settings say it did not run.
  assert report['ood'] is None and report['settings']['ood'] is False
  assert 'species models only' in report['ood_note']
  assert 'per-class accuracy: apple' in result.stdout
  tags = _image_tags(world['run'])
  assert tags['figures/validation_cams'][0] == 2  # Written by training.
  step, height = tags['figures/evaluation/cams_test']  # By evaluate.
  assert step == 2 and height > 100


class _Page(html.parser.HTMLParser):
  """The images, tags and outside references of an HTML page."""

  def __init__(self):
    super().__init__()
    self.images, self.tags, self.outside = [], [], []

  def handle_starttag(self, tag, attrs):
    self.tags.append(tag)
    for name, value in attrs:
      if name in ('src', 'href') and not (value or '').startswith('data:'):
        self.outside.append(value)
    if tag == 'img':
      self.images.append(dict(attrs)['src'])


def check_page(path: Path) -> _Page:
  """A page a browser opens from disk: no script, no outside file, every
  image an embedded PNG that decodes."""
  parsed = _Page()
  parsed.feed(path.read_text(encoding='utf-8'))
  assert 'script' not in parsed.tags and 'link' not in parsed.tags
  assert not parsed.outside, parsed.outside
  for src in parsed.images:
    prefix = 'data:image/png;base64,'
    assert src.startswith(prefix)
    with Image.open(io.BytesIO(base64.b64decode(src[len(prefix) :]))) as png:
      png.load()
      assert png.size[0] > 50 and png.size[1] > 50
  return parsed


def test_evaluation_and_explanation_pages(world, evaluation):
  page = evaluation[1].with_suffix('.html')
  parsed = check_page(page)
  assert len(parsed.images) >= 2 and parsed.tags.count('table') >= 2
  text = page.read_text()
  assert 'Balanced accuracy' in text and 'true \\ predicted' in text
  # explain: a folder with a note in it, true classes from labels.csv only.
  folder = world['tmp'] / 'to_explain'
  folder.mkdir(exist_ok=True)
  for name in ('apple_1.jpg', 'pear_9.jpg'):
    shutil.copy(world['root'] / 'images' / name, folder / name)
  (folder / 'notes.txt').write_text('not an image')
  out = world['tmp'] / 'why_page'
  result = run_command(
    EXPLAIN,
    [
      f'--workdir={world["run"]}',
      f'--out={out}',
      f'--labels={world["root"] / "labels.csv"}',
      str(folder),
    ],
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'Skipped 1 file(s) that are not images' in result.stdout
  assert 'notes.txt' in result.stdout
  explained = json.loads((out / 'explanations.json').read_text())
  assert [e['true_class'] for e in explained['images']] == ['apple', 'pear']
  parsed = check_page(out / 'explanations.html')
  assert len(parsed.images) == 2
  text = (out / 'explanations.html').read_text()
  assert 'true class apple' in text and 'notes.txt' in text


def test_pages_in_a_real_browser(world, evaluation):
  """Both pages opened from disk in headless Chromium: no console or page
  error, no failed request, every image decoded, the tables rendered."""
  report = browser.open_page(
    evaluation[1].with_suffix('.html'), screenshot=world['tmp'] / 'report.png'
  )
  browser.assert_reads_well(report, min_images=2)
  assert report.tables >= 2 and report.title
  out = world['tmp'] / 'why_browser'
  result = run_command(
    EXPLAIN,
    [
      f'--workdir={world["run"]}',
      f'--out={out}',
      f'--labels={world["root"] / "labels.csv"}',
      str(world['root'] / 'images' / 'apple_1.jpg'),
      str(world['root'] / 'images' / 'pear_9.jpg'),
    ],
  )
  assert result.returncode == 0, result.stderr[-3000:]
  explained = browser.open_page(out / 'explanations.html')
  browser.assert_reads_well(explained, min_images=2)
