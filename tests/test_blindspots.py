"""Guarantees no other test would notice breaking (issue 12, items 15 to 21).

Each test here was checked against the small change that breaks its guarantee (named
in its docstring): it fails there and passes on the real code.
"""

from __future__ import annotations

import socket
import sys
import time

import psutil
import pytest

from forkchat.conn import KEEPALIVE_COUNT, KEEPALIVE_IDLE, KEEPALIVE_INTERVAL
from support import (
    DEADLINE,
    ROOT,
    Peer,
    ServerProc,
    child_env,
    close_all,
    copy_fd_of,
    pair,
    report,
    server_side_fd,
    socket_fds,
    tcp_sockets,
    wait_until,
)

# -- 15: a room worker holds its two sockets only --------------------------------------


def test_room_worker_holds_no_socket_of_a_client_still_naming_itself(server):
    """Breaks if ``add_client`` does not record the new socket as the parent's
    (``self.fds.own(conn.fd)``): the worker forked for the pair inherits it."""
    shy = Peer(server.address)  # greeted, no name yet: in the parent's hands at the fork
    a, b = pair(server.address)
    (worker,) = server.children()
    held = sorted(tuple(c.raddr) for c in tcp_sockets(worker.pid))
    assert held == sorted([a.sock.getsockname(), b.sock.getsockname()])
    # Whatever else it holds is no socket of the parent's: at most its own channel to
    # the parent (a Unix socket, protocol 1.1).
    unix = psutil.Process(worker.pid).net_connections(kind="unix")
    assert len(unix) <= 1 and socket_fds(worker.pid) == 2 + len(unix)
    shy.send("shy")  # the handshaking client is still served by the parent
    shy.expect("WAIT ")
    close_all((shy, a, b))


# -- 16: pairing follows the order of names ------------------------------------------


def test_first_to_name_itself_writes_first_whoever_connected_first(server):
    """Breaks if pairs are ordered by connection (accept order, fd number) instead of
    by the order the names arrived."""
    early = Peer(server.address)  # connects first...
    late = Peer(server.address)
    late.send("bob")  # ...but bob names himself first
    late.expect("WAIT ")
    early.send("alice")
    late.expect("PAIRED alice", "TURN WRITE")
    early.expect("PAIRED bob", "TURN READ")
    close_all((early, late))


# -- 17: every message restarts the idle timer ---------------------------------------

IDLE = 2.0  # --idle-timeout
GAP = 0.5  # between messages: a quarter of it, so a stalled test machine has 1.5 s slack
SPAN = 3.5  # messages for well over the idle timeout


def test_messages_keep_an_idle_room_open_and_silence_closes_it():
    """Breaks if a relayed message does not reset the room's idle timer: the room
    would close IDLE seconds after PAIRED, in the middle of the conversation."""
    srv = ServerProc("--no-color", "--idle-timeout", f"{IDLE:g}")
    try:
        writer, reader = pair(srv.address)
        opened = time.monotonic()
        n = 0
        while time.monotonic() - opened < SPAN:
            writer.send(f"m{n}")
            sent = time.monotonic()
            writer.expect("TURN READ")
            reader.expect(f"MSG m{n}", "TURN WRITE")
            writer, reader = reader, writer
            n += 1
            time.sleep(max(0.0, opened + n * GAP - time.monotonic()))  # pacing only
        for peer in (writer, reader):
            peer.expect("BYE timeout", timeout=IDLE + DEADLINE)
        quiet = time.monotonic() - sent
        assert quiet >= IDLE - 0.05, f"closed {quiet:.2f} s after the last message"
        close_all((writer, reader))
        srv.out.wait_for("room 1 closed: idle timeout")
    finally:
        srv.stop()


# -- 19: accepted sockets are tuned ------------------------------------------------------

WANT_OPTIONS = {
    "TCP_NODELAY": (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),
    "SO_KEEPALIVE": (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
    "TCP_KEEPIDLE": (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE),
    "TCP_KEEPINTVL": (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL),
    "TCP_KEEPCNT": (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT),
}


def options_held(pid: int, peer: Peer) -> dict[str, int]:
    """The options of the socket that process ``pid`` holds for ``peer``, read on a copy
    of that very socket (pidfd_getfd)."""
    try:
        fd = copy_fd_of(pid, server_side_fd(pid, peer))
    except OSError as exc:  # kernel before 5.6, or no ptrace rights over the server
        pytest.skip(f"cannot copy the server's socket into the test: {exc}")
    with socket.socket(fileno=fd) as copy:
        return {name: copy.getsockopt(level, opt) for name, (level, opt, _) in WANT_OPTIONS.items()}


def test_server_tunes_every_accepted_socket_in_parent_and_room(server):
    """Breaks if ``add_client`` does not call ``tune_socket`` or ``tune_socket`` drops
    an option: the server's own sockets are read, not a socket the test tuned."""
    want = {name: value for name, (_, _, value) in WANT_OPTIONS.items()}
    shy = Peer(server.address)  # handshaking, in the parent
    first = Peer(server.address, "alice")  # waiting, in the parent
    first.expect("WAIT ")
    assert options_held(server.pid, shy) == want
    assert options_held(server.pid, first) == want
    second = Peer(server.address, "bob")
    second.expect("PAIRED alice")
    first.expect("PAIRED bob")
    (worker,) = server.children()
    assert options_held(worker.pid, first) == want
    assert options_held(worker.pid, second) == want
    close_all((shy, first, second))


# -- 20: a crashing room -------------------------------------------------------------

# A real server whose rooms crash on the first message: it patches the product in its
# own process, then runs the real main(). argv: ROOT, then the server's options.
CRASHING_SERVER = """\
import sys
sys.path.insert(0, sys.argv.pop(1))
FAULT = '''
import forkchat.room
assert hasattr(forkchat.room.Room, "relay"), "Room.relay is gone: move the fault"
def relay(self, writer, line):
    raise RuntimeError("injected fault")
forkchat.room.Room.relay = relay
'''
exec(FAULT)  # in the server, so in every room it forks
import forkchat.cli
sys.exit(forkchat.cli.main(sys.argv[1:]))
"""


def test_a_crashing_room_says_bye_error_logs_once_and_exits_70():
    """Breaks if the crash path of ``run_room`` does not tell the pair ``BYE error``,
    does not log its one line, or exits 0 (the parent then logs nothing abnormal)."""
    launcher = [sys.executable, "-c", CRASHING_SERVER, str(ROOT)]
    srv = ServerProc("--no-color", launcher=launcher)
    try:
        a, b = pair(srv.address)
        (worker,) = srv.children()
        a.send("boom")
        for peer in (a, b):
            peer.expect("BYE error")
            peer.expect_closed()
        srv.out.wait_for(rf"room 1 worker pid {worker.pid} exited with status 70$")
        crashed = r"\[room 1 pid \d+\] room 1 crashed: RuntimeError: injected fault$"
        assert srv.out.count(crashed) == 1
        assert srv.out.count("crashed") == 1
        assert "Traceback" not in srv.err.text() + srv.out.text()
        assert report(srv)[:2] == (0, 0)
        # The server goes on: a new pair gets a room (and leaves before any message).
        c, d = pair(srv.address, "carol", "dave")
        c.send("exit")
        d.expect("BYE partner-exit")
        close_all((a, b, c, d))
        srv.out.wait_for("room 2 closed: carol left")
        assert srv.proc.poll() is None
    finally:
        srv.stop()


# -- 21: colour on a pipe, and the server's own defaults -------------------------------


def test_log_on_a_pipe_has_no_colour_even_without_no_color():
    """Breaks if colour is chosen without asking whether stdout is a terminal."""
    env = child_env()
    del env["NO_COLOR"]
    srv = ServerProc(env=env)  # neither NO_COLOR nor --no-color: only the pipe says no
    try:
        a, b = pair(srv.address)  # connect, name, room (the worker logs too)
        a.send("exit")
        b.expect("BYE partner-exit")
        close_all((a, b))  # the room lingers until its clients close
        srv.out.wait_for("room 1 closed")
        assert "\x1b" not in srv.out.text()
    finally:
        srv.stop()


def test_default_max_line_is_4096_bytes(server):
    """Breaks if ``--max-line`` defaults to anything but 4096 (``server`` has none)."""
    a, b = pair(server.address)
    a.send("y" * 4097)
    a.expect("ERR too-long")
    a.send("x" * 4096)
    a.expect("TURN READ")
    b.expect("MSG " + "x" * 4096, "TURN WRITE")
    close_all((a, b))


DEFAULT_PORT = 33016


def test_default_port_is_33016():
    """Breaks if ``--port`` defaults to anything else. Skipped when 33016 is taken."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", DEFAULT_PORT))
        except OSError as exc:
            pytest.skip(f"port {DEFAULT_PORT} is busy here ({exc.strerror})")
    try:
        srv = ServerProc("--no-color", port=None)
    except AssertionError as exc:
        if "in use" in str(exc):  # taken between the probe and the start
            pytest.skip(f"port {DEFAULT_PORT} was taken meanwhile")
        raise
    try:
        assert srv.address == ("127.0.0.1", DEFAULT_PORT)
        wait_until(lambda: srv.proc.poll() is None, what="server running")
    finally:
        srv.stop()
