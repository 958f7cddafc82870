"""Integration tests of bin/client: real processes, real sockets, a real pseudo-terminal.

Piped clients are started with start_new_session=True and the env of
support.child_env(); interactive ones run on a pseudo-terminal (client_tty.py).
Every process is reaped by PID at teardown; every wait has a deadline.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys

import psutil
import pytest
from client_tty import finish_tty, tty_client

from support import BIN, DEADLINE, OutputTail, Peer, child_env, reap_tree, run_bin, wait_until

__all__ = ["finish_tty", "tty_client"]  # the terminal driver, used here and by the others
CLIENT = str(BIN / "client")
BYE_RE = r"\[BYE\] .*\((?P<reason>[a-z-]+)\)"

# ---------------------------------------------------------------- helpers


class ClientProc:
    """A piped bin/client: stdin is a pipe the test writes, stdout/stderr are collected."""

    def __init__(self, port: int, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, CLIENT, *args, "--port", str(port)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=child_env(),
            start_new_session=True,
        )
        self.pid = self.proc.pid
        self.out = OutputTail(self.proc.stdout)
        self.err = OutputTail(self.proc.stderr)

    def type(self, text: str | bytes) -> None:
        """Write to the client's stdin (as a script would)."""
        self.proc.stdin.write(text.encode() if isinstance(text, str) else text)
        self.proc.stdin.flush()

    def end_input(self) -> None:
        self.proc.stdin.close()

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = DEADLINE) -> int:
        """Exit status, once the process ended and both pipes reached end of file."""
        status = self.proc.wait(timeout)
        self.out.wait_closed(timeout)
        self.err.wait_closed(timeout)
        return status


@pytest.fixture
def clients(piped):
    """conftest's factory of piped clients, under this file's name."""
    return piped


def assert_transcript(lines: list[str], patterns: list[str]) -> None:
    """Each line fully matches its pattern, and there are exactly as many lines."""
    shown = "\n".join(lines)
    assert len(lines) == len(patterns), f"transcript:\n{shown}"
    for line, pattern in zip(lines, patterns, strict=True):
        assert re.fullmatch(pattern, line), f"{line!r} !~ {pattern!r} in:\n{shown}"


def waiting_peer(server, name: str = "alice") -> Peer:
    """A raw peer that arrived first: it is waiting, and will write first."""
    peer = Peer(server.address, name)
    peer.expect("WAIT ")
    return peer


def paired_client(server, clients, name: str = "bob") -> tuple[Peer, ClientProc]:
    """A waiting raw peer ``alice`` (writes first) paired with a piped client."""
    peer = waiting_peer(server)
    client = clients(server.port, name)
    peer.expect(f"PAIRED {name}", "TURN WRITE")
    client.out.wait_for(r"^\[READ\] waiting for alice$")
    return peer, client


# ---------------------------------------------------------------- piped clients


def test_two_piped_clients_chat(server, clients):
    a = clients(server.port, "alice")
    a.type("hello\n")
    a.out.wait_for(r"^\[WAIT\] ")
    b = clients(server.port, "bob")
    b.type("hi there\n")
    b.end_input()  # bob leaves at once after his line
    assert b.wait() == 0
    a.end_input()
    assert a.wait() == 0
    assert_transcript(
        a.out.lines,
        [
            r"connected to 127\.0\.0\.1:\d+ as alice",
            r"\[WAIT\] .+",
            r"\[PAIRED\] you are chatting with bob",
            r"\[WRITE\] your turn to write",
            r"\[READ\] waiting for bob",
            r"bob: hi there",
            r"\[WRITE\] your turn to write",
            r"\[BYE\] .*\(partner-exit\)",
        ],
    )
    assert_transcript(
        b.out.lines,
        [
            r"connected to 127\.0\.0\.1:\d+ as bob",
            r"\[PAIRED\] you are chatting with alice",
            r"\[READ\] waiting for alice",
            r"alice: hello",
            r"\[WRITE\] your turn to write",
            r"leaving: end of input",
            r"\[BYE\] .*\(exit\)",
        ],
    )
    assert a.err.lines == [] and b.err.lines == []


def test_raw_peer_and_client_chat_both_ways(server, clients):
    peer, client = paired_client(server, clients)
    to_client = "h\u00e9llo w\u00f6rld \u4e2d\u6587\ttab  end "
    peer.send(to_client)
    peer.expect("TURN READ")
    client.out.wait_for(r"^\[WRITE\] your turn to write$")
    assert client.out.lines[-2] == "alice: " + to_client
    to_peer = "r\u00e9ply \u2713 42  "
    client.type(to_peer + "\r\n\n   \nexit\nnever sent\n")  # exit goes right after the line
    assert peer.raw_line() == b"MSG " + to_peer.encode()
    peer.expect("TURN WRITE", "BYE partner-exit")
    peer.expect_closed()
    assert client.wait() == 0
    assert client.out.lines[-2] == "[WRITE] your turn to write"
    assert re.fullmatch(r"\[BYE\] .*\(exit\)", client.out.lines[-1])
    peer.close()


def test_piped_line_typed_ahead_waits_for_the_turn(server, clients):
    peer, client = paired_client(server, clients)
    client.type("queued\n")  # typed ahead while alice writes: must wait for the turn
    peer.send("first")
    peer.expect("TURN READ")
    assert peer.line() == "MSG queued"
    peer.expect("TURN WRITE")
    client.end_input()  # its line went out: it leaves at once
    peer.expect("BYE partner-exit")
    assert client.wait() == 0
    peer.close()


def test_refused_line_keeps_the_turn(server, clients):
    peer, client = paired_client(server, clients)
    client.type(b"x" * 5000 + b"\nbad\x01char\nbad \xff utf8\nfine\n")
    peer.send("go")
    peer.expect("TURN READ")
    assert peer.line() == "MSG fine"  # the three refused lines never reached alice
    client.out.wait_for(r"^\[ERR\] too-long: ")
    client.out.wait_for(r"^\[ERR\] bad-char: ")
    client.out.wait_for(r"^\[ERR\] bad-encoding: ")
    peer.expect("TURN WRITE")
    client.end_input()
    peer.expect("BYE partner-exit")
    assert client.wait() == 0
    peer.close()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP])
def test_signal_makes_client_leave(server, clients, sig):
    peer, client = paired_client(server, clients)
    client.signal(sig)
    peer.expect("BYE partner-exit")
    peer.expect_closed()
    assert client.wait() == 0
    name = signal.Signals(sig).name
    assert client.out.lines[-2] == f"leaving: received {name}"
    assert re.fullmatch(r"\[BYE\] .*\(exit\)", client.out.lines[-1])
    assert client.err.lines == []
    peer.close()


def test_signal_while_waiting_for_a_partner(server, clients):
    client = clients(server.port, "lonely")
    client.out.wait_for(r"^\[WAIT\] ")
    client.signal(signal.SIGTERM)
    assert client.wait() == 0
    assert client.out.lines[-2] == "leaving: received SIGTERM"
    assert re.fullmatch(r"\[BYE\] .*\(exit\)", client.out.lines[-1])


def test_server_shutdown_reaches_client(server, clients):
    peer, client = paired_client(server, clients)
    server.signal(signal.SIGUSR1)
    assert client.wait() == 0
    assert re.fullmatch(r"\[BYE\] .*\(shutdown\)", client.out.lines[-1])
    peer.close()


def test_c1_and_bidi_from_partner_are_not_printed(server, clients):
    peer, client = paired_client(server, clients)
    peer.send("a\u009b2J\u009b31mb\u009d0;pwned\u009cc \u202eevil\u202c \u0085x")
    peer.expect("TURN READ")
    client.out.wait_for(r"^\[WRITE\]")
    assert client.out.lines[-2] == "alice: abc evil \\x85x"
    client.end_input()
    peer.expect("BYE partner-exit")
    assert client.wait() == 0
    peer.close()


# ---------------------------------------------------------------- a fake server


@pytest.fixture
def fake_server():
    """A listening loopback socket the test drives by hand, to send what no server would."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(DEADLINE)
    yield listener
    listener.close()


def accept_named(listener: socket.socket) -> socket.socket:
    """Accept the client, greet it, and check it sent its name first."""
    conn, _ = listener.accept()
    conn.settimeout(DEADLINE)
    conn.sendall(b"HELLO forkchat/1 send your name\n")
    name = b""
    while not name.endswith(b"\n"):
        chunk = conn.recv(1)
        assert chunk, "client closed before sending its name"
        name += chunk
    assert name == b"bob\n"
    return conn


def run_against(listener, lines: bytes) -> subprocess.CompletedProcess:
    """Start a piped client, feed it ``lines`` from the fake server, collect its output.
    Its standard input stays open (and empty) throughout: it never leaves by itself."""
    stdin_read, stdin_write = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, CLIENT, "bob", "--port", str(listener.getsockname()[1])],
        stdin=stdin_read,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=child_env(),
        start_new_session=True,
    )
    os.close(stdin_read)
    try:
        conn = accept_named(listener)
        with conn:
            conn.sendall(lines)
            conn.shutdown(socket.SHUT_WR)
            out, err = proc.communicate(timeout=DEADLINE)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    finally:
        os.close(stdin_write)
        reap_tree(proc)


def test_terminal_injection_is_stripped(fake_server):
    evil = b"\x1b]0;pwned\x07\x1b[2J\x1b[31mred\x1b[0m\rX\x9b\x07\x7f"
    result = run_against(
        fake_server,
        b"WAIT \x1b]0;title\x07waiting\n"
        b"PAIRED ev\x1b[2Jil\n"
        b"TURN READ\n"
        b"MSG " + evil + b"\n"
        b"MSG \xc2\x9b2J\xe2\x80\xaeafter\n"
        b"ERR bad-char \x1b[1mbold\n"
        b"SOMETHING \x1b[5n\n"
        b"BYE shutdown \x1b[2Jbye\n",
    )
    assert result.returncode == 0
    assert b"\x1b" not in result.stdout
    assert b"\r" not in result.stdout
    assert "\u202e" not in result.stdout.decode()
    assert result.stdout.decode().splitlines()[1:] == [
        "[WAIT] waiting",
        "[PAIRED] you are chatting with evil",
        "[READ] waiting for evil",
        "evil: red^MX\ufffd^G^?",
        "evil: after",
        "[ERR] bad-char: bold",
        "[?] SOMETHING ",
        "[BYE] bye (shutdown)",
    ]


@pytest.mark.parametrize(
    ("bye", "status", "shown"),
    [
        (b"BYE partner-lost alice vanished\n", 0, "[BYE] alice vanished (partner-lost)"),
        (b"BYE timeout idle\n", 0, "[BYE] idle (timeout)"),
        (b"BYE full too many\n", 1, "[BYE] too many (full)"),
        (b"BYE bad-name no\n", 1, "[BYE] no (bad-name)"),
        (b"BYE error oops\n", 1, "[BYE] oops (error)"),
        (b"", 1, "connection lost"),
    ],
)
def test_exit_status_follows_bye_reason(fake_server, bye, status, shown):
    result = run_against(fake_server, b"WAIT wait\n" + bye)
    assert result.returncode == status
    assert result.stdout.decode().splitlines()[-1] == shown
    assert result.stderr == b""


def test_leaving_is_bounded_when_the_server_never_says_bye(fake_server):
    proc = subprocess.Popen(
        [sys.executable, CLIENT, "bob", "--port", str(fake_server.getsockname()[1])],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=child_env(),
        start_new_session=True,
    )
    try:
        with accept_named(fake_server) as conn:  # the name came: the session loop runs
            proc.send_signal(signal.SIGTERM)
            assert conn.recv(64) == b"exit\n"
            out, err = proc.communicate(timeout=DEADLINE)  # about LEAVE_TIMEOUT
        assert proc.returncode == 0
        assert out.decode().splitlines()[-2:] == [
            "leaving: received SIGTERM",
            "no goodbye from the server in time",
        ]
        assert err == b""
    finally:
        reap_tree(proc)


@contextlib.contextmanager
def stuck_connecting(start):
    """A piped client (from the ``start`` factory) held in its connect(): the listener's
    accept queue is full, so its SYNs are dropped. Yields the client, once it is there."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        fillers = [socket.socket() for _ in range(3)]  # fill the accept queue: SYNs drop
        try:
            for filler in fillers:
                filler.setblocking(False)
                filler.connect_ex(("127.0.0.1", port))
            client = start(port, "bob")
            wait_until(lambda: connecting(client.pid, port), what="client in connect()")
            yield client
        finally:
            for filler in fillers:
                filler.close()


def test_signal_while_connecting(clients):
    with stuck_connecting(clients) as client:
        client.signal(signal.SIGTERM)
        assert client.wait() == 0
    assert client.out.lines == ["leaving: received SIGTERM"]
    assert client.err.lines == []


def connecting(pid: int, port: int) -> bool:
    """True once process ``pid`` has a TCP connect to ``port`` in progress."""
    return any(
        c.status == psutil.CONN_SYN_SENT and c.raddr and c.raddr.port == port
        for c in psutil.Process(pid).net_connections("tcp")
    )


def test_connection_lost_without_bye(fake_server):
    result = run_against(fake_server, b"WAIT wait\nPAIRED alice\nTURN READ\n")
    assert result.returncode == 1
    assert result.stdout.decode().splitlines()[-1] == "connection lost"


# ---------------------------------------------------------------- command line


def run_client_command(*args: str) -> subprocess.CompletedProcess:
    return run_bin("client", *args, text=False)


def test_refused_connection_is_one_line():
    with socket.socket() as bound:  # bound, never listening: connecting is refused
        bound.bind(("127.0.0.1", 0))
        port = bound.getsockname()[1]
        result = run_client_command("alice", "--port", str(port))
    assert result.returncode == 1
    assert result.stdout == b""
    err = result.stderr.decode()
    assert err.count("\n") == 1, err
    assert f"127.0.0.1:{port}" in err
    assert "make run" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--port", "abc"), "--port must be a number, not 'abc'"),
        (("--port", "70000"), "--port must be between 1 and 65535, not '70000'"),
        (("bad name",), "bad user name 'bad name'"),
    ],
)
def test_bad_command_line_is_one_line(args, message):
    result = run_client_command(*args)
    assert result.returncode == 2
    err = result.stderr.decode()
    assert err.count("\n") == 1 and message in err, err
    assert "Traceback" not in err


def test_help_and_version():
    result = run_client_command("--version")
    assert result.returncode == 0 and result.stdout.strip().endswith(b"1.0.0")
    result = run_client_command("-h")
    assert result.returncode == 0 and b"Usage:" in result.stdout


# ---------------------------------------------------------------- interactive (pty)


def test_interactive_prompt_notice_redraw_and_ctrl_c(server, tty_client):
    peer = waiting_peer(server)
    child = tty_client(server.port, "bob")
    peer.expect("PAIRED bob", "TURN WRITE")
    child.expect_exact("[PAIRED] you are chatting with alice")
    child.expect_exact("[READ] waiting for alice")
    child.expect_exact("(alice writes)")  # the prompt says whose turn it is
    child.send("draft")  # typed while alice writes
    child.expect_exact("draft")
    peer.send("hello bob")
    peer.expect("TURN READ")
    # The message comes at once, above the line being typed, which is kept as it was,
    # now behind the prompt of our turn.
    child.expect_exact("alice: hello bob\r\n")
    child.expect_exact("[WRITE] your turn to write\r\n")
    child.expect_exact("bob>")
    child.send(" more\x7fE\r")
    assert peer.line() == "MSG draft morE"
    child.expect_exact("bob> draft morE\r\n")  # the transcript's line for it
    peer.expect("TURN WRITE")
    child.expect_exact("[READ] waiting for alice")
    child.send("\x03")  # Ctrl-C: a key at the prompt, SIGINT while a line is printed
    child.expect_exact("leaving: received SIGINT")
    child.expect(BYE_RE)
    assert child.match.group("reason") == "exit"
    peer.expect("BYE partner-exit")
    peer.expect_closed()
    assert finish_tty(child) == 0
    peer.close()


def test_interactive_line_typed_off_turn_is_held(server, tty_client):
    peer = waiting_peer(server)
    child = tty_client(server.port, "bob")
    peer.expect("PAIRED bob", "TURN WRITE")
    child.expect_exact("[READ] waiting for alice")
    child.send("early\r")
    child.expect_exact("[HELD] early (goes out when your turn comes)")
    peer.send("first")
    peer.expect("TURN READ")
    assert peer.line() == "MSG early"  # sent by itself when the turn came
    peer.expect("TURN WRITE")
    child.expect_exact("bob> early")
    child.expect_exact("[READ] waiting for alice")
    child.send("\x04")  # Ctrl-D on an empty line
    child.expect_exact("leaving: end of input (Ctrl-D)")
    peer.expect("BYE partner-exit")
    assert finish_tty(child) == 0
    peer.close()


def test_interactive_partner_leaves_while_typing(server, tty_client):
    peer = waiting_peer(server)
    child = tty_client(server.port, "bob")
    peer.expect("PAIRED bob", "TURN WRITE")
    child.expect_exact("[READ] waiting for alice")
    child.send("unfinished")
    child.expect_exact("unfinished")
    peer.send("exit")
    child.expect(BYE_RE)
    assert child.match.group("reason") == "partner-exit"
    assert finish_tty(child) == 0
    peer.close()


def test_interactive_exit_typed_on_turn(server, tty_client):
    child = tty_client(server.port, "bob")
    child.expect_exact("[WAIT]")
    child.expect_exact("(no partner yet)")
    peer = Peer(server.address, "carol")
    peer.expect("PAIRED bob", "TURN READ")
    child.expect_exact("[WRITE] your turn to write")
    child.expect_exact("bob>")
    child.send("  exit \r")
    child.expect(BYE_RE)
    assert child.match.group("reason") == "exit"
    peer.expect("BYE partner-exit")
    assert finish_tty(child) == 0
    peer.close()
