"""The training-config schema: every config's keys in it, unknown keys refused,
old `config.json` files completed (and resumed) from its defaults."""

import importlib
import json
import logging

import pytest
from test_train import tiny_config

from cco_jax import config_schema
from cco_jax import configuration
from cco_jax import errors
from cco_jax import restore
from cco_jax import train
from cco_jax.data import config as data_config

CONFIG_MODULES = ('pets', 'folder', 'isic', 'waterbirds', 'spurious')


def _variants():
  for name in CONFIG_MODULES:
    module = importlib.import_module(f'experiments.configs.{name}')
    for variant in module.VARIANTS:
      yield f'{name}:{variant}', module.get_config(variant)


@pytest.mark.parametrize('name, config', list(_variants()))
def test_every_config_variant_has_exactly_the_schemas_keys(name, config):
  assert config_schema.unknown_keys(config) == [], name
  assert config_schema.missing_keys(config) == [], name
  config_schema.check_known(config)


def test_schema_has_the_data_schema_and_one_home_per_default():
  config = config_schema.default_config()
  assert config.data.to_dict() == data_config.default_config().to_dict()
  # The values the library read with `.get(key, default)` before the schema.
  assert config.model.sync_batch_norm is True
  assert config.model.pointwise_as_dot is True
  assert config.model.init_from == ''
  assert config.per_device_batch_size == 0
  assert config.per_device_eval_batch_size == 0
  assert config.figure_every_evals == 0
  assert config.eval_cache_mb == 512
  assert config.async_checkpoints is True
  assert config.best_metric == 'accuracy'
  assert config.rng_impl == ''
  assert config.loss.group_counts == ()


@pytest.mark.parametrize(
  'key, suggestion',
  [('model.num_filter', 'model.num_filters'), ('lerning_rate', None)],
)
def test_an_unknown_key_is_refused_in_one_line(key, suggestion):
  config = config_schema.default_config()
  *path, last = key.split('.')
  node = config
  for part in path:
    node = node[part]
  node[last] = 1
  with pytest.raises(errors.UserError) as error:
    config_schema.check_known(config)
  message = str(error.value)
  assert '\n' not in message and repr(key) in message
  if suggestion:
    assert f'did you mean {suggestion!r}' in message
  with pytest.raises(errors.UserError):
    config_schema.complete(config)


def test_unknown_key_stops_training_before_anything_is_written(tmp_path):
  config = config_schema.default_config()
  config.num_train_step = 3  # Misspelt: num_train_steps.
  workdir = tmp_path / 'run'
  with pytest.raises(errors.UserError, match="'num_train_step'"):
    train.train_and_evaluate(config, str(workdir))
  assert not workdir.exists()


def _drop(tree: dict, dotted: str) -> None:
  *path, last = dotted.split('.')
  for part in path:
    tree = tree[part]
  del tree[last]


OLD_MISSING = (
  'figure_every_evals',
  'model.pointwise_as_dot',
  'data.store_size',
)


def test_complete_fills_what_an_old_config_json_lacks_and_says_so(
  tmp_path, caplog
):
  config = config_schema.default_config()
  config.model.stage_sizes = (1, 1, 1, 1)
  config.figure_every_evals = 3
  saved = json.loads(config.to_json_best_effort())
  for key in OLD_MISSING:
    _drop(saved, key)
  saved['no_longer_known'] = 1
  path = tmp_path / 'config.json'
  path.write_text(json.dumps(saved))
  with caplog.at_level(logging.INFO, logger='absl'):
    loaded = config_schema.load_saved(path)
  messages = [r.getMessage() for r in caplog.records]
  assert loaded.figure_every_evals == 0  # The default, not the dropped 3.
  assert loaded.model.stage_sizes == (1, 1, 1, 1)  # JSON list -> tuple.
  assert config_schema.missing_keys(loaded) == []
  assert 'no_longer_known' not in loaded
  filled = [m for m in messages if 'lacks 3 key(s)' in m]
  assert filled and all(k in filled[0] for k in OLD_MISSING)
  assert any('no_longer_known' in m for m in messages)
  # A complete config comes back equal.
  assert config_schema.complete(config).to_dict() == config.to_dict()


def test_old_workdir_without_new_keys_resumes_and_restores(
  tmp_path, synthetic_pets_dir, synthetic_cvd_dir, synthetic_data_dir
):
  """A run whose config.json predates keys: resumed, then restored."""
  dirs = (synthetic_pets_dir, synthetic_cvd_dir, synthetic_data_dir)
  workdir = tmp_path / 'old'
  train.train_and_evaluate(tiny_config(*dirs, num_train_steps=2), str(workdir))
  path = workdir / 'config.json'
  saved = json.loads(path.read_text())
  for key in OLD_MISSING:
    _drop(saved, key)
  path.write_text(json.dumps(saved))

  config = tiny_config(*dirs, num_train_steps=4)
  configuration.check_resumable(config, str(workdir))  # No difference.
  restored = restore.load_config(str(workdir))
  assert restored.model.pointwise_as_dot is True
  assert restored.data.store_size == 0
  train.train_and_evaluate(config, str(workdir))
  records = [json.loads(line) for line in open(workdir / 'metrics.jsonl')]
  assert [r['step'] for r in records if 'train_loss' in r] == [2, 4]
  # The resumed run records its full config.
  assert config_schema.missing_keys(json.loads(path.read_text())) == []
  assert restore.restore_model(str(workdir), step='last').step == 4
