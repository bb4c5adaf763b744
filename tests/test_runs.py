"""The results drivers' subprocess runner (`experiments/runs.py`), with real
processes: skip when finished, resume otherwise, failures named and raised
after the other runs, `after` called for every finished run."""

import json
import os
import sys

import pytest

from experiments import runs


def script(workdir, body: str) -> list[str]:
  """A process that runs `body` with `w` = the workdir."""
  return [sys.executable, '-c', f'w = {str(workdir)!r}\n{body}']


FINISH = (
  'import os, json\n'
  "n = os.path.join(w, 'count')\n"
  'c = int(open(n).read()) + 1 if os.path.exists(n) else 1\n'
  "open(n, 'w').write(str(c))\n"
  "print('trained', c)\n"
  "json.dump({}, open(os.path.join(w, 'final_metrics.json'), 'w'))\n"
)


def test_command_names_module_config_variant_seed_and_overrides():
  argv = runs.command(
    'experiments.pets', 'c.py', 'ace', '/w', 3, ['a.b=1', 'c=x y']
  )
  assert argv[:3] == [sys.executable, '-m', 'experiments.pets']
  assert argv[3:] == [
    '--config=c.py:ace',
    '--workdir=/w',
    '--config.seed=3',
    '--config.a.b=1',
    '--config.c=x y',
  ]


def test_train_runs_once_then_skips_and_records_wall_time(tmp_path):
  workdir = tmp_path / 'run'
  argv = script(workdir, FINISH)
  seconds = runs.train(str(workdir), argv)
  assert seconds is not None and seconds > 0
  assert runs.train_seconds(str(workdir)) == pytest.approx(seconds)
  assert runs.train(str(workdir), argv) is None  # Finished: not run again.
  assert (workdir / 'count').read_text() == '1'
  assert 'trained 1' in (workdir / runs.LOG).read_text()


def test_unfinished_run_is_started_again_and_log_appended(tmp_path):
  workdir = tmp_path / 'run'
  crash = script(workdir, "print('attempt'); raise SystemExit(3)")
  with pytest.raises(RuntimeError, match='exit 3') as error:
    runs.train(str(workdir), crash)
  assert str(workdir / runs.LOG) in str(error.value)
  assert runs.train_seconds(str(workdir)) is None
  assert not runs.finished(str(workdir))
  runs.train(str(workdir), script(workdir, FINISH))
  log = (workdir / runs.LOG).read_text()
  assert log.index('attempt') < log.index('trained 1')  # Appended, not lost.
  assert runs.finished(str(workdir))


def test_env_reaches_the_process(tmp_path):
  workdir = tmp_path / 'run'
  body = (
    'import os, json\n'
    "json.dump(os.environ['CCO_RUNS_TEST'], "
    "open(os.path.join(w, 'final_metrics.json'), 'w'))\n"
  )
  runs.train(str(workdir), script(workdir, body), env={'CCO_RUNS_TEST': 'v7'})
  assert json.loads((workdir / 'final_metrics.json').read_text()) == 'v7'


@pytest.mark.parametrize('parallel', [1, 2, 3])
def test_train_all_finishes_the_others_then_raises_every_failure(
  tmp_path, parallel
):
  good = [tmp_path / f'good{i}' for i in range(3)]
  bad = [tmp_path / f'bad{i}' for i in range(2)]
  done = tmp_path / 'done_before'
  os.makedirs(done)
  (done / 'final_metrics.json').write_text('{}')
  jobs = [(str(w), script(w, FINISH)) for w in good]
  jobs[1:1] = [(str(w), script(w, 'raise SystemExit(5)')) for w in bad]
  jobs.append((str(done), script(done, 'raise SystemExit(9)')))
  seen = []
  with pytest.raises(RuntimeError) as error:
    runs.train_all(jobs, parallel, after=seen.append)
  message = str(error.value)
  assert all(str(w) in message for w in bad)
  assert not any(str(w) + ' ' in message for w in good + [done])
  assert sorted(seen) == sorted(str(w) for w in good + [done])
  assert all((w / 'count').read_text() == '1' for w in good)
