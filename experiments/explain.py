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
  explanations.json   {'workdir', 'step', 'checkpoint', 'class_names',
                      'images': [per image: path, figure, predicted_index,
                      predicted_class, probabilities, logits, map_sums, bias,
                      identity_error, map_shape, target_index, target_class,
                      true_class (if the path tells it), influence (fg, bg,
                      net, bg_share; with a mask)], 'failed': [path, error]}.

For every class `logits == map_sums + bias` up to float rounding (the
logit-sum identity, docs/method.md); `identity_error` is the largest gap.
`--masks=DIR` takes `DIR/<stem>.png` as the object mask of `<stem>.*` (Pets
trimaps or binary masks). `--classes=a,b,...` names (or numbers) classes:
the large map and the contrastive maps are taken for the first instead of
the predicted class, and the small panels show these classes. An unreadable
image is reported and skipped; the exit status is 1 if any image failed.
"""

from __future__ import annotations

import glob
import json
import os
import sys

from absl import app
from absl import flags
import numpy as np

from cco_jax import explain as explain_lib
from cco_jax import figures
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
  flags.DEFINE_integer('batch_size', 32, 'Images per forward pass.')
  flags.mark_flags_as_required(['out'])


def expand_paths(patterns: list[str]) -> list[str]:
  """Files, folders (recursively, image extensions only) and globs -> paths,
  in the given order; a pattern that matches nothing is kept (it will fail)."""
  paths = []
  for pattern in patterns:
    if os.path.isdir(pattern):
      found = sorted(
        os.path.join(root, name)
        for root, _, names in os.walk(pattern)
        for name in names
        if name.lower().endswith(IMAGE_EXTENSIONS)
      )
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


def true_class(path: str, class_names) -> str | None:
  """The class a path names, if any: a folder named like a class
  (`PetImages/Cat/1.jpg`), or a Pets file name `<Breed>_<n>.jpg` (breed
  classes, or species: cat breeds are capitalised, dog breeds are not)."""
  lowered = {c.lower().replace(' ', '_'): c for c in class_names}
  folder = os.path.basename(os.path.dirname(path)).lower()
  if folder in lowered:
    return lowered[folder]
  stem = os.path.splitext(os.path.basename(path))[0]
  if '_' not in stem or not stem.rsplit('_', 1)[1].isdigit():
    return None
  breed = stem.rsplit('_', 1)[0]
  if breed.lower() in lowered:
    return lowered[breed.lower()]
  if {'cat', 'dog'} <= set(lowered):
    return lowered['cat' if breed[:1].isupper() else 'dog']
  return None


def parse_class(value: str, class_names) -> int:
  if value.isdigit() and int(value) < len(class_names):
    return int(value)
  lowered = [c.lower() for c in class_names]
  if value.lower() in lowered:
    return lowered.index(value.lower())
  raise app.UsageError(
    f'--classes: unknown class {value!r}; the classes are {list(class_names)}.'
  )


def progress(done: int, total: int, width: int = 30) -> None:
  filled = width * done // max(total, 1)
  sys.stderr.write(f'\r[{"#" * filled}{"." * (width - filled)}] {done}/{total}')
  if done == total:
    sys.stderr.write('\n')
  sys.stderr.flush()


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


def record(explainer, result, i: int, path: str, figure: str) -> dict:
  """The JSON entry of image `i` of an `Explanation`."""
  names = explainer.class_names
  predicted, target = int(result.predicted[i]), int(result.target[i])
  entry = {
    'path': path,
    'figure': figure,
    'predicted_index': predicted,
    'predicted_class': explainer.class_name(predicted),
    'target_index': target,
    'target_class': explainer.class_name(target),
    'true_class': true_class(path, names) if names else None,
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
  explainer, paths, out, *, mask_dir=None, target=None, panels=3
):
  """Explains `paths` in batches; returns (entries, failures). `target`:
  the class of the large map (None = the predicted one); `panels`: how many
  top classes, or which classes, get small panels."""
  stems = dict(zip(paths, unique_stems(paths)))
  entries, failures = [], []
  subtitle = ''
  if explainer.trained is not None:
    trained = explainer.trained
    subtitle = f'{trained.workdir}, step {trained.step} ({trained.checkpoint})'
  progress(0, len(paths))
  for start in range(0, len(paths), explainer.batch_size):
    chunk = paths[start : start + explainer.batch_size]
    loaded = []
    for path in chunk:
      try:
        loaded.append((path, *_load(explainer, path, mask_dir)))
      except (ValueError, OSError) as e:
        failures.append({'path': path, 'error': str(e)})
        print(f'\nskipped: {e}', file=sys.stderr)
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
          true_class=true_class(path, explainer.class_names or ()),
          subtitle=subtitle,
          panels=panels,
        )
        entries.append(record(explainer, result, i, path, figure))
    progress(min(start + len(chunk), len(paths)), len(paths))
  order = {p: k for k, p in enumerate(paths)}
  entries.sort(key=lambda e: order[e['path']])
  return entries, failures


def run(
  workdir: str,
  out: str,
  patterns: list[str],
  *,
  step='best',
  masks: str | None = None,
  classes: list[str] | None = None,
  batch_size: int = 32,
) -> int:
  """Explains the images of `patterns` with the run's checkpoint `step`
  ('best', 'last' or a number); writes `out`; returns the exit status."""
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
  paths = expand_paths(patterns)
  os.makedirs(out, exist_ok=True)
  entries, failures = explain_paths(
    explainer,
    paths,
    out,
    mask_dir=masks,
    target=target,
    panels=chosen or 3,
  )
  report = {
    'workdir': os.path.abspath(trained.workdir),
    'step': trained.step,
    'checkpoint': trained.checkpoint,
    'class_names': list(names),
    'images': entries,
    'failed': failures,
  }
  path = os.path.join(out, 'explanations.json')
  with open(path, 'w') as f:
    json.dump(report, f, indent=1)
  worst = max((e['identity_error'] for e in entries), default=0.0)
  print(
    f'Explained {len(entries)} image(s), {len(failures)} failed; largest '
    f'|sum of maps + bias - logit| = {worst:.2e}.'
  )
  for failure in failures:
    print(f'FAILED {failure["path"]}: {failure["error"]}')
  print(path, flush=True)
  return 1 if failures else 0


def main(argv):
  patterns = argv[1:]
  if not patterns:
    raise app.UsageError('Give at least one image file, folder or glob.')
  f = flags.FLAGS
  return run(
    f.workdir,
    f.out,
    patterns,
    step=f.step,
    masks=f.masks,
    classes=f.classes,
    batch_size=f.batch_size,
  )


if __name__ == '__main__':
  define_flags()
  cli.run(main)
