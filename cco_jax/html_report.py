"""One self-contained HTML page per evaluation and per explanation run.

`evaluation_page(report, figures)` and `explanation_page(report)` return the
text of a page that a browser opens from disk: no script, no external file,
every figure embedded as a `data:image/png;base64` URI, every table plain
HTML. `experiments.evaluate` writes `WORKDIR/evaluation/report_<step>.html`
beside the JSON, `experiments.explain` writes `OUT/explanations.html`. The
keys shown are those of docs/evaluation_report.md.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Sequence
import html
import os

from etils import epath

_STYLE = """
body { font-family: sans-serif; margin: 1.5em; max-width: 70em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.5em 0; }
th, td { border: 1px solid #bbb; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
td.diag { background: #dfd; } img { max-width: 100%; }
.note { color: #555; font-size: 0.9em; }
"""


def _text(value) -> str:
  if value is None:
    return 'n/a'
  if isinstance(value, float):
    return (
      f'{value:.3f}' if abs(value) >= 1e-3 or value == 0 else f'{value:.2e}'
    )
  return html.escape(str(value))


def table(
  header: Sequence[str], rows: Iterable[Sequence], diagonal: bool = False
) -> str:
  """An HTML table; `diagonal` marks cell (i, i + 1) (a confusion matrix
  whose first column names the row)."""
  head = ''.join(f'<th>{html.escape(str(h))}</th>' for h in header)
  body = []
  for i, row in enumerate(rows):
    cells = ''.join(
      f'<td{" class=diag" if diagonal and j == i + 1 else ""}>{_text(c)}</td>'
      for j, c in enumerate(row)
    )
    body.append(f'<tr>{cells}</tr>')
  return f'<table><tr>{head}</tr>{"".join(body)}</table>'


def image(path: str, alt: str) -> str:
  """An <img> with the PNG at `path` embedded (the page needs no file)."""
  data = base64.b64encode(epath.Path(path).read_bytes()).decode('ascii')
  return (
    f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}" '
    f'title="{html.escape(os.path.basename(path))}">'
  )


def page(title: str, sections: Sequence[tuple[str, str]]) -> str:
  """The page: a title, then (heading, HTML) sections."""
  parts = [
    '<!DOCTYPE html>',
    '<html lang="en"><head><meta charset="utf-8">',
    f'<title>{html.escape(title)}</title><style>{_STYLE}</style></head>',
    f'<body><h1>{html.escape(title)}</h1>',
  ]
  parts += [
    f'<h2>{html.escape(h)}</h2>\n{body}' for h, body in sections if body
  ]
  parts.append('</body></html>')
  return '\n'.join(parts)


def _classes(report: dict) -> str:
  per_class = report.get('per_class')
  if not per_class:
    return ''
  names = list(report['class_names'])
  recall = table(
    ['class', 'accuracy (recall)', 'images'],
    [
      (n, per_class['recall'].get(n), int(sum(row)))
      for n, row in zip(names, per_class['confusion'])
    ],
  )
  confusion = table(
    ['true \\ predicted', *names],
    [
      (n, *(int(v) for v in row))
      for n, row in zip(names, per_class['confusion'])
    ],
    diagonal=True,
  )
  return (
    f'<p>Balanced accuracy {_text(per_class["balanced_accuracy"])}.</p>'
    f'{recall}<p class=note>Confusion matrix (rows: true class).</p>'
    f'{confusion}'
  )


def evaluation_page(report: dict, figures: dict[str, str]) -> str:
  """The page of one `experiments.evaluate` report (`figures`: {caption:
  PNG path}, drawn in that order)."""
  summary = [
    ('accuracy', report.get('accuracy')),
    ('cross-entropy', report.get('ce')),
    ('images', report.get('count')),
    ('background share of evidence', report.get('bg_share')),
    ('worst-group accuracy', report.get('worst_group_accuracy')),
    (
      'relative foreground sensitivity',
      report.get('relative_foreground_sensitivity'),
    ),
    ('pointing game', report.get('pointing_game')),
  ]
  ood = report.get('ood')
  if ood:
    summary.append(('Cats-vs-Dogs accuracy', ood.get('accuracy')))
  perturbations = table(
    ['intervention', 'accuracy', 'flip rate'],
    [
      (name, v.get('accuracy'), v.get('flip_rate'))
      for name, v in (report.get('perturbations') or {}).items()
    ],
  )
  deletion = table(
    ['map', 'deletion AUC', 'insertion AUC'],
    [
      (name, v.get('deletion_auc'), v.get('insertion_auc'))
      for name, v in (report.get('deletion_insertion') or {}).items()
    ],
  )
  tasks = (report.get('auc') or {}).get('tasks') or {}
  auc_table = table(
    ['task', 'ROC AUC', '95 % interval', 'sensitivity @ 0.8 / 0.9 spec.'],
    [
      (
        name,
        v.get('auc'),
        ' - '.join(_text(x) for x in v.get('auc_interval') or ()) or None,
        ' / '.join(
          _text(v.get(f'sensitivity_at_specificity_{x}')) for x in (0.8, 0.9)
        ),
      )
      for name, v in tasks.items()
    ],
  )
  shown = ''.join(
    f'<figure>{image(path, caption)}<figcaption>{html.escape(caption)}'
    '</figcaption></figure>'
    for caption, path in figures.items()
    if epath.Path(path).exists()
  )
  return page(
    f'{report["workdir"]}: step {report["step"]} ({report["checkpoint"]}), '
    f'split {report["split"]}',
    [
      (
        'Summary',
        table(['measure', 'value'], [r for r in summary if r[1] is not None]),
      ),
      ('Per class', _classes(report)),
      (
        'Binary tasks (each class against the rest)',
        auc_table if tasks else '',
      ),
      ('Interventions', perturbations if report.get('perturbations') else ''),
      (
        'Deletion and insertion',
        deletion if report.get('deletion_insertion') else '',
      ),
      ('Figures', shown),
      ('Notes', html.escape(report.get('ood_note') or '')),
    ],
  )


def explanation_page(report: dict) -> str:
  """The page of one `experiments.explain` run (its explanations.json)."""
  rows = []
  for entry in report['images']:
    probability = entry['probabilities'][entry['predicted_index']]
    truth = entry.get('true_class')
    rows.append(
      '<tr><td>'
      + html.escape(entry['path'])
      + f'<br>predicted <b>{html.escape(entry["predicted_class"])}</b> '
      f'({probability:.0%})'
      + (f'<br>true class {html.escape(truth)}' if truth else '')
      + f'<br><span class=note>identity error {entry["identity_error"]:.1e}'
      '</span></td><td>' + image(entry['figure'], entry['path']) + '</td></tr>'
    )
  images = f'<table>{"".join(rows)}</table>' if rows else ''
  failed = table(
    ['path', 'error'], [(f['path'], f['error']) for f in report['failed']]
  )
  skipped = ''.join(
    f'<li>{html.escape(p)}</li>' for p in report.get('skipped') or []
  )
  labels = report.get('labels')
  return page(
    f'{report["workdir"]}: step {report["step"]} ({report["checkpoint"]})',
    [
      (
        'Settings',
        f'<p>Classes: {html.escape(", ".join(report["class_names"]))}. True '
        'classes from '
        + (html.escape(labels) if labels else 'no labels file (none shown)')
        + '.</p>',
      ),
      (f'{len(report["images"])} images explained', images),
      ('Not explained', failed if report['failed'] else ''),
      ('Skipped (not images)', f'<ul>{skipped}</ul>' if skipped else ''),
    ],
  )


def write(path: str, text: str) -> str:
  """Writes the page (through `etils.epath`); returns `path`."""
  epath.Path(path).write_text(text, encoding='utf-8')
  return path
