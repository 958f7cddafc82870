"""The core server against real processes over real sockets: pairing, turns, relay, exit."""

from __future__ import annotations

import re
import signal
import socket
import ssl
import subprocess
import sys

import pexpect
import psutil
import pytest
from test_tls import pair_up

from support import (
    BIN,
    DEADLINE,
    Peer,
    ServerProc,
    child_env,
    close_all,
    pair,
    run_bin,
    socket_fds,
    tcp_sockets,
    wait_until,
)

STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}"


def run_server_cli(*args: str, timeout: float = DEADLINE) -> subprocess.CompletedProcess:
    return run_bin("server", *args, timeout=timeout)


def test_listen_line_is_first_and_names_the_pid(server):
    assert re.fullmatch(
        rf"forkchat server listening on 127\.0\.0\.1:{server.port} pid {server.pid}",
        server.out.lines[0],
    )


def test_pairs_in_arrival_order_and_first_writes_first(server):
    a, b = pair(server.address, "alice", "bob")
    c = Peer(server.address, "carol")
    c.expect("WAIT ")
    d = Peer(server.address, "dave")
    d.expect("PAIRED carol", "TURN READ")
    c.expect("PAIRED dave", "TURN WRITE")
    # Two rooms, two workers, both children of the server.
    wait_until(lambda: len(server.children()) == 2, what="two room workers")
    for peer in (a, b, c, d):
        peer.close()


def test_message_is_relayed_byte_for_byte_and_turns_swap(server):
    a, b = pair(server.address)
    text = "  héllo\twörld €  ".encode()
    a.send(text + b"\r\n")  # the CR before LF is dropped, nothing else is touched
    a.expect("TURN READ")
    assert b.raw_line() == b"MSG " + text
    b.expect("TURN WRITE")
    b.send("reply")
    b.expect("TURN READ")
    a.expect("MSG reply", "TURN WRITE")


def test_reader_gets_not_your_turn_and_turn_is_unchanged(server):
    a, b = pair(server.address)
    b.send("me first")
    b.expect("ERR not-your-turn")
    a.send("no, me")
    a.expect("TURN READ")
    b.expect("MSG no, me", "TURN WRITE")


def test_blank_lines_are_ignored(server):
    a, b = pair(server.address)
    a.send(b"\n   \n\t\r\n")
    b.send(b"\n")
    a.send("real")
    a.expect("TURN READ")  # nothing came back for the blank lines
    b.expect("MSG real", "TURN WRITE")


@pytest.mark.parametrize("leaver", ["writer", "reader"])
def test_exit_at_any_time_ends_the_room_for_both(server, leaver):
    a, b = pair(server.address)
    gone, stays = (a, b) if leaver == "writer" else (b, a)
    gone.send("  exit ")
    gone.expect("BYE exit")
    stays.expect("BYE partner-exit")
    gone.expect_closed()
    stays.expect_closed()
    server.out.wait_for(r"room 1 closed")
    worker = server.children()
    gone.close()
    stays.close()
    psutil.wait_procs(worker, timeout=DEADLINE)
    assert not server.children()
    assert "exited with status" not in server.out.text()


def test_vanished_partner_gives_partner_lost(server):
    a, b = pair(server.address)
    a.close()
    b.expect("BYE partner-lost")
    b.expect_closed()


def test_waiting_client_that_leaves_is_never_paired(server):
    a = Peer(server.address, "alice")
    a.expect("WAIT ")
    a.close()
    server.out.wait_for(r"client disconnected alice 127\.0\.0\.1:\d+ \(closed while waiting\)")
    b = Peer(server.address, "bob")
    b.expect("WAIT ")
    c = Peer(server.address, "carol")
    c.expect("PAIRED bob", "TURN READ")
    b.expect("PAIRED carol", "TURN WRITE")


def test_exit_while_waiting_gets_bye_exit(server):
    a = Peer(server.address, "alice")
    a.expect("WAIT ")
    a.send("exit")
    a.expect("BYE exit")
    a.expect_closed()


def test_bytes_sent_with_the_name_are_handled_in_the_room(server):
    a = Peer(server.address, "alice")
    a.expect("WAIT ")
    b = Peer(server.address)
    b.send(b"bob\nnot yet\nexit\n")  # one segment: name, an off-turn line, exit
    b.expect("PAIRED alice", "TURN READ", "ERR not-your-turn", "BYE exit")
    a.expect("PAIRED bob", "TURN WRITE", "BYE partner-exit")


def test_waiting_client_writing_is_told_not_your_turn(server):
    a = Peer(server.address, "alice")
    a.expect("WAIT ")
    a.send("anyone?")
    a.expect("ERR not-your-turn")
    b = Peer(server.address, "bob")
    b.expect("PAIRED alice")
    a.expect("PAIRED bob", "TURN WRITE")


def test_silent_client_does_not_delay_anyone(server):
    silent = socket.create_connection(server.address, timeout=DEADLINE)
    half = socket.create_connection(server.address, timeout=DEADLINE)
    half.sendall(b"bo")  # half a name, no LF
    a, b = pair(server.address)
    a.send("still here")
    b.expect("MSG still here")
    silent.close()
    half.close()


def test_room_worker_holds_only_its_two_sockets(server):
    rooms = [pair(server.address, f"a{i}", f"b{i}") for i in range(3)]
    waiting = Peer(server.address, "w")
    waiting.expect("WAIT ")
    wait_until(lambda: len(server.children()) == 3, what="three workers")
    pairs = {frozenset((x.sock.getsockname(), y.sock.getsockname())) for x, y in rooms}
    held_by_workers = set()
    for worker in server.children():
        held = frozenset(tuple(c.raddr) for c in tcp_sockets(worker.pid))
        assert held in pairs  # its own two: no listener, no other client
        held_by_workers.add(held)
        # Besides them, at most its own end of its channel to the parent (protocol 1.1).
        unix = worker.net_connections(kind="unix")
        assert len(unix) <= 1 and socket_fds(worker.pid) == 2 + len(unix)
        assert worker.num_fds() <= 14  # few fds, whatever the sibling count
    assert held_by_workers == pairs
    # The parent kept no copy of the paired sockets: the listener and the waiting one.
    parent = tcp_sockets(server.pid)
    assert sorted(c.status for c in parent) == sorted([psutil.CONN_LISTEN, psutil.CONN_ESTABLISHED])
    assert [tuple(c.raddr) for c in parent if c.raddr] == [waiting.sock.getsockname()]
    for x, y in rooms:
        x.close()
        y.close()
    waiting.close()


def test_log_has_one_timestamped_line_per_event(server):
    a, b = pair(server.address)
    a.send("exit")
    b.expect("BYE partner-exit")
    out = server.out
    peer = r"127\.0\.0\.1:\d+"
    out.wait_for(rf"^{STAMP} \[server\] client connected {peer}$")
    out.wait_for(rf"^{STAMP} \[server\] client named alice {peer}$")
    opened = out.wait_for(
        rf"^{STAMP} \[room 1 pid (\d+)\] room 1 opened pid \1: alice {peer} \+ bob {peer}$"
    )
    pid = opened.group(1)
    out.wait_for(rf"^{STAMP} \[room 1 pid {pid}\] client disconnected alice {peer} \(exit\)$")
    out.wait_for(rf"^{STAMP} \[room 1 pid {pid}\] client disconnected bob {peer} \(partner-exit\)$")
    out.wait_for(rf"^{STAMP} \[room 1 pid {pid}\] room 1 closed: alice left$")
    assert "\x1b" not in out.text()


def test_log_is_coloured_on_a_terminal_only_when_allowed():
    def first_events(*args: str, **env: str) -> str:
        environ = child_env(**env)
        if "NO_COLOR" not in env:
            del environ["NO_COLOR"]
        child = pexpect.spawn(
            sys.executable,
            [str(BIN / "server"), "--port", "0", *args],
            env=environ,
            timeout=DEADLINE,
        )
        try:
            child.expect(r"listening on 127\.0\.0\.1:(\d+)")
            port = int(child.match.group(1))
            with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE):
                child.expect("client connected")
            return child.before.decode() + child.after.decode()
        finally:
            family = psutil.Process(child.pid).children(recursive=True)  # rooms, if any
            child.kill(signal.SIGKILL)
            child.close()
            psutil.wait_procs(family, timeout=DEADLINE)  # it exits once the server is gone

    assert "\x1b[" in first_events()
    assert "\x1b[" not in first_events("--no-color")
    assert "\x1b[" not in first_events(NO_COLOR="1")


def test_help_and_version():
    usage = run_server_cli("-h")
    assert usage.returncode == 0 and "--max-line" in usage.stdout
    version = run_server_cli("--version")
    assert version.returncode == 0 and version.stdout.startswith("forkchat ")


@pytest.mark.parametrize(
    "args",
    [
        ["--port", "abc"],
        ["--port", "70000"],
        ["--max-line", "-3"],
        ["--name-timeout", "nan"],
        ["--idle-timeout", "soon"],
        ["--max-rooms", "0"],
        ["--bogus"],
    ],
)
def test_bad_values_get_one_line_and_no_traceback(args):
    result = run_server_cli(*args)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_port_in_use_is_one_line_and_status_1(server):
    result = run_server_cli("--port", str(server.port))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"127.0.0.1:{server.port}" in lines[0], result.stderr
    assert "in use" in lines[0]


def test_unbindable_address_is_one_line_and_status_1():
    result = run_server_cli("--host", "192.0.2.1", "--port", "0")  # TEST-NET: not ours
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_log_is_flushed_line_by_line_on_a_pipe():
    # child_env() removes PYTHONUNBUFFERED; without a flush per line this would time out.
    assert "PYTHONUNBUFFERED" not in child_env()
    srv = ServerProc("--no-color")
    try:
        with socket.create_connection(srv.address, timeout=DEADLINE):
            srv.out.wait_for("client connected")
    finally:
        srv.stop()


def test_worker_exit_status_is_zero_after_a_normal_room(server):
    a, b = pair(server.address)
    worker = server.children()[0]
    b.close()
    a.expect("BYE partner-lost")
    a.close()
    psutil.wait_procs([worker], timeout=DEADLINE)
    # The parent reaped it (no zombie) and logged nothing abnormal.
    wait_until(lambda: not server.children(), what="worker reaped")
    assert "exited with status" not in server.out.text()
    # The server itself is still running: not merely a /proc entry (an unreaped, dead
    # child keeps one), but a process that has not exited and still serves.
    assert server.proc.poll() is None
    x, y = pair(server.address, "x", "y")
    x.send("after a reaped room")
    y.expect("MSG after a reaped room")


def test_processes_are_named_for_top(server):
    """The original had you find PIDs with top: they show as forkchat-server/-room."""
    a, b = pair(server.address)
    assert psutil.Process(server.pid).name() == "forkchat-server"
    assert [c.name() for c in server.children()] == ["forkchat-room"]
    a.close()
    b.close()


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_every_room_is_a_child_of_the_server_with_nothing_between(tls, request):
    """The process tree the project promises: server -> rooms, with or without TLS."""
    cert, key = request.getfixturevalue("tls_pair") if tls else (None, None)
    srv = ServerProc("--no-color", *(("--tls-cert", cert, "--tls-key", key) if tls else ()))
    try:
        if tls:
            trust = ssl.create_default_context(cafile=cert)
            peers = [p for i in range(3) for p in pair_up(srv.address, trust, f"a{i}", f"b{i}")]
        else:
            peers = [p for i in range(3) for p in pair(srv.address, f"a{i}", f"b{i}")]
        rooms = srv.descendants()
        assert len(rooms) == 3
        for room in rooms:
            assert room.ppid() == srv.pid
            assert room.name() == "forkchat-room"
            assert room.cmdline()[0].startswith("forkchat-room ")
        close_all(peers)
    finally:
        srv.stop()
