"""Just Train Twice (JTT): retrain with the first model's errors upsampled.

Liu et al. (2021), "Just Train Twice: Improving Group Robustness without
Training Group Information": train an ordinary (ERM) model for T steps; the
training examples it misclassifies form the error set; train a second model
from scratch on the training set with every error-set example repeated
`factor` (lambda_up) times. Training uses no group labels; T and lambda_up
are chosen on validation (with group labels, in the paper's main results).

Stage two reads a folder dataset derived from the first (`write_upsampled`):
the same labels.csv with each error-set training row repeated, each repeat
a hard link (`<stem>-jtt<k>.<ext>`, mask likewise) to the original files, so
the derived dataset costs no image bytes and the pipeline, its order and its
checks are the ones every run uses. Validation and test rows are unchanged.

  train_errors     the training images a restored model misclassifies
                   (unaugmented, in the split's order);
  write_upsampled  the derived folder dataset of stage two.
"""

from __future__ import annotations

from collections.abc import Sequence
import csv
import json
import os

import numpy as np

SUMMARY_FILE = 'jtt.json'


def train_errors(trained, *, batch_size: int = 64) -> list[str]:
  """Image paths (as in labels.csv, relative to images/) of the training
  examples `trained` (a `restore.TrainedModel`) misclassifies."""
  # Imported here: the data pipeline is not needed by write_upsampled.
  from cco_jax.data import eval_pipeline  # pylint: disable=g-import-not-at-top
  from cco_jax.data import sources  # pylint: disable=g-import-not-at-top
  from cco_jax.evaluation import report  # pylint: disable=g-import-not-at-top

  data = report.resolved_data(
    trained.config, None, os.path.join(trained.workdir, 'evaluation')
  )
  source = sources.load_split_sources(data, ['train'])['train']
  predict = trained.predict_fn()
  errors = []
  for batch in eval_pipeline.create_eval_iterator(
    data,
    'train',
    source=source,
    cam_size=trained.cam_size,
    global_batch_size=batch_size,
    num_devices=1,
    with_file_name=True,
  ):
    names = batch.pop('file_name')[0]
    flat = {k: np.asarray(v)[0] for k, v in batch.items()}
    predicted = np.asarray(predict(flat['image'])[0]).argmax(-1)
    wrong = (predicted != flat['label']) & (flat['weight'] > 0)
    errors.extend(str(name) for name in names[wrong])  # labels.csv's `image`
  return sorted(errors)


def write_upsampled(
  data_dir: str,
  out_dir: str,
  error_images: Sequence[str],
  factor: int,
) -> dict:
  """Writes stage two's folder dataset (module docstring) to `out_dir`.

  Args:
    data_dir: the original folder dataset (labels.csv, images/, masks/).
    out_dir: where to write (created; files already there are replaced).
    error_images: labels.csv `image` values of the error set (train rows).
    factor: lambda_up, the number of times an error-set example appears (>=1).

  Returns:
    The summary written to OUT/jtt.json: factor, error-set size, train rows
    before and after.

  Raises:
    ValueError: factor < 1, or an error image that is not a train row.
  """
  if factor < 1:
    raise ValueError(f'factor (lambda_up) must be >= 1; got {factor}.')
  with open(os.path.join(data_dir, 'labels.csv'), newline='') as f:
    reader = csv.DictReader(f)
    fields, rows = reader.fieldnames, list(reader)
  train = {r['image'] for r in rows if r['split'] == 'train'}
  unknown = sorted(set(error_images) - train)
  if unknown:
    raise ValueError(
      f'{data_dir}: {len(unknown)} error-set images are not train rows, e.g. '
      f'{unknown[0]!r}.'
    )
  for part in ('images', 'masks'):
    source = os.path.join(data_dir, part)
    for folder, _, files in os.walk(source):
      target = os.path.join(out_dir, part, os.path.relpath(folder, source))
      os.makedirs(target, exist_ok=True)
      for name in files:
        _link(os.path.join(folder, name), os.path.join(target, name))
  chosen = set(error_images)
  out_rows = []
  for row in rows:
    out_rows.append(row)
    if row['image'] not in chosen:
      continue
    stem, ext = os.path.splitext(row['image'])
    for k in range(1, factor):
      image = f'{stem}-jtt{k}{ext}'
      _link(
        os.path.join(data_dir, 'images', row['image']),
        os.path.join(out_dir, 'images', image),
      )
      _link(
        os.path.join(data_dir, 'masks', f'{stem}.png'),
        os.path.join(out_dir, 'masks', f'{stem}-jtt{k}.png'),
      )
      out_rows.append({**row, 'image': image})
  with open(os.path.join(out_dir, 'labels.csv'), 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=fields, lineterminator='\n')
    writer.writeheader()
    writer.writerows(out_rows)
  summary = {
    'source': os.path.realpath(data_dir),
    'factor': factor,
    'error_set_size': len(chosen),
    'train_rows': len(train),
    'train_rows_upsampled': sum(r['split'] == 'train' for r in out_rows),
    'error_set': sorted(chosen),
  }
  with open(os.path.join(out_dir, SUMMARY_FILE), 'w') as f:
    json.dump(summary, f, indent=1)
  return summary


def _link(source: str, target: str) -> None:
  """A hard link (a copy across file systems), replacing `target`."""
  if os.path.lexists(target):
    os.remove(target)
  try:
    os.link(source, target)
  except OSError:
    import shutil  # pylint: disable=g-import-not-at-top

    shutil.copyfile(source, target)
