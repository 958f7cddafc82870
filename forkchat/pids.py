"""forkchat pids: list the server, its room forker, rooms and clients on a port, or signal them.

Usage:
  pids [--port PORT] [--json] [--signal SIG [--all]]
  pids -h | --help
  pids --version

Options:
  --port PORT    The server's TCP port [default: 33016].
  --json         Print JSON for scripts instead of text.
  --signal SIG   Send SIG to the server: a name (USR2, SIGUSR2) or a number (12).
  --all          With --signal, send it to every client too.
  -h --help      Show this help.
  --version      Show the version.

The server is the forkchat server listening on PORT (a process named forkchat-server:
anything else holding the port is named on stderr, and neither listed nor signalled).
The rooms are its descendants, named "#N:alice+bob" after their process title: forked
by its room forker (its child forkchat-forker, listed between the server and the rooms,
never signalled), or by the server itself (with TLS, or once the forker is gone). The
clients are the processes connected to it. SIGUSR2 makes the server print its client
count (and bin/client print a status line); SIGUSR1 or SIGTERM shut the server down
(and, sent to clients with --all, make them leave).
"""

from __future__ import annotations

import json
import re
import signal
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import psutil

from . import __version__
from .args import UsageError, parse_port, parse_usage
from .conn import format_peer
from .proctitle import ROOM_NAME

FORKER_NAME = "forkchat-forker"  # no such process any more: bin/pids is being updated

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
DEFAULT_CLIENT_NAME = "client"  # bin/client's name when none is given
CLIENT_SCRIPTS = ("bin/client", "forkchat-client")
CLIENT_VALUE_OPTIONS = ("--host", "--port")  # bin/client options that take a value
HIDDEN = "access denied"
SERVER_TITLE = "forkchat-server"  # comm, and the first word of the full title
ROOM_TITLE_RE = re.compile(r"forkchat-room (\d+) (\S+\+\S+)")
COLUMNS = ("ROLE", "PID", "PPID", "NAME", "ADDRESS", "PEER", "AGE")


class LookupFailed(Exception):
    """No server can be reported on the port: one line on stderr, exit status 1."""


@dataclass(frozen=True)
class Options:
    """The command line, checked."""

    port: int = 33016
    json: bool = False
    signal: signal.Signals | None = None
    all: bool = False


@dataclass
class Entry:
    """One row: a server, its room forker, a room worker or a client connection.

    ``pid`` and ``ppid`` are None for another user's process that psutil cannot see.
    ``room`` (rooms only) is the room's number, from its process title, when it has one.
    ``holder`` (clients only) is the PID of the server or room holding the other end;
    ``ends`` (server and rooms only) the (local, remote) addresses of its connections.
    A forker has no name, address, peers or ends: it holds no client for longer than
    it takes to fork its room, and the server holds that client too meanwhile.
    """

    role: str
    pid: int | None
    ppid: int | None
    name: str | None
    address: str
    peers: list[str]
    age: float | None
    holder: int | None = None
    note: str | None = None
    room: int | None = None
    proc: psutil.Process | None = field(default=None, repr=False, compare=False)
    ends: list[tuple[str, str]] = field(default_factory=list, repr=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        """The entry as a JSON object (``proc`` and ``ends`` left out, the age rounded)."""
        data = {k: v for k, v in vars(self).items() if k not in ("proc", "ends")}
        data["age"] = None if self.age is None else round(self.age, 1)
        return data


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


# -- finding the server ------------------------------------------------------------------


def pick_servers(listeners: Mapping[int, int]) -> list[int]:
    """The real servers among the processes holding the listening socket.

    ``listeners`` maps the PID of every process holding a LISTEN socket on the port to
    its parent PID. A socket inherited by fork is held by parent and child alike (a room
    worker holds the listener until it closes what it inherited): the server is a
    listener whose parent is not a listener too.
    """
    return sorted(pid for pid, ppid in listeners.items() if ppid not in listeners)


def listens_on(proc: psutil.Process, port: int) -> bool:
    """True if ``proc`` holds a LISTEN socket on ``port`` (per process: not misattributed)."""
    try:
        conns = proc.net_connections(kind="tcp")
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False
    return any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in conns)


def collect_listeners(credited: Iterable[int], port: int) -> dict[int, psutil.Process]:
    """Every process holding the listener: the ones the system-wide view credits, and
    their ancestors that hold it too.

    psutil's system-wide view credits a socket shared after fork to one holder only, the
    one it scans last, which may be the child; the parents are checked one by one.
    """
    found: dict[int, psutil.Process] = {}
    for pid in credited:
        try:
            proc = psutil.Process(pid)
        except psutil.NoSuchProcess:
            continue
        while proc is not None and proc.pid not in found:
            found[proc.pid] = proc
            proc = parent_listener(proc, port)
    return found


def parent_listener(proc: psutil.Process, port: int) -> psutil.Process | None:
    """The parent of ``proc`` if it holds a listener on ``port`` too, else None."""
    try:
        parent = proc.parent()
    except psutil.NoSuchProcess:
        return None
    return parent if parent is not None and listens_on(parent, port) else None


def is_named(name: str, cmdline: list[str], title: str) -> bool:
    """True if a process's name (comm, or what psutil's ``name()`` made of it) or its
    command line begins with ``title`` (``forkchat-server``, ``forkchat-room``...).

    The command line may be a title set with setproctitle, one string padded with empty
    ones (``['forkchat-server --port 0', '', '']``) or split on spaces.
    """
    words = " ".join(cmdline).split()
    return name.split(" ")[0] == title or bool(words and words[0].startswith(title))


def is_forkchat_server(name: str, cmdline: list[str]) -> bool:
    """True for a forkchat server: its name or command line begins with forkchat-server."""
    return is_named(name, cmdline, SERVER_TITLE)


def room_title(cmdline: list[str]) -> tuple[int, str] | None:
    """(number, ``alice+bob``) from a room worker's title ``forkchat-room 7 alice+bob``,
    whichever way psutil split it; None for any other command line (an older server's
    room, whose command line is still the server's)."""
    match = ROOM_TITLE_RE.fullmatch(" ".join(" ".join(cmdline).split()))
    return (int(match.group(1)), match.group(2)) if match else None


def foreign_text(port: int, pid: int, name: str) -> str:
    """The line for a listener on the port that is not a forkchat server."""
    return (
        f"port {port} is held by pid {pid} ({name}), which is not a forkchat server; "
        "not listed, not signalled"
    )


def read_identity(proc: psutil.Process) -> tuple[str, list[str]]:
    """(name, command line) of a process; empty where psutil may not read them."""
    identity: list[Any] = []
    for read, empty in ((proc.name, ""), (proc.cmdline, [])):
        try:
            identity.append(read())
        except (psutil.AccessDenied, psutil.ZombieProcess):
            identity.append(empty)
    return identity[0], identity[1]


def keep_forkchat(procs: list[psutil.Process], port: int) -> list[psutil.Process]:
    """The forkchat servers among the listeners. Every other listener is named on stderr;
    if none is a forkchat server, LookupFailed names the first one."""
    servers, foreign = [], []
    for proc in procs:
        try:
            name, cmdline = read_identity(proc)
        except psutil.NoSuchProcess:
            continue
        if is_forkchat_server(name, cmdline):
            servers.append(proc)
        else:
            foreign.append(foreign_text(port, proc.pid, name or "?"))
    if foreign and not servers:
        raise LookupFailed(foreign[0])
    for line in foreign:
        print(f"forkchat pids: {line}", file=sys.stderr)
    return servers


def find_servers(conns: list[Any], port: int) -> list[psutil.Process]:
    """The forkchat servers listening on ``port``. Raises LookupFailed if there is none,
    naming what holds the port instead if anything does."""
    listening = [c for c in conns if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
    credited = {c.pid for c in listening if c.pid is not None}
    if listening and not credited:
        raise LookupFailed(
            f"port {port} is held by a process this user cannot see ({HIDDEN}); "
            "run as its owner or as root"
        )
    procs = collect_listeners(credited, port)
    ppids = {pid: parent_pid(proc) for pid, proc in procs.items()}
    servers = keep_forkchat([procs[pid] for pid in pick_servers(ppids)], port)
    if not servers:
        raise LookupFailed(f"no server listening on port {port} (start one with make run)")
    return servers


# -- describing processes ----------------------------------------------------------------


def parent_pid(proc: psutil.Process) -> int | None:
    try:
        return proc.ppid()
    except psutil.NoSuchProcess:
        return None


def format_addr(addr: Any) -> str:
    """``IP:port`` (``[IP]:port`` for IPv6); an IPv4-mapped IPv6 address as plain IPv4,
    so both ends of one connection spell the same address."""
    host = addr.ip.removeprefix("::ffff:") if "." in addr.ip else addr.ip
    return format_peer((host, addr.port))


def port_sockets(proc: psutil.Process, port: int) -> list[Any]:
    """The TCP sockets of ``proc`` whose local port is ``port``, read for this process
    alone (exact, but it parses the whole socket table). Raises NoSuchProcess."""
    try:
        conns = proc.net_connections(kind="tcp")
    except psutil.AccessDenied:
        return []
    return [c for c in conns if c.laddr and c.laddr.port == port]


def sockets_by_pid(conns: list[Any], port: int) -> dict[int, list[Any]]:
    """The system-wide view's sockets whose local port is ``port``, by the PID it credits.

    A room worker's two sockets are its own once the server (and the forker, if it
    forked the room) have closed their copies, a moment after the fork; reading them
    here saves parsing the socket table per room.
    """
    by_pid: dict[int, list[Any]] = {}
    for c in conns:
        if c.pid is not None and c.laddr and c.laddr.port == port:
            by_pid.setdefault(c.pid, []).append(c)
    return by_pid


def describe_family(proc: psutil.Process, role: str, socks: list[Any], now: float) -> Entry:
    """The entry for the server or a room from its sockets on the port: its listening
    (or local) address, its clients' addresses. Raises NoSuchProcess if it is gone."""
    with proc.oneshot():
        ppid, age = proc.ppid(), now - proc.create_time()
    listening = [format_addr(c.laddr) for c in socks if c.status == psutil.CONN_LISTEN]
    connected = sorted((c for c in socks if c.raddr), key=lambda c: (c.raddr.ip, c.raddr.port))
    address = " ".join(listening) or (format_addr(connected[0].laddr) if connected else "-")
    ends = [(format_addr(c.laddr), format_addr(c.raddr)) for c in connected]
    peers = [remote for _, remote in ends]
    return Entry(role, proc.pid, ppid, None, address, peers, age, proc=proc, ends=ends)


def client_name(cmdline: list[str]) -> str | None:
    """The user name in a forkchat client's command line (``bin/client [options] NAME``);
    None when the process is not a forkchat client (nc, a script, a benchmark)."""
    for i, arg in enumerate(cmdline):
        if arg.endswith(CLIENT_SCRIPTS) or cmdline[i - 1 : i + 1] == ["-m", "forkchat.client"]:
            return first_positional(cmdline[i + 1 :]) or DEFAULT_CLIENT_NAME
    return None


def first_positional(args: list[str]) -> str | None:
    """The first argument that is neither an option nor an option's value."""
    rest = iter(args)
    for arg in rest:
        if arg == "--":
            return next(rest, None)
        if arg in CLIENT_VALUE_OPTIONS:
            next(rest, None)
        elif not arg.startswith("-"):
            return arg
    return None


def describe_client(conn: Any, holder: int | None, process: tuple | None) -> Entry | None:
    """The entry for one client connection, given its process's ``read_client``;
    None if that process is gone."""
    address, peers = format_addr(conn.laddr), [format_addr(conn.raddr)]
    if conn.pid is None:
        return Entry("client", None, None, None, address, peers, None, holder, HIDDEN)
    if process is None:
        return None
    proc, ppid, name, age = process
    return Entry("client", proc.pid, ppid, name, address, peers, age, holder, proc=proc)


def read_client(pid: int, now: float) -> tuple | None:
    """(Process, ppid, user name or None, age) of a client process; None if it is gone."""
    try:
        proc = psutil.Process(pid)
        with proc.oneshot():
            return proc, proc.ppid(), read_client_name(proc), now - proc.create_time()
    except psutil.NoSuchProcess:
        return None


def read_client_name(proc: psutil.Process) -> str | None:
    try:
        return client_name(proc.cmdline())
    except psutil.AccessDenied:
        return None


# -- the survey --------------------------------------------------------------------------


def list_tcp() -> list[Any]:
    """Every TCP socket on the machine, once. Raises LookupFailed where the OS refuses."""
    try:
        return psutil.net_connections(kind="tcp")
    except psutil.AccessDenied:
        raise LookupFailed(f"listing TCP sockets: {HIDDEN}; run as root") from None


def survey(port: int, conns: list[Any] | None = None) -> list[Entry]:
    """The server(s) on ``port``, each followed by its forker and rooms, then their
    clients, in that order.

    ``conns`` is the system-wide socket list (``psutil.net_connections``), read once
    when not given; the server's own sockets are read for it alone, since the listener
    may be credited to a room that has not closed its copy yet. Raises LookupFailed
    when no server can be reported.
    """
    conns = list_tcp() if conns is None else conns
    now = time.time()
    by_pid = sockets_by_pid(conns, port)
    family: list[Entry] = []
    for server in find_servers(conns, port):
        try:
            family.append(describe_family(server, "server", port_sockets(server, port), now))
        except psutil.NoSuchProcess:
            continue
        family.extend(describe_descendants(server, by_pid, now))
    if not any(e.role == "server" for e in family):
        raise LookupFailed(f"no server listening on port {port} (start one with make run)")
    clients = find_clients(conns, family, now)
    name_rooms(family, clients)
    return family + order_clients(clients, family)


def describe_descendants(
    server: psutil.Process, by_pid: dict[int, list[Any]], now: float
) -> list[Entry]:
    """The server's room forker, then its rooms, oldest first, at whatever depth they
    run; those that exit meanwhile are left out."""
    try:
        descendants = server.children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    entries = []
    for proc, role, cmdline in sort_descendants(server.pid, descendants):
        entry = describe_descendant(proc, role, cmdline, by_pid, now)
        if entry is not None:
            entries.append(entry)
    rooms = sorted((e for e in entries if e.role == "room"), key=lambda e: (-(e.age or 0), e.pid))
    return [e for e in entries if e.role == "forker"] + rooms


def sort_descendants(
    server_pid: int, descendants: list[psutil.Process]
) -> list[tuple[psutil.Process, str, list[str]]]:
    """(process, ``forker`` or ``room``, command line) for the forker and the rooms
    among a server's descendants; those that exit meanwhile are left out.

    The forker is a child of the server named forkchat-forker. A room is a descendant
    named forkchat-room, or any other child of the server or of the forker: an older
    server's room, or one forked a moment ago that still bears its parent's name.
    """
    known = []
    for proc in descendants:
        try:
            known.append((proc, proc.ppid(), *read_identity(proc)))
        except psutil.NoSuchProcess:
            continue
    forkers = {
        proc.pid
        for proc, ppid, name, cmdline in known
        if ppid == server_pid and is_named(name, cmdline, FORKER_NAME)
    }
    parents = forkers | {server_pid}
    return [
        (proc, "forker" if proc.pid in forkers else "room", cmdline)
        for proc, ppid, name, cmdline in known
        if ppid in parents or is_named(name, cmdline, ROOM_NAME)
    ]


def describe_descendant(
    proc: psutil.Process,
    role: str,
    cmdline: list[str],
    by_pid: dict[int, list[Any]],
    now: float,
) -> Entry | None:
    """The entry for the forker or a room; None if it has exited. The forker's sockets
    are left unread (see Entry); a room is named by its title when it has one."""
    socks = by_pid.get(proc.pid, []) if role == "room" else []
    try:
        entry = describe_family(proc, role, socks, now)
    except psutil.NoSuchProcess:
        return None
    if role == "room":
        entry.room, entry.name = room_title(cmdline) or (None, None)
    return entry


def find_clients(conns: list[Any], family: list[Entry], now: float) -> list[Entry]:
    """The client connections: established sockets, outside the server, its forker and
    its rooms, whose remote end is the listening address or a socket the server or a
    room holds."""
    listen = {a for e in family if e.role == "server" for a in e.address.split()}
    ends = {end: e.pid for e in family for end in e.ends}
    pids = {e.pid for e in family}
    processes: dict[int, tuple | None] = {}  # one read per process, however many sockets
    clients = []
    for c in conns:
        if c.status != psutil.CONN_ESTABLISHED or not c.raddr or c.pid in pids:
            continue
        key = (format_addr(c.raddr), format_addr(c.laddr))
        if key in ends or key[0] in listen:
            if c.pid is not None and c.pid not in processes:
                processes[c.pid] = read_client(c.pid, now)
            entry = describe_client(c, ends.get(key), processes.get(c.pid))
            if entry is not None:
                clients.append(entry)
    return clients


def name_rooms(family: list[Entry], clients: list[Entry]) -> None:
    """A room without a title (an older server's) is named after its clients, in the
    order of its peers, ``alice+bob``, where any is known (``alice+?`` where one is not)."""
    for room in (e for e in family if e.role == "room" and e.room is None):
        by_address = {c.address: c.name for c in clients if c.holder == room.pid}
        names = [by_address.get(peer) for peer in room.peers]
        if any(names):
            room.name = "+".join(n or "?" for n in names)


def order_clients(clients: list[Entry], family: list[Entry]) -> list[Entry]:
    """Clients in their holder's order: rooms first, then the servers' waiting clients."""
    holders = sorted(family, key=lambda e: e.role == "server")  # stable: rooms keep order
    rank = {e.pid: i for i, e in enumerate(holders)}
    return sorted(clients, key=lambda c: (rank.get(c.holder, len(rank)), c.pid or 0, c.address))


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


def format_peers(entry: Entry) -> str:
    """Up to two peer addresses, or their number."""
    if not entry.peers:
        return "-"
    return " ".join(entry.peers) if len(entry.peers) <= 2 else f"{len(entry.peers)} clients"


def display_name(entry: Entry) -> str:
    """The NAME column: ``#7:alice+bob`` for a titled room, the name, a note or ``-``."""
    if entry.note:
        return f"({entry.note})"
    if entry.room is not None:
        return f"#{entry.room}:{entry.name}"
    return entry.name or "-"


def table_row(entry: Entry) -> tuple[str, ...]:
    name = display_name(entry)
    return (
        entry.role,
        "?" if entry.pid is None else str(entry.pid),
        "?" if entry.ppid is None else str(entry.ppid),
        name,
        entry.address,
        format_peers(entry),
        format_age(entry.age),
    )


def render_table(entries: list[Entry]) -> str:
    """Aligned columns with a header line; the last column is not padded."""
    rows = [COLUMNS, *(table_row(e) for e in entries)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS) - 1)]
    lines = ("  ".join([*map(str.ljust, r[:-1], widths), r[-1]]) for r in rows)
    return "\n".join(lines)


def render_json(entries: list[Entry]) -> str:
    return json.dumps([e.to_json() for e in entries], indent=2)


# -- signals -----------------------------------------------------------------------------


def signal_targets(entries: list[Entry], everyone: bool) -> list[Entry]:
    """The server(s), then with ``everyone`` each client process once: never the forker
    or a room (the server passes its shutdown on to them itself)."""
    targets, seen = [], set()
    for e in entries:
        wanted = e.role == "server" or (everyone and e.role == "client")
        if wanted and (e.pid is None or e.pid not in seen):
            targets.append(e)
            seen.add(e.pid)
    return targets


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
    who = f"{entry.role} pid {'?' if entry.pid is None else entry.pid}"
    where = " ".join(x for x in (entry.name, entry.address) if x)
    if result == "sent":
        return f"sent {sig.name} to {who} ({where})"
    if result == "gone":
        return f"not sent {sig.name} to {who} ({where}): it has exited"
    return f"not sent {sig.name} to {who} ({where}): {HIDDEN}, another user's process"


def signal_entries(entries: list[Entry], opts: Options) -> int:
    """Signal the targets, print one line (or JSON object) each; 1 if any was denied
    or the server was already gone, else 0."""
    results = [(e, deliver(e, opts.signal)) for e in signal_targets(entries, opts.all)]
    if opts.json:
        report = [{**e.to_json(), "signal": opts.signal.name, "result": r} for e, r in results]
        print(json.dumps(report, indent=2))
    else:
        for e, r in results:
            print(describe_delivery(e, opts.signal, r))
    failed = any(r == "denied" or (r == "gone" and e.role == "server") for e, r in results)
    return EXIT_FAILURE if failed else EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``bin/pids``. Returns the exit status."""
    try:
        opts = parse_options(argv)
    except UsageError as exc:
        print(f"forkchat pids: {exc} (see --help)", file=sys.stderr)
        return EXIT_USAGE
    try:
        entries = survey(opts.port)
    except LookupFailed as exc:
        print(f"forkchat pids: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    if opts.signal is not None:
        return signal_entries(entries, opts)
    print(render_json(entries) if opts.json else render_table(entries))
    return EXIT_OK
