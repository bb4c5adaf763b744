"""cco-jax: classifiers that are interpretable by construction.

Modules, in data-flow order (docs/architecture.md tells the whole path):
  data              datasets, preparation, transforms and input pipelines.
  models            the model registry: classifiers whose logits decompose
                    exactly into maps (create_model, every family).
  cam_head          the backbone interface (CamModel) and the shared head.
  resnet, vit, convnext  the backbone families.
  ops               faster CPU kernels with the values of Flax's own.
  pretrained        torchvision/timm ResNet weights in and out; any family in.
  pretrained_timm   timm ViT and ConvNeXt weights in.
  cams              HiResCAM / ContrastiveCAM arithmetic (pure functions).
  losses            CE, ablated CE, CAM divergence (pure functions).
  baseline_losses   the field's baselines (RRR, CAM penalty, Group DRO, ...).
  cutmix            contrastive CutMix.
  objectives        training objectives as plug-ins: interface and registry.
  optimizers        optax optimizer and schedule from the config.
  train_step        pure, pmapped train and eval steps.
  metrics           per-batch evaluation sums and the field's metrics.
  checkpointing     Orbax checkpoints, with fallback past unreadable ones.
  metric_writers    metrics.jsonl, TensorBoard and the console.
  figures           maps overlaid on images, learning curves.
  errors            UserError: a user's mistake, reported in one line.
  runtime           process setup, one module per job: XLA CPU and GPU flags,
                    compilation cache, several hosts, workdir lock, logs.
  config_schema     the training config: every key, its default and meaning.
  configuration     config overrides, value and resume checks.
  checks            argument checks with clear errors.
  train_setup       everything a run builds from its config.
  train_input       the loop's input: batches sent ahead in a thread, the
                    validation split read once and kept on the devices.
  train_guards      the checks that stop a diverged run.
  train_evaluation  evaluation during and after training.
  train             the training loop.
  run_record        what a run is (run.json), computed once at its start.
  model_config      the model of a config (training and restoring alike).
  restore           a trained model restored for use, without the training
                    loop: run.json + config.json, params and batch_stats.
  evaluation        interventions, evaluators and checkpoint reports.
  explain           explanations for any image.
"""

__version__ = '0.1.0'
