"""The data layer: datasets, preparation, transforms and input pipelines.

One job per module:
  config      the schema and defaults of `config.data` (`default_config`).
  preparation preparing datasets once (process 0 of several) and where
              prepared data lives.
  sources     opening the pipeline's splits (`OpenSplits`: each once per
              process) and the validation carve.
  device_transforms  the image work of training batches done in the train
              step (uint8 -> float32, normalisation, flips).
  info        split sizes, class names and group names of a configured dataset.
  transforms  decode, crop, squash, masks on the CAM grid.
  order       which example and which augmentation at each stream position.
  cache       the RAM cache of decoded, squashed training examples.
  pipeline    the training iterator.
  eval_pipeline  the evaluation iterator.
  datasets    the TFDS builders (no TensorFlow) and their shared helpers.
  spurious    the spurious-background benchmark built from Pets.
  spurious_groups  the same with groups (species x background), in the
              'folder' layout: train at a correlation, balanced val/test.
  isic_shortcut  ISIC images with an adhesive patch pasted outside the
              lesion, groups diagnosis x patch, in the 'folder' layout.

The names below are the public API the trainer and the experiments use.
"""

import importlib

# name -> the module that defines it. Imported on first use (PEP 562), so
# that reading a config (`cco_jax.data.config`) does not load grain, JAX and
# TFDS: a mistyped flag is reported in a second, not after every import.
_PUBLIC = {
  'IMAGENET_MEAN': 'config',
  'IMAGENET_STD': 'config',
  'default_config': 'config',
  'create_eval_iterator': 'eval_pipeline',
  'class_counts_of': 'info',
  'class_labels_of': 'info',
  'class_names': 'info',
  'class_names_of': 'info',
  'group_counts': 'info',
  'group_counts_of': 'info',
  'group_names': 'info',
  'group_names_of': 'info',
  'num_classes': 'info',
  'num_examples': 'info',
  'split_sizes': 'info',
  'TrainIterator': 'pipeline',
  'create_train_iterator': 'pipeline',
  'prepare_dataset': 'preparation',
  'prepare_from_config': 'preparation',
  'prepare_options': 'preparation',
  'prepared_source': 'preparation',
  'resolve_data_dir': 'preparation',
  'OOD_DATASET': 'sources',
  'OpenSplits': 'sources',
  'carve_validation': 'sources',
  'check_config': 'sources',
  'load_split_sources': 'sources',
  'decode': 'transforms',
  'to_model_input': 'transforms',
}


def __getattr__(name: str):
  if name in _PUBLIC:
    value = getattr(
      importlib.import_module(f'cco_jax.data.{_PUBLIC[name]}'), name
    )
    globals()[name] = value
    return value
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__():
  return sorted({*globals(), *_PUBLIC})


__all__ = sorted(_PUBLIC)
