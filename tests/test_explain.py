"""Explanations of any image: identity, channel maps, autodiff equality, files,
masks."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest
from test_models import random_variables

from cco_jax import explain as explain_lib
from cco_jax import head_features
from cco_jax import models
from cco_jax.data import transforms
from experiments.benchmarks import explanation_speed as bench

SIZE = 16


def _model(classes=5, cam_faithful=True, seed=0, batch=3):
  model = models.create_model(
    'resnet18',
    classes,
    cam_faithful=cam_faithful,
    num_filters=4,
    stem='strided',
    stage_sizes=(1, 1),
  )
  variables = random_variables(model, (batch, SIZE, SIZE, 3), seed)
  return model, variables


def _images(batch, seed=0):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(batch, SIZE, SIZE, 3)).astype(np.float32)


@pytest.mark.parametrize('cam_faithful,batch', [(True, 3), (False, 5)])
def test_identity_and_contrastive_maps(cam_faithful, batch):
  model, variables = _model(cam_faithful=cam_faithful, seed=batch)
  explainer = explain_lib.Explainer(model, variables, batch_size=4)
  result = explainer.explain(_images(batch, seed=batch))
  logits, _ = model.apply(variables, _images(batch, seed=batch), train=False)
  np.testing.assert_allclose(result.logits, logits, rtol=1e-5, atol=1e-5)
  grid = models.cam_size(model, SIZE)
  assert grid == ((8, 8) if cam_faithful else (4, 4))
  assert result.cams.shape == (batch, *grid, 5)
  np.testing.assert_allclose(
    result.map_sums + result.bias, result.logits, rtol=1e-4, atol=1e-4
  )
  assert result.identity_error.shape == (batch,)
  assert np.all(result.identity_error <= 1e-4 * (1 + np.abs(logits).max()))
  if not cam_faithful:
    assert np.abs(result.bias).max() > 0.1  # the bias matters
  np.testing.assert_array_equal(result.target, np.argmax(logits, -1))
  np.testing.assert_allclose(result.probabilities.sum(-1), 1, rtol=1e-5)
  # Contrastive maps against the target: zero at the target, differences of
  # logits (minus biases) elsewhere.
  t = result.target
  rows = np.arange(batch)
  assert np.all(result.contrastive[rows, ..., t] == 0)
  expected = (logits - result.bias)[rows, t][:, None] - (logits - result.bias)
  np.testing.assert_allclose(
    result.contrastive.sum((1, 2)), expected, rtol=1e-4, atol=1e-4
  )
  # A given target.
  given = explainer.explain(_images(batch, seed=batch), targets=2)
  assert np.all(given.contrastive[..., 2] == 0)
  np.testing.assert_allclose(
    given.contrastive, given.cams[..., 2:3] - given.cams, atol=1e-6
  )
  with pytest.raises(ValueError, match=r'targets must be class indices'):
    explainer.explain(_images(batch), targets=7)
  with pytest.raises(ValueError, match=r'\(B, S, S, 3\)'):
    explainer.explain(_images(1)[0])


@pytest.mark.parametrize('against', [None, 1])
def test_channel_maps_sum_to_the_class_map(against):
  model, variables = _model(seed=3)
  explainer = explain_lib.Explainer(model, variables)
  images = _images(2, seed=4)
  result = explainer.explain(images, targets=against)
  decomposition = explainer.channels(images, 3, k=3, against=against)
  assert decomposition.maps.shape == (2, 8, 8, 3)
  np.testing.assert_allclose(
    decomposition.maps.sum(-1) + decomposition.rest,
    decomposition.class_map,
    atol=1e-6,
  )
  if against is None:
    expected = result.cams[..., 3]
  else:  # M_3 - M_1 = -K[..., 3] with K taken against class 1.
    expected = -result.contrastive[..., 3]
  np.testing.assert_allclose(decomposition.class_map, expected, atol=1e-5)
  np.testing.assert_allclose(
    decomposition.contributions, decomposition.maps.sum((1, 2)), atol=1e-6
  )
  # The k channels are the largest by |contribution|, in decreasing order.
  everything = explainer.channels(images, 3, k=1000, against=against)
  assert everything.maps.shape[-1] == 4 * 2  # all channels of the last stage
  np.testing.assert_allclose(everything.rest, 0, atol=1e-6)
  magnitudes = np.abs(everything.contributions)
  assert np.all(np.diff(magnitudes, axis=-1) <= 0)
  np.testing.assert_array_equal(
    decomposition.channels, everything.channels[:, :3]
  )


def _autodiff_hirescam(model, variables, images, class_index):
  """HiResCAM the textbook way: d logit / d A times A, summed over channels,
  with the gradient taken through the real head by autodiff."""

  def logit_of_delta(delta):
    def interceptor(next_fun, args, kwargs, context):
      if isinstance(context.module, models.CamHead):
        args = (args[0] + delta,)
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
      logits, _ = model.apply(variables, images, train=False)
    return logits[:, class_index].sum()

  features = head_features.forward_with_features(model, variables, images)[2]
  grads = jax.grad(logit_of_delta)(jnp.zeros_like(features))
  return np.asarray((grads * features).sum(-1))


def test_maps_equal_autodiff_hirescam_and_bound_gradcam():
  model, variables = _model(classes=4, cam_faithful=False, seed=7)
  images = _images(3, seed=8)
  result = explain_lib.explain(model, variables, images)
  for c in range(4):
    np.testing.assert_allclose(
      result.cams[..., c],
      _autodiff_hirescam(model, variables, images, c),
      rtol=1e-4,
      atol=1e-6,
    )
  # The library's post-hoc maps, one class per image.
  classes = jnp.array([0, 3, 1])
  rows = np.arange(3)
  ours = result.cams[rows, ..., np.asarray(classes)]
  np.testing.assert_allclose(
    head_features.autodiff_hirescam(model, variables, images, classes),
    ours,
    rtol=1e-4,
    atol=1e-6,
  )
  # Behind global average pooling, Grad-CAM is the class map clipped at 0.
  np.testing.assert_allclose(
    head_features.gradcam(model, variables, images, classes),
    np.maximum(ours, 0),
    rtol=1e-4,
    atol=1e-6,
  )


def test_benchmark_checks_its_maps():
  result = bench.measure(
    'resnet18',
    3,
    16,
    2,
    num_filters=4,
    autodiff_classes=1,
    repeats=1,
    stage_sizes=(1, 1),
    stem='small',
  )
  assert set(result['seconds']) == {'ours', 'hirescam', 'gradcam'}
  assert all(v < 1e-5 for v in result['relative_map_error'].values())
  assert '| ours |' in bench.table(result, 2)


def _write_image(path, seed, size=(23, 19)):
  rng = np.random.default_rng(seed)
  pixels = rng.integers(0, 256, size[::-1] + (3,), dtype=np.uint8)
  Image.fromarray(pixels).save(path)
  return pixels


@pytest.mark.parametrize('normalize', [False, True])
def test_file_paths_get_the_evaluation_preprocessing(tmp_path, normalize):
  model, variables = _model(seed=1)
  paths = []
  expected = []
  for i in range(3):
    path = tmp_path / f'image_{i}.png'
    pixels = _write_image(path, i)
    paths.append(str(path))
    squashed = np.asarray(
      Image.fromarray(pixels).resize((SIZE, SIZE), Image.Resampling.BILINEAR),
      np.float32,
    )
    squashed = squashed / 255
    if normalize:
      squashed = (squashed - np.array([0.485, 0.456, 0.406])) / np.array(
        [0.229, 0.224, 0.225]
      )
    expected.append(squashed.astype(np.float32))
  explainer = explain_lib.Explainer(
    model, variables, image_size=SIZE, normalize=normalize
  )
  from_files = explainer.explain(paths)
  from_arrays = explainer.explain(np.stack(expected))
  np.testing.assert_allclose(from_files.images, np.stack(expected), atol=1e-5)
  np.testing.assert_allclose(from_files.logits, from_arrays.logits, atol=1e-5)
  assert from_files.paths == paths
  one = explainer.explain(paths[1])
  np.testing.assert_allclose(one.logits[0], from_arrays.logits[1], atol=1e-5)

  corrupt = tmp_path / 'corrupt.jpg'
  corrupt.write_bytes(b'not an image at all')
  with pytest.raises(ValueError, match=r'corrupt\.jpg: not a readable image'):
    explainer.explain([paths[0], str(corrupt)])
  with pytest.raises(ValueError, match=r'image_size'):
    explain_lib.Explainer(model, variables).explain(paths)


def test_mask_influence(tmp_path):
  model, variables = _model(seed=2)
  images = _images(2, seed=5)
  rng = np.random.default_rng(0)
  # Masks constant on each CAM cell (2 x 2 pixels per cell of an 8 x 8 grid).
  cells = (rng.random((2, 8, 8)) < 0.5).astype(np.float32)
  masks = np.kron(cells, np.ones((2, 2), np.float32))
  explainer = explain_lib.Explainer(model, variables, image_size=SIZE)
  result = explainer.explain(images, masks=masks)
  magnitude = np.abs(result.contrastive.astype(np.float64)).sum(-1)
  np.testing.assert_allclose(result.cam_masks, cells)
  np.testing.assert_allclose(
    result.influence['fg'], (magnitude * cells).sum((1, 2)), rtol=1e-5
  )
  np.testing.assert_allclose(
    result.influence['bg'], (magnitude * (1 - cells)).sum((1, 2)), rtol=1e-5
  )
  np.testing.assert_allclose(
    result.influence['fg'] + result.influence['bg'],
    result.influence['net'],
    rtol=1e-5,
  )
  # The same masks as Pets trimaps on disk (1 = pet, 2 = background).
  paths = []
  for i, mask in enumerate(masks):
    path = tmp_path / f'trimap_{i}.png'
    Image.fromarray(np.where(mask > 0, 1, 2).astype(np.uint8)).save(path)
    paths.append(str(path))
  from_files = explainer.explain(images, masks=paths)
  for key in ('fg', 'bg', 'net'):
    np.testing.assert_allclose(
      from_files.influence[key], result.influence[key], rtol=1e-6
    )
  with pytest.raises(ValueError, match=r'masks must be \(2, S, S\)'):
    explainer.explain(images, masks=masks[:1])


def write_tiny_run(workdir, config, best_step=2, last_step=4):
  """A run directory as training leaves it, without training: config.json,
  run.json (derived from the config and the data, as `experiments.run_record`
  does) and checkpoints at `best_step` (validation accuracy 0.9) and
  `last_step` (0.5), whose parameters differ. Returns {step: variables}."""
  from cco_jax import checkpointing  # pylint: disable=g-import-not-at-top
  from cco_jax import model_config  # pylint: disable=g-import-not-at-top
  from cco_jax import optimizers  # pylint: disable=g-import-not-at-top
  from cco_jax import run_record  # pylint: disable=g-import-not-at-top
  from cco_jax import train_step  # pylint: disable=g-import-not-at-top
  from cco_jax.data import info  # pylint: disable=g-import-not-at-top

  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(config.to_json_best_effort(indent=2))
  model = model_config.create_model(config, info.num_classes(config.data))
  tx = optimizers.create_optimizer(config.optimizer, 1, 1, 1)
  state = train_step.create_train_state(
    jax.random.key(0), model, config.data.image_size, tx
  )
  manager = checkpointing.create_manager(str(workdir))
  saved = {}
  for step, accuracy in ((best_step, 0.9), (last_step, 0.5)):
    state = state.replace(
      params=jax.tree.map(lambda x, s=step: x * 1.5 + 0.01 * s, state.params),
      step=jnp.asarray(step, jnp.int32),
    )
    checkpointing.save(
      manager, step, state, jax.random.key(1), {}, {'eval_accuracy': accuracy}
    )
    saved[step] = {'params': state.params, 'batch_stats': state.batch_stats}
  manager.close()
  run_record.derive(config).save(run_record.path_of(workdir))
  return saved


@pytest.fixture(scope='module')
def tiny_run(
  tmp_path_factory, synthetic_pets_dir, synthetic_cvd_dir, synthetic_data_dir
):
  from test_train import tiny_config  # pylint: disable=g-import-not-at-top

  workdir = tmp_path_factory.mktemp('explain_run')
  config = tiny_config(
    synthetic_pets_dir, synthetic_cvd_dir, synthetic_data_dir
  )
  saved = write_tiny_run(str(workdir), config)
  return workdir, saved


def test_restore_chooses_best_last_or_a_step(tiny_run):
  from cco_jax import restore  # pylint: disable=g-import-not-at-top

  workdir, saved = tiny_run
  from cco_jax import checkpointing  # pylint: disable=g-import-not-at-top

  manager = checkpointing.create_manager(str(workdir))
  assert restore.choose_step(manager, 'last') == (4, 'last')
  assert restore.choose_step(manager, 'best') == (2, 'best')
  manager.close()
  for step, expected_step, how in (('best', 2, 'best'), (4, 4, 'step')):
    run = restore.restore_model(str(workdir), step=step)
    assert (run.step, run.checkpoint) == (expected_step, how)
    size = run.record.image_size
    x = np.random.default_rng(0).normal(size=(2, size, size, 3))
    expected, _ = run.model.apply(saved[expected_step], x, train=False)
    logits, _ = run.predict_fn()(x.astype(np.float32))
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match=r'No checkpoint at step 3.*\[2, 4\]'):
    restore.restore_model(str(workdir), step=3)
  with pytest.raises(FileNotFoundError, match='config.json'):
    restore.restore_model(str(workdir / 'nope'))


def test_probabilities_read_the_logits_as_the_objective_did(tiny_run):
  """Softmax for softmax objectives; for sigmoid heads (bce, ace_bce) each
  class's own sigmoid, which need not sum to one."""
  import dataclasses  # pylint: disable=g-import-not-at-top

  import ml_collections  # pylint: disable=g-import-not-at-top

  from cco_jax import restore  # pylint: disable=g-import-not-at-top

  logits = np.random.default_rng(3).normal(size=(5, 3)) * 4
  soft = explain_lib.probabilities(logits)
  np.testing.assert_allclose(soft.sum(-1), 1.0, rtol=1e-12)
  np.testing.assert_allclose(
    soft, np.exp(logits) / np.exp(logits).sum(-1, keepdims=True), rtol=1e-12
  )
  np.testing.assert_allclose(
    explain_lib.probabilities(logits, 'sigmoid'),
    1 / (1 + np.exp(-logits)),
    rtol=1e-12,
  )
  run = restore.restore_model(str(tiny_run[0]), step='last')
  assert explain_lib.Explainer.from_trained(run).head == 'softmax'
  assert run.record.head == 'softmax'
  config = ml_collections.ConfigDict(run.config.to_dict())
  config.loss.name = 'ace_bce'
  # The run record says how to read the logits; a record written before it
  # did (head None) is read by the objective registry from the config.
  for record in (
    dataclasses.replace(run.record, head='sigmoid'),
    dataclasses.replace(run.record, head=None),
  ):
    sigmoid = explain_lib.Explainer.from_trained(
      dataclasses.replace(run, config=config, record=record)
    )
    assert sigmoid.head == 'sigmoid'
  size = run.record.image_size
  x = np.random.default_rng(0).normal(size=(2, size, size, 3))
  result = sigmoid.explain(x.astype(np.float32))
  np.testing.assert_allclose(
    result.probabilities, 1 / (1 + np.exp(-result.logits)), rtol=1e-5
  )


def test_explain_entry_point_end_to_end(
  tiny_run, tmp_path, synthetic_pets_dir, capsys
):
  from experiments import explain as cli  # pylint: disable=g-import-not-at-top

  tiny_run, _ = tiny_run
  images = sorted((synthetic_pets_dir / 'images').glob('*.jpg'))[:3]
  folder = tmp_path / 'mine'
  folder.mkdir()
  (folder / 'Bengal_7.png').write_bytes(images[1].read_bytes())
  _write_image(folder / 'other.png', 5)
  (folder / 'broken.jpg').write_bytes(b'\xff\xd8 truncated')
  masks = synthetic_pets_dir / 'annotations' / 'trimaps'
  out = tmp_path / 'out'
  status = cli.run(
    str(tiny_run),
    str(out),
    [str(images[0]), str(folder), str(tmp_path / 'nothing_*.jpg')],
    step=2,
    masks=str(masks),
    batch_size=2,
  )
  printed = capsys.readouterr().out
  assert status == 1  # broken.jpg and the empty glob failed
  assert 'at step 2 (step checkpoint)' in printed
  report = json.loads((out / 'explanations.json').read_text())
  assert report['step'] == 2
  failed = sorted(os.path.basename(f['path']) for f in report['failed'])
  assert failed == ['broken.jpg', 'nothing_*.jpg']
  entries = report['images']
  assert [os.path.basename(e['path']) for e in entries] == [
    images[0].name,
    'Bengal_7.png',
    'other.png',
  ]
  names = report['class_names']
  for entry in entries:
    logits = np.array(entry['logits'])
    recon = np.array(entry['map_sums']) + np.array(entry['bias'])
    assert np.all(np.abs(logits - recon) <= 1e-4 * (1 + np.abs(logits)))
    assert entry['predicted_index'] == int(np.argmax(logits))
    assert entry['predicted_class'] == names[entry['predicted_index']]
    np.testing.assert_allclose(sum(entry['probabilities']), 1, rtol=1e-5)
    assert entry['map_shape'] == [4, 4]
    assert os.path.getsize(entry['figure']) > 0
  # Pets images have trimaps of the same stem; the others do not.
  assert set(entries[0]['influence']) == {'net', 'fg', 'bg', 'bg_share'}
  assert 'influence' not in entries[2]
  # No --labels: no true class, whatever the file names say (Bengal_7).
  assert [e['true_class'] for e in entries] == [None, None, None]

  # The best checkpoint by default, printed.
  best = tmp_path / 'best'
  status = cli.run(str(tiny_run), str(best), [str(images[0])], classes=['dog'])
  assert status == 0
  assert 'at step 2 (best checkpoint)' in capsys.readouterr().out
  (entry,) = json.loads((best / 'explanations.json').read_text())['images']
  assert entry['target_class'] == 'dog' and entry['target_index'] == 1


def test_paths_stems_and_skipped_files(tmp_path):
  from experiments import explain as cli  # pylint: disable=g-import-not-at-top

  for name in ('Cat/1.jpg', 'Dog/1.jpg', 'Dog/notes.txt'):
    (tmp_path / name).parent.mkdir(exist_ok=True)
    (tmp_path / name).write_bytes(b'')
  skipped = []
  paths = cli.expand_paths(
    [str(tmp_path), str(tmp_path / 'Cat' / '1.jpg')], skipped
  )
  assert [os.path.relpath(p, tmp_path) for p in paths] == [
    'Cat/1.jpg',
    'Dog/1.jpg',
  ]
  assert [os.path.relpath(p, tmp_path) for p in skipped] == ['Dog/notes.txt']
  assert cli.unique_stems(paths) == ['1', 'Dog_1']


def test_true_labels_come_only_from_a_labels_file(tmp_path):
  from cco_jax import errors  # pylint: disable=g-import-not-at-top
  from cco_jax import true_labels  # pylint: disable=g-import-not-at-top

  csv_path = tmp_path / 'labels.csv'
  csv_path.write_text(
    '\ufeffimage,label,split\nsub/Rex_1.jpg,dog,test\nIMG_0042.jpg,cat,test\n',
    encoding='utf-8',
  )
  labels = true_labels.read(str(csv_path), ('cat', 'dog'))
  assert labels.of('/photos/sub/Rex_1.jpg') == 'dog'  # By relative path.
  assert labels.of('elsewhere/IMG_0042.jpg') == 'cat'  # By file name.
  assert labels.of('x/Abyssinian_3.jpg') is None  # Never by a name rule.
  pets = tmp_path / 'test.txt'
  pets.write_text(
    '#NAME CLASS-ID SPECIES BREED-ID\nAbyssinian_3 1 1 1\n'
    'american_bulldog_12 2 2 1\n'
  )
  species = true_labels.read(str(pets), ('cat', 'dog'))
  assert species.of('x/Abyssinian_3.jpg') == 'cat'
  assert species.of('x/american_bulldog_12.jpg') == 'dog'
  breeds = true_labels.read(str(pets), ('Abyssinian', 'american_bulldog'))
  assert breeds.of('Abyssinian_3.jpg') == 'Abyssinian'
  with pytest.raises(errors.UserError, match=r"\['Abyssinian'.*not classes"):
    true_labels.read(str(pets), ('melanoma', 'nevus'))
  with pytest.raises(errors.UserError, match='no such file'):
    true_labels.read(str(tmp_path / 'none.csv'), ('cat', 'dog'))


def test_read_mask_file_reads_trimaps_and_binary_masks(tmp_path):
  trimap = np.array([[1, 2], [3, 2]], np.uint8)
  Image.fromarray(trimap).save(tmp_path / 'trimap.png')
  Image.fromarray(np.array([[255, 0], [0, 0]], np.uint8)).save(
    tmp_path / 'binary.png'
  )
  read = lambda name, boundary_is_foreground=False: transforms.read_mask_file(
    str(tmp_path / name),
    image_size=2,
    boundary_is_foreground=boundary_is_foreground,
  )
  np.testing.assert_array_equal(read('trimap.png'), [[1, 0], [0, 0]])
  np.testing.assert_array_equal(
    read('trimap.png', boundary_is_foreground=True), [[1, 0], [1, 0]]
  )
  np.testing.assert_array_equal(read('binary.png'), [[1, 0], [0, 0]])
  # A 0/1 mask is the 'folder' layout's: > 0 = object.
  Image.fromarray(np.array([[0, 1], [1, 1]], np.uint8)).save(
    tmp_path / 'ones.png'
  )
  np.testing.assert_array_equal(read('ones.png'), [[0, 1], [1, 1]])
  with pytest.raises(ValueError, match='missing.png'):
    read('missing.png')


def test_progress_logs_rate_and_eta_measured_after_the_first_batch(
  monkeypatch, caplog
):
  import logging  # pylint: disable=g-import-not-at-top

  from experiments import explain as cli  # pylint: disable=g-import-not-at-top

  # The first batch ends at 100 s (compilation); then 10 images per 10 s.
  clock = iter([100.0, 110.0, 115.0, 130.0])
  monkeypatch.setattr(cli.time, 'monotonic', lambda: next(clock))
  caplog.set_level(logging.INFO)
  progress = cli.Progress(40, batch_size=10, every_s=10)
  for done in (10, 20, 30, 40):
    progress.update(done)
  lines = [
    r.getMessage() for r in caplog.records if 'Explained' in r.getMessage()
  ]
  assert lines == [
    'Explained 20/40 images, 1.0 images/s, ETA 00:00:20.',  # Not 100 s/batch.
    'Explained 40/40 images, 1.0 images/s, ETA 00:00:00.',  # The end: always.
  ]
  # One batch: nothing to wait for, no progress lines.
  caplog.clear()
  clock = iter([1.0])
  cli.Progress(5, batch_size=10).update(5)
  assert not [r for r in caplog.records if 'Explained' in r.getMessage()]
