"""Finding a forkchat server's processes on a port, with psutil: the server, its rooms and
every process connected to them, one entry each.

The server is the process named ``forkchat-server`` that listens on the port; its rooms
are its children titled ``forkchat-room`` (any other child, such as a check process
during an upgrade, is not a room). A process connected to the server or a room is a
``client`` when it is a forkchat client (``bin/client``, ``forkchat-client`` or
``python -m forkchat.client``, by its title or command line) and ``other`` for any
other program (``nc``, ``openssl``, HAProxy), named after that program. A process with
several connections is one entry.
"""

from __future__ import annotations

import ipaddress
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import psutil

from .args import make_run
from .conn import format_peer
from .proctitle import ROOM_NAME, SERVER_NAME

DEFAULT_CLIENT_NAME = "client"  # bin/client's name when none is given
CLIENT_SCRIPTS = ("bin/client", "forkchat-client")
CLIENT_MODULE = ["-m", "forkchat.client"]
CLIENT_VALUE_OPTIONS = ("--host", "--port", "--cafile")  # bin/client options with a value
HIDDEN = "access denied"
ROOM_TITLE_RE = re.compile(rf"{ROOM_NAME} (\d+) (\S+\+\S+)")


def no_server(port: int) -> str:
    return f"no server listening on port {port} (start one with {make_run(port)})"


class LookupFailed(Exception):
    """No server can be reported on the port: one line on stderr, exit status 1."""


@dataclass
class Entry:
    """One process: a server, a room, a forkchat client or another program.

    ``address`` is its local addresses on the port's connections (a server's listening
    ones), space-separated; ``peers`` the other ends, in address order. ``pid``, ``ppid``,
    ``name`` and ``age`` are None, and ``note`` says why, for a connection whose
    process psutil cannot see (another user's); such a connection is an entry of its own.
    ``room`` (rooms only) is the room's number, from its title. ``holder`` (clients and
    others) is the PID of the server or room holding the other end of its connections,
    None if unknown or if several hold them. ``ends`` (server and rooms only) are the
    (local, remote) addresses of its connections.
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


@dataclass(frozen=True)
class Holder:
    """A process holding the listening socket, as far as it matters to finding the server."""

    proc: psutil.Process
    ppid: int | None
    name: str
    is_server: bool


# -- recognising forkchat processes ------------------------------------------------------


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
    return is_named(name, cmdline, SERVER_NAME)


def client_name(cmdline: list[str]) -> str | None:
    """The user name in a forkchat client's command line or title (``bin/client
    [options] NAME``, ``forkchat-client NAME``); None when the process is not a forkchat
    client (nc, openssl, a proxy, a script)."""
    words = " ".join(cmdline).split()
    for i, word in enumerate(words):
        if word.endswith(CLIENT_SCRIPTS) or words[i - 1 : i + 1] == CLIENT_MODULE:
            return first_positional(words[i + 1 :]) or DEFAULT_CLIENT_NAME
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


def room_title(cmdline: list[str]) -> tuple[int, str] | None:
    """(number, ``alice+bob``) from a room worker's title ``forkchat-room 7 alice+bob``,
    whichever way psutil split it; None for any other command line."""
    match = ROOM_TITLE_RE.fullmatch(" ".join(" ".join(cmdline).split()))
    return (int(match.group(1)), match.group(2)) if match else None


def read_identity(proc: psutil.Process) -> tuple[str, list[str]]:
    """(name, command line) of a process; empty where psutil may not read them.
    Raises NoSuchProcess if it is gone."""
    identity: list[Any] = []
    for read, empty in ((proc.name, ""), (proc.cmdline, [])):
        try:
            identity.append(read())
        except (psutil.AccessDenied, psutil.ZombieProcess):
            identity.append(empty)
    return identity[0], identity[1]


# -- finding the server ------------------------------------------------------------------


def pick_servers(holders: Mapping[int, tuple[int | None, bool]]) -> tuple[list[int], list[int]]:
    """(servers, strangers) among the processes holding a listening socket on the port.

    ``holders`` maps each holder's PID to (its parent's PID, named forkchat-server). A
    socket inherited by fork, or passed at exec, is held by parent and child alike. A
    server is a holder named forkchat-server whose parent is not one (a room a moment
    after its fork still bears its parent's name). A holder above a server is its service
    manager (systemd keeps its copy of a socket-activated listener): neither. A stranger
    is any other holder whose parent holds none: another program on the port.
    """
    servers = sorted(
        pid
        for pid, (ppid, named) in holders.items()
        if named and not is_server_holder(holders, ppid)
    )
    managers: set[int] = set()
    for pid in servers:
        ppid = holders[pid][0]
        while ppid in holders and ppid not in managers:
            managers.add(ppid)
            ppid = holders[ppid][0]
    strangers = sorted(
        pid
        for pid, (ppid, named) in holders.items()
        if not named and ppid not in holders and pid not in managers
    )
    return servers, strangers


def is_server_holder(holders: Mapping[int, tuple[int | None, bool]], pid: int | None) -> bool:
    return pid in holders and holders[pid][1]


def listen_addresses(proc: psutil.Process, port: int) -> list[str]:
    """The addresses on which ``proc`` holds a LISTEN socket on ``port``, read for this
    process alone (exact, but it parses the whole socket table)."""
    try:
        conns = proc.net_connections(kind="tcp")
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return []
    return [format_addr(c.laddr) for c in conns if is_listener(c, port)]


def is_listener(conn: Any, port: int) -> bool:
    return conn.status == psutil.CONN_LISTEN and conn.laddr.port == port


def collect_holders(credited: Iterable[int], port: int) -> dict[int, Holder]:
    """Every process holding the listener: those the system-wide view credits, their
    ancestors that hold it too, and the forkchat servers among the children of a holder
    that is none (a service manager).

    psutil's system-wide view credits a socket shared after fork to one holder only, the
    one it scans last: a room not yet rid of it, a server, or its manager. Only a manager
    whose server is not found yet has its children read.
    """
    found: dict[int, Holder] = {}
    for pid in credited:
        holder = read_holder(pid)
        while holder is not None and holder.proc.pid not in found:
            found[holder.proc.pid] = holder
            holder = parent_holder(holder, port)
    parents = {h.ppid for h in found.values() if h.is_server}
    for holder in list(found.values()):
        if not holder.is_server and holder.proc.pid not in parents:
            for child in server_children(holder.proc, port):
                found.setdefault(child.proc.pid, child)
    return found


def read_holder(pid: int) -> Holder | None:
    """What matters of a listener's holder; None if it is gone."""
    try:
        proc = psutil.Process(pid)
        name, cmdline = read_identity(proc)
        return Holder(proc, proc.ppid(), name, is_forkchat_server(name, cmdline))
    except psutil.NoSuchProcess:
        return None


def parent_holder(holder: Holder, port: int) -> Holder | None:
    """The holder's parent if it holds a listener on ``port`` too, else None."""
    if not holder.ppid:
        return None
    parent = read_holder(holder.ppid)
    return parent if parent is not None and listen_addresses(parent.proc, port) else None


def server_children(proc: psutil.Process, port: int) -> list[Holder]:
    """The children of ``proc`` named forkchat-server that listen on ``port``."""
    try:
        children = proc.children()
    except psutil.NoSuchProcess:
        return []
    holders = (read_holder(child.pid) for child in children)
    return [h for h in holders if h and h.is_server and listen_addresses(h.proc, port)]


def stranger_text(port: int, holder: Holder, alone: bool) -> str:
    """The line naming a listener on the port that is not a forkchat server."""
    where = " ".join(listen_addresses(holder.proc, port))
    held = "held" if alone else "also held"
    return (
        f"port {port} is {held} by pid {holder.proc.pid} ({holder.name or '?'})"
        f"{' on ' + where if where else ''}, which is not a forkchat server; "
        "not listed, not signalled"
    )


def find_servers(conns: list[Any], port: int) -> tuple[list[psutil.Process], list[str]]:
    """The forkchat servers listening on ``port``, and one line for each other program
    listening on it. Raises LookupFailed if there is no server, naming what holds the
    port instead if anything does."""
    listening = [c for c in conns if is_listener(c, port)]
    credited = {c.pid for c in listening if c.pid is not None}
    if listening and not credited:
        raise LookupFailed(
            f"port {port} is held by a process this user cannot see ({HIDDEN}); "
            "run as its owner or as root"
        )
    holders = collect_holders(credited, port)
    servers, strangers = pick_servers({p: (h.ppid, h.is_server) for p, h in holders.items()})
    lines = [stranger_text(port, holders[pid], alone=not servers) for pid in strangers]
    if not servers:
        raise LookupFailed(lines[0] if lines else no_server(port))
    return [holders[pid].proc for pid in servers], lines


# -- describing the server and its rooms -------------------------------------------------


def format_addr(addr: Any) -> str:
    """``IP:port`` (``[IP]:port`` for IPv6); an IPv4-mapped IPv6 address as plain IPv4,
    so both ends of one connection spell the same address."""
    host = addr.ip.removeprefix("::ffff:") if "." in addr.ip else addr.ip
    return format_peer((host, addr.port))


def addr_key(text: str) -> tuple[int, Any, int]:
    """Sort key of an ``IP:port`` (``[IP]:port``) text: IPv4 first, then by address,
    then by port, as numbers."""
    host, _, port = text.rpartition(":")
    ip = ipaddress.ip_address(host.strip("[]"))
    return ip.version, ip, int(port)


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

    A room's two sockets are its own once the server has closed its copies, a moment
    after the fork; reading them here saves parsing the socket table per room.
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
    ends = sorted(
        ((format_addr(c.laddr), format_addr(c.raddr)) for c in socks if c.raddr),
        key=lambda end: addr_key(end[1]),
    )
    address = " ".join(listening) or (ends[0][0] if ends else "-")
    peers = [remote for _, remote in ends]
    return Entry(role, proc.pid, ppid, None, address, peers, age, proc=proc, ends=ends)


def find_rooms(server: psutil.Process, by_pid: dict[int, list[Any]], now: float) -> list[Entry]:
    """The server's rooms, oldest first: its children titled forkchat-room, named after
    their title. Any other child is not a room; a room that exits meanwhile is left out."""
    try:
        children = server.children()
    except psutil.NoSuchProcess:
        return []
    rooms = []
    for proc in children:
        try:
            name, cmdline = read_identity(proc)
            if is_named(name, cmdline, ROOM_NAME):
                room = describe_family(proc, "room", by_pid.get(proc.pid, []), now)
                room.room, room.name = room_title(cmdline) or (None, None)
                rooms.append(room)
        except psutil.NoSuchProcess:
            continue
    return sorted(rooms, key=lambda e: (-(e.age or 0), e.pid))


# -- the processes connected to them -----------------------------------------------------


def find_connected(conns: list[Any], family: list[Entry], now: float) -> list[Entry]:
    """One entry per process connected to the server or a room (one per connection
    whose process cannot be seen): established sockets, outside the family, whose
    remote end is a listening address or a socket the server or a room holds."""
    listen = {a for e in family if e.role == "server" for a in e.address.split()}
    holders = {end: e.pid for e in family for end in e.ends}
    pids = {e.pid for e in family}
    hidden, by_pid = [], {}
    for c in conns:
        if c.status != psutil.CONN_ESTABLISHED or not c.raddr or c.pid in pids:
            continue
        key = (format_addr(c.raddr), format_addr(c.laddr))
        if key in holders or key[0] in listen:
            end = (key[1], key[0], holders.get(key))
            if c.pid is None:
                hidden.append(describe_hidden(end))
            else:
                by_pid.setdefault(c.pid, []).append(end)
    entries = (describe_connected(pid, ends, now) for pid, ends in by_pid.items())
    return [e for e in entries if e is not None] + hidden


def describe_hidden(end: tuple[str, str, int | None]) -> Entry:
    """The entry for a connection whose process this user cannot see."""
    local, remote, holder = end
    return Entry("other", None, None, None, local, [remote], None, holder, HIDDEN)


def describe_connected(
    pid: int, ends: list[tuple[str, str, int | None]], now: float
) -> Entry | None:
    """The entry for a process from its (local, remote, holder) connections: ``client``
    named after its user if it is a forkchat client, else ``other`` named after its
    program. None if it is gone."""
    try:
        proc = psutil.Process(pid)
        with proc.oneshot():
            ppid, age = proc.ppid(), now - proc.create_time()
            program, cmdline = read_identity(proc)
    except psutil.NoSuchProcess:
        return None
    user = client_name(cmdline)
    ends = sorted(ends, key=lambda end: addr_key(end[0]))
    address = " ".join(local for local, _, _ in ends)
    peers = [remote for _, remote, _ in ends]
    holder = ends[0][2] if len({h for _, _, h in ends}) == 1 else None
    role, name = ("client", user) if user is not None else ("other", program or None)
    return Entry(role, pid, ppid, name, address, peers, age, holder, proc=proc)


def order_connected(connected: list[Entry], family: list[Entry]) -> list[Entry]:
    """Clients, then others; each in their holder's order (rooms first, then the
    servers' own), then by PID."""
    holders = sorted(family, key=lambda e: e.role == "server")  # stable: rooms keep order
    rank = {e.pid: i for i, e in enumerate(holders)}
    return sorted(
        connected,
        key=lambda c: (c.role != "client", rank.get(c.holder, len(rank)), c.pid or 0, c.address),
    )


# -- the survey --------------------------------------------------------------------------


def list_tcp() -> list[Any]:
    """Every TCP socket on the machine, once. Raises LookupFailed where the OS refuses."""
    try:
        return psutil.net_connections(kind="tcp")
    except psutil.AccessDenied:
        raise LookupFailed(f"listing TCP sockets: {HIDDEN}; run as root") from None


def survey(port: int, conns: list[Any] | None = None) -> tuple[list[Entry], list[str]]:
    """(entries, strangers): the server(s) on ``port``, each followed by its rooms, then
    the clients and the other programs connected to them; and one line for each other
    program listening on the port.

    ``conns`` is the system-wide socket list (``psutil.net_connections``), read once
    when not given; the server's own sockets are read for it alone, since the listener
    may be credited to a room that has not closed its copy yet. Raises LookupFailed
    when no server can be reported.
    """
    conns = list_tcp() if conns is None else conns
    now = time.time()
    by_pid = sockets_by_pid(conns, port)
    servers, strangers = find_servers(conns, port)
    family: list[Entry] = []
    for server in servers:
        try:
            family.append(describe_family(server, "server", port_sockets(server, port), now))
        except psutil.NoSuchProcess:
            continue
        family.extend(find_rooms(server, by_pid, now))
    if not any(e.role == "server" for e in family):
        raise LookupFailed(no_server(port))
    connected = find_connected(conns, family, now)
    return family + order_connected(connected, family), strangers
