"""Preemption and a dead peer, with real processes (`python -m experiments.pets`).

Fault table (`PREEMPTIONS`, `test_preempted_run_resumes_bit_identically`):

  fault                                       -> expected outcome
  SIGTERM at a random step, one process       -> saves that step, exits 143;
  SIGTERM at a random step to process 1 of 2  -> both save the same step,
                                                 both exit 143;
  then the same command again                 -> resumes there; records and
                                                 every saved array (checksums)
                                                 equal an uninterrupted run's.
  a worker killed (-9) mid-run, two processes -> the other exits 75 within the
                                                 peer timeout, its last line
                                                 naming process 1 and the
                                                 resume command
                                                 (`test_dead_peer_...`);
  the coordinator killed (-9), two processes  -> the other exits 75, its last
                                                 line (its supervisor's)
                                                 naming process 0 and the
                                                 resume command
                                                 (`test_dead_coordinator_...`).

The processes compile once into a shared `$CCO_COMPILATION_CACHE`, with 2
virtual CPU devices each (the tiny `cpu` config at 32 px, width 4).
"""

import json
import os
from pathlib import Path
import random
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import xla_flags

from cco_jax import peers
from cco_jax import preemption

REPO = Path(__file__).resolve().parents[1]
# Long enough that a signal sent at a logged step in the first half always
# arrives before the run ends, however fast the machine (~150 steps/s here).
STEPS = 96


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.fixture(scope='module')
def launch(
  tmp_path_factory, synthetic_pets_dir, synthetic_cvd_dir, synthetic_data_dir
):
  """Starts a run's processes; returns `(processes, log paths)`."""
  cache = tmp_path_factory.getbasetemp() / 'preemption_xla_cache'

  def start(workdir: Path, num_processes: int, env=None):
    command = [
      sys.executable,
      '-m',
      'experiments.pets',
      '--config=experiments/configs/pets.py:cpu',
      f'--workdir={workdir}',
      f'--config.data.manual_dir={synthetic_pets_dir}',
      f'--config.data.ood_manual_dir={synthetic_cvd_dir}',
      f'--config.data.tfds_data_dir={synthetic_data_dir}',
      '--config.data.image_size=32',
      '--config.model.num_filters=4',
      '--config.batch_size=8',
      '--config.eval_batch_size=16',
      f'--config.num_train_steps={STEPS}',
      '--config.log_every_steps=4',
      '--config.eval_every_steps=12',
      '--config.num_figure_examples=0',
      '--config.eval_ood=False',
    ]
    port = _free_port()
    processes, logs = [], []
    workdir.mkdir(parents=True, exist_ok=True)
    for index in range(num_processes):
      process_env = dict(
        os.environ,
        XLA_FLAGS=xla_flags.for_devices(2),
        JAX_PLATFORMS='cpu',
        CCO_COMPILATION_CACHE=str(cache),
        **(env or {}),
      )
      if num_processes > 1:
        process_env.update(
          JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}',
          JAX_NUM_PROCESSES=str(num_processes),
          JAX_PROCESS_ID=str(index),
        )
      log = workdir.parent / f'{workdir.name}.{index}.{time.time_ns()}.log'
      with open(log, 'w') as f:
        processes.append(
          subprocess.Popen(
            command, cwd=REPO, env=process_env, stdout=f, stderr=f
          )
        )
      logs.append(log)
    return processes, logs

  return start


def _wait(processes, timeout=600) -> list[int]:
  try:
    return [p.wait(timeout=timeout) for p in processes]
  finally:
    for p in processes:
      if p.poll() is None:
        p.kill()
        p.wait()


def _wait_for_line(log: Path, text: str, process, timeout=600) -> None:
  deadline = time.monotonic() + timeout
  while text not in log.read_text():
    assert process.poll() is None, log.read_text()[-3000:]
    assert time.monotonic() < deadline, f'no {text!r} in {log}'
    time.sleep(0.05)


def _records(workdir: Path) -> list[dict]:
  """Training and evaluation records (no speeds, no identity checks)."""
  records = []
  for line in (workdir / 'metrics.jsonl').read_text().splitlines():
    record = json.loads(line)
    record.pop('train_steps_per_second', None)
    if set(record) - {'step', 'identity_error'}:
      records.append(record)
  return records


def _checksums(workdir: Path, step: int) -> dict:
  """The checksums of every array (and the iterator state) saved at `step`."""
  path = workdir / 'checkpoints' / str(step) / 'integrity' / 'metadata'
  return json.loads(path.read_text())['leaves']


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory, launch):
  """An uninterrupted run's workdir, per number of processes (made once)."""
  made = {}

  def get(num_processes: int) -> Path:
    if num_processes not in made:
      workdir = tmp_path_factory.mktemp('uninterrupted') / 'run'
      processes, logs = launch(workdir, num_processes)
      codes = _wait(processes)
      assert codes == [0] * num_processes, logs[0].read_text()[-3000:]
      made[num_processes] = workdir
    return made[num_processes]

  return get


PREEMPTIONS = {
  # fault: (processes, the processes that get the signal)
  'SIGTERM at a random step, one process': (1, [0]),
  'SIGTERM at a random step to process 1 of 2': (2, [1]),
}


@pytest.mark.parametrize('fault', list(PREEMPTIONS))
def test_preempted_run_resumes_bit_identically(
  tmp_path, launch, uninterrupted, fault
):
  num_processes, signalled = PREEMPTIONS[fault]
  reference = uninterrupted(num_processes)
  workdir = tmp_path / 'run'
  processes, logs = launch(workdir, num_processes)
  # A random logged step in the first half, then the signal at once (a
  # random sleep instead let a fast machine finish the run first).
  at = random.Random(fault).randrange(4, STEPS // 2 + 1, 4)
  _wait_for_line(logs[signalled[0]], f'step {at}/', processes[signalled[0]])
  for index in signalled:
    processes[index].send_signal(signal.SIGTERM)
  codes = _wait(processes)
  texts = [log.read_text() for log in logs]
  assert codes == [143] * num_processes, texts[0][-3000:]
  stops = set()
  for text in texts:
    line = text.strip().splitlines()[-1]
    assert 'Stopped by SIGTERM after saving the checkpoint of step' in line
    assert 'Run the same command again to resume' in line
    stops.add(int(line.split('checkpoint of step ')[1].split()[0]))
  assert len(stops) == 1, texts  # Every process saved the same step.
  (stop,) = stops
  assert at <= stop < STEPS
  assert (workdir / 'checkpoints' / str(stop) / 'integrity').is_dir()

  processes, logs = launch(workdir, num_processes)
  codes = _wait(processes)
  assert codes == [0] * num_processes, logs[0].read_text()[-3000:]
  assert f'Resumed from step {stop} ' in logs[0].read_text()
  assert _records(workdir) == _records(reference)
  assert _checksums(workdir, STEPS) == _checksums(reference, STEPS)
  final = json.loads((workdir / 'final_metrics.json').read_text())
  assert final == json.loads((reference / 'final_metrics.json').read_text())


def test_dead_peer_is_named_with_the_resume_command(tmp_path, launch):
  """Process 1 killed with SIGKILL: process 0 stops within the peer timeout
  (3 s here), and its last line says which process died and what to run."""
  workdir = tmp_path / 'run'
  processes, logs = launch(workdir, 2, env={peers.TIMEOUT_ENV: '3'})
  _wait_for_line(logs[1], 'step 4/', processes[1])
  processes[1].send_signal(signal.SIGKILL)
  killed = time.monotonic()
  codes = _wait(processes[:1], timeout=120)
  waited = time.monotonic() - killed
  _wait(processes)
  assert codes == [peers.EXIT_CODE]
  assert waited < 3 + 10, waited  # The timeout and one poll, not JAX's 100 s.
  last = logs[0].read_text().strip().splitlines()[-1]
  assert 'Process 1 of 2 stopped responding' in last, last
  assert 'Start all 2 processes again with the same command' in last
  assert '-m experiments.pets --config=experiments/configs/pets.py:cpu' in last


def test_dead_coordinator_is_named_with_the_resume_command(tmp_path, launch):
  """Process 0 (the coordinator) killed with SIGKILL: JAX's runtime aborts
  process 1 before Python runs, and its supervisor's line is the last one:
  which process died and what to run (`cco_jax.runtime.supervisor`)."""
  workdir = tmp_path / 'run'
  processes, logs = launch(workdir, 2, env={peers.TIMEOUT_ENV: '30'})
  _wait_for_line(logs[1], 'step 4/', processes[1])
  processes[0].send_signal(signal.SIGKILL)
  codes = _wait(processes[1:], timeout=120)
  _wait(processes)
  assert codes == [peers.EXIT_CODE]
  last = logs[1].read_text().strip().splitlines()[-1]
  assert 'Process 1 of 2 was stopped by the JAX distributed runtime' in last
  assert 'the coordinator, process 0' in last, last
  assert '-m experiments.pets --config=experiments/configs/pets.py:cpu' in last


# -- In one process -------------------------------------------------------------


def test_notice_turns_signals_into_a_stop_at_the_step_boundary():
  """SIGTERM and the first SIGINT set the notice; a second SIGINT stops at
  once; the previous handlers come back."""
  previous = signal.getsignal(signal.SIGTERM)
  with preemption.Notice() as notice:
    assert not notice.reached(1)
    os.kill(os.getpid(), signal.SIGTERM)
    assert notice.reached(2) and notice.signal_name == 'SIGTERM'
  assert signal.getsignal(signal.SIGTERM) is previous
  with preemption.Notice() as notice:
    os.kill(os.getpid(), signal.SIGINT)
    assert notice.reached(1) and notice.signal_name == 'SIGINT'
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
  error = preemption.Preempted(7, 'SIGINT', '/w/checkpoints')
  assert error.exit_code == 130 and 'step 7 in /w/checkpoints' in str(error)


def test_pending_metrics_round_trip_exactly():
  """A checkpoint between two log steps carries those steps' metrics: the
  float32 values, dtypes and flags come back bit for bit."""
  rng = np.random.default_rng(0)
  pending = [
    {
      'loss': rng.normal(size=2).astype(np.float32).repeat(1),
      'nonfinite': np.zeros(2, np.int32),
    }
    for _ in range(3)
  ]
  text = json.dumps(preemption.pending_to_json(pending))
  back = preemption.pending_from_json(json.loads(text))
  for original, restored in zip(pending, back):
    for key, value in original.items():
      assert restored[key].dtype == value.dtype
      np.testing.assert_array_equal(restored[key][0], value[0])


def test_peer_timeout_is_validated(monkeypatch):
  monkeypatch.setenv(peers.TIMEOUT_ENV, 'soon')
  with pytest.raises(ValueError, match="CCO_PEER_TIMEOUT_S='soon' is not"):
    peers.timeout_s()
  monkeypatch.setenv(peers.TIMEOUT_ENV, '12.5')
  assert peers.timeout_s() == 12.5
  assert peers.initialize_options(12.5)['heartbeat_timeout_seconds'] >= 100
  message = peers.dead_peer_message([1], 0, 2, 30, 'python -m x')
  assert message.startswith('Process 1 of 2 stopped responding')
  assert message.endswith('to resume from the last checkpoint: python -m x')
