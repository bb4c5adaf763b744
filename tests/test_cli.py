"""The shared entry-point setup (`experiments.cli`), in real processes: a user
error is one stderr line and a non-zero exit, a bug keeps its traceback."""

import os
from pathlib import Path
import subprocess
import sys
import textwrap

import pytest
import xla_flags

REPO = Path(__file__).resolve().parents[1]


def _run(args, *, code=None, timeout=300, **extra_env):
  env = dict(
    os.environ,
    XLA_FLAGS=xla_flags.for_devices(1),
    JAX_PLATFORMS='cpu',
    **extra_env,
  )
  command = [sys.executable]
  command += ['-c', textwrap.dedent(code)] if code else ['-m']
  return subprocess.run(
    command + list(args),
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def _one_error_line(result, *fragments):
  assert result.returncode != 0
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]
  errors = [s for s in result.stderr.splitlines() if ': error: ' in s]
  assert len(errors) == 1, result.stderr[-3000:]
  assert result.stderr.strip().splitlines()[-1] == errors[0]
  for fragment in fragments:
    assert fragment in errors[0], errors[0]
  return errors[0]


ENTRY = """
import os
from cco_jax import errors
from experiments import cli

def main(argv):
  cli.no_arguments(argv)
  if os.environ['RAISE'] == 'user':
    raise errors.UserError('config.x=1: must be 2; set --config.x=2.')
  if os.environ['RAISE'] == 'bug':
    raise RuntimeError('an internal invariant broke')
  return 0

cli.run(main)
"""


@pytest.mark.parametrize('verbose', [False, True])
def test_user_error_is_one_line_and_a_bug_a_traceback(verbose):
  args = ['--verbose'] if verbose else []
  user = _run(args, code=ENTRY, RAISE='user')
  assert user.returncode == 1
  if verbose:
    assert 'Traceback' in user.stderr and 'UserError' in user.stderr
  else:
    line = _one_error_line(user, 'config.x=1: must be 2; set --config.x=2.')
    assert line.startswith('-c: error: ')
  bug = _run(args, code=ENTRY, RAISE='bug')
  assert bug.returncode == 1
  assert 'Traceback' in bug.stderr
  assert 'RuntimeError: an internal invariant broke' in bug.stderr
  assert _run(args, code=ENTRY, RAISE='no').returncode == 0


def test_stray_argument_and_unknown_flag_are_one_line():
  _one_error_line(
    _run(['stray'], code=ENTRY, RAISE='no'), "unexpected arguments ['stray']"
  )
  _one_error_line(_run(['--nope=1'], code=ENTRY, RAISE='no'), 'nope')


def test_evaluate_and_explain_share_the_step_flag_and_errors(tmp_path):
  missing = tmp_path / 'nowhere'
  _one_error_line(
    _run(['experiments.evaluate', f'--workdir={missing}', '--step=first']),
    'experiments.evaluate: error:',
    "'best', 'last' or a step number",
  )
  _one_error_line(
    _run(['experiments.evaluate', f'--workdir={missing}', '--step=last']),
    'experiments.evaluate: error:',
    'config.json does not exist',
  )
  _one_error_line(
    _run(
      [
        'experiments.explain',
        f'--workdir={missing}',
        f'--out={tmp_path / "out"}',
        '--step=3',
        'x.jpg',
      ]
    ),
    'experiments.explain: error:',
    'config.json does not exist',
  )
  for old in ('--best', '--last'):
    _one_error_line(
      _run(['experiments.evaluate', f'--workdir={missing}', old]), old[2:]
    )


def test_config_with_an_unknown_key_is_refused_at_parse_time(tmp_path):
  config = tmp_path / 'extra.py'
  config.write_text(
    'from experiments.configs import protocols\n'
    'def get_config():\n'
    '  config = protocols.small_cpu()\n'
    '  config.model.widht = 3\n'
    '  return config\n'
  )
  _one_error_line(
    _run(
      [
        'experiments.pets',
        f'--config={config}',
        f'--workdir={tmp_path / "unused"}',
      ]
    ),
    'experiments.pets: error:',
    "'model.widht' is not in the training config schema",
  )
  assert not (tmp_path / 'unused').exists()


@pytest.mark.parametrize(
  'value, parsed', [('best', 'best'), ('last', 'last'), ('0', 0), ('120', 120)]
)
def test_step_parser(value, parsed):
  from experiments import cli  # pylint: disable=g-import-not-at-top

  assert cli.StepParser().parse(value) == parsed


@pytest.mark.parametrize('value', ['', 'first', '-3', '1.5'])
def test_step_parser_refuses(value):
  from experiments import cli  # pylint: disable=g-import-not-at-top

  with pytest.raises(ValueError, match="'best', 'last' or a step number"):
    cli.StepParser().parse(value)


def test_entry_points_start_no_jax_backend_at_import():
  """`cli.run` sets XLA_FLAGS before JAX starts its backends: importing an
  entry point (and the library it calls) must not start them."""
  result = _run(
    [],
    code="""
    import experiments.compare, experiments.evaluate
    import experiments.explain, experiments.isic, experiments.pets
    from jax._src import xla_bridge
    print(sorted(xla_bridge._backends))
    """,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip() == '[]'
