"""Does the model decide from the object? Evaluation of a trained checkpoint.

One path: `report.evaluate_checkpoint` restores a run (`cco_jax.restore`),
runs the evaluators the config lists (`evaluators.EVALUATORS`, each
`Evaluator(predict_fn, **cfg).run(batches)` yielding named values) over one
split, and `report.write_report` saves `workdir/evaluation/report_<step>.json`.
The per-batch sums are `cco_jax.metrics.batch_sums`, which the training loop's
eval step uses too.

  interventions  background/foreground noise, grey, swap (a registry);
  evaluators     classification, interventions, localisation,
                 deletion_insertion;
  report         restoring, data locations, the report.
"""

from cco_jax.evaluation.evaluators import EVALUATORS
from cco_jax.evaluation.evaluators import Evaluator
from cco_jax.evaluation.interventions import PERTURBATIONS
from cco_jax.evaluation.interventions import Context
from cco_jax.evaluation.interventions import to_model_space
from cco_jax.evaluation.interventions import to_pixel_space
from cco_jax.evaluation.report import EVALUATION_DIR
from cco_jax.evaluation.report import default_config
from cco_jax.evaluation.report import evaluate_checkpoint
from cco_jax.evaluation.report import report_path
from cco_jax.evaluation.report import write_report

__all__ = [
  'EVALUATION_DIR',
  'EVALUATORS',
  'PERTURBATIONS',
  'Context',
  'Evaluator',
  'default_config',
  'evaluate_checkpoint',
  'report_path',
  'to_model_space',
  'to_pixel_space',
  'write_report',
]
