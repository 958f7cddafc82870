"""bin/pids beside programs that are not forkchat's: nc, openssl s_client, HAProxy and a
plain Python program connected to the server; a service manager holding the listener
it passed to the server (socket activation); another program listening on the same
port. They are listed as what they are and never signalled, while the forkchat clients
(real bin/client processes) get the signal, if it is one they take."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from test_pids import (
    Clients,
    Program,
    credit_listener,
    holder,
    pids_json,
    port_of,
    program_name,
    roles,
    run_pids,
    script_tree,
)

from forkchat import pidsfind
from support import BIN, DEADLINE, LISTEN_RE, OutputTail, Peer, ServerProc, child_env, reap_tree

needs = {
    tool: pytest.mark.skipif(not shutil.which(tool), reason=f"{tool} is not installed")
    for tool in ("nc", "openssl", "haproxy")
}

# A service manager, as systemd is for deploy/forkchat.socket: binds and listens, then
# forks and execs argv[1] (bin/server) with the socket on fd 3, LISTEN_FDS=1 and
# LISTEN_PID its own PID, keeping its own copy of the socket open. At EOF on stdin it
# stops the server (SIGTERM) and reaps it.
MANAGER_CODE = """\
import os, signal, socket, sys
sock = socket.socket()
sock.bind(("127.0.0.1", 0))
sock.listen()
child = os.fork()
if child == 0:
    os.dup2(sock.fileno(), 3)
    os.set_inheritable(3, True)
    os.environ.update(LISTEN_FDS="1", LISTEN_PID=str(os.getpid()))
    os.execv(sys.executable, [sys.executable, sys.argv[1], "--no-color"])
print("manager", sock.getsockname()[1], child, flush=True)
sys.stdin.buffer.read()
os.kill(child, signal.SIGTERM)
_, status = os.waitpid(child, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""

# Another program listening on argv[1]:argv[2], answering each line on stdin with "pong".
LISTENER_CODE = """\
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
sock.bind((host, port))
sock.listen()
print("listening", flush=True)
for line in sys.stdin:
    print("pong", flush=True)
"""


@contextmanager
def program(*argv: str) -> Iterator[Program]:
    """Run ``argv`` (nc, openssl) with piped stdin and stdout, stderr drained, in a
    session of its own; reap it by PID afterwards."""
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=child_env(),
        start_new_session=True,
    )
    OutputTail(proc.stderr)
    try:
        yield Program(proc, OutputTail(proc.stdout), [])
    finally:
        reap_tree(proc)


def pair_clients(piped, port: int, *args: str) -> tuple:
    """Two real bin/client processes in a room: alice writes, bob reads."""
    alice = piped(port, "alice", *args)
    alice.out.wait_for(r"^\[WAIT\] ")
    bob = piped(port, "bob", *args)
    alice.out.wait_for(r"^\[WRITE\] ")
    bob.out.wait_for(r"^\[READ\] ")
    return alice, bob


def check_report(done, srv: ServerProc, sig: str, clients: list, others: list[Program]) -> None:
    """bin/pids --signal SIG --all: exit 0, one line for the server and each client (sent,
    or gone when the server's BYE ended it first), one stderr line naming the others."""
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"sent SIG{sig} to server pid {srv.pid} (127.0.0.1:{srv.port})"
    assert len(lines) == 1 + len(clients)
    for c, name in zip(clients, ("alice", "bob"), strict=False):
        pattern = rf"^(not )?sent SIG{sig} to client pid {c.pid} \({name} 127\.0\.0\.1:\d+\)"
        assert any(re.match(pattern, line) for line in lines[1:]), lines
    named = ", ".join(f"pid {o.pid} ({program_name(o.pid)})" for o in others)
    noun = "the other program" if len(others) == 1 else f"the {len(others)} other programs"
    assert done.stderr == f"forkchat pids: SIG{sig} not sent to {noun}: {named}\n"


def wait_status(clients: list) -> None:
    """Each bin/client prints its [STATUS] line: it got SIGUSR2, and is alive."""
    for c, name in zip(clients, ("alice", "bob"), strict=False):
        c.out.wait_for(rf"^\[STATUS\] {name} at ")


def leave(clients: list) -> None:
    for c in clients:
        c.end_input()
    for c in clients:
        assert c.wait() == 0


# -- other programs connected to the server (issue 18, item 1) -------------------------------


@contextmanager
def netcat(port: int) -> Iterator[Program]:
    """nc connected to the server, once it has printed the server's HELLO."""
    with program("nc", "127.0.0.1", str(port)) as nc:
        nc.out.wait_for("^HELLO ")
        yield nc


@pytest.mark.parametrize("kind", ["python", pytest.param("nc", marks=needs["nc"])])
def test_usr2_all_reaches_the_clients_never_a_program_connected(server, piped, kind):
    """After --signal USR2 --all each bin/client prints its status line, and the other
    program still answers: SIGUSR2 would have ended it."""
    clients = pair_clients(piped, server.port)
    with holder(server.port, 3) if kind == "python" else netcat(server.port) as other:
        mark = server.out.mark()
        done = run_pids("--port", str(server.port), "--signal", "USR2", "--all")
        check_report(done, server, "USR2", clients, [other])
        server.out.wait_for(r"^NUMBER OF CLIENTS : ", start=mark)
        wait_status(clients)
        if kind == "python":
            other.ping()
        else:  # nc still types for its user: it names itself and is put to wait
            other.out.wait_for("^WAIT ", start=other.type("ncuser\n"))
    leave(clients)


@pytest.mark.parametrize("kind", ["python", pytest.param("nc", marks=needs["nc"])])
def test_usr1_all_ends_the_clients_never_a_program_connected(server, piped, kind):
    """--signal USR1 --all: the server shuts down and the clients leave; the other
    program gets the server's BYE like anyone, and no signal."""
    clients = pair_clients(piped, server.port)
    with holder(server.port, 3) if kind == "python" else netcat(server.port) as other:
        done = run_pids("--port", str(server.port), "--signal", "USR1", "--all")
        check_report(done, server, "USR1", clients, [other])
        assert server.wait_exit() == 0
        for c in clients:
            # A client that has the server's BYE first may get its SIGUSR1 while exiting,
            # after it put the default handlers back: -SIGUSR1 then, a bin/client matter.
            assert c.wait() in (0, -signal.SIGUSR1)
        if kind == "python":
            other.ping()  # its sockets are closed: it is alive all the same
        else:
            other.out.wait_for("^BYE shutdown ")
            other.proc.stdin.close()
            assert other.proc.wait(DEADLINE) == 0  # it ended by itself, not by SIGUSR1


@needs["openssl"]
@pytest.mark.parametrize("sig", ["USR2", "USR1"])
def test_openssl_s_client_is_listed_never_signalled(tls_pair, piped, sig):
    cert, key = tls_pair
    srv = ServerProc("--no-color", "--tls-cert", cert, "--tls-key", key)
    connect = ("-connect", f"127.0.0.1:{srv.port}", "-CAfile", cert, "-quiet")
    try:
        clients = pair_clients(piped, srv.port, "--cafile", cert)
        with program("openssl", "s_client", *connect) as ossl:
            ossl.out.wait_for("^HELLO ")
            entries = pids_json(srv.port)
            assert ("other", ossl.pid, "openssl") in {
                (e["role"], e["pid"], e["name"]) for e in entries
            }
            done = run_pids("--port", str(srv.port), "--signal", sig, "--all")
            check_report(done, srv, sig, clients, [ossl])
            if sig == "USR2":
                wait_status(clients)
                ossl.out.wait_for("^WAIT ", start=ossl.type("ossl\n"))
                leave(clients)
            else:
                assert srv.wait_exit() == 0
                ossl.out.wait_for("^BYE shutdown ")
                assert ossl.proc.wait(DEADLINE) >= 0  # it ended by itself, not by SIGUSR1
    finally:
        srv.stop()


def free_port() -> int:
    """A port free now on loopback (HAProxy wants a number in its configuration)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


HAPROXY_CONFIG = """\
global
    stats socket {stats} mode 600
defaults
    mode tcp
    timeout connect 5s
    timeout client 1m
    timeout server 1m
frontend chat
    bind 127.0.0.1:{front}
    default_backend forkchat
backend forkchat
    server a 127.0.0.1:{port} send-proxy-v2
"""


def show_info(stats: str) -> dict[str, str]:
    """HAProxy's ``show info`` on its stats socket, as {field: value}."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(DEADLINE)
        sock.connect(stats)
        sock.sendall(b"show info\n")
        text = b"".join(iter(lambda: sock.recv(65536), b"")).decode()
    return dict(line.split(": ", 1) for line in text.splitlines() if ": " in line)


@needs["haproxy"]
def test_haproxy_in_front_is_one_entry_and_never_stopped(tmp_path):
    """Behind HAProxy (--proxy-protocol), HAProxy holds three connections to the server:
    it is one entry, named haproxy, and --signal USR1 --all does not soft-stop it."""
    from test_haproxy import HAProxy  # the deployment tests' HAProxy runner

    srv = ServerProc("--no-color", "--proxy-protocol")
    front, stats = free_port(), str(tmp_path / "haproxy.sock")
    config = tmp_path / "haproxy.cfg"
    config.write_text(HAPROXY_CONFIG.format(stats=stats, front=front, port=srv.port))
    proxy, peers = None, []
    try:
        proxy = HAProxy(config, front)
        peers = [Peer(("127.0.0.1", front)) for _ in range(3)]  # each has its HELLO
        entries = pids_json(srv.port)
        assert [(e["role"], e["pid"], e["name"]) for e in entries] == [
            ("server", srv.pid, None),
            ("other", proxy.proc.pid, "haproxy"),
        ]
        assert len(entries[1]["address"].split()) == 3
        done = run_pids("--port", str(srv.port), "--signal", "USR1", "--all")
        assert done.returncode == 0, done.stderr
        assert done.stdout == f"sent SIGUSR1 to server pid {srv.pid} (127.0.0.1:{srv.port})\n"
        assert done.stderr == (
            f"forkchat pids: SIGUSR1 not sent to the other program: pid {proxy.proc.pid} "
            "(haproxy)\n"
        )
        assert srv.wait_exit() == 0
        for peer in peers:
            peer.expect("BYE shutdown ")
        assert show_info(stats)["Stopping"] == "0"  # it answers, and is not stopping
    finally:
        for peer in peers:
            peer.close()
        if proxy is not None:
            proxy.stop()
        srv.stop()


# -- a signal bin/client does not take (issue 19's upgrade trigger) -------------------------


def ignore_rtmin() -> None:
    """In the server before exec: SIGRTMIN ignored, so that a server which does not
    handle it yet survives it (a server that does installs its own handler)."""
    signal.signal(signal.SIGRTMIN, signal.SIG_IGN)


@pytest.mark.parametrize("spelling", ["RTMIN", "SIGRTMIN", str(int(signal.SIGRTMIN))])
def test_rtmin_goes_to_the_server_never_to_clients(piped, spelling):
    """SIGRTMIN would end a bin/client: with --all it goes to the server alone, and
    stderr says so; the clients still answer SIGUSR2 afterwards."""
    srv = ServerProc("--no-color", preexec=ignore_rtmin)
    try:
        clients = pair_clients(piped, srv.port)
        with holder(srv.port, 1) as other:
            done = run_pids("--port", str(srv.port), "--signal", spelling, "--all")
            assert done.returncode == 0, done.stderr
            assert done.stdout == f"sent SIGRTMIN to server pid {srv.pid} (127.0.0.1:{srv.port})\n"
            assert done.stderr.splitlines() == [
                "forkchat pids: SIGRTMIN not sent to the 2 clients: bin/client does not handle it",
                "forkchat pids: SIGRTMIN not sent to the other program: "
                f"pid {other.pid} ({program_name(other.pid)})",
            ]
            for c in clients:
                c.signal(signal.SIGUSR2)
            wait_status(clients)
            other.ping()
        leave(clients)
    finally:
        srv.stop()


# -- socket activation: the manager keeps its copy (issue 18, item 2) -----------------------


@pytest.fixture
def stand_ins(tmp_path):
    """test_pids' stand-in bin/client processes, reaped after the test."""
    crowd = Clients(tmp_path)
    yield crowd
    crowd.reap()


@contextmanager
def activated() -> Iterator[tuple[Program, int, int]]:
    """A server started by MANAGER_CODE: yields (the manager, the server's PID, port)
    once the server has printed its listen line."""
    with script_tree(MANAGER_CODE, str(BIN / "server")) as (proc, out):
        port, server = map(int, out.wait_for(r"^manager (\d+) (\d+)$").groups())
        listen = out.wait_for(LISTEN_RE.pattern)
        assert (int(listen.group(2)), int(listen.group(3))) == (port, server)
        yield Program(proc, out, []), server, port


def test_a_socket_activated_server_is_listed_and_signalled_beside_its_managers_copy(
    stand_ins,
):
    with activated() as (manager, server, port):
        alice = stand_ins.start(port, "alice")
        alice.out.wait_for("^WAIT ")
        done = run_pids("--port", str(port), "--json")
        assert done.returncode == 0 and done.stderr == ""
        entries = json.loads(done.stdout)
        assert roles(entries) == [
            ("server", server, manager.pid),  # the manager itself is not listed
            ("client", alice.pid, os.getpid()),
        ]
        assert entries[0]["address"] == f"127.0.0.1:{port}"
        mark = manager.out.mark()  # the server's stdout is the manager's
        done = run_pids("--port", str(port), "--signal", "USR2")
        assert (done.returncode, done.stderr) == (0, "")
        assert done.stdout == f"sent SIGUSR2 to server pid {server} (127.0.0.1:{port})\n"
        manager.out.wait_for(r"^NUMBER OF CLIENTS : \*\* 1 \*\*$", start=mark)


def test_a_socket_activated_server_is_found_when_only_the_manager_is_credited():
    """Deterministic: the system-wide view is rewritten to credit the listener to the
    manager alone; the server is found among its children."""
    with activated() as (manager, server, port):
        entries, strangers = pidsfind.survey(port, credit_listener(port, manager.pid))
        assert roles([e.to_json() for e in entries]) == [("server", server, manager.pid)]
        assert strangers == []


# -- another program listening on the port (issue 18, items 10 and 24) ----------------------


def can_bind(host: str) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family) as probe:
            probe.bind((host, 0))
    except OSError:
        return False
    return True


@pytest.mark.parametrize("host", ["127.0.0.2", "::1"])
@pytest.mark.parametrize(
    "args", [(), ("--json",), ("--signal", "USR2"), ("--signal", "USR2", "--all")]
)
def test_a_server_beside_another_listener_is_served_and_the_other_named(server, host, args):
    """The server on 127.0.0.1, another program on the same port at another loopback
    address: the server is listed or signalled (exit 0), the other is named in one
    stderr line and never signalled (SIGUSR2 would have ended it)."""
    if not can_bind(host):
        pytest.skip(f"{host} is not available here")
    with script_tree(LISTENER_CODE, host, str(server.port)) as (proc, out):
        out.wait_for("^listening$")
        other = Program(proc, out, [])
        mark = server.out.mark()
        done = run_pids("--port", str(server.port), *args)
        assert done.returncode == 0, done.stderr
        where = f"[{host}]" if ":" in host else host
        assert done.stderr == (
            f"forkchat pids: port {server.port} is also held by pid {proc.pid} "
            f"({program_name(proc.pid)}) on {where}:{server.port}, which is not a forkchat "
            "server; not listed, not signalled\n"
        )
        here = f"127.0.0.1:{server.port}"
        if "--signal" in args:
            assert done.stdout == f"sent SIGUSR2 to server pid {server.pid} ({here})\n"
            server.out.wait_for(r"^NUMBER OF CLIENTS : \*\* 0 \*\*$", start=mark)
        elif "--json" in args:
            assert [(e["role"], e["pid"], e["address"]) for e in json.loads(done.stdout)] == [
                ("server", server.pid, here)
            ]
        else:
            rows = [line.split()[:2] for line in done.stdout.splitlines()[1:]]
            assert rows == [["server", str(server.pid)]]
        other.ping()


def test_port_of_reads_the_port():
    assert port_of("[::1]:4000") == 4000 == port_of("127.0.0.1:4000")
