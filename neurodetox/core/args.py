"""One command-line dialect for every ``neurodetox`` command, derived from settings dataclasses.

Every command builds its parser with :func:`command_parser` from the dataclasses that hold its
settings (the way TRL's ``TrlParser`` is built from ``SFTConfig``), so a setting is declared once,
with its default, its help text and its range check, and every field is reachable from the
command line:

* ``--field_name value`` and ``--field-name value`` are the same flag;
* booleans take ``--flag``, ``--flag true|false``, and ``--no_flag`` / ``--no-flag`` when the
  default is true;
* lists take several values (``--seeds 0 1 2``);
* ``--config RECIPE.yaml`` (where a command accepts it) supplies any field; flags override it.

A parse error or a dataclass's range check raises :class:`~neurodetox.core.errors.UserError`,
which :func:`neurodetox.cli.main.main` prints as ``neurodetox COMMAND: error: MESSAGE`` with exit
code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser

from neurodetox.core.errors import UserError

__all__ = [
    "ArgumentParser",
    "check_known",
    "command_parser",
    "fields_of",
    "load_recipe",
    "parse_command",
    "recipe_to_argv",
]


class ArgumentParser(HfArgumentParser):
    """:class:`transformers.HfArgumentParser` whose errors raise :class:`UserError` instead of exiting."""

    def error(self, message: str):
        raise UserError(f"{message} (see `{self.prog} --help`)")


def command_parser(
    prog: str,
    description: str,
    dataclass_types: Sequence[type] = (),
    *,
    config: bool = False,
    epilog: str | None = None,
) -> ArgumentParser:
    """A parser whose flags are the fields of ``dataclass_types`` (in order).

    Args:
        prog: the command as the user types it, e.g. ``"neurodetox eval"``.
        description: one paragraph for ``--help``.
        dataclass_types: settings dataclasses; field ``metadata["help"]`` is the flag's help and
            ``metadata["aliases"]`` extra flag names (e.g. an older name).
        config: accept ``--config RECIPE.yaml`` whose keys are any of the fields.
        epilog: text after the flags in ``--help``.

    Positional arguments may be added with ``parser.add_argument`` as with argparse; they come
    back in the namespace that :func:`parse_command` returns last.
    """
    parser = ArgumentParser(
        list(dataclass_types),
        prog=prog,
        description=description,
        epilog=epilog,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    if config:
        parser.add_argument("--config", default=None, help="YAML recipe whose keys are any of the fields below.")
    parser.accepts_config = config
    return parser


def load_recipe(path: str | Path | None) -> dict[str, Any]:
    """Read a YAML recipe into a flat ``{field: value}`` dict (``{}`` for ``None``).

    Raises:
        UserError: the file is missing, is not valid YAML, or is not a mapping.
    """
    if path is None:
        return {}
    p = Path(path)
    if not p.is_file():
        raise UserError(f"recipe not found: {path}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        raise UserError(f"recipe {path} is not valid YAML{at}: {getattr(e, 'problem', None) or e}") from None
    data = data or {}
    if not isinstance(data, dict):
        raise UserError(f"recipe {path} must be a YAML mapping of field: value, got {type(data).__name__}")
    return data


def recipe_to_argv(recipe: dict[str, Any]) -> list[str]:
    """``{field: value}`` → ``["--field", "value", ...]`` (lists expand, ``None`` is skipped).

    Raises:
        UserError: a value is a mapping (only scalars and lists are fields).
    """
    argv: list[str] = []
    for key, value in recipe.items():
        if value is None:
            continue
        if isinstance(value, bool):
            argv += [f"--{key}", "true" if value else "false"]
        elif isinstance(value, (list, tuple)):
            argv += [f"--{key}", *[str(v) for v in value]]
        elif isinstance(value, dict):
            raise UserError(f"recipe field {key!r} is a mapping; only scalars and lists are supported")
        else:
            argv += [f"--{key}", str(value)]
    return argv


def _fields(parser: argparse.ArgumentParser) -> set[str]:
    names = set()
    for action in parser._actions:
        for opt in action.option_strings:
            if opt.startswith("--"):
                names.add(opt[2:].replace("-", "_"))
    return names


def check_known(parser: argparse.ArgumentParser, keys: Sequence[str], what: str) -> None:
    """Refuse unknown field names, suggesting the closest valid ones.

    Raises:
        UserError: naming each unknown key.
    """
    known = _fields(parser)
    unknown = [k for k in keys if k.replace("-", "_") not in known]
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k.replace("-", "_"), sorted(known), n=3)
            hints.append(f"{k!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        raise UserError(f"unknown {what}: {'; '.join(hints)}. Run `{parser.prog} --help` for every valid field.")


def parse_command(
    parser: ArgumentParser, argv: Sequence[str], *, recipe: dict[str, Any] | None = None
) -> tuple[Any, ...]:
    """Parse ``argv`` (after an optional recipe) into one instance per dataclass of ``parser``.

    Returns the instances in the parser's order, then an ``argparse.Namespace`` of whatever else
    the parser defines (positionals, ``--config``) when there is any.

    Raises:
        UserError: an unknown flag or recipe key, a value of the wrong type, a missing required
            flag, or a range check of a settings dataclass.
    """
    argv = list(argv)
    recipe = dict(recipe or {})
    if getattr(parser, "accepts_config", False) and any(a == "--config" or a.startswith("--config=") for a in argv):
        pre = argparse.ArgumentParser(add_help=False)
        pre.add_argument("--config")
        known, argv = pre.parse_known_args(argv)
        recipe = {**load_recipe(known.config), **recipe}
    if recipe:
        check_known(parser, list(recipe), "field(s) in the recipe")
    flags = [a[2:].split("=", 1)[0] for a in argv if a.startswith("--")]
    check_known(parser, [f for f in flags if f not in ("help",)], "field(s)")
    try:
        out = parser.parse_args_into_dataclasses(args=recipe_to_argv(recipe) + argv, return_remaining_strings=True)
    except UserError:
        raise
    except (TypeError, ValueError) as e:
        raise UserError(str(e)) from None
    *values, rest = out
    if rest:
        raise UserError(f"could not parse these arguments: {' '.join(rest)} (see `{parser.prog} --help`)")
    return tuple(values)


def fields_of(obj: Any) -> dict[str, Any]:
    """A settings instance as a plain dict (for JSON summaries)."""
    return dataclasses.asdict(obj)


#: Exceptions that mean "the user asked for something that cannot be done": one line, exit code 2.
USER_ERRORS = (UserError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError)


def user_errors_exit_2(prog: str):
    """Decorator for a command entry point ``fn(argv) -> int``: a user error prints
    ``PROG: error: MESSAGE`` on stderr and returns 2 (``NEURODETOX_DEBUG=1`` re-raises it with
    its traceback); Ctrl-C returns 130."""

    def wrap(fn):
        @functools.wraps(fn)
        def run(argv: Sequence[str]) -> int:
            try:
                return fn(argv)
            except USER_ERRORS as e:
                if os.environ.get("NEURODETOX_DEBUG"):
                    raise
                print(f"{prog}: error: {str(e) or type(e).__name__}", file=sys.stderr)
                return 2
            except KeyboardInterrupt:
                print(f"{prog}: interrupted", file=sys.stderr)
                return 130

        return run

    return wrap
