"""bin/pids against real processes: a server with rooms, a waiting client and clients that
are processes of their own, a listener shared after fork, and a server's family in every
shape (rooms forked by the room forker, and by the server itself)."""

from __future__ import annotations

import json
import os
import re
import signal
import ssl
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from forkchat import pids
from support import (
    DEADLINE,
    LISTEN_RE,
    OutputTail,
    ServerProc,
    child_env,
    reap_tree,
    run_bin,
    wait_until,
)

# A stand-in for bin/client: ``[NAME] --port PORT``. Prints its own address, sends the
# name if given, then prints every line from the server until the server closes.
CLIENT_CODE = """\
import socket, sys
args = sys.argv[1:]
port = int(args.pop(args.index("--port") + 1))
args.remove("--port")
sock = socket.create_connection(("127.0.0.1", port))
print("local %s:%d" % sock.getsockname()[:2], flush=True)
if args:
    sock.sendall(args[0].encode() + b"\\n")
for line in sock.makefile("rb"):
    print(line.decode().rstrip("\\n"), flush=True)
"""

# A listener shared after fork, held open by parent and child until stdin closes. argv[1]
# says how the parent names itself: "comm" as today's server does (comm only), "title"
# as a server does with setproctitle (full command line, comm left as Python's), "none"
# (any program). The child takes the title of a room worker unless argv[2] is "untitled".
SHARED_LISTENER_CODE = """\
import os, socket, sys
from setproctitle import setproctitle
def comm(name):
    with open("/proc/self/comm", "w") as f:
        f.write(name)
sock = socket.socket()
sock.bind(("127.0.0.1", 0))
sock.listen()
child = os.fork()
if child == 0:
    if sys.argv[1] != "none":
        comm("forkchat-room")
    if sys.argv[2] == "titled":
        setproctitle("forkchat-room 7 alice+bob")
        comm("forkchat-room 7")
    sys.stdin.buffer.read()
    os._exit(0)
if sys.argv[1] == "comm":
    comm("forkchat-server")
elif sys.argv[1] == "title":
    setproctitle("forkchat-server --port 0")
    comm("python3")
print(sock.getsockname()[1], child, flush=True)
sys.stdin.buffer.read()
os.waitpid(child, 0)
"""


# A server's family in every shape at once, built by hand. The parent (comm
# forkchat-server) listens and forks the forker (titled forkchat-forker, the listener
# closed) and a room of its own, #2 (what a TLS server does, or one that lost its
# forker). The forker forks a room, #1, and a child that has not named itself yet (still
# forkchat-forker: a room a moment after its fork). Each prints its children's PIDs;
# all wait for stdin to close, and each parent reaps its children.
FAMILY_CODE = """\
import os, socket, sys
from setproctitle import setproctitle
def name(comm, title=None):
    if title:
        setproctitle(title)
    with open("/proc/self/comm", "w") as f:
        f.write(comm)
def child(body):
    pid = os.fork()
    if pid == 0:
        body()
        sys.stdin.buffer.read()
        os._exit(0)
    return pid
def forker():
    sock.close()
    name("forkchat-forker", "forkchat-forker")
    room = child(lambda: name("forkchat-room", "forkchat-room 1 alice+bob"))
    unnamed = child(lambda: None)
    print("forker", os.getpid(), room, unnamed, flush=True)
    sys.stdin.buffer.read()
    os.waitpid(room, 0)
    os.waitpid(unnamed, 0)
sock = socket.socket()
sock.bind(("127.0.0.1", 0))
sock.listen()
name("forkchat-server")
pids = [child(forker), child(lambda: name("forkchat-room", "forkchat-room 2 carol+dave"))]
print("server", sock.getsockname()[1], pids[1], flush=True)
sys.stdin.buffer.read()
for pid in pids:
    os.waitpid(pid, 0)
"""


def descendants_named(pid: int, name: str) -> dict[int, int]:
    """{pid: ppid} of the live descendants of ``pid`` whose comm is ``name``, at any
    depth: a plain-TCP server's rooms are its room forker's children, a TLS server's its
    own. Read here, not through ServerProc, so the test says what it counts."""
    found = {}
    for proc in psutil.Process(pid).children(recursive=True):
        try:
            if proc.name() == name:
                found[proc.pid] = proc.ppid()
        except psutil.NoSuchProcess:
            continue
    return found


def forkers_of(pid: int) -> dict[int, int]:
    return descendants_named(pid, "forkchat-forker")


def rooms_of(pid: int) -> dict[int, int]:
    return descendants_named(pid, "forkchat-room")


@dataclass
class Client:
    """A client process: its Popen, its output and its own address."""

    name: str | None
    proc: subprocess.Popen
    out: OutputTail
    address: str = ""

    @property
    def pid(self) -> int:
        return self.proc.pid


class Clients:
    """Starts client processes for a test and reaps every one of them by PID."""

    def __init__(self, tmp_path: Path, port: int) -> None:
        self.port = port
        self.script = tmp_path / "bin" / "client"  # so its command line reads bin/client
        self.script.parent.mkdir()
        self.script.write_text(CLIENT_CODE)
        self.started: list[Client] = []

    def start(self, name: str | None, as_bin_client: bool = True) -> Client:
        """Start one client; ``as_bin_client=False`` runs it as ``python -c`` instead,
        a client whose name bin/pids cannot know."""
        program = [str(self.script)] if as_bin_client else ["-c", CLIENT_CODE]
        args = [name] if name else []
        proc = subprocess.Popen(
            [sys.executable, *program, *args, "--port", str(self.port)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=child_env(),
            start_new_session=True,
        )
        client = Client(name if as_bin_client else None, proc, OutputTail(proc.stdout))
        self.started.append(client)
        client.address = client.out.wait_for(r"^local (\S+)").group(1)
        client.out.wait_for(r"^HELLO ")
        return client

    def reap(self) -> None:
        for client in self.started:
            reap_tree(client.proc)


@pytest.fixture
def clients(server, tmp_path):
    crowd = Clients(tmp_path, server.port)
    yield crowd
    crowd.reap()


@pytest.fixture
def crowd(server, clients):
    """Two rooms (alice+bob, carol+dave), a waiting client and a client without a name.

    Returns (clients, {room pid: (first, second)}) once the server has logged both rooms,
    that is once it has closed its own copies of the paired sockets.
    """
    alice = clients.start("alice")
    alice.out.wait_for("^WAIT ")
    bob = clients.start("bob")
    carol = clients.start("carol")
    carol.out.wait_for("^WAIT ")
    dave = clients.start("dave")
    for c in (alice, bob, carol, dave):
        c.out.wait_for("^PAIRED ")
    erin = clients.start("erin", as_bin_client=False)  # waiting, name not visible
    erin.out.wait_for("^WAIT ")
    frank = clients.start(None, as_bin_client=False)  # connected, no name sent yet
    rooms = {}
    for first, second in ((alice, bob), (carol, dave)):
        m = server.out.wait_for(rf"room \d+ opened pid (\d+): {first.name} \S+ \+ {second.name} ")
        rooms[int(m.group(1))] = (first, second)
    return [alice, bob, carol, dave, erin, frank], rooms


def run_pids(*args: str) -> subprocess.CompletedProcess:
    return run_bin("pids", *args)


def pids_json(port: int) -> list[dict]:
    done = run_pids("--port", str(port), "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


# -- listing ------------------------------------------------------------------------------


def test_json_reports_every_pid_right(server, crowd):
    started, rooms = crowd
    entries = pids_json(server.port)
    forkers, room_parents = forkers_of(server.pid), rooms_of(server.pid)
    assert [e["role"] for e in entries] == [
        "server",
        *["forker"] * len(forkers),
        "room",
        "room",
        *["client"] * 6,
    ]
    here = f"127.0.0.1:{server.port}"

    srv = entries[0]
    assert (srv["pid"], srv["ppid"], srv["address"]) == (server.pid, os.getpid(), here)
    waiting = started[4:]  # erin and frank are still the parent's
    assert srv["peers"] == sorted(c.address for c in waiting)

    found_rooms = {e["pid"]: e for e in entries if e["role"] == "room"}
    assert set(found_rooms) == set(rooms) == set(room_parents)
    for pid, (first, second) in rooms.items():
        room = found_rooms[pid]
        assert room["ppid"] == room_parents[pid] in {server.pid, *forkers}
        assert room["address"] == here
        assert set(room["peers"]) == {first.address, second.address}
        if room["room"] is None:  # named after its clients, in the order of its peers
            names = dict(zip(room["peers"], room["name"].split("+"), strict=True))
            assert names == {first.address: first.name, second.address: second.name}
        else:  # named by its title, in the order of arrival
            assert room["name"] == f"{first.name}+{second.name}"
        assert 0 <= room["age"] < DEADLINE

    found_clients = {e["pid"]: e for e in entries if e["role"] == "client"}
    assert set(found_clients) == {c.pid for c in started}
    holders = {c.pid: pid for pid, pair in rooms.items() for c in pair}
    for c in started:
        entry = found_clients[c.pid]
        assert (entry["ppid"], entry["name"]) == (os.getpid(), c.name)
        assert (entry["address"], entry["peers"]) == (c.address, [here])
        assert entry["holder"] == holders.get(c.pid, server.pid)


def test_table_lists_the_same_processes(server, crowd):
    started, rooms = crowd
    done = run_pids("--port", str(server.port))
    assert done.returncode == 0 and done.stderr == ""
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["ROLE", "PID", "PPID", "NAME", "ADDRESS", "PEER", "AGE"]
    rows = [line.split() for line in lines[1:]]
    me = os.getpid()
    # A room's names follow its PEER column, sorted by address: compare them as a set.
    # A titled room shows its number first: #1:alice+bob.
    names = [re.sub(r"^#\d+:", "", f[3]) for f in rows]
    got = {
        (f[0], int(f[1]), int(f[2]), frozenset(n.split("+")))
        for f, n in zip(rows, names, strict=True)
    }
    room_parents = rooms_of(server.pid)
    want = {("server", server.pid, me, frozenset("-"))}
    want |= {("forker", pid, server.pid, frozenset("-")) for pid in forkers_of(server.pid)}
    want |= {
        ("room", pid, room_parents[pid], frozenset((a.name, b.name)))
        for pid, (a, b) in rooms.items()
    }
    want |= {("client", c.pid, me, frozenset([c.name or "-"])) for c in started}
    assert got == want and len(rows) == len(want)


def test_the_room_forker_is_listed_between_the_server_and_its_rooms(server, crowd):
    """A plain-TCP server forks one room forker, which forks the rooms: its line comes
    right after the server's, with no name, address or peers, and it holds no client."""
    _, rooms = crowd
    (forker,) = forkers_of(server.pid)
    entries = pids_json(server.port)
    assert entries[1] == {
        "role": "forker",
        "pid": forker,
        "ppid": server.pid,
        "name": None,
        "address": "-",
        "peers": [],
        "age": entries[1]["age"],
        "holder": None,
        "note": None,
        "room": None,
    }
    assert 0 <= entries[1]["age"] < DEADLINE
    assert {e["pid"]: e["ppid"] for e in entries if e["role"] == "room"} == dict.fromkeys(
        rooms, forker
    )
    assert forker not in {e["holder"] for e in entries if e["role"] == "client"}
    table = run_pids("--port", str(server.port)).stdout.splitlines()
    assert table[2].split()[:6] == ["forker", str(forker), str(server.pid), "-", "-", "-"]
    assert [line.split()[0] for line in table[1:]] == [e["role"] for e in entries]


def test_a_tls_server_has_no_forker_its_rooms_are_its_children(tls_pair):
    from test_tls import pair_up  # the TLS tests' clients, shared here

    srv = ServerProc("--no-color", "--tls-cert", tls_pair[0], "--tls-key", tls_pair[1])
    try:
        pair = pair_up(srv.address, ssl.create_default_context(cafile=tls_pair[0]))
        room = int(srv.out.wait_for(r"room \d+ opened pid (\d+)").group(1))
        entries = pids_json(srv.port)
        assert roles(entries) == [
            ("server", srv.pid, os.getpid()),
            ("room", room, srv.pid),
            ("client", os.getpid(), os.getppid()),
            ("client", os.getpid(), os.getppid()),
        ]
        assert [e["holder"] for e in entries[2:]] == [room, room]
        assert {e["address"] for e in entries[2:]} == {c.here for c in pair}
    finally:
        srv.stop()


def test_default_port_is_33016():
    assert pids.parse_options([]).port == 33016


# -- signals ----------------------------------------------------------------------------------


def test_signal_usr2_makes_the_server_report(server, crowd):
    mark = server.out.mark()
    done = run_pids("--port", str(server.port), "--signal", "USR2")
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"sent SIGUSR2 to server pid {server.pid} (127.0.0.1:{server.port})\n"
    server.out.wait_for(r"^NUMBER OF CLIENTS : \*\* 6 \*\*$", start=mark)
    server.out.wait_for(r"^rooms 2, waiting 1, handshaking 1$", start=mark)


@pytest.mark.parametrize("spelling", ["SIGUSR2", "12", "usr2"])
def test_signal_spellings(server, spelling):
    mark = server.out.mark()
    done = run_pids("--port", str(server.port), "--signal", spelling)
    assert done.returncode == 0 and "sent SIGUSR2 to server" in done.stdout
    server.out.wait_for(r"^NUMBER OF CLIENTS : \*\* 0 \*\*$", start=mark)


def test_signal_usr1_all_ends_every_process(server, crowd):
    started, rooms = crowd
    room_procs = [psutil.Process(pid) for pid in rooms]
    done = run_pids("--port", str(server.port), "--signal", "USR1", "--all")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"sent SIGUSR1 to server pid {server.pid} (127.0.0.1:{server.port})"
    assert len(lines) == 1 + len(started)
    for c in started:  # sent, or the server's BYE ended it first: both are fine
        pattern = rf"^(sent SIGUSR1 to|not sent SIGUSR1 to) client pid {c.pid} \(.*{c.address}\)"
        assert any(re.match(pattern, line) for line in lines[1:]), (c.pid, lines)
    assert server.wait_exit() == 0
    server.out.wait_for("^SERVER WILL DISCONNECT$")
    for c in started:
        assert c.proc.wait(DEADLINE) in (0, -signal.SIGUSR1)
    assert not any(p.is_running() for p in room_procs)
    assert run_pids("--port", str(server.port)).returncode == 1


def test_signal_with_json_reports_each_target(server, clients):
    alice = clients.start("alice")
    alice.out.wait_for("^WAIT ")
    done = run_pids("--port", str(server.port), "--json", "--signal", "CONT", "--all")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert [(r["role"], r["pid"], r["signal"], r["result"]) for r in report] == [
        ("server", server.pid, "SIGCONT", "sent"),
        ("client", alice.pid, "SIGCONT", "sent"),
    ]


def test_signal_targets_are_the_server_and_clients_never_the_forker_or_a_room():
    def entry(role: str, pid: int) -> pids.Entry:
        return pids.Entry(role, pid, 1, None, "-", [], 0.0)

    family = [entry(role, pid) for pid, role in enumerate(["server", "forker", "room"], 10)]
    clients = [entry("client", 20), entry("client", 20), entry("client", 21)]
    assert [e.pid for e in pids.signal_targets(family + clients, False)] == [10]
    assert [e.pid for e in pids.signal_targets(family + clients, True)] == [10, 20, 21]


def test_no_server_on_the_port_is_one_line_and_exit_1(server):
    port = server.port
    server.stop()
    done = run_pids("--port", str(port), "--signal", "USR1")
    assert done.returncode == 1 and done.stdout == ""
    assert (
        done.stderr
        == f"forkchat pids: no server listening on port {port} (start one with make run)\n"
    )


@pytest.mark.parametrize("argv", [["--port", "abc"], ["--signal", "FOO"]])
def test_bad_values_exit_2_without_traceback(argv):
    done = run_pids(*argv)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


# -- a listener shared after fork -----------------------------------------------------------


@pytest.fixture
def shared_listener(request):
    """(port, parent pid, child pid) of a process whose forked child holds its listener;
    named as ``request.param`` says (``(parent naming, child titled)``), by default like
    today's server: comm only."""
    naming, titled = getattr(request, "param", ("comm", "untitled"))
    with script_tree(SHARED_LISTENER_CODE, naming, titled) as (proc, out):
        port, child = map(int, out.wait_for(r"^(\d+) (\d+)$").groups())
        yield port, proc.pid, child


@contextmanager
def script_tree(code: str, *args: str) -> Iterator[tuple[subprocess.Popen, OutputTail]]:
    """Run ``code`` (a process tree whose every member reads stdin) in a session of its
    own; yield it and its output. After: EOF on stdin ends the tree, the script must
    exit 0, and whatever is left is reaped."""
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=child_env(),
        start_new_session=True,
    )
    try:
        yield proc, OutputTail(proc.stdout)
        proc.stdin.close()  # all read stdin: EOF ends them, each parent reaps its child
        assert proc.wait(DEADLINE) == 0
    finally:
        reap_tree(proc)


def roles(entries: list) -> list[tuple]:
    return [(e["role"], e["pid"], e["ppid"]) for e in entries]


def test_shared_listener_the_parent_is_the_server(shared_listener):
    port, parent, child = shared_listener
    # psutil's system-wide view credits the shared socket to one of the two holders.
    credited = {
        c.pid
        for c in psutil.net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == port
    }
    assert len(credited) == 1 and credited <= {parent, child}
    entries = pids_json(port)
    assert roles(entries) == [("server", parent, os.getpid()), ("room", child, parent)]
    assert entries[0]["address"] == f"127.0.0.1:{port}"


@pytest.mark.parametrize("credit", ["child", "parent"])
def test_shared_listener_whichever_holder_psutil_credits(shared_listener, credit):
    """Deterministic: the system-wide view is rewritten to credit the child (what psutil
    does when it scans the child last) or the parent; the server is the parent either way."""
    port, parent, child = shared_listener
    pid = {"child": child, "parent": parent}[credit]
    conns = [
        c._replace(pid=pid) if c.status == psutil.CONN_LISTEN and c.laddr.port == port else c
        for c in psutil.net_connections(kind="tcp")
    ]
    entries = [e.to_json() for e in pids.survey(port, conns)]
    assert roles(entries) == [("server", parent, os.getpid()), ("room", child, parent)]


def test_server_listen_line_matches_what_pids_reports(server):
    entries = pids_json(server.port)
    m = LISTEN_RE.search(server.out.lines[0])
    forkers = [("forker", pid, server.pid) for pid in forkers_of(server.pid)]
    assert roles(entries) == [("server", int(m.group(3)), os.getpid()), *forkers]
    assert entries[0]["address"] == f"{m.group(1)}:{m.group(2)}"


# -- only a forkchat server is listed or signalled (issue 12, item 3) ------------------------


@pytest.mark.parametrize(
    "shared_listener", [("title", "titled"), ("comm", "titled")], indirect=True
)
def test_a_room_is_named_by_its_title_and_the_server_by_comm_or_title(shared_listener):
    port, parent, child = shared_listener
    entries = pids_json(port)
    assert roles(entries) == [("server", parent, os.getpid()), ("room", child, parent)]
    assert (entries[1]["room"], entries[1]["name"]) == (7, "alice+bob")
    done = run_pids("--port", str(port))
    assert done.stdout.splitlines()[2].split()[:4] == [
        "room",
        str(child),
        str(parent),
        "#7:alice+bob",
    ]


@pytest.mark.parametrize("shared_listener", [("none", "untitled")], indirect=True)
@pytest.mark.parametrize("args", [(), ("--signal", "USR1"), ("--signal", "USR1", "--all")])
def test_a_listener_that_is_not_forkchat_is_named_not_signalled(shared_listener, args):
    port, parent, child = shared_listener
    listener = psutil.Process(parent)
    done = run_pids("--port", str(port), *args)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr == (
        f"forkchat pids: port {port} is held by pid {parent} ({listener.name()}), "
        "which is not a forkchat server; not listed, not signalled\n"
    )
    assert listener.status() != psutil.STATUS_ZOMBIE and psutil.Process(child).is_running()


# -- a server's family in every shape ------------------------------------------------------


@pytest.fixture
def family():
    """{what: pid} of a server family built by FAMILY_CODE, and its port, until the test
    ends: server, forker, forker_room (#1), unnamed (the forker's), server_room (#2)."""
    with script_tree(FAMILY_CODE) as (proc, out):
        port, server_room = map(int, out.wait_for(r"^server (\d+) (\d+)$").groups())
        forker, forker_room, unnamed = map(
            int, out.wait_for(r"^forker (\d+) (\d+) (\d+)$").groups()
        )
        # each child names itself after its fork: wait until every one has
        names = {server_room: "forkchat-room", forker_room: "forkchat-room"}
        wait_until(
            lambda: all(psutil.Process(p).name() == n for p, n in names.items()),
            what="rooms named",
        )
        yield (
            port,
            {
                "server": proc.pid,
                "forker": forker,
                "forker_room": forker_room,
                "unnamed": unnamed,
                "server_room": server_room,
            },
        )


def test_rooms_at_both_levels_and_the_forker_are_listed(family):
    """The forker (a child named forkchat-forker) after the server, then every room:
    the forker's, titled or not named yet, and the server's own."""
    port, pid = family
    entries = pids_json(port)
    me = os.getpid()
    assert [(e["role"], e["pid"], e["ppid"]) for e in entries[:2]] == [
        ("server", pid["server"], me),
        ("forker", pid["forker"], pid["server"]),
    ]
    assert (entries[1]["name"], entries[1]["address"], entries[1]["peers"]) == (None, "-", [])
    rooms = {(e["role"], e["pid"], e["ppid"], e["room"], e["name"]) for e in entries[2:]}
    assert rooms == {
        ("room", pid["forker_room"], pid["forker"], 1, "alice+bob"),
        ("room", pid["unnamed"], pid["forker"], None, None),
        ("room", pid["server_room"], pid["server"], 2, "carol+dave"),
    }
    assert len(entries) == 5
    table = run_pids("--port", str(port)).stdout.splitlines()
    assert [line.split()[0] for line in table[1:]] == ["server", "forker", "room", "room", "room"]
    assert table[2].split()[:6] == ["forker", str(pid["forker"]), str(pid["server"]), "-", "-", "-"]


@pytest.mark.parametrize("args", [("--signal", "CONT"), ("--signal", "CONT", "--all")])
def test_the_forker_and_the_rooms_are_never_signalled(family, args):
    port, pid = family
    done = run_pids("--port", str(port), "--json", *args)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert [(r["role"], r["pid"], r["result"]) for r in report] == [
        ("server", pid["server"], "sent")
    ]
