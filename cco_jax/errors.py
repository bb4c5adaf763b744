"""The one exception class for a user's mistake.

`UserError` is raised where a flag, a config field, a path or a workdir is
wrong in a way the user can fix; its message is one line naming the thing,
the problem and the fix. The entry points (`experiments.cli`) print it as one
line on stderr and exit with status 1; any other exception is a bug and keeps
its traceback. It subclasses `ValueError`, so callers that catch bad values
keep catching it.
"""


class UserError(ValueError):
  """A mistake the user can fix: one line naming the thing, problem and fix."""
