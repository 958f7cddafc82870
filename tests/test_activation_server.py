"""The real server under socket activation (issue 11): started with a listening socket on
fd 3, LISTEN_FDS=1 and LISTEN_PID its own PID, it serves that socket instead of binding;
by hand (an inherited fd) and through systemd-socket-activate."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys

import pytest
from test_tls import chat_both_ways, leave

from support import (
    BIN,
    DEADLINE,
    LISTEN_RE,
    OutputTail,
    Peer,
    ServerProc,
    SocketActivated,
    child_env,
    pair,
    socket_fds,
)

# sh keeps its PID across exec: LISTEN_PID=$$ names the server itself, as systemd does.
EXEC_WITH_OWN_PID = 'LISTEN_PID=$$; export LISTEN_PID; exec "$@"'


class ActivatedServer(ServerProc):
    """bin/server started with ``passed`` as its fd 3 and the activation variables."""

    def __init__(self, passed: socket.socket, *args: str) -> None:
        fd = passed.fileno()
        self.proc = subprocess.Popen(
            ["sh", "-c", EXEC_WITH_OWN_PID, "sh", sys.executable, str(BIN / "server"), *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=child_env(LISTEN_FDS="1"),
            start_new_session=True,
            pass_fds=[3],  # kept open across the exec; preexec puts the socket there
            preexec_fn=lambda: os.dup2(fd, 3),
        )
        self.pid = self.proc.pid
        self.out = OutputTail(self.proc.stdout)
        self.err = OutputTail(self.proc.stderr)


def ready(srv: ActivatedServer) -> tuple[str, int]:
    """Wait for the listen line; return the address it names."""
    m = srv.out.wait_for(LISTEN_RE.pattern)
    assert int(m.group(3)) == srv.pid
    assert srv.out.lines[0] == m.group(0)
    srv.host, srv.port = m.group(1), int(m.group(2))
    return srv.host, srv.port


def test_the_server_serves_the_socket_on_fd_3():
    with socket.create_server(("127.0.0.1", 0)) as listener:
        # --port names the very port fd 3 listens on: binding it would fail (in use),
        # so a listen line proves the server took the socket it was given.
        port = listener.getsockname()[1]
        srv = ActivatedServer(listener, "--no-color", "--port", str(port))
        try:
            assert ready(srv) == listener.getsockname()
            listener.close()  # the server holds its own copy
            alice, bob = pair(srv.address)
            room = int(srv.out.wait_for(r"room 1 opened pid (\d+)").group(1))
            assert socket_fds(room) == 3, "the room worker kept the passed listener"
            chat_both_ways(alice, bob)
            leave(alice, bob)
            srv.signal(signal.SIGTERM)
            assert srv.wait_exit() == 0
            assert srv.err.text() == ""
        finally:
            srv.stop()


def test_an_ipv6_socket_on_fd_3_is_named_in_brackets():
    try:
        listener = socket.create_server(("::1", 0), family=socket.AF_INET6)
    except OSError:
        pytest.skip("no IPv6 loopback here")
    with listener:
        port = listener.getsockname()[1]
        srv = ActivatedServer(listener, "--no-color")
        try:
            assert ready(srv) == ("[::1]", port)
            listener.close()
            alice, bob = pair(("::1", port))
            chat_both_ways(alice, bob)
            leave(alice, bob)
            srv.out.wait_for(r"client connected \[::1\]:\d+$")
        finally:
            srv.stop()


def test_a_udp_socket_on_fd_3_is_one_line_and_exit_1():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("127.0.0.1", 0))
        srv = ActivatedServer(udp, "--no-color", "--port", "0")
        try:
            assert srv.wait_exit() == 1
            srv.err.wait_closed()
            srv.out.wait_closed()
        finally:
            srv.stop()
    assert srv.out.lines == []
    assert len(srv.err.lines) == 1, srv.err.lines
    assert "fd 3 is a SOCK_DGRAM socket, not SOCK_STREAM" in srv.err.lines[0]


@pytest.mark.skipif(
    not shutil.which("systemd-socket-activate"), reason="no systemd-socket-activate here"
)
def test_systemd_socket_activate_starts_the_server_on_the_first_connection():
    with SocketActivated(BIN / "server") as tool:
        assert tool.out.lines == []  # nothing started yet
        # The tool execs the server on the first connection, in its own process: this
        # client then waits in the backlog and must get HELLO from the server.
        alice = Peer(tool.address, "alice")
        m = tool.out.wait_for(LISTEN_RE.pattern)
        assert (m.group(1), int(m.group(2)), int(m.group(3))) == ("127.0.0.1", tool.port, tool.pid)
        alice.expect("WAIT ")
        bob = Peer(tool.address, "bob")
        bob.expect("PAIRED alice", "TURN READ")
        alice.expect("PAIRED bob", "TURN WRITE")
        chat_both_ways(alice, bob)
        leave(alice, bob)
        tool.proc.send_signal(signal.SIGTERM)
        assert tool.proc.wait(DEADLINE) == 0
        tool.out.wait_for("^SERVER WILL DISCONNECT$")
