"""bin/pids against real processes: a server with rooms, waiting clients, forkchat clients
and other programs that are processes of their own, a listener shared after fork, and a
server whose children are not all rooms."""

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

from forkchat import pids, pidsfind
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

# A stand-in for bin/client: ``[NAME] --port PORT [--cafile FILE]``. Connects (over TLS
# with --cafile), prints its own address, sends the name if given, then prints every
# line from the server until the server closes, and exits 0.
CLIENT_CODE = """\
import socket, ssl, sys
args = sys.argv[1:]
def option(name):
    if name not in args:
        return None
    i = args.index(name)
    value = args[i + 1]
    del args[i : i + 2]
    return value
port, cafile = int(option("--port")), option("--cafile")
sock = socket.create_connection(("127.0.0.1", port))
if cafile:
    sock = ssl.create_default_context(cafile=cafile).wrap_socket(sock, server_hostname="localhost")
print("local %s:%d" % sock.getsockname()[:2], flush=True)
if args:
    sock.sendall(args[0].encode() + b"\\n")
for line in sock.makefile("rb"):
    print(line.decode().rstrip("\\n"), flush=True)
"""

# A program that holds connections and is not a forkchat client: connects argv[2] times
# to 127.0.0.1:argv[1] (reading each HELLO unless argv[3] is "tls"), prints its own
# addresses, then answers each line on stdin with "pong". Any signal bin/pids could
# send it but SIGCONT, SIGCHLD, SIGURG or SIGWINCH ends it, so a pong after a signal
# proves it was never sent one.
HOLDER_CODE = """\
import socket, sys
port, count = int(sys.argv[1]), int(sys.argv[2])
socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(count)]
if sys.argv[3:] != ["tls"]:
    for sock in socks:
        assert sock.makefile("rb").readline().startswith(b"HELLO ")
print("local", *("%s:%d" % sock.getsockname()[:2] for sock in socks), flush=True)
for line in sys.stdin:
    print("pong", flush=True)
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

# A server with a room and a child that is no room, built by hand. The parent (comm
# forkchat-server) listens, then forks a room (titled "forkchat-room 2 carol+dave") and
# a child that keeps its name (a check process during an upgrade, say, or a room a moment
# after its fork). Both hold the listener they inherited and wait for stdin to close;
# the parent reaps them.
FAMILY_CODE = """\
import os, socket, sys
from setproctitle import setproctitle
def child(title):
    pid = os.fork()
    if pid == 0:
        if title:
            setproctitle(title)
            with open("/proc/self/comm", "w") as f:
                f.write(title.split()[0])
        sys.stdin.buffer.read()
        os._exit(0)
    return pid
sock = socket.socket()
sock.bind(("127.0.0.1", 0))
sock.listen()
with open("/proc/self/comm", "w") as f:
    f.write("forkchat-server")
room, check = child("forkchat-room 2 carol+dave"), child(None)
print(sock.getsockname()[1], room, check, flush=True)
sys.stdin.buffer.read()
for pid in (room, check):
    os.waitpid(pid, 0)
"""


@pytest.fixture(params=["tcp", "tls"])
def chat_server(request):
    """A server whose rooms are its own children: plain TCP or TLS. ``cafile`` is the
    certificate to check it against (None for plain TCP)."""
    if request.param == "tls":
        cert, key = request.getfixturevalue("tls_pair")
        srv = ServerProc("--no-color", "--tls-cert", cert, "--tls-key", key)
        srv.cafile = cert
    else:
        srv = ServerProc("--no-color")
        srv.cafile = None
    yield srv
    srv.stop()


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
    """Starts stand-in client processes for a test and reaps every one of them by PID."""

    def __init__(self, tmp_path: Path) -> None:
        self.script = tmp_path / "bin" / "client"  # so its command line reads bin/client
        self.script.parent.mkdir()
        self.script.write_text(CLIENT_CODE)
        self.started: list[Client] = []

    def start(
        self, port: int, name: str | None, as_bin_client: bool = True, cafile: str | None = None
    ) -> Client:
        """Start one client; ``as_bin_client=False`` runs it as ``python -c`` instead, a
        program that is not a forkchat client. Returns once it has the server's HELLO."""
        program = [str(self.script)] if as_bin_client else ["-c", CLIENT_CODE]
        args = [name] if name else []
        tls = ["--cafile", cafile] if cafile else []
        proc = subprocess.Popen(
            [sys.executable, *program, *args, "--port", str(port), *tls],
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
def clients(tmp_path):
    crowd = Clients(tmp_path)
    yield crowd
    crowd.reap()


@pytest.fixture
def crowd(chat_server, clients):
    """Two rooms (alice+bob, carol+dave), a waiting client and a connected one that sent
    no name, both of them programs that are not forkchat clients.

    Returns (clients, {room pid: (first, second)}) once the server has logged both rooms,
    that is once it has closed its own copies of the paired sockets.
    """
    srv = chat_server

    def start(name: str | None, as_bin_client: bool = True) -> Client:
        return clients.start(srv.port, name, as_bin_client, srv.cafile)

    alice = start("alice")
    alice.out.wait_for("^WAIT ")
    bob = start("bob")
    carol = start("carol")
    carol.out.wait_for("^WAIT ")
    dave = start("dave")
    for c in (alice, bob, carol, dave):
        c.out.wait_for("^PAIRED ")
    erin = start("erin", as_bin_client=False)  # waiting, not a forkchat client
    erin.out.wait_for("^WAIT ")
    frank = start(None, as_bin_client=False)  # connected, no name sent yet
    rooms = {}
    for first, second in ((alice, bob), (carol, dave)):
        m = srv.out.wait_for(rf"room \d+ opened pid (\d+): {first.name} \S+ \+ {second.name} ")
        rooms[int(m.group(1))] = (first, second)
    return [alice, bob, carol, dave, erin, frank], rooms


@dataclass
class Program:
    """A process the test types to (stdin) and reads (stdout); ``local`` its addresses."""

    proc: subprocess.Popen
    out: OutputTail
    local: list[str]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def type(self, text: str) -> int:
        """Write ``text`` to its stdin; return the output mark from before."""
        mark = self.out.mark()
        self.proc.stdin.write(text.encode())
        self.proc.stdin.flush()
        return mark

    def ping(self) -> None:
        """A holder answers: it is alive, and was never sent a signal that ends it."""
        self.out.wait_for("^pong$", start=self.type("ping\n"))


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


@contextmanager
def holder(port: int, count: int, *extra: str) -> Iterator[Program]:
    """Run HOLDER_CODE; yield it once connected; end it (EOF) and reap it."""
    with script_tree(HOLDER_CODE, str(port), str(count), *extra) as (proc, out):
        local = out.wait_for(r"^local (.*)$").group(1).split()
        yield Program(proc, out, sorted(local, key=port_of))


def port_of(address: str) -> int:
    return int(address.rpartition(":")[2])


def run_pids(*args: str) -> subprocess.CompletedProcess:
    return run_bin("pids", *args)


def pids_json(port: int) -> list[dict]:
    done = run_pids("--port", str(port), "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def program_name(pid: int) -> str:
    """What psutil calls the program running as ``pid`` (``python3``, ``nc``...)."""
    return psutil.Process(pid).name()


def roles(entries: list) -> list[tuple]:
    return [(e["role"], e["pid"], e["ppid"]) for e in entries]


# -- listing ------------------------------------------------------------------------------


def test_json_reports_every_pid_right(chat_server, crowd):
    """The server, its rooms (its children), the forkchat clients, then the other
    programs connected (named after the program), each once."""
    srv = chat_server
    started, rooms = crowd
    entries = pids_json(srv.port)
    assert [e["role"] for e in entries] == [
        *["server", "room", "room"],
        *["client"] * 4,
        *["other"] * 2,
    ]
    here = f"127.0.0.1:{srv.port}"

    entry = entries[0]
    assert (entry["pid"], entry["ppid"], entry["address"]) == (srv.pid, os.getpid(), here)
    waiting = started[4:]  # erin and frank are still the parent's
    assert entry["peers"] == sorted(c.address for c in waiting)

    found_rooms = {e["pid"]: e for e in entries if e["role"] == "room"}
    assert set(found_rooms) == set(rooms)
    for pid, (first, second) in rooms.items():
        room = found_rooms[pid]
        assert room["ppid"] == srv.pid
        assert room["address"] == here
        assert set(room["peers"]) == {first.address, second.address}
        assert room["name"] == f"{first.name}+{second.name}"  # by its title: arrival order
        assert 0 <= room["age"] < DEADLINE

    holders = {c.pid: pid for pid, pair in rooms.items() for c in pair}
    for c, entry in zip(started, entries[3:], strict=True):
        assert entry["pid"] == c.pid
        assert entry["role"] == ("client" if c.name else "other")
        assert entry["name"] == (c.name or program_name(c.pid))
        assert (entry["ppid"], entry["note"]) == (os.getpid(), None)
        assert (entry["address"], entry["peers"]) == (c.address, [here])
        assert entry["holder"] == holders.get(c.pid, srv.pid)


def test_table_lists_the_same_processes(chat_server, crowd):
    srv = chat_server
    started, rooms = crowd
    done = run_pids("--port", str(srv.port))
    assert done.returncode == 0 and done.stderr == ""
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["ROLE", "PID", "PPID", "NAME", "ADDRESS", "PEER", "AGE"]
    rows = [tuple(line.split()[:4]) for line in lines[1:]]
    me = str(os.getpid())
    assert rows[0] == ("server", str(srv.pid), me, "-")
    # Rooms come oldest first: two opened within a clock tick may come either way.
    assert {(*r[:3], re.sub(r"^#\d+:", "", r[3])) for r in rows[1:3]} == {
        ("room", str(pid), str(srv.pid), f"{a.name}+{b.name}") for pid, (a, b) in rooms.items()
    }
    assert rows[3:] == [
        ("client" if c.name else "other", str(c.pid), me, c.name or program_name(c.pid))
        for c in started
    ]


def test_a_program_with_several_connections_is_one_entry(server):
    """Three connections of one program (as HAProxy holds) are one line, never three."""
    with holder(server.port, 3) as held:
        entries = pids_json(server.port)
        assert roles(entries) == [
            ("server", server.pid, os.getpid()),
            ("other", held.pid, os.getpid()),
        ]
        other = entries[1]
        assert other["name"] == program_name(held.pid)
        assert other["address"] == " ".join(held.local)
        assert other["peers"] == [f"127.0.0.1:{server.port}"] * 3
        assert other["holder"] == server.pid  # all three wait in the server
        rows = run_pids("--port", str(server.port)).stdout.splitlines()[1:]
        assert [row.split()[:5] for row in rows[1:]] == [
            ["other", str(held.pid), str(os.getpid()), other["name"], "3"]
        ]


def test_rooms_are_the_servers_children_titled_forkchat_room():
    """A child of the server that is not titled forkchat-room (a check process during an
    upgrade) is not a room: neither listed nor signalled."""
    with script_tree(FAMILY_CODE) as (proc, out):
        port, room, check = map(int, out.wait_for(r"^(\d+) (\d+) (\d+)$").groups())
        wait_until(lambda: program_name(room) == "forkchat-room", what="room named")
        entries = pids_json(port)
        assert roles(entries) == [("server", proc.pid, os.getpid()), ("room", room, proc.pid)]
        assert (entries[1]["room"], entries[1]["name"]) == (2, "carol+dave")
        done = run_pids("--port", str(port), "--json", "--signal", "CONT", "--all")
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout)
        assert [(r["role"], r["pid"], r["result"]) for r in report] == [
            ("server", proc.pid, "sent")
        ]
        assert psutil.Process(check).ppid() == proc.pid  # the check was there all along


def test_a_tls_server_lists_its_rooms_as_its_children(tls_pair):
    from test_tls import pair_up  # the TLS tests' clients, shared here

    srv = ServerProc("--no-color", "--tls-cert", tls_pair[0], "--tls-key", tls_pair[1])
    try:
        pair = pair_up(srv.address, ssl.create_default_context(cafile=tls_pair[0]))
        room = int(srv.out.wait_for(r"room \d+ opened pid (\d+)").group(1))
        entries = pids_json(srv.port)
        assert roles(entries) == [
            ("server", srv.pid, os.getpid()),
            ("room", room, srv.pid),
            ("other", os.getpid(), os.getppid()),  # this test holds both clients: one entry
        ]
        assert entries[2]["holder"] == room
        assert entries[2]["address"].split() == sorted((c.here for c in pair), key=port_of)
    finally:
        srv.stop()


def test_default_port_is_33016():
    assert pids.parse_options([]).port == 33016


def test_server_listen_line_matches_what_pids_reports(server):
    entries = pids_json(server.port)
    m = LISTEN_RE.search(server.out.lines[0])
    assert roles(entries) == [("server", int(m.group(3)), os.getpid())]
    assert entries[0]["address"] == f"{m.group(1)}:{m.group(2)}"


# -- signals ----------------------------------------------------------------------------------


def test_signal_usr2_makes_the_server_report(chat_server, crowd):
    srv = chat_server
    mark = srv.out.mark()
    done = run_pids("--port", str(srv.port), "--signal", "USR2")
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"sent SIGUSR2 to server pid {srv.pid} (127.0.0.1:{srv.port})\n"
    srv.out.wait_for(r"^NUMBER OF CLIENTS : \*\* 6 \*\*$", start=mark)
    srv.out.wait_for(r"^rooms 2, waiting 1, handshaking 1$", start=mark)


@pytest.mark.parametrize("spelling", ["SIGUSR2", "12", "usr2"])
def test_signal_spellings(server, spelling):
    mark = server.out.mark()
    done = run_pids("--port", str(server.port), "--signal", spelling)
    assert done.returncode == 0 and "sent SIGUSR2 to server" in done.stdout
    server.out.wait_for(r"^NUMBER OF CLIENTS : \*\* 0 \*\*$", start=mark)


def test_signal_usr1_all_ends_the_server_and_its_clients_never_other_programs(chat_server, crowd):
    """The forkchat clients get SIGUSR1; erin and frank (not forkchat clients) are named
    on stderr, left alone, and end only because the server closed their connections."""
    srv = chat_server
    started, rooms = crowd
    room_procs = [psutil.Process(pid) for pid in rooms]
    done = run_pids("--port", str(srv.port), "--signal", "USR1", "--all")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"sent SIGUSR1 to server pid {srv.pid} (127.0.0.1:{srv.port})"
    named, others = started[:4], started[4:]
    assert len(lines) == 1 + len(named)
    for c in named:  # sent, or the server's BYE ended it first: both are fine
        pattern = rf"^(sent SIGUSR1 to|not sent SIGUSR1 to) client pid {c.pid} \({c.name} "
        assert any(re.match(pattern, line) for line in lines[1:]), (c.pid, lines)
    listed = ", ".join(f"pid {c.pid} ({program_name(c.pid)})" for c in others)
    assert done.stderr == f"forkchat pids: SIGUSR1 not sent to the 2 other programs: {listed}\n"
    assert srv.wait_exit() == 0
    srv.out.wait_for("^SERVER WILL DISCONNECT$")
    for c in named:
        assert c.proc.wait(DEADLINE) in (0, -signal.SIGUSR1)
    for c in others:  # the stand-in ends when the server closes: never by the signal
        assert c.proc.wait(DEADLINE) == 0
        c.out.wait_for("^BYE shutdown ")
    assert not any(p.is_running() for p in room_procs)
    assert run_pids("--port", str(srv.port)).returncode == 1


def test_signal_with_json_reports_each_target(server, clients):
    alice = clients.start(server.port, "alice")
    alice.out.wait_for("^WAIT ")
    done = run_pids("--port", str(server.port), "--json", "--signal", "CONT", "--all")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert [(r["role"], r["pid"], r["signal"], r["result"]) for r in report] == [
        ("server", server.pid, "SIGCONT", "sent"),
        ("client", alice.pid, "SIGCONT", "sent"),
    ]


def test_no_server_on_the_port_is_one_line_and_exit_1(server):
    port = server.port
    server.stop()
    done = run_pids("--port", str(port), "--signal", "USR1")
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr == (
        f"forkchat pids: no server listening on port {port} (start one with make run PORT={port})\n"
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
    today's server: comm only. Yielded once the child has named itself, if it does."""
    naming, titled = getattr(request, "param", ("comm", "untitled"))
    with script_tree(SHARED_LISTENER_CODE, naming, titled) as (proc, out):
        port, child = map(int, out.wait_for(r"^(\d+) (\d+)$").groups())
        if naming != "none":  # a child is a room once it has named itself
            wait_until(lambda: program_name(child).startswith("forkchat-room"), what="room named")
        yield port, proc.pid, child


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


def credit_listener(port: int, pid: int) -> list:
    """The system-wide socket list, rewritten to credit the listener on ``port`` to ``pid``
    (what psutil does when it scans that holder last)."""
    return [
        c._replace(pid=pid) if c.status == psutil.CONN_LISTEN and c.laddr.port == port else c
        for c in psutil.net_connections(kind="tcp")
    ]


@pytest.mark.parametrize("credit", ["child", "parent"])
def test_shared_listener_whichever_holder_psutil_credits(shared_listener, credit):
    """Deterministic: the system-wide view is rewritten to credit the child or the
    parent; the server is the parent either way."""
    port, parent, child = shared_listener
    conns = credit_listener(port, {"child": child, "parent": parent}[credit])
    entries, strangers = pidsfind.survey(port, conns)
    assert roles([e.to_json() for e in entries]) == [
        ("server", parent, os.getpid()),
        ("room", child, parent),
    ]
    assert strangers == []


# -- only a forkchat server is listed or signalled -------------------------------------------


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
        f"forkchat pids: port {port} is held by pid {parent} ({listener.name()}) "
        f"on 127.0.0.1:{port}, which is not a forkchat server; not listed, not signalled\n"
    )
    assert listener.status() != psutil.STATUS_ZOMBIE and psutil.Process(child).is_running()
