r"""Explains a trained model's decision on any images.

    python -m experiments.explain --workdir=/tmp/pets_cpu --out=/tmp/why \
        photo.jpg more_photos/ 'PetImages/*/1*.jpg' \
        [--masks=DIR] [--classes=cat,dog] [--step=best|last|N]

PATHs are image files, folders (searched recursively for images) or globs.
Restores the best checkpoint of `--workdir` (or `--step=last`, `--step=N`;
the step used is always printed) and writes to `--out`:

  <stem>.png          the image, and over it the signed evidence map of the
                      predicted class (red argues for it, blue against) at
                      image resolution with a colour bar; small panels for
                      the three most probable classes;
  explanations.html   one self-contained page: every image's figure, its
                      prediction and true class, the failures and skips;
  explanations.json   {'workdir', 'step', 'checkpoint', 'class_names',
                      'images': [per image: path, figure, predicted_index,
                      predicted_class, probabilities, logits, map_sums, bias,
                      identity_error, map_shape, target_index, target_class,
                      true_class (from --labels, else null), influence (fg,
                      bg, net, bg_share; with a mask)], 'failed': [path,
                      error], 'skipped': [files in the folders that are not
                      images]}.

For every class `logits == map_sums + bias` up to float rounding (the
logit-sum identity, docs/method.md); `identity_error` is the largest gap.
`--masks=DIR` takes `DIR/<stem>.png` as the object mask of `<stem>.*` (Pets
trimaps or binary masks). `--classes=a,b,...` names (or numbers) classes:
the large map and the contrastive maps are taken for the first instead of
the predicted class, and the small panels show these classes.
`--labels=FILE` gives true classes (a CSV with an image,label header, such as
a folder dataset's labels.csv, or an Oxford-IIIT Pet list such as
annotations/test.txt; `cco_jax.true_labels`); without it no true class is
shown: a file name is never read as a label.

Files in a folder that are not images are named as skipped. Progress, with
the rate and the time left (measured after the first batch, which compiles),
is logged every few seconds on runs of more than one batch. An unreadable or
missing image is skipped; the others are written, then the command ends with
one line naming the failed paths (exit status 1).
"""

from __future__ import annotations

import glob
import json
import os
import time

from absl import app
from absl import flags
from absl import logging
import numpy as np

from cco_jax import errors
from cco_jax import explain as explain_lib
from cco_jax import figures
from cco_jax import html_report
from cco_jax import true_labels
from cco_jax.data import transforms
from experiments import cli

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif')


def define_flags() -> None:
  """The entry point's flags (defined only when run, so that tests can import
  several entry points)."""
  cli.define_workdir_flag()
  cli.define_step_flag()
  flags.DEFINE_string('out', None, 'Where to write figures and JSON.')
  flags.DEFINE_string(
    'masks', None, 'Folder of object masks named <image stem>.png.'
  )
  flags.DEFINE_list(
    'classes',
    None,
    'Class (name or index) to explain instead of the predicted.',
  )
  flags.DEFINE_string(
    'labels',
    None,
    'True classes: a CSV with an image,label header (labels.csv) or an '
    'Oxford-IIIT Pet list (annotations/test.txt). None: no true class.',
  )
  flags.DEFINE_integer('batch_size', 32, 'Images per forward pass.')
  flags.mark_flags_as_required(['out'])


def expand_paths(
  patterns: list[str], skipped: list[str] | None = None
) -> list[str]:
  """Files, folders (recursively, image extensions only) and globs -> paths,
  in the given order; a pattern that matches nothing is kept (it will fail).
  Files of a folder that are not images are appended to `skipped`."""
  paths = []
  for pattern in patterns:
    if os.path.isdir(pattern):
      files = sorted(
        os.path.join(root, name)
        for root, _, names in os.walk(pattern)
        for name in names
      )
      found = [p for p in files if p.lower().endswith(IMAGE_EXTENSIONS)]
      if skipped is not None:
        skipped.extend(p for p in files if p not in found)
    elif os.path.exists(pattern):
      found = [pattern]
    else:
      found = sorted(glob.glob(pattern, recursive=True)) or [pattern]
    paths.extend(p for p in found if p not in paths)
  return paths


def unique_stems(paths: list[str]) -> list[str]:
  """File stems, made unique with the parent folder's name (then a count)."""
  stems, seen = [], set()
  for path in paths:
    stem = os.path.splitext(os.path.basename(path))[0]
    if stem in seen:
      stem = f'{os.path.basename(os.path.dirname(path))}_{stem}'
    base, n = stem, 1
    while stem in seen:
      n += 1
      stem = f'{base}_{n}'
    seen.add(stem)
    stems.append(stem)
  return stems


def parse_class(value: str, class_names) -> int:
  if value.isdigit() and int(value) < len(class_names):
    return int(value)
  lowered = [c.lower() for c in class_names]
  if value.lower() in lowered:
    return lowered.index(value.lower())
  raise app.UsageError(
    f'--classes: unknown class {value!r}; the classes are {list(class_names)}.'
  )


class Progress:
  """Logs `done/total`, the rate and the time left every `every_s` seconds
  (and at the end) on runs of more than one batch; the rate is measured from
  the end of the first batch, so compilation does not inflate the ETA."""

  def __init__(self, total: int, batch_size: int, every_s: float = 10.0):
    self.total, self.every_s = total, every_s
    self.enabled = total > batch_size
    self._first = None  # (time, done) after the first batch.
    self._last_log = 0.0

  def update(self, done: int) -> None:
    now = time.monotonic()
    if self._first is None:
      self._first, self._last_log = (now, done), now
      return
    if not self.enabled or (
      done < self.total and now - self._last_log < self.every_s
    ):
      return
    self._last_log = now
    rate = (done - self._first[1]) / max(now - self._first[0], 1e-9)
    left = (self.total - done) / rate if rate > 0 else float('inf')
    eta = time.strftime('%H:%M:%S', time.gmtime(left)) if left < 1e6 else '?'
    logging.info(
      'Explained %d/%d images, %.1f images/s, ETA %s.',
      done,
      self.total,
      rate,
      eta,
    )


def _load(explainer, path: str, mask_dir: str | None):
  image = transforms.read_image_file(
    path, image_size=explainer.image_size, normalize=explainer.normalize
  )
  mask = None
  if mask_dir:
    stem = os.path.splitext(os.path.basename(path))[0]
    mask_path = os.path.join(mask_dir, stem + '.png')
    if os.path.exists(mask_path):
      mask = transforms.read_mask_file(
        mask_path,
        image_size=explainer.image_size,
        boundary_is_foreground=explainer.boundary_is_foreground,
      )
  return image, mask


def record(
  explainer, result, i: int, path: str, figure: str, labels=None
) -> dict:
  """The JSON entry of image `i` of an `Explanation` (`labels`: the
  `true_labels.TrueLabels` of --labels, or None)."""
  predicted, target = int(result.predicted[i]), int(result.target[i])
  entry = {
    'path': path,
    'figure': figure,
    'predicted_index': predicted,
    'predicted_class': explainer.class_name(predicted),
    'target_index': target,
    'target_class': explainer.class_name(target),
    'true_class': labels.of(path) if labels else None,
    'probabilities': result.probabilities[i].astype(float).tolist(),
    'logits': result.logits[i].astype(float).tolist(),
    'map_sums': result.map_sums[i].astype(float).tolist(),
    'bias': result.bias.astype(float).tolist(),
    'identity_error': float(result.identity_error[i]),
    'map_shape': list(result.cams.shape[1:3]),
  }
  if result.influence is not None:
    entry['influence'] = {
      k: None if not np.isfinite(v[i]) else float(v[i])
      for k, v in result.influence.items()
    }
  return entry


def explain_paths(
  explainer, paths, out, *, mask_dir=None, target=None, panels=3, labels=None
):
  """Explains `paths` in batches; returns (entries, failures). `target`:
  the class of the large map (None = the predicted one); `panels`: how many
  top classes, or which classes, get small panels; `labels`: true classes
  (`true_labels.TrueLabels`) or None."""
  stems = dict(zip(paths, unique_stems(paths)))
  entries, failures = [], []
  subtitle = ''
  if explainer.trained is not None:
    trained = explainer.trained
    subtitle = f'{trained.workdir}, step {trained.step} ({trained.checkpoint})'
  progress = Progress(len(paths), explainer.batch_size)
  for start in range(0, len(paths), explainer.batch_size):
    chunk = paths[start : start + explainer.batch_size]
    loaded = []
    for path in chunk:
      try:
        loaded.append((path, *_load(explainer, path, mask_dir)))
      except (ValueError, OSError) as e:
        failures.append({'path': path, 'error': _reason(path, e)})
    groups = [
      [x for x in loaded if x[2] is not None],
      [x for x in loaded if x[2] is None],
    ]
    for group in groups:
      if not group:
        continue
      images = np.stack([x[1] for x in group])
      masks = None if group[0][2] is None else np.stack([x[2] for x in group])
      result = explainer.explain(images, targets=target, masks=masks)
      for i, (path, image, _) in enumerate(group):
        figure = os.path.join(out, stems[path] + '.png')
        figures.save_explanation(
          figure,
          explain_lib.to_pixel_space(image, normalize=explainer.normalize),
          result.cams[i],
          result.probabilities[i],
          target=int(result.target[i]),
          class_names=[
            explainer.class_name(c) for c in range(len(result.bias))
          ],
          true_class=labels.of(path) if labels else None,
          subtitle=subtitle,
          panels=panels,
        )
        entries.append(record(explainer, result, i, path, figure, labels))
    progress.update(min(start + len(chunk), len(paths)))
  order = {p: k for k, p in enumerate(paths)}
  entries.sort(key=lambda e: order[e['path']])
  return entries, failures


def _reason(path: str, error: Exception) -> str:
  """Why `path` could not be read, without repeating the path."""
  if not os.path.exists(path) and glob.has_magic(path):
    return 'no file matches this pattern'
  text = str(error)
  return text[len(path) + 2 :] if text.startswith(f'{path}: ') else text


def failure_line(failures: list[dict], report_path: str) -> str:
  """One line naming the images that failed and the fix."""
  shown = '; '.join(f'{f["path"]}: {f["error"]}' for f in failures[:3])
  more = f'; and {len(failures) - 3} more' if len(failures) > 3 else ''
  return (
    f'{len(failures)} image(s) could not be explained ({shown}{more}); the '
    f'others are in {report_path}. Fix or leave out those paths.'
  )


def run(
  workdir: str,
  out: str,
  patterns: list[str],
  *,
  step='best',
  masks: str | None = None,
  classes: list[str] | None = None,
  batch_size: int = 32,
  labels: str | None = None,
) -> int:
  """Explains the images of `patterns` with the run's checkpoint `step`
  ('best', 'last' or a number); writes `out`; returns the exit status."""
  _, failures = explain_to(
    workdir,
    out,
    patterns,
    step=step,
    masks=masks,
    classes=classes,
    batch_size=batch_size,
    labels=labels,
  )
  return 1 if failures else 0


def explain_to(
  workdir: str,
  out: str,
  patterns: list[str],
  *,
  step='best',
  masks: str | None = None,
  classes: list[str] | None = None,
  batch_size: int = 32,
  labels: str | None = None,
) -> tuple[str, list[dict]]:
  """`run`'s work; returns (the report's path, the failures)."""
  if masks and not os.path.isdir(masks):
    raise errors.UserError(
      f'--masks={masks}: no such folder; give the folder of the object '
      'masks named <image stem>.png, or leave --masks out.'
    )
  skipped: list[str] = []
  paths = expand_paths(patterns, skipped)
  explainer = explain_lib.Explainer.from_workdir(
    workdir, step=step, batch_size=batch_size
  )
  trained = explainer.trained
  print(
    f'Explaining with {trained.workdir} at step {trained.step} '
    f'({trained.checkpoint} checkpoint); classes '
    f'{list(trained.record.class_names)}.',
    flush=True,
  )
  names = trained.record.class_names
  chosen = [parse_class(c, names) for c in classes or ()]
  target = chosen[0] if chosen else None
  truth = true_labels.read(labels, names) if labels else None
  if skipped:
    shown = ', '.join(os.path.basename(p) for p in skipped[:5])
    print(
      f'Skipped {len(skipped)} file(s) that are not images '
      f'({"/".join(IMAGE_EXTENSIONS)}): {shown}'
      + (', ...' if len(skipped) > 5 else '')
      + '.',
      flush=True,
    )
  os.makedirs(out, exist_ok=True)
  entries, failures = explain_paths(
    explainer,
    paths,
    out,
    mask_dir=masks,
    target=target,
    panels=chosen or 3,
    labels=truth,
  )
  report = {
    'workdir': os.path.abspath(trained.workdir),
    'step': trained.step,
    'checkpoint': trained.checkpoint,
    'class_names': list(names),
    'labels': os.path.abspath(labels) if labels else None,
    'images': entries,
    'failed': failures,
    'skipped': skipped,
  }
  path = os.path.join(out, 'explanations.json')
  with open(path, 'w') as f:
    json.dump(report, f, indent=1)
  page = html_report.write(
    os.path.join(out, 'explanations.html'), html_report.explanation_page(report)
  )
  worst = max((e['identity_error'] for e in entries), default=0.0)
  print(
    f'Explained {len(entries)} image(s), {len(failures)} failed; largest '
    f'|sum of maps + bias - logit| = {worst:.2e}.'
  )
  for failure in failures:
    print(f'FAILED {failure["path"]}: {failure["error"]}')
  print(f'Page: {page}')
  print(path, flush=True)
  return path, failures


def main(argv):
  patterns = argv[1:]
  if not patterns:
    raise app.UsageError('Give at least one image file, folder or glob.')
  f = flags.FLAGS
  path, failures = explain_to(
    f.workdir,
    f.out,
    patterns,
    step=f.step,
    masks=f.masks,
    classes=f.classes,
    batch_size=f.batch_size,
    labels=f.labels,
  )
  if failures:
    raise errors.UserError(failure_line(failures, path))


if __name__ == '__main__':
  define_flags()
  cli.run(main)
