r"""Benchmarks the TF-free data path: preparing, and reading to batches.

    python -m experiments.benchmarks.input_pipeline \
        [--manual_dir=../shared/data/oxford-iiit-pet-sample] \
        [--ood_manual_dir=../shared/data/cats-vs-dogs-sample] \
        [--workers=0,1,2] [--image_size=224] [--output=/tmp/input_benchmark.json]
        [--device_preprocessing=false,true] [--augment_flip] [--normalize]
        [--skip_prepare_rows] [--gather_batch=640]

Measures, on this machine:
  * prepare: images/s of `prepare_dataset` (read, validate, convert, write
    ArrayRecord) for both samples, into a fresh temporary data dir;
  * cpu_per_image: CPU milliseconds per example of read + decode + squash +
    mask for one thread (1000 / ms = images/s per core, independent of other
    load on the machine); for the full-size Pets JPEGs once per
    --draft_fractions entry f: JPEG DCT-domain downscaling (Pillow's
    `Image.draft`, `transforms.decode(draft_size=...)`) to the smallest
    1/2, 1/4 or 1/8 scale whose sides stay >= f x image_size (0: no draft,
    the full decode; 1: the pipeline's own rule, never below the target),
    with the mean and largest per-image mean |difference| of the final
    image from the full decode's (`draft_difference`, in [0, 1] units);
  * train: images/s (wall clock) of `create_train_iterator` (read, decode,
    squash to image_size, CAM masks, batch) for each worker count, the first
    batch (start-up) excluded, and the main process's CPU ms per image (with
    workers=0 all of the host's work: 1000 / ms = images/s per core); with
    --cache also `cache_decoded=True`; each with
    `data.device_preprocessing` off (float32 images finished and flipped on
    the host) and on (uint8 images and flip bits; the device finishes them);
  * gather: host CPU ms per batch of `cache.CachedBatches` alone (the
    cached training path's whole host work: gather, and with
    device_preprocessing off also flip and uint8 -> float32 [normalise]) at
    --gather_batch images of 224 px, on random cached pixels;
  * ood: images/s of a full `create_eval_iterator` pass over Cats-vs-Dogs.
Prints a table and writes the numbers (with versions and load) as JSON.
"""

import functools
import json
import os
from pathlib import Path
import platform
import sys
import tempfile
import time

from absl import app
from absl import flags
import numpy as np
import PIL
import tensorflow_datasets as tfds

from cco_jax import data as data_lib
from cco_jax.data import cache as cache_lib
from experiments.benchmarks import jpeg_draft

_SHARED = Path(__file__).resolve().parents[2].parent / 'shared' / 'data'
_MANUAL_DIR = flags.DEFINE_string(
  'manual_dir',
  str(_SHARED / 'oxford-iiit-pet-sample'),
  'Oxford-IIIT Pet in the official layout.',
)
_OOD_MANUAL_DIR = flags.DEFINE_string(
  'ood_manual_dir',
  str(_SHARED / 'cats-vs-dogs-sample'),
  'Cats-vs-Dogs in the Microsoft layout.',
)
_WORKERS = flags.DEFINE_list(
  'workers', ['0', '1', '2'], 'Worker counts to time.'
)
_IMAGE_SIZE = flags.DEFINE_integer('image_size', 224, 'Squashed image side.')
_CAM = flags.DEFINE_integer('cam', 14, 'CAM grid side.')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 32, 'Batch size.')
_NUM_BATCHES = flags.DEFINE_integer(
  'num_batches', 20, 'Timed batches per setting.'
)
_PREFETCH = flags.DEFINE_integer('prefetch', 2, 'config.data.prefetch.')
_CACHE = flags.DEFINE_bool('cache', True, 'Also time cache_decoded=True.')
_DEVICE_PREPROCESSING = flags.DEFINE_list(
  'device_preprocessing',
  ['false', 'true'],
  'config.data.device_preprocessing values to time the train iterator with.',
)
_AUGMENT_FLIP = flags.DEFINE_bool(
  'augment_flip', False, 'config.data.augment_flip of the timed iterators.'
)
_NORMALIZE = flags.DEFINE_bool(
  'normalize', False, 'config.data.normalize of the timed iterators.'
)
_GATHER_BATCH = flags.DEFINE_integer(
  'gather_batch',
  640,
  'Images per batch of the `gather` rows (an 8-GPU host at 80 per GPU); '
  '0 = skip them.',
)
_SKIP_PREPARE_ROWS = flags.DEFINE_bool(
  'skip_prepare_rows',
  False,
  'Time only the train iterators (the data is still prepared, untimed).',
)
_DRAFT_FRACTIONS = flags.DEFINE_list(
  'draft_fractions',
  ['0', '1', '0.5'],
  'JPEG draft sizes to time on the full-size Pets images, as fractions of '
  '--image_size (0 = full decode, no draft).',
)
_OUTPUT = flags.DEFINE_string(
  'output', '/tmp/input_benchmark.json', 'Where to write the JSON results.'
)


def _timed(fn):
  start = time.perf_counter()
  result = fn()
  return result, time.perf_counter() - start


def time_prepare(data_dir: str) -> dict:
  """Images/s of preparing both samples into `data_dir`."""
  results = {}
  for name, manual_dir in (
    ('oxford_iiit_pet', _MANUAL_DIR.value),
    (data_lib.OOD_DATASET, _OOD_MANUAL_DIR.value),
  ):
    builder, seconds = _timed(
      functools.partial(
        data_lib.prepare_dataset,
        name,
        manual_dir=manual_dir,
        data_dir=data_dir,
      )
    )
    count = sum(split.num_examples for split in builder.info.splits.values())
    results[name] = {
      'examples': count,
      'seconds': seconds,
      'images_per_s': count / seconds,
    }
  return results


def cpu_ms_per_image(
  config, split: str, count: int = 200, draft_fraction: float = 1.0
) -> float:
  """Single-thread CPU ms per example: read, decode (JPEG draft at
  `draft_fraction` of the target side), squash, CAM mask."""
  source = data_lib.load_split_sources(config, [split])[split]
  count = min(count, len(source))
  start = time.process_time()
  for i in range(count):
    example = data_lib.decode(
      source[i],
      task=config.task,
      boundary_is_foreground=config.boundary_is_foreground,
      draft_size=jpeg_draft.draft_size(config.image_size, draft_fraction),
    )
    data_lib.to_model_input(
      example,
      image_size=config.image_size,
      cam_size=(_CAM.value,) * 2,
      mask_resize=config.mask_resize,
      normalize=config.normalize,
      with_pixel_mask=False,
    )
  return (time.process_time() - start) / count * 1e3


def time_train(config) -> dict:
  """Images/s of the train iterator, first batch (start-up) excluded."""
  iterator, startup = _timed(
    lambda: data_lib.create_train_iterator(
      config,
      cam_size=(_CAM.value,) * 2,
      global_batch_size=_BATCH_SIZE.value,
      num_devices=1,
      seed=0,
    )
  )
  _, first = _timed(lambda: next(iterator))
  cpu = time.process_time()
  _, seconds = _timed(
    lambda: [next(iterator) for _ in range(_NUM_BATCHES.value)]
  )
  cpu = time.process_time() - cpu
  iterator.close()
  images = _NUM_BATCHES.value * _BATCH_SIZE.value
  return {
    'startup_s': startup + first,
    'seconds': seconds,
    'images_per_s': images / seconds,
    # CPU of this process only: all of it with workers=0.
    'main_process_cpu_ms_per_image': cpu / images * 1e3,
    'main_process_images_per_s_per_core': images / cpu,
  }


def time_ood(config) -> dict:
  """Images/s of one evaluation pass over Cats-vs-Dogs."""
  iterator = data_lib.create_eval_iterator(
    config,
    'ood',
    cam_size=(_CAM.value,) * 2,
    global_batch_size=_BATCH_SIZE.value,
    num_devices=1,
  )
  weights, seconds = _timed(lambda: [b['weight'].sum() for b in iterator])
  count = int(sum(weights))
  return {
    'examples': count,
    'seconds': seconds,
    'images_per_s': count / seconds,
  }


def time_trains(config) -> dict:
  """`time_train` for each worker count (and the cache), each
  `device_preprocessing` value."""
  results = {}
  for on_device in _DEVICE_PREPROCESSING.value:
    on_device = on_device.lower() in ('1', 'true', 'on')
    config.device_preprocessing = on_device
    suffix = f', device_preprocessing={"on" if on_device else "off"}'
    for workers in map(int, _WORKERS.value):
      config.num_workers = workers
      results[f'workers={workers}{suffix}'] = time_train(config)
    config.num_workers = 0
    if _CACHE.value:
      config.cache_decoded = True
      results[f'cache_decoded{suffix}'] = time_train(config)
      config.cache_decoded = False
  return results


def time_gather(batch_size: int, num_batches: int = 10) -> dict:
  """CPU ms per `CachedBatches` batch, device_preprocessing off and on."""
  size, cam, n = _IMAGE_SIZE.value, (_CAM.value,) * 2, 2 * batch_size
  rng = np.random.default_rng(0)
  cached = cache_lib.Cached(
    images=rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
    fgs=None,
    masks=np.ones((n, *cam), np.float32),
    pixel_masks=None,
    labels=np.zeros(n, np.int32),
    indices=np.arange(n, dtype=np.int32),
    groups=np.zeros(n, np.int32),
    file_names=('',) * n,
  )
  results = {}
  for on_device in (False, True):
    keys = ('image', 'mask', 'label', 'group')
    batches = cache_lib.CachedBatches(
      cached,
      batch_size=batch_size,
      num_devices=1,
      shuffle_seed=0,
      augment_seed=1,
      flip=_AUGMENT_FLIP.value,
      normalize=_NORMALIZE.value,
      keys=keys + ('flip',) * (on_device and _AUGMENT_FLIP.value),
      device_preprocessing=on_device,
    )
    batches[0]  # pylint: disable=pointless-statement
    start = time.process_time()
    for k in range(1, num_batches + 1):
      batches[k]  # pylint: disable=pointless-statement
    ms = (time.process_time() - start) / num_batches * 1e3
    results[f'device_preprocessing={"on" if on_device else "off"}'] = {
      'ms_per_batch': ms,
      'images_per_s_per_core': batch_size / ms * 1e3,
    }
  return results


def environment() -> dict:
  return {
    'machine': platform.machine(),
    'cpus': os.cpu_count(),
    'python': sys.version.split()[0],
    'numpy': np.__version__,
    'pillow': PIL.__version__,
    'tensorflow_datasets': tfds.__version__,
    'grain': _package_version('grain'),
    'loadavg_1min': os.getloadavg()[0],
  }


def _package_version(name: str) -> str:
  from importlib import metadata  # pylint: disable=g-import-not-at-top

  return metadata.version(name)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  results = {
    'environment': environment(),
    'settings': {
      'image_size': _IMAGE_SIZE.value,
      'cam': _CAM.value,
      'batch_size': _BATCH_SIZE.value,
      'num_batches': _NUM_BATCHES.value,
      'prefetch': _PREFETCH.value,
      'augment_flip': _AUGMENT_FLIP.value,
      'normalize': _NORMALIZE.value,
    },
  }
  with tempfile.TemporaryDirectory() as data_dir:
    prepare = time_prepare(data_dir)
    config = data_lib.default_config()
    config.update(
      dict(
        manual_dir=_MANUAL_DIR.value,
        ood_manual_dir=_OOD_MANUAL_DIR.value,
        tfds_data_dir=data_dir,
        image_size=_IMAGE_SIZE.value,
        prefetch=_PREFETCH.value,
        augment_flip=_AUGMENT_FLIP.value,
        normalize=_NORMALIZE.value,
      )
    )
    if _GATHER_BATCH.value:
      results['gather'] = time_gather(_GATHER_BATCH.value)
    results['train'] = time_trains(config)
    if not _SKIP_PREPARE_ROWS.value:
      results['prepare'] = prepare
      results.update(time_reading(config))
  results['environment']['loadavg_1min_end'] = os.getloadavg()[0]
  print_table(results)
  Path(_OUTPUT.value).write_text(json.dumps(results, indent=2))
  print(f'Wrote {_OUTPUT.value}')


def time_reading(config) -> dict:
  """The CPU-time rows and the evaluation pass."""
  results = {}
  results['cpu_ms_per_image'] = {
    'oxford_iiit_pet': cpu_ms_per_image(config, 'test'),
    'cats_vs_dogs': cpu_ms_per_image(config, 'ood'),
  }
  source = data_lib.load_split_sources(config, ['test'])['test']
  records = [source[i] for i in range(min(200, len(source)))]
  results['draft'] = {}
  for fraction in map(float, _DRAFT_FRACTIONS.value):
    name = f'oxford_iiit_pet_draft_{fraction:g}'
    results['cpu_ms_per_image'][name] = cpu_ms_per_image(
      config, 'test', draft_fraction=fraction
    )
    results['draft'][name] = jpeg_draft.draft_difference(
      records, config.image_size, fraction, config.task
    )
  for store_format in ('jpeg', 'raw'):  # Pre-squashed when preparing.
    stored = config.copy_and_resolve_references()
    stored.store_size = _IMAGE_SIZE.value
    stored.store_format = store_format
    results['cpu_ms_per_image'][f'oxford_iiit_pet_stored_{store_format}'] = (
      cpu_ms_per_image(stored, 'test')
    )
  results['ood'] = time_ood(config)
  return results


def print_table(results: dict) -> None:
  rows = [
    (f'prepare {name}', r['images_per_s'], f'{r["examples"]} examples')
    for name, r in results.get('prepare', {}).items()
  ]
  rows += [
    (f'1 thread, CPU time: {name}', 1e3 / ms, f'{ms:.2f} ms/image')
    for name, ms in results.get('cpu_ms_per_image', {}).items()
  ]
  rows += [
    (
      f'JPEG draft vs full decode: {name}',
      float('nan'),
      f'{r["reduced_by_the_draft"]}/{r["images"]} images reduced, mean |diff| '
      f'{r["mean_abs_difference"]:.4f} (worst image {r["max_image_mean_abs_difference"]:.4f})',
    )
    for name, r in results.get('draft', {}).items()
  ]
  rows += [
    (
      f'train pets {name}',
      r['images_per_s'],
      f'start-up {r["startup_s"]:.1f} s, main-process CPU '
      f'{r["main_process_cpu_ms_per_image"]:.2f} ms/image '
      f'({r["main_process_images_per_s_per_core"]:.0f} images/s per core)',
    )
    for name, r in results['train'].items()
  ]
  rows += [
    (
      f'gather {_GATHER_BATCH.value} cached images, {name}',
      r['images_per_s_per_core'],
      f'{r["ms_per_batch"]:.1f} ms CPU per batch (per core)',
    )
    for name, r in results.get('gather', {}).items()
  ]
  if 'ood' in results:
    rows.append(
      (
        'eval cats_vs_dogs (ood), workers=0',
        results['ood']['images_per_s'],
        f'{results["ood"]["examples"]} examples',
      )
    )
  print(f'{"what":60s} {"images/s":>9s}  notes')
  for what, rate, note in rows:
    print(f'{what:60s} {rate:9.0f}  {note}')
  env = results['environment']
  print(
    f'({env["cpus"]} CPUs, load average {env["loadavg_1min"]:.1f} -> '
    f'{env["loadavg_1min_end"]:.1f})'
  )


if __name__ == '__main__':
  app.run(main)
