"""Entry points of the command-line tools: a user's mistake is one line `error: ...`, a bug keeps its traceback.

  if __name__ == "__main__":
    cli.run(main)           # absl tools: main(argv), after absl parses the flags
    cli.run_argparse(main)  # argparse tools: main() parses sys.argv itself

What counts as a user's mistake, printed as `error: <message>` on stderr
(the lines after the first indented), with its exit code:

- 2, a usage mistake: a flag absl or ml_collections rejects (`flags.Error`), a
  config file that does not exist, and `app.UsageError` from `main`. Flag
  parsing runs only absl, ml_collections and the config file, so there
  `KeyError` and `AttributeError` (a misspelt override such as
  `--config.model.block_siz=0`, or a field the config file misspells) and
  `OSError` (a config file that cannot be read) are the user's too. argparse
  reports its own flag errors itself (usage, then `prog: error: ...`, exit 2).
- 1, a bad value or path: `ValueError` (the config and data checks) and the
  `OSError`s that name a path the user gave: `FileNotFoundError`,
  `FileExistsError`, `NotADirectoryError`, `IsADirectoryError`,
  `PermissionError`, and `ReportedError`, raised by the project where its
  message already says what failed and what to do (a checkpoint that cannot
  be restored).
- 130, an interrupt (Ctrl-C): `error: KeyboardInterrupt`, no traceback (what
  was saved stays; rerun to resume).

Anything else, `KeyError` and `AttributeError` in `main` included, is a bug
(or a failure of the machine, as other `OSError`s such as a full disk are)
and propagates with its traceback. The price: a `ValueError` from a bug deep
in a library is shortened too. Set the environment variable
`ATTNRES_TRACEBACK=1` to let every exception, flag errors included, propagate
with its full traceback; `experiments.sweep` passes it on to its runs.
"""

import contextlib
import functools
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

from absl import app, flags
from ml_collections.config_flags.config_flags import ConfigFileFlagParser

TRACEBACK_VARIABLE = "ATTNRES_TRACEBACK"
USAGE_EXIT_CODE = 2
ERROR_EXIT_CODE = 1
INTERRUPT_EXIT_CODE = 130


class ReportedError(Exception):
  """An error whose message tells the user all there is to know (e.g. a checkpoint that failed to restore)."""


USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
               PermissionError, ReportedError)


def traceback_requested() -> bool:
  """Whether `ATTNRES_TRACEBACK` asks for full tracebacks (set, and not "" or "0")."""
  return os.environ.get(TRACEBACK_VARIABLE, "0") not in ("", "0")


def error_message(error: BaseException, prefix: str = "") -> str:
  """`error: <prefix><message>`, continuation lines indented; without the quotes `str(KeyError)` adds."""
  while len(error.args) == 1 and isinstance(error.args[0], BaseException):  # AttributeError(KeyError(...))
    error = error.args[0]
  text = error.args[0] if len(error.args) == 1 and isinstance(error.args[0], str) else str(error)
  first, *rest = [line for line in text.strip().splitlines() if line.strip()] or [type(error).__name__]
  return "\n".join([f"error: {prefix}{first}", *(f"  {line.rstrip()}" for line in rest)])


@contextlib.contextmanager
def _exiting_on(errors: tuple[type[BaseException], ...], exit_code: int, prefix: str = "") -> Iterator[None]:
  """Turns `errors` raised in the block into their `error_message` on stderr and `exit_code`."""
  try:
    yield
  except errors as error:
    if traceback_requested():
      raise
    print(error_message(error, prefix), file=sys.stderr, flush=True)
    sys.exit(exit_code)


def _check_config_files(argv: list[str]) -> None:
  """A missing config file is a flag error, raised before ml_collections tries to load it (an override of a
  field would otherwise report a failure to load a file named after the flag)."""
  for name in flags.FLAGS:
    if isinstance(flags.FLAGS[name].parser, ConfigFileFlagParser):
      for value in (arg.split("=", 1)[1] for arg in argv[1:] if arg.startswith(f"--{name}=")):
        path = value.split(":", 1)[0]
        if not os.path.isfile(path):
          raise flags.IllegalFlagValueError(f"flag --{name}={path}: no such file")


def _parse_flags(argv: list[str]) -> list[str]:
  with _exiting_on((flags.Error, OSError), USAGE_EXIT_CODE):
    _check_config_files(argv)
    with _exiting_on((KeyError, AttributeError), USAGE_EXIT_CODE, prefix="no such config field: "):
      return flags.FLAGS(argv)  # runs the config file and looks up each --config.<field> override


def _call(main: Callable[..., Any], *args: Any) -> Any:
  with _exiting_on((KeyboardInterrupt,), INTERRUPT_EXIT_CODE), _exiting_on((app.UsageError,), USAGE_EXIT_CODE):
    with _exiting_on(USER_ERRORS, ERROR_EXIT_CODE):
      return main(*args)


def run(main: Callable[[list[str]], Any]) -> None:
  """`absl.app.run(main)`, with flag errors and the user's mistakes in `main` reported as one line."""
  app.run(functools.partial(_call, main), flags_parser=_parse_flags)


def run_argparse(main: Callable[[], Any]) -> None:
  """Calls an argparse tool's `main()`, with the user's mistakes it raises after parsing reported as one line."""
  _call(main)
