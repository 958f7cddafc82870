"""forkchat pids: list a forkchat server's processes on a port, or signal them.

Usage:
  pids [--port PORT] [--json] [--signal SIG [--all]]
  pids -h | --help
  pids --version

Options:
  --port PORT    The server's TCP port [default: 33016].
  --json         Print JSON for scripts instead of text.
  --signal SIG   Send SIG to the server: a name (USR2, SIGUSR2, RTMIN) or a number (12).
  --all          With --signal, send it to every forkchat client too.
  -h --help      Show this help.
  --version      Show the version.

One line per process: the server (the process named forkchat-server that listens on
PORT), its rooms (its children titled forkchat-room, shown as #7:alice+bob), then the
processes connected to them: "client" for a forkchat client (bin/client, shown by its
user's name), "other" for any other program (nc, openssl, haproxy, shown by the
program's name). A process with several connections is one line. Within a line,
addresses are in address order (IPv4 first, then by number); the lines of clients and
others follow the room they talk to, then their PID. Another program listening on PORT is named
in one line on stderr, neither listed nor signalled; a service manager's copy of the
listener (systemd's, behind socket activation) is not mentioned.

The signal goes to the server: SIGUSR2 prints its client count; SIGUSR1, SIGTERM,
SIGINT or SIGHUP shut it down; SIGRTMIN upgrades it in place. With --all it goes to
each forkchat client too, if bin/client takes it (SIGUSR2: a status line; SIGUSR1,
SIGTERM, SIGINT, SIGHUP: it leaves); a signal bin/client does not take (SIGRTMIN,
SIGKILL) is not sent to clients, and stderr says so in one line. Rooms and other
programs are never signalled (with --all, stderr names the other programs left alone).

In JSON each entry has role (server, room, client, other), pid, ppid, name, address
(its local addresses, space-separated), peers (the other ends), age (seconds), holder
(for a client or other: the PID of the server or room at the other end, null if
unknown or several), room (a room's number, from its title) and note: null, or
"access denied" for a connection whose process belongs to another user (its pid, ppid,
name and age are then null). With --signal, one object per process signalled, with
signal and result (sent, gone, denied).

Exit status: 0 when the server was listed or signalled; 1 if no forkchat server listens
on PORT, if the server exited before the signal, or if a process to signal belongs to
another user; 2 for a bad command line.
"""

from __future__ import annotations

import json
import signal
import sys
from dataclasses import dataclass

import psutil

from . import __version__
from .args import UsageError, parse_port, parse_usage
from .client import LEAVE_SIGNALS, STATUS_SIGNAL, TTY_SIGNALS
from .pidsfind import HIDDEN, Entry, LookupFailed, survey

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
COLUMNS = ("ROLE", "PID", "PPID", "NAME", "ADDRESS", "PEER", "AGE")
# The signals a bin/client survives: those it handles (leave, status, terminal) and those
# ignored by default. Any other would end (or stop) it.
CLIENT_SIGNALS = frozenset(
    {*LEAVE_SIGNALS, STATUS_SIGNAL, *TTY_SIGNALS, signal.SIGCHLD, signal.SIGURG}
)


@dataclass(frozen=True)
class Options:
    """The command line, checked."""

    port: int = 33016
    json: bool = False
    signal: signal.Signals | None = None
    all: bool = False


# -- command line ------------------------------------------------------------------------


def parse_signal(text: str) -> signal.Signals:
    """``USR2``, ``SIGUSR2``, ``usr2`` or ``12`` -> signal.SIGUSR2. Raises UsageError."""
    name = text.strip().upper()
    try:
        if name.isdigit():
            sig = signal.Signals(int(name))
        else:
            sig = signal.Signals[name if name.startswith("SIG") else "SIG" + name]
    except (KeyError, ValueError):
        raise UsageError(
            f"--signal: unknown signal {text!r} (try USR1, USR2, TERM or 12)"
        ) from None
    return sig


def parse_options(argv: list[str] | None = None) -> Options:
    """Parse and check the command line. Raises UsageError, or exits for -h/--version."""
    args = parse_usage(__doc__, argv, f"forkchat {__version__}")
    if args["--all"] and args["--signal"] is None:
        raise UsageError("--all goes with --signal")
    sig = parse_signal(args["--signal"]) if args["--signal"] is not None else None
    return Options(parse_port(args["--port"]), args["--json"], sig, args["--all"])


# -- output ------------------------------------------------------------------------------


def format_age(seconds: float | None) -> str:
    """``42s``, ``3m07s``, ``2h05m``, ``4d03h``; ``-`` when unknown."""
    if seconds is None:
        return "-"
    s = max(0, int(seconds))
    for unit, size, sub, sub_size in (("d", 86400, "h", 3600), ("h", 3600, "m", 60)):
        if s >= size:
            return f"{s // size}{unit}{s % size // sub_size:02d}{sub}"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def format_many(items: list[str], noun: str) -> str:
    """Up to two items, or their number: ``3 clients``; ``-`` for none."""
    if not items:
        return "-"
    return " ".join(items) if len(items) <= 2 else f"{len(items)} {noun}"


def display_name(entry: Entry) -> str:
    """The NAME column: ``#7:alice+bob`` for a titled room, the name, a note or ``-``."""
    if entry.note:
        return f"({entry.note})"
    if entry.room is not None:
        return f"#{entry.room}:{entry.name}"
    return entry.name or "-"


def table_row(entry: Entry) -> tuple[str, ...]:
    """The entry's cells, in COLUMNS order."""
    peers = "clients" if entry.role in ("server", "room") else "peers"
    return (
        entry.role,
        format_pid(entry.pid),
        format_pid(entry.ppid),
        display_name(entry),
        format_many(entry.address.split(), "sockets"),
        format_many(entry.peers, peers),
        format_age(entry.age),
    )


def format_pid(pid: int | None) -> str:
    return "?" if pid is None else str(pid)


def render_table(entries: list[Entry]) -> str:
    """Aligned columns with a header line; the last column is not padded."""
    rows = [COLUMNS, *(table_row(e) for e in entries)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS) - 1)]
    lines = ("  ".join([*map(str.ljust, r[:-1], widths), r[-1]]) for r in rows)
    return "\n".join(lines)


def render_json(entries: list[Entry]) -> str:
    return json.dumps([e.to_json() for e in entries], indent=2)


# -- signals ---------------------------------------------------------------------------


def signal_targets(entries: list[Entry], opts: Options) -> list[Entry]:
    """The server(s), then with --all each forkchat client if the signal is one bin/client
    takes; never a room (the server passes its shutdown on to them itself) or another
    program."""
    clients = opts.all and opts.signal in CLIENT_SIGNALS
    return [e for e in entries if e.role == "server" or (clients and e.role == "client")]


def spared_lines(entries: list[Entry], opts: Options) -> list[str]:
    """With --all, a line for the clients spared a signal they would die of, and a line
    naming the other programs left alone."""
    clients = [e for e in entries if e.role == "client"]
    others = [e for e in entries if e.role == "other"]
    name = opts.signal.name
    lines = []
    if opts.all and clients and opts.signal not in CLIENT_SIGNALS:
        lines.append(
            f"{name} not sent to {format_count(clients, 'client')}: bin/client does not handle it"
        )
    if opts.all and others:
        who = ", ".join(f"pid {format_pid(e.pid)} ({e.name or e.note})" for e in others)
        lines.append(f"{name} not sent to {format_count(others, 'other program')}: {who}")
    return lines


def format_count(entries: list[Entry], noun: str) -> str:
    """``the client``, ``the 3 clients``."""
    return f"the {noun}" if len(entries) == 1 else f"the {len(entries)} {noun}s"


def deliver(entry: Entry, sig: signal.Signals) -> str:
    """Send ``sig`` to the entry's process: ``sent``, ``gone`` or ``denied``.

    psutil checks the process is the one looked up (not a reused PID) before sending.
    """
    if entry.proc is None:
        return "denied"
    try:
        entry.proc.send_signal(sig)
    except psutil.NoSuchProcess:
        return "gone"
    except psutil.AccessDenied:
        return "denied"
    return "sent"


def describe_delivery(entry: Entry, sig: signal.Signals, result: str) -> str:
    """One line saying what happened to one target."""
    who = f"{entry.role} pid {format_pid(entry.pid)}"
    where = " ".join(x for x in (entry.name, entry.address) if x)
    if result == "sent":
        return f"sent {sig.name} to {who} ({where})"
    if result == "gone":
        return f"not sent {sig.name} to {who} ({where}): it has exited"
    return f"not sent {sig.name} to {who} ({where}): {HIDDEN}, another user's process"


def signal_entries(entries: list[Entry], opts: Options) -> int:
    """Signal the targets, print one line (or JSON object) each, and on stderr what was
    spared; 1 if a target was denied or the server was already gone, else 0."""
    warn(spared_lines(entries, opts))
    results = [(e, deliver(e, opts.signal)) for e in signal_targets(entries, opts)]
    if opts.json:
        report = [{**e.to_json(), "signal": opts.signal.name, "result": r} for e, r in results]
        print(json.dumps(report, indent=2))
    else:
        for e, r in results:
            print(describe_delivery(e, opts.signal, r))
    failed = any(r == "denied" or (r == "gone" and e.role == "server") for e, r in results)
    return EXIT_FAILURE if failed else EXIT_OK


def warn(lines: list[str]) -> None:
    for line in lines:
        print(f"forkchat pids: {line}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``bin/pids``. Returns the exit status."""
    try:
        opts = parse_options(argv)
    except UsageError as exc:
        print(f"forkchat pids: {exc} (see --help)", file=sys.stderr)
        return EXIT_USAGE
    try:
        entries, strangers = survey(opts.port)
    except LookupFailed as exc:
        warn([str(exc)])
        return EXIT_FAILURE
    warn(strangers)
    if opts.signal is not None:
        return signal_entries(entries, opts)
    print(render_json(entries) if opts.json else render_table(entries))
    return EXIT_OK
