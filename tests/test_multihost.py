"""Several hosts, really run: two JAX processes on this machine.

`python -m experiments.pets` is started twice with JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES and JAX_PROCESS_ID (the documented interface; the processes
meet over 127.0.0.1 and run their collectives over gloo), 2 virtual CPU devices
each: they train the tiny `cpu` config, stop, resume and evaluate; then one
process evaluates the checkpoint they wrote with `experiments.evaluate`.

All runs share one `$CCO_COMPILATION_CACHE` (what a user's resumed run does):
the resumed processes and the evaluation load the programs the first run
compiled instead of compiling them again.
"""

import json
import os
from pathlib import Path
import socket
import subprocess
import sys

import numpy as np
import synthetic_data
import xla_flags

REPO = Path(__file__).resolve().parents[1]
NUM_PROCESSES = 2


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _run_processes(workdir, data_dirs, steps, tmp_path) -> list[str]:
  """Both processes of one training run; returns their logs (stderr)."""
  pets_dir, cvd_dir, tfds_dir = data_dirs
  port = _free_port()
  command = [
    sys.executable,
    '-m',
    'experiments.pets',
    '--config=experiments/configs/pets.py:cpu',
    f'--workdir={workdir}',
    f'--config.data.manual_dir={pets_dir}',
    f'--config.data.ood_manual_dir={cvd_dir}',
    f'--config.data.tfds_data_dir={tfds_dir}',
    '--config.data.image_size=32',
    '--config.model.num_filters=4',
    '--config.batch_size=8',
    '--config.eval_batch_size=16',
    f'--config.num_train_steps={steps}',
    '--config.log_every_steps=2',
    '--config.eval_every_steps=2',
    '--config.num_figure_examples=2',
  ]
  processes = []
  for index in range(NUM_PROCESSES):
    env = dict(
      os.environ,
      XLA_FLAGS=xla_flags.for_devices(2),
      JAX_PLATFORMS='cpu',
      JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}',
      JAX_NUM_PROCESSES=str(NUM_PROCESSES),
      JAX_PROCESS_ID=str(index),
      CCO_COMPILATION_CACHE=str(tmp_path / 'xla_cache'),
    )
    log = open(tmp_path / f'process_{index}_steps_{steps}.log', 'w+')
    processes.append(
      (
        subprocess.Popen(
          command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT
        ),
        log,
      )
    )
  logs = []
  try:
    for process, _ in processes:
      process.wait(timeout=600)
  finally:
    for process, log in processes:
      if process.poll() is None:
        process.kill()
        process.wait()
      log.seek(0)
      logs.append(log.read())
      log.close()
  for (process, _), text in zip(processes, logs):
    assert process.returncode == 0, text[-4000:]
  return logs


def test_two_processes_train_resume_and_evaluate(
  tmp_path, synthetic_pets_dir, synthetic_cvd_dir, synthetic_data_dir
):
  data_dirs = (synthetic_pets_dir, synthetic_cvd_dir, synthetic_data_dir)
  workdir = tmp_path / 'run'
  logs = _run_processes(workdir, data_dirs, 2, tmp_path)
  for index, log in enumerate(logs):
    assert f'JAX process {index}/2' in log
    assert 'on 4 devices of 2 processes' in log
    assert str(tmp_path / 'xla_cache') in log  # The cache is in use.

  logs = _run_processes(workdir, data_dirs, 4, tmp_path)
  for log in logs:
    assert 'Resumed from step 2' in log

  # Each host's own iterator state was saved and restored.
  data = json.loads(
    (workdir / 'checkpoints' / '4' / 'data' / 'metadata').read_text()
  )
  states = [json.loads(s) for s in data['iterators']]
  assert [s['fingerprint']['process_index'] for s in states] == [0, 1]
  assert all(s['next_batch'] == 4 for s in states)

  records = [json.loads(line) for line in open(workdir / 'metrics.jsonl')]
  assert [r['step'] for r in records if 'train_loss' in r] == [2, 4]
  assert [r['step'] for r in records if 'eval_accuracy' in r] == [2, 4]
  assert all(np.isfinite(r['train_loss']) for r in records if 'train_loss' in r)
  # Every example is evaluated exactly once across the two hosts.
  final = json.loads((workdir / 'final_metrics.json').read_text())
  assert final['step'] == 4
  assert final['test_count'] == synthetic_data.NUM_TEST
  assert final['ood_count'] == synthetic_data.NUM_CVD_DECODABLE
  assert list((workdir / 'figures').glob('cams_step_*.png'))

  # The checkpoint the two processes wrote evaluates in one process.
  result = subprocess.run(
    [
      sys.executable,
      '-m',
      'experiments.evaluate',
      f'--workdir={workdir}',
      '--num_figure_examples=2',
    ],
    cwd=REPO,
    env=dict(
      os.environ,
      JAX_PLATFORMS='cpu',
      CCO_COMPILATION_CACHE=str(tmp_path / 'xla_cache'),
    ),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, result.stderr[-4000:]
  report = json.loads(Path(result.stdout.strip().splitlines()[-1]).read_text())
  assert report['count'] == synthetic_data.NUM_TEST
  assert report['step'] in (2, 4)
