"""Command-line checks shared by every executable: docopt errors in one line, and option
values converted and range-checked with a message that names the option."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable
from typing import Any

from docopt import DocoptExit, docopt


class UsageError(Exception):
    """A bad command line: reported in one line, exit status 2."""


def parse_usage(doc: str, argv: list[str] | None, version: str) -> dict[str, Any]:
    """docopt over ``doc``; a command line that does not fit raises UsageError in one
    line. ``-h`` and ``--version`` print and exit, as docopt does."""
    try:
        return docopt(doc, argv=argv, version=version)
    except DocoptExit as exc:
        raise UsageError(explain_usage(str(exc))) from None
    except BrokenPipeError:  # -h into a pager or head that stopped reading: no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(0) from None


# One leftover in docopt's "found unmatched" list: Option(short, long, ...) or
# Argument(name, value), each field quoted or None.
_UNMATCHED_RE = re.compile(r"(?:Option|Argument)\((?:'([^']*)'|None), (?:'([^']*)'|None)")


def explain_usage(message: str) -> str:
    """docopt's complaint in one line, never its usage block: its "Warning: found
    unmatched (duplicate?) arguments [Option(None, '--all', ...)]" becomes "unexpected
    argument --all" (``-x`` for a short option, the word itself for an argument)."""
    first = message.strip().splitlines()[0] if message.strip() else "bad command line"
    if not first.startswith("Warning: found unmatched"):
        return first
    words = [long or short for short, long in _UNMATCHED_RE.findall(first)]
    return f"unexpected argument {' '.join(words)}" if words else "arguments do not fit the usage"


def to_number(args: dict, option: str, kind: Callable, low: float, high: float) -> Any:
    """Convert one option value, or raise UsageError naming the option and the range."""
    raw = args[option]
    try:
        value = kind(raw)
    except ValueError:
        raise UsageError(f"{option} must be a number, not {raw!r}") from None
    if not low <= value <= high or value != value:  # value != value: NaN
        raise UsageError(
            f"{option} must be between {format_limit(low)} and {format_limit(high)}, not {raw!r}"
        )
    return value


def format_limit(value: float) -> str:
    """A range limit as people write it: 1048576, 0.01, 86400 (never 1.04858e+06)."""
    return str(int(value)) if value == int(value) else repr(value)


DEFAULT_PORT = 33016  # the server's, as the original's


def make_run(port: int) -> str:
    """The command that starts a server on ``port``, for a hint: ``make run`` serves
    the default port, ``make run PORT=N`` another."""
    return "make run" if port == DEFAULT_PORT else f"make run PORT={port}"


def parse_port(text: str, low: int = 1) -> int:
    """A TCP port from ``low`` (1, or 0 for "any free port") to 65535, or UsageError."""
    return to_number({"--port": text}, "--port", int, low, 65535)
