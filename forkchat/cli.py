"""forkchat server: pairs TCP clients two by two and forks one room worker per pair.

Usage:
  server [options]
  server -h | --help
  server --version

Options:
  --host HOST          Address to listen on [default: 127.0.0.1].
  --port PORT          TCP port; 0 picks a free one [default: 33016].
  --max-rooms N        Rooms open at once; further pairs wait [default: 200].
  --max-waiting N      Named clients not yet in a room; more get BYE full. Connections
                       still sending their name are capped by the same number,
                       counted apart [default: 1000].
  --max-line BYTES     Longest line accepted, LF excluded [default: 4096].
  --name-timeout SEC   Seconds a new client has to send its name [default: 30].
  --idle-timeout SEC   Seconds without a message before a room closes, 0 = never
                       [default: 1800].
  --requeue            A client whose partner leaves (exit, next, vanished) waits for
                       a new partner instead of getting BYE.
  --tls-cert FILE      Serve TLS (1.2 or later) with this PEM certificate (chain)...
  --tls-key FILE       ...and this PEM private key; both or neither.
  --proxy-protocol     Every connection starts with a PROXY header (v1 or v2, as HAProxy's
                       send-proxy writes it): only behind a proxy you control.
  --pidfile PATH       Write the server's PID here at start, remove it at a clean exit.
  --no-color           Never colour the log (NO_COLOR in the environment does the same).
  -h --help            Show this help.
  --version            Show the version.

Started by systemd with a listening socket (LISTEN_FDS=1, socket activation), it serves
that socket and ignores --host and --port.

Signals: SIGUSR2 prints the number of clients; SIGUSR1, SIGTERM, SIGINT and SIGHUP (the
terminal closed) shut down; SIGRTMIN upgrades in place: the code now on disk is checked,
then takes over every connection and room under the same PID (kill -s RTMIN PID).
"""

from __future__ import annotations

import resource
import sys

from . import __version__
from .args import UsageError, parse_port, parse_usage, to_number
from .log import Log, detach_stdout, want_color
from .pidfile import remove_pidfile
from .proctitle import SERVER_NAME, prepare_titles, set_comm
from .server import Options, Server, StartupError
from .tlsconf import TlsError, server_context
from .upgrade import READS, UpgradeError, check_request, take_state

EXIT_FAILURE = 1
EXIT_USAGE = 2


def parse_options(argv: list[str] | None = None) -> Options:
    """Parse and check the command line. Raises UsageError, or exits for -h/--version."""
    args = parse_usage(__doc__, argv, f"forkchat {__version__}")
    if bool(args["--tls-cert"]) != bool(args["--tls-key"]):
        raise UsageError("--tls-cert and --tls-key go together")
    return Options(
        host=args["--host"],
        port=parse_port(args["--port"], low=0),
        max_rooms=to_number(args, "--max-rooms", int, 1, 100_000),
        max_waiting=to_number(args, "--max-waiting", int, 1, 1_000_000),
        max_line=to_number(args, "--max-line", int, 16, 1 << 20),
        name_timeout=to_number(args, "--name-timeout", float, 0.01, 86400),
        idle_timeout=to_number(args, "--idle-timeout", float, 0, 30 * 86400),
        pidfile=args["--pidfile"],
        no_color=args["--no-color"],
        requeue=args["--requeue"],
        tls_cert=args["--tls-cert"],
        tls_key=args["--tls-key"],
        proxy_protocol=args["--proxy-protocol"],
    )


def raise_fd_limit() -> tuple[int, int] | None:
    """Raise our soft RLIMIT_NOFILE to the hard limit: the parent holds two fds per
    open room (its channel and sentinel) besides every client not yet in a room.
    Returns (old, new) when it was raised, else None. Rooms inherit the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft >= hard:
        return None
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (OSError, ValueError):
        return None
    return soft, hard


def check_upgrade(argv: list[str] | None, state_format: int) -> int:
    """Check mode, run by a server about to upgrade to this code: everything imported
    (this module imports the server's), the options accepted, the TLS files loaded, the
    state's format read. The last line printed says yes (``forkchat VERSION ...``) or
    why not."""
    try:
        opts = parse_options(argv)
    except UsageError as exc:
        print(f"the options are refused: {exc}")
        return EXIT_USAGE
    if opts.tls_cert:
        try:
            server_context(opts.tls_cert, opts.tls_key or "")
        except TlsError as exc:
            print(f"the TLS files are refused: {exc}")
            return EXIT_FAILURE
    if state_format not in READS:
        print(f"cannot take over from a server handing over state format {state_format}")
        return EXIT_FAILURE
    print(f"forkchat {__version__} ready to take over")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``bin/server``. Returns the exit status."""
    state_format = check_request()
    if state_format is not None:
        return check_upgrade(argv, state_format)
    try:
        opts = parse_options(argv)
    except UsageError as exc:
        print(f"forkchat server: {exc} (see --help)", file=sys.stderr)
        return EXIT_USAGE
    try:
        state = take_state()
    except UpgradeError as exc:
        print(f"forkchat server: upgrade: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    prepare_titles()  # first: setproctitle's set-up rewrites comm
    set_comm(SERVER_NAME)  # the command line stays as typed: it says how it was started
    detach_stdout()
    log = Log("server", want_color(sys.stdout, opts.no_color))
    server = Server(opts, log)
    raised = raise_fd_limit()
    try:
        if state is None:
            server.start()
        else:
            server.resume(state)
    except StartupError as exc:
        print(f"forkchat server: {exc}", file=sys.stderr)
        server.close()
        return EXIT_FAILURE
    if raised:
        log.event("info", f"open-file limit raised from {raised[0]} to {raised[1]}")
    try:
        return server.serve_forever()
    finally:
        server.close()
        if opts.pidfile:
            remove_pidfile(opts.pidfile)
