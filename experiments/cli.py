r"""The setup every `experiments.*` command shares: flags, runtime, errors.

An entry point defines its own flags plus the shared ones it needs, and hands
its `main` to `run`:

  from experiments import cli

  def define_flags():
    cli.define_config_flags()       # --config=FILE:VARIANT, --workdir
    cli.define_step_flag()          # --step=best|last|N
    flags.DEFINE_string('out', ...)

  def main(argv):
    cli.no_arguments(argv)
    ...

  if __name__ == '__main__':
    define_flags()
    cli.run(main)

`run(main)`:
  1. adds the XLA flags for CPU and GPU (`cco_jax.runtime.xla_cpu`,
     `xla_gpu`) before JAX starts its backends;
  2. parses the flags and loads the config (checked against the library's
     schema, `cco_jax.config_schema`); a mistake ends with one line;
  3. installs the log filter (`cco_jax.runtime.log_filter`), joins a run over
     several hosts where `define_distributed_flags` was called
     (`cco_jax.runtime.distributed`), enables the compilation cache
     ($CCO_COMPILATION_CACHE, `cco_jax.runtime.compilation_cache`) and logs
     what it set;
  4. calls `main(argv)`. A user's mistake (`cco_jax.errors.UserError`, absl's
     `app.UsageError`, a missing file) prints ONE line on stderr,
     `<command>: error: <message>`, and exits with status 1; with `--verbose`
     it keeps its traceback. Any other exception is a bug: traceback. An
     integer `main` returns is the exit status.
"""

from __future__ import annotations

from collections.abc import Callable
import os
import re
import sys
from typing import Any

from absl import app
from absl import flags
from absl import logging

from cco_jax import configuration
from cco_jax import errors
from cco_jax.runtime import compilation_cache
from cco_jax.runtime import deterministic
from cco_jax.runtime import distributed
from cco_jax.runtime import log_filter
from cco_jax.runtime import supervisor
from cco_jax.runtime import xla_cpu
from cco_jax.runtime import xla_gpu

FLAGS = flags.FLAGS
# Exceptions that are the user's mistake: one line, no traceback.
USER_ERRORS = (
  errors.UserError,
  app.UsageError,
  FileNotFoundError,
  # A path given that cannot be written where asked (--out, --workdir):
  PermissionError,
  FileExistsError,
  NotADirectoryError,
  IsADirectoryError,
)
# The fix each of these path errors names (`one_line`).
_PATH_FIXES = {
  PermissionError: 'permission denied; choose a path you may write to',
  FileExistsError: 'exists and is not a folder; choose another path',
  NotADirectoryError: 'a part of this path is a file, not a folder; choose '
  'another path',
  IsADirectoryError: 'is a folder where a file was expected; give a file',
}
STEP_CHOICES = ('best', 'last')  # As `cco_jax.restore.choose_step` takes.

flags.DEFINE_bool(
  'verbose', False, "Show a user error's traceback (bugs always show one)."
)


# ----------------------------------------------------------------------------
# Shared flags.
# ----------------------------------------------------------------------------


def define_config_flags(workdir_help: str = 'Directory of the run.') -> None:
  """`--config=FILE:VARIANT` (locked: a misspelt override is an error) and
  `--workdir`, both required."""
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  config_flags.DEFINE_config_file(
    'config', None, 'Training configuration file.', lock_config=True
  )
  define_workdir_flag(workdir_help)
  flags.mark_flags_as_required(['config'])


def define_workdir_flag(help_text: str = 'Directory of a training run.'):
  flags.DEFINE_string('workdir', None, help_text)
  flags.mark_flags_as_required(['workdir'])


class StepParser(flags.ArgumentParser):
  """`--step`: 'best', 'last' or a step number (an int >= 0)."""

  syntactic_help = "'best', 'last' or a step number"

  def parse(self, argument: Any) -> str | int:
    if argument in STEP_CHOICES or (
      isinstance(argument, int) and argument >= 0
    ):
      return argument
    if isinstance(argument, str) and argument.isdigit():
      return int(argument)
    raise ValueError(f"give 'best', 'last' or a step number, not {argument!r}")

  def flag_type(self) -> str:
    return 'step'


def define_step_flag() -> None:
  """`--step=best|last|N`: which checkpoint of the run (default 'best', the
  highest validation `best_metric`; the latest when none has metrics)."""
  flags.DEFINE(
    StepParser(),
    'step',
    'best',
    "Checkpoint: 'best' (highest validation best_metric), 'last' or a step.",
  )


def define_distributed_flags() -> None:
  """Flags of a run over several hosts (`cco_jax.runtime.distributed`)."""
  flags.DEFINE_bool(
    'jax_distributed',
    False,
    'Call jax.distributed.initialize() (multi-host runs; alone on Cloud TPU).',
  )
  flags.DEFINE_string(
    'coordinator_address',
    None,
    f'HOST:PORT of process 0 (default: ${distributed.ENV_COORDINATOR}).',
  )
  flags.DEFINE_integer(
    'num_processes',
    None,
    f'Processes of a multi-host run (default: ${distributed.ENV_NUM_PROCESSES}).',
  )
  flags.DEFINE_integer(
    'process_id',
    None,
    f'This process, 0..num_processes-1 (default: ${distributed.ENV_PROCESS_ID}).',
  )


def no_arguments(argv: list[str]) -> None:
  """Refuses positional arguments (a flag without its `--`, usually)."""
  if len(argv) > 1:
    raise errors.UserError(
      f'unexpected arguments {argv[1:]}: every option is a --flag (see --help).'
    )


# ----------------------------------------------------------------------------
# Errors on one line.
# ----------------------------------------------------------------------------


def one_line(error: BaseException) -> str:
  """The message of a flag, config or user error on one line, no escapes."""
  while error.args and isinstance(error.args[0], BaseException):
    error = error.args[0]
  text = str(error.args[0]) if error.args else str(error)
  missing = re.search(r"No such file or directory: '([^']+)'", text)
  if missing and not isinstance(error, errors.UserError):
    return (
      f'config file {missing.group(1)} does not exist (--config=FILE:VARIANT, '
      'e.g. experiments/configs/pets.py:cpu).'
    )
  if isinstance(error, OSError) and error.filename:
    fix = _PATH_FIXES.get(type(error)) or (
      f'{(error.strerror or text).lower()}; check the path'
    )
    return f'{error.filename}: {fix}.'
  lines = [line.strip() for line in text.splitlines() if line.strip()] or [
    type(error).__name__
  ]
  if 'Traceback (most recent call last)' in text:
    # A config file's own error: keep its last line, the exception.
    lines = [re.sub(r'^[\w.]+(Error|Exception): ', '', lines[-1])]
  if isinstance(error, KeyError):
    lines[0] = (
      f'no config field {lines[0]}.'  # ml_collections' own suggestion.
      if 'Did you mean' in text
      else _no_such_field(lines[0].strip('\'"'))
    )
  text = ' '.join(lines)
  for problem, fix in _FLAG_VALUE_FIXES:
    if problem in text:
      text += fix
  return text


# Parts of absl's and ml_collections' flag errors, and the fix to append.
_FLAG_VALUE_FIXES = (
  ('invalid literal for int()', '; give an integer.'),
  ('could not convert string to float', '; give a number, e.g. 1e-3.'),
  ('must have a value other than None', ' It is required (see --help).'),
)


def _no_such_field(name: str) -> str:
  """'no config field X' with the closest fields of the schema."""
  import difflib  # pylint: disable=g-import-not-at-top

  from cco_jax import config_schema  # pylint: disable=g-import-not-at-top

  known = config_schema.flatten(config_schema.default_config().to_dict())
  leaves = {}
  for key in known:
    leaves.setdefault(key.rsplit('.', 1)[-1], []).append(key)
  close = difflib.get_close_matches(name, list(leaves), n=2)
  hint = (
    f'; did you mean {" or ".join(f"--config.{k}" for c in close for k in leaves[c])}?'
    if close
    else ''
  )
  return (
    f'no config field {name!r}{hint} (every field: cco_jax/config_schema.py).'
  )


def _command() -> str:
  """`python -m experiments.x` -> 'experiments.x' (the module's name)."""
  main = sys.modules.get('__main__')
  spec = getattr(main, '__spec__', None)
  return spec.name if spec else os.path.basename(sys.argv[0])


def fail(error: BaseException) -> None:
  """Ends the process with `<command>: error: <one line>` and status 1."""
  sys.exit(f'{_command()}: error: {one_line(error)}')


# ----------------------------------------------------------------------------
# The run.
# ----------------------------------------------------------------------------


def _verbose(argv: list[str]) -> bool:
  """Whether `argv` asks for --verbose (read before the flags parse)."""
  return any(
    arg in ('--verbose', '--verbose=true', '--verbose=1') for arg in argv[1:]
  )


def parse_flags(argv: list[str]) -> list[str]:
  """Parses flags and loads and checks `--config`; a mistake ends with one
  line (a traceback with --verbose)."""
  try:
    args = FLAGS(argv)
    if 'config' in FLAGS and FLAGS.config is not None:
      from cco_jax import config_schema  # pylint: disable=g-import-not-at-top

      config_schema.check_known(FLAGS.config)  # Also loads the file.
      configuration.check_training_config(FLAGS.config)
  except (flags.Error, KeyError, AttributeError, OSError, ValueError) as e:
    if _verbose(argv):
      raise
    fail(e)
  return args


def setup_runtime() -> None:
  """Log filter, several hosts (where the flags exist), compilation cache."""
  log_filter.quiet_library_logs()
  if 'jax_distributed' in FLAGS:
    distributed.initialize_distributed(
      FLAGS.jax_distributed,
      FLAGS.coordinator_address,
      FLAGS.num_processes,
      FLAGS.process_id,
    )
    import jax  # pylint: disable=g-import-not-at-top

    logging.info(
      'JAX process %d/%d, local devices: %s',
      jax.process_index(),
      jax.process_count(),
      jax.local_devices(),
    )
  cache = compilation_cache.enable_compilation_cache()
  logging.info(
    'XLA_FLAGS=%r (added for CPU: %r, for GPU: %r, for %s: %r); '
    'compilation cache: %r.',
    os.environ.get('XLA_FLAGS', ''),
    _ADDED_XLA_FLAGS.get('cpu', ''),
    _ADDED_XLA_FLAGS.get('gpu', ''),
    deterministic.ENV,
    _ADDED_XLA_FLAGS.get('deterministic', ''),
    cache or 'off',
  )


_ADDED_XLA_FLAGS: dict[str, str] = {}
_ORIGINAL_XLA_FLAGS: list[str] = []


def child_environment() -> dict[str, str]:
  """Environment changes for a child entry point: the `XLA_FLAGS` this
  process was started with (without the flags `run` added), so the child's
  own setup (e.g. `CCO_DETERMINISTIC`) decides them afresh."""
  if not _ORIGINAL_XLA_FLAGS:
    return {}
  return {'XLA_FLAGS': _ORIGINAL_XLA_FLAGS[0]}


def run(main: Callable[[list[str]], int | None]) -> None:
  """Runs `main` as an entry point (module docstring); does not return."""
  if supervisor.needed(sys.argv):  # One of several processes: see there.
    supervisor.run_supervised(sys.argv)
  _ORIGINAL_XLA_FLAGS[:] = [os.environ.get('XLA_FLAGS', '')]
  # XLA reads XLA_FLAGS once, when JAX starts its backends: set them first.
  try:  # CCO_DETERMINISTIC first: it pins the option xla_cpu would set.
    _ADDED_XLA_FLAGS['deterministic'] = deterministic.apply()
  except errors.UserError as e:
    fail(e)
  _ADDED_XLA_FLAGS['cpu'] = xla_cpu.apply()
  _ADDED_XLA_FLAGS['gpu'] = xla_gpu.apply()

  def guarded(argv: list[str]) -> int | None:
    try:
      setup_runtime()
      return main(argv)
    except USER_ERRORS as e:
      if FLAGS.verbose:
        raise
      fail(e)

  app.run(guarded, flags_parser=parse_flags)
