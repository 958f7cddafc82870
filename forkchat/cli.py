"""forkchat server: pairs TCP clients two by two and forks one room worker per pair.

Usage:
  server [options]
  server -h | --help
  server --version

Options:
  --host HOST          Address to listen on [default: 127.0.0.1].
  --port PORT          TCP port; 0 picks a free one [default: 33016].
  --max-rooms N        Rooms open at once; further pairs wait [default: 200].
  --max-waiting N      Named clients not yet in a room; more get BYE full [default: 1000].
  --max-line BYTES     Longest line accepted, LF excluded [default: 4096].
  --name-timeout SEC   Seconds a new client has to send its name [default: 30].
  --idle-timeout SEC   Seconds without a message before a room closes, 0 = never
                       [default: 1800].
  --pidfile PATH       Write the server's PID here at start, remove it at a clean exit.
  --no-color           Never colour the log (NO_COLOR in the environment does the same).
  -h --help            Show this help.
  --version            Show the version.

Signals: SIGUSR2 prints the number of clients; SIGUSR1, SIGTERM and SIGINT shut down.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from docopt import DocoptExit, docopt

from . import __version__
from .log import Log, want_color
from .server import Options, Server, StartupError, remove_pidfile, set_process_name

EXIT_FAILURE = 1
EXIT_USAGE = 2


class UsageError(Exception):
    """A bad command line: reported in one line, exit status 2."""


def to_number(args: dict, option: str, kind: Callable, low: float, high: float) -> Any:
    """Convert one option value, or raise UsageError naming the option and the range."""
    raw = args[option]
    try:
        value = kind(raw)
    except ValueError:
        raise UsageError(f"{option} must be a number, not {raw!r}") from None
    if not low <= value <= high or value != value:  # value != value: NaN
        raise UsageError(f"{option} must be between {low:g} and {high:g}, not {raw!r}")
    return value


def parse_options(argv: list[str] | None = None) -> Options:
    """Parse and check the command line. Raises UsageError, or exits for -h/--version."""
    try:
        args = docopt(__doc__, argv=argv, version=f"forkchat {__version__}")
    except DocoptExit as exc:
        raise UsageError(str(exc).strip().splitlines()[0]) from None
    return Options(
        host=args["--host"],
        port=to_number(args, "--port", int, 0, 65535),
        max_rooms=to_number(args, "--max-rooms", int, 1, 100_000),
        max_waiting=to_number(args, "--max-waiting", int, 1, 1_000_000),
        max_line=to_number(args, "--max-line", int, 16, 1 << 20),
        name_timeout=to_number(args, "--name-timeout", float, 0.01, 86400),
        idle_timeout=to_number(args, "--idle-timeout", float, 0, 30 * 86400),
        pidfile=args["--pidfile"],
        no_color=args["--no-color"],
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``bin/server``. Returns the exit status."""
    try:
        opts = parse_options(argv)
    except UsageError as exc:
        print(f"forkchat server: {exc} (see --help)", file=sys.stderr)
        return EXIT_USAGE
    set_process_name("forkchat-server")
    log = Log("server", want_color(sys.stdout, opts.no_color))
    server = Server(opts, log)
    try:
        server.start()
    except StartupError as exc:
        print(f"forkchat server: {exc}", file=sys.stderr)
        server.close()
        return EXIT_FAILURE
    try:
        return server.serve_forever()
    finally:
        server.close()
        if opts.pidfile:
            remove_pidfile(opts.pidfile)
