"""How every pdeq-jax program ends on bad input: one line, no traceback.

``run(main)`` replaces ``absl.app.run(main)`` in the programs' ``__main__``:
a bad flag, an unknown ``--config.<key>``, a :class:`validate.ConfigError`
or any other error prints one line ``error: <message>`` on stderr and exits
with status 2 (status 1 for a run that diverged: :class:`common.
NonFiniteError`).  ``--verbose_errors`` shows the full traceback instead.

``invoke(main, argv, flag_values)`` does the same in-process (tests) and
returns the exit status.
"""

from __future__ import annotations

import pathlib
import re
import sys
import traceback
from typing import Callable, List, Optional, Sequence

from absl import app
from absl import flags

from train import common

VERBOSE_FLAG = "verbose_errors"
EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 1

# Errors whose message says everything: printed without their type name.
_PLAIN = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError,
          IsADirectoryError, PermissionError, flags.Error, app.UsageError,
          common.NonFiniteError, common.CorruptCheckpointError)


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  if VERBOSE_FLAG not in flag_values:
    flags.DEFINE_bool(VERBOSE_FLAG, False,
                      "Show the full traceback of an error.",
                      flag_values=flag_values)


def error_line(exc: BaseException) -> str:
  """``error: <message>`` on one line."""
  if isinstance(exc, _PLAIN):
    text = str(exc)
  else:
    text = (f"{type(exc).__name__}: {exc} (rerun with --{VERBOSE_FLAG} for "
            "the traceback)")
  text = " ".join(text.split())  # one line
  return f"error: {text}"


def exit_status(exc: BaseException) -> int:
  return EXIT_DIVERGED if isinstance(exc, common.NonFiniteError) \
      else EXIT_BAD_INPUT


def _config_flag_names(flag_values: flags.FlagValues) -> List[str]:
  from ml_collections.config_flags import config_flags  # pylint: disable=import-outside-toplevel
  return [name for name in flag_values
          if isinstance(flag_values[name], config_flags._ConfigFlag)]  # pylint: disable=protected-access


def unknown_override(argv: Sequence[str], flag_values: flags.FlagValues
                     ) -> Optional[str]:
  """The message for the first ``--<config>.<key>`` naming no config field
  (None if every override names one)."""
  from ml_collections.config_flags import config_flags  # pylint: disable=import-outside-toplevel
  for name in _config_flag_names(flag_values):
    spec = None
    for arg in argv:
      m = re.fullmatch(rf"--?{name}=(.*)", arg)
      if m:
        spec = m.group(1)
    if spec is None:
      continue
    try:
      config = config_flags._ConfigFileParser(name=name).parse(spec)  # pylint: disable=protected-access
      list(config.keys())  # a file that failed to load raises only here
    except Exception as e:  # pylint: disable=broad-except
      return _config_load_message(name, spec, e)
    for arg in argv:
      m = re.fullmatch(rf"--?(?:no)?{name}\.([^=]+)(?:=(.*))?", arg)
      if not m:
        continue
      node, path = config, []
      for part in m.group(1).split("."):
        keys = list(node.keys()) if hasattr(node, "keys") else []
        if part not in keys:
          where = ".".join([name, *path])
          shown = ", ".join(sorted(keys)) if keys else "(no sub-keys)"
          value = m.group(2) if m.group(2) is not None else ""
          return (f"unknown config key ({name}.{m.group(1)} = {value}; keys "
                  f"of {where}: {shown})")
        node = node[part]
        path.append(part)
  return None


def _config_load_message(name: str, spec: str, exc: BaseException) -> str:
  """One line for a config file that cannot be loaded: missing, or its
  ``get_config(arg)`` raised (the last line of its traceback)."""
  path = spec.split(":", 1)[0]
  if not pathlib.Path(path).is_file():
    return (f"config file not found (--{name} = {spec}; allowed: a "
            "get_config() file such as configs/pde_gcn.py:cora,sym,4w4a)")
  lines = [l.strip() for l in str(exc).splitlines() if l.strip()]
  last = lines[-1] if lines else type(exc).__name__
  last = re.sub(r"^[A-Za-z_.]*(Error|Exception): ", "", last)
  return f"cannot load the config (--{name} = {spec}; {last})"


def parse_flags(argv: Sequence[str], flag_values: flags.FlagValues
                ) -> List[str]:
  """Parses ``argv``; a bad flag raises ``flags.Error`` with one line."""
  try:
    rest = flag_values(list(argv))
    for name in _config_flag_names(flag_values):
      value = flag_values[name].value
      if value is not None:
        list(value.keys())  # a file that failed to load raises only here
  except Exception as e:  # pylint: disable=broad-except
    unknown = unknown_override(argv, flag_values)
    if unknown is not None:
      raise flags.Error(unknown) from e
    if isinstance(e, flags.Error):
      raise
    raise flags.Error(f"{type(e).__name__}: {e}") from e
  return rest


def _verbose_requested(argv: Sequence[str]) -> bool:
  return any(a in (f"--{VERBOSE_FLAG}", f"--{VERBOSE_FLAG}=true",
                   f"--{VERBOSE_FLAG}=True", f"--{VERBOSE_FLAG}=1")
             for a in argv)


def invoke(main: Callable[[List[str]], None], argv: Sequence[str],
           flag_values: flags.FlagValues = flags.FLAGS,
           stderr=None) -> int:
  """Parses ``argv`` into ``flag_values`` and runs ``main``; returns the exit
  status (0, 1 diverged, 2 bad input), printing ``error: ...`` on errors."""
  stderr = stderr or sys.stderr
  define_flags(flag_values)
  verbose = _verbose_requested(argv)
  old_argv = sys.argv
  sys.argv = list(argv)  # ml_collections reads the overrides from sys.argv
  try:
    rest = parse_flags(argv, flag_values)
    main(rest)
    return 0
  except SystemExit as e:
    return int(e.code or 0)
  except Exception as e:  # pylint: disable=broad-except
    if verbose:
      traceback.print_exc(file=stderr)
    print(error_line(e), file=stderr, flush=True)
    return exit_status(e)
  finally:
    sys.argv = old_argv


def run(main: Callable[[List[str]], None]) -> None:
  """``app.run(main)`` with one-line errors (see the module docstring)."""
  define_flags()
  verbose = _verbose_requested(sys.argv)

  def parser(argv):
    try:
      return parse_flags(argv, flags.FLAGS)
    except Exception as e:  # pylint: disable=broad-except
      if verbose:
        traceback.print_exc()
      print(error_line(e), file=sys.stderr, flush=True)
      sys.exit(EXIT_BAD_INPUT)

  def wrapped(argv):
    try:
      main(argv)
    except Exception as e:  # pylint: disable=broad-except
      if verbose:
        raise
      print(error_line(e), file=sys.stderr, flush=True)
      sys.exit(exit_status(e))

  app.run(wrapped, flags_parser=parser)
