"""The real server with --tls-cert/--tls-key (issue 11): Python TLS clients, openssl
s_client and bin/client --cafile as third-party clients, and the bad ones (plain text,
HTTP, silent, untrusting) that must each cost one log line and delay nobody.

``Client`` here is also the PROXY-protocol client of test_proxy.py and test_haproxy.py.
"""

from __future__ import annotations

import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time

import psutil
import pytest

import support
from support import (
    BIN,
    DEADLINE,
    OutputTail,
    Peer,
    ServerProc,
    child_env,
    close_all,
    pair,
    reap_tree,
    report,
    socket_fds,
    tcp_sockets,
    wait_until,
)

pytestmark = pytest.mark.skipif(not shutil.which("openssl"), reason="needs the openssl CLI")

ROOM_RE = r"room (\d+) opened pid (\d+): "
RECONNECT_TEXT = "over TLS a new partner needs a new connection: reconnect"


class Client(Peer):
    """A client of the real server, as raw as a test needs it: sends ``header`` (a PROXY
    header) first, then does the TLS handshake when given a ``context`` (verifying the
    server as "localhost"; a missing close_notify is an error, not an end of file), then
    sends ``first`` (raw bytes, before reading anything), then reads ``HELLO`` unless
    ``hello`` is False, then sends ``name``."""

    def __init__(
        self,
        address: tuple[str, int],
        name: str | None = None,
        *,
        context: ssl.SSLContext | None = None,
        header: bytes = b"",
        first: bytes = b"",
        hello: bool = True,
    ) -> None:
        self.address = address
        support._live_peers.add(self)  # closed by ServerProc.stop like every Peer
        raw = socket.create_connection(address, timeout=DEADLINE)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = raw
        self.buf = b""
        self.hello = ""
        if header:
            raw.sendall(header)
        if context is not None:
            self.sock = context.wrap_socket(
                raw, server_hostname="localhost", suppress_ragged_eofs=False
            )
        if first:
            self.sock.sendall(first)
        if hello:
            self.hello = self.line()
            assert self.hello.startswith("HELLO "), self.hello
        if name is not None:
            self.send(name)

    @property
    def here(self) -> str:
        """This end's address as the server logs it (``IP:port``)."""
        host, port = self.sock.getsockname()[:2]
        return f"{host}:{port}"

    def expect_tls_close(self, timeout: float = DEADLINE) -> None:
        """Assert the server ends the TLS session properly: close_notify, then the close
        (``recv`` gives b''), not a bare TCP FIN (SSLEOFError) and not a reset."""
        try:
            self.expect_closed(timeout)
        except ssl.SSLEOFError:
            raise AssertionError("TCP closed without a TLS close_notify") from None


def about(server: ServerProc, where: str) -> list[str]:
    """The server's log lines that name the address ``where`` (IP:port)."""
    regex = re.compile(re.escape(where) + r"(?!\d)")
    return [line for line in server.out.lines if regex.search(line)]


def assert_one_failure_line(server: ServerProc, where: str, reason: str) -> None:
    """The connection from ``where`` cost exactly one log line: ``client disconnected``
    with ``reason`` (it is logged as connected only once its handshake is through)."""
    lines = about(server, where)
    assert len(lines) == 1, lines
    assert f"client disconnected {where} " in lines[0] and reason in lines[0], lines


def wait_handshaking(server: ServerProc, count: int) -> None:
    """Poll SIGUSR2 reports until ``count`` connections are in their handshake (the
    server has accepted them; a connect alone does not say when)."""
    wait_until(lambda: report(server)[3] == count, what=f"{count} handshaking")


def pair_up(address, context, a: str = "alice", b: str = "bob", **kw) -> tuple[Client, Client]:
    """Two clients in a room (``a`` writes first)."""
    first = Client(address, a, context=context, **kw)
    first.expect("WAIT ")
    second = Client(address, b, context=context, **kw)
    second.expect(f"PAIRED {a}", "TURN READ")
    first.expect(f"PAIRED {b}", "TURN WRITE")
    return first, second


def chat(writer: Peer, reader: Peer, text: str = "hello") -> None:
    """``writer`` sends ``text``; the turn passes to ``reader``."""
    writer.send(text)
    writer.expect("TURN READ")
    reader.expect(f"MSG {text}", "TURN WRITE")


def chat_both_ways(a: Peer, b: Peer) -> None:
    chat(a, b, "ping from a")
    chat(b, a, "pong from b")


def leave(writer: Peer, other: Peer) -> None:
    """``writer`` says exit; both get their BYE and close."""
    writer.send("exit")
    writer.expect("BYE exit")
    other.expect("BYE partner-exit")
    writer.close()
    other.close()


@pytest.fixture(scope="module")
def trust(tls_pair) -> ssl.SSLContext:
    """A client context that trusts the test server's self-signed certificate."""
    return ssl.create_default_context(cafile=tls_pair[0])


@pytest.fixture
def start(tls_pair):
    """Start TLS servers with extra options; stop and reap them after the test."""
    servers: list[ServerProc] = []

    def start(*args: str) -> ServerProc:
        srv = ServerProc("--no-color", "--tls-cert", tls_pair[0], "--tls-key", tls_pair[1], *args)
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        srv.stop()


# ---- Python TLS clients ------------------------------------------------------------------


@pytest.mark.parametrize("version", ["TLSv1_2", "TLSv1_3"])
def test_a_tls_pair_chats_and_the_bye_ends_with_close_notify(start, tls_pair, version):
    srv = start()
    trust = ssl.create_default_context(cafile=tls_pair[0])
    trust.minimum_version = trust.maximum_version = ssl.TLSVersion[version]
    alice, bob = pair_up(srv.address, trust)
    assert alice.sock.version() == version.replace("_", ".")
    chat_both_ways(alice, bob)
    alice.send("exit")
    alice.expect("BYE exit")
    alice.expect_tls_close()
    bob.expect("BYE partner-exit")
    bob.expect_tls_close()
    alice.close()
    bob.close()
    srv.out.wait_for(r"room 1 closed")


def test_the_room_worker_holds_the_two_tls_sockets_and_its_channel(start, trust):
    srv = start()
    alice, bob = pair_up(srv.address, trust)
    room = int(srv.out.wait_for(ROOM_RE).group(2))
    held = {tuple(c.raddr) for c in tcp_sockets(room) if c.raddr}
    assert held == {alice.sock.getsockname(), bob.sock.getsockname()}
    assert len(tcp_sockets(room)) == 2  # no listener, nobody else's socket
    assert socket_fds(room) == 3  # the two clients and its end of the channel
    # The sessions' state is in the server's memory: it forks TLS rooms itself.
    assert psutil.Process(room).ppid() == srv.pid
    assert srv.descendants() == srv.children()  # the rooms, and nothing between
    chat_both_ways(alice, bob)  # the worker carries both sessions on after the fork
    leave(alice, bob)


def test_a_name_and_a_line_in_one_record_are_both_handled_by_the_parent(start, trust):
    """The first of a pair: the line that came with the name is a waiting client's
    message (ERR not-your-turn, from the parent, before PAIRED) and is never relayed."""
    srv = start()
    alice = Client(srv.address, context=trust, first=b"alice\nhello\n")
    alice.expect("WAIT ", "ERR not-your-turn")
    alice.send("next")  # while waiting, over TLS too: told it waits, nothing changes
    alice.expect("WAIT ")
    bob = Client(srv.address, "bob", context=trust)
    bob.expect("PAIRED alice", "TURN READ")
    alice.expect("PAIRED bob", "TURN WRITE")
    chat(alice, bob, "first real message")  # bob's next line is this, not "hello"
    leave(bob, alice)


def test_a_name_and_a_line_in_one_record_reach_the_room(start, trust):
    """The second of a pair: the line that came with its name is in its inbox when the
    worker forks, and the room handles it there: ERR after PAIRED and TURN READ."""
    srv = start()
    alice = Client(srv.address, "alice", context=trust)
    alice.expect("WAIT ")
    bob = Client(srv.address, context=trust, first=b"bob\nhello\n")
    bob.expect("PAIRED alice", "TURN READ", "ERR not-your-turn")
    alice.expect("PAIRED bob", "TURN WRITE")
    chat(alice, bob, "after the record")
    leave(bob, alice)


def test_exit_in_the_same_record_as_the_name_is_handled_in_the_room(start, trust):
    srv = start()
    alice = Client(srv.address, "alice", context=trust)
    alice.expect("WAIT ")
    bob = Client(srv.address, context=trust, first=b"bob\nexit\n")
    bob.expect("PAIRED alice", "TURN READ", "BYE exit")
    bob.expect_tls_close()
    alice.expect("PAIRED bob", "TURN WRITE", "BYE partner-exit")
    alice.expect_tls_close()


def test_two_lines_in_one_record_in_the_room(start, trust):
    """The writer sends ``a`` and ``b`` in one TLS record: ``a`` is relayed, ``b`` is
    no longer its turn."""
    srv = start()
    alice, bob = pair_up(srv.address, trust)
    alice.sock.sendall(b"a\nb\n")  # one sendall, one SSL_write: one record
    alice.expect("TURN READ", "ERR not-your-turn")
    bob.expect("MSG a", "TURN WRITE")
    chat(bob, alice, "c")
    chat(alice, bob, "d")
    leave(alice, bob)


@pytest.mark.parametrize("requeue", [False, True], ids=["plain", "requeue"])
def test_next_over_tls_ends_with_bye_and_a_reconnect_text(start, trust, requeue):
    srv = start(*(["--requeue"] if requeue else []))
    alice, bob = pair_up(srv.address, trust)
    bob.send("next")  # not its turn: next is taken at any time
    bob.expect(f"BYE exit {RECONNECT_TEXT}")
    bob.expect_tls_close()
    alice.expect("BYE partner-exit")
    alice.expect_tls_close()
    alice.close()
    bob.close()
    srv.out.wait_for(r"room 1 closed")
    carol, dave = pair_up(srv.address, trust, "carol", "dave")
    leave(carol, dave)  # under --requeue too, an exit over TLS ends the partner with BYE
    srv.out.wait_for(r"room 2 closed")
    eve, frank = pair_up(srv.address, trust, "eve", "frank")
    frank.close()  # vanishes without exit
    eve.expect("BYE partner-lost")
    eve.expect_tls_close()
    eve.close()
    srv.out.wait_for(r"room 3 closed")
    assert srv.out.count("client requeued") == 0
    assert report(srv)[0] == 0


def test_the_sigusr2_count_is_exact_with_tls_clients(start, trust):
    srv = start()
    alice, bob = pair_up(srv.address, trust)
    carol = Client(srv.address, "carol", context=trust)
    carol.expect("WAIT ")
    silent = socket.create_connection(srv.address, timeout=DEADLINE)  # in its handshake
    wait_handshaking(srv, 1)
    assert report(srv) == (4, 1, 1, 1)
    alice.send("exit")
    alice.expect("BYE exit")
    bob.expect("BYE partner-exit")
    clients, _, waiting, handshaking = report(srv)
    assert (clients, waiting, handshaking) == (2, 1, 1)
    mark = srv.out.mark()
    carol.close()
    srv.out.wait_for(r"client disconnected carol ", start=mark)
    silent.close()
    srv.out.wait_for(r"client disconnected 127\.0\.0\.1:\d+ \(TLS handshake", start=mark)
    assert report(srv)[0] == 0


def test_sigusr1_tells_tls_clients_bye_shutdown_and_exits_0(start, trust):
    srv = start()
    alice, bob = pair_up(srv.address, trust)
    carol = Client(srv.address, "carol", context=trust)
    carol.expect("WAIT ")
    silent = Client(srv.address, hello=False)  # TCP only: no TLS yet, nothing to tell
    wait_handshaking(srv, 1)
    srv.signal(signal.SIGUSR1)
    for peer in (alice, bob, carol):
        peer.expect("BYE shutdown")
        peer.expect_tls_close()
        peer.close()
    silent.expect_closed()
    silent.close()
    assert srv.wait_exit() == 0
    srv.out.wait_for("^SERVER WILL DISCONNECT$")


def test_a_tls_client_that_does_not_read_is_dropped(start, trust):
    """TLS writes that would block (SSLWantWrite) pile up to the bound, not forever:
    bob writes on his turns but never reads, and is dropped; alice hears partner-lost."""
    srv = start()
    alice, bob = pair_up(srv.address, trust)
    bob.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    for _ in range(2000):  # 4 KB a turn: the bound (64 KiB and more) is met long before
        alice.send("x" * 4000)
        line = alice.line()
        if line == "TURN READ":
            try:
                bob.sock.sendall(b"y\n")  # his turn, blind
            except OSError:
                pass  # dropped already
            line = alice.line()
        if line != "MSG y":
            break
        alice.expect("TURN WRITE")
    assert line.startswith("BYE partner-lost"), line
    alice.expect_tls_close()
    srv.out.wait_for(r"client disconnected bob \S+ \(dropped: more than \d+ bytes unread\)")


# ---- bad clients: one line each, and nobody waits ----------------------------------------


def test_a_plain_text_client_costs_one_line_and_the_server_goes_on(start, trust):
    srv = start()
    plain = Client(srv.address, hello=False, first=b"carol\n")
    plain.expect_closed(allow_reset=True)  # what it sent was never read: maybe a reset
    srv.out.wait_for(f"client disconnected {plain.here} ")
    alice, bob = pair_up(srv.address, trust)
    chat_both_ways(alice, bob)
    assert_one_failure_line(srv, plain.here, "(TLS handshake failed: not TLS: a plain-text client)")
    leave(alice, bob)


def test_an_http_request_costs_one_line(start, trust):
    srv = start()
    http = Client(srv.address, hello=False, first=b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
    http.expect_closed(allow_reset=True)
    srv.out.wait_for(f"client disconnected {http.here} ")
    alice, bob = pair_up(srv.address, trust)
    chat(alice, bob)
    assert_one_failure_line(srv, http.here, "(TLS handshake failed: not TLS: a plain HTTP request)")
    leave(alice, bob)


def test_a_silent_connection_is_closed_at_the_name_timeout_and_delays_nobody(start, trust):
    srv = start("--name-timeout", "1")
    began = time.monotonic()
    silent = Client(srv.address, hello=False)
    alice, bob = pair_up(srv.address, trust)  # while the silent one holds its handshake
    chat_both_ways(alice, bob)
    assert time.monotonic() - began < 0.9, "the TLS pair was held up by the silent client"
    silent.expect_closed(timeout=5)
    waited = time.monotonic() - began
    assert 0.9 <= waited < 3.0, waited
    srv.out.wait_for(f"client disconnected {re.escape(silent.here)} ")  # closed, then logged
    assert_one_failure_line(srv, silent.here, "timeout")
    leave(alice, bob)


def test_a_tls_client_that_never_names_itself_gets_bye_timeout(start, trust):
    srv = start("--name-timeout", "1")
    mute = Client(srv.address, context=trust)  # handshake done, HELLO read, no name
    mute.expect("BYE timeout")
    mute.expect_tls_close()


# ---- third-party clients -----------------------------------------------------------------


def test_openssl_s_client_chats_with_a_python_tls_client(start, trust, tls_pair):
    srv = start()
    command = [
        *("openssl", "s_client", "-quiet", "-CAfile", tls_pair[0]),
        *("-verify_return_error", "-verify_ip", "127.0.0.1"),
        *("-connect", f"127.0.0.1:{srv.port}"),
    ]
    proc = subprocess.Popen(
        command,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        out, err = OutputTail(proc.stdout), OutputTail(proc.stderr)
        out.wait_for(r"^HELLO ")
        proc.stdin.write(b"carol\n")
        proc.stdin.flush()
        out.wait_for(r"^WAIT ")
        dave = Client(srv.address, "dave", context=trust)
        dave.expect("PAIRED carol", "TURN READ")
        out.wait_for(r"^TURN WRITE$")
        proc.stdin.write(b"hi from openssl\n")
        proc.stdin.flush()
        dave.expect("MSG hi from openssl", "TURN WRITE")
        chat_mark = out.mark()
        dave.send("hi from python")
        dave.expect("TURN READ")
        out.wait_for(r"^MSG hi from python$", start=chat_mark)
        out.wait_for(r"^TURN WRITE$", start=chat_mark)
        proc.stdin.write(b"exit\n")
        proc.stdin.flush()
        out.wait_for(r"^BYE exit ")
        dave.expect("BYE partner-exit")
        dave.close()
        assert proc.wait(DEADLINE) == 0, err.text()
    finally:
        reap_tree(proc)


def run_client(port: int, name: str, stdin: str, *args: str) -> subprocess.Popen:
    """Start bin/client NAME with ``stdin`` piped in (and closed: the end of input)."""
    proc = subprocess.Popen(
        [sys.executable, str(BIN / "client"), name, "--port", str(port), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(),
        start_new_session=True,
    )
    proc.stdin.write(stdin)
    proc.stdin.close()
    proc.stdin = None  # communicate() must not flush it
    return proc


def finish(proc: subprocess.Popen) -> tuple[str, str]:
    """Wait for bin/client to end (deadline) and reap it; its (stdout, stderr)."""
    try:
        return proc.communicate(timeout=DEADLINE)
    except subprocess.TimeoutExpired:
        raise AssertionError("bin/client did not finish in time") from None
    finally:
        reap_tree(proc)


def test_bin_client_with_cafile_chats_with_a_python_peer(start, trust, tls_pair):
    srv = start()
    bob = Client(srv.address, "bob", context=trust)
    bob.expect("WAIT ")
    proc = run_client(srv.port, "alice", "hello there\n", "--cafile", tls_pair[0])
    try:
        bob.expect("PAIRED alice", "TURN WRITE")
        bob.send("hi alice")
        bob.expect("TURN READ", "MSG hello there", "TURN WRITE")
        bob.expect("BYE partner-exit")  # a piped client leaves once its last line went out
        bob.expect_tls_close()
    finally:
        out, err = finish(proc)
    assert proc.returncode == 0, err
    assert "hi alice" in out
    assert "Traceback" not in err


def test_bin_client_with_the_wrong_ca_says_so_in_one_line(start, make_cert):
    srv = start()
    stranger, _ = make_cert("stranger")
    proc = run_client(srv.port, "alice", "", "--cafile", stranger)
    out, err = finish(proc)
    assert proc.returncode == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "certificate" in lines[0], err
    assert "Traceback" not in err + out
    line = srv.out.wait_for(r"client disconnected (\S+) \(TLS handshake failed: the client does")
    assert_one_failure_line(srv, line.group(1), "unknown CA")


def test_bin_client_with_the_wrong_ca_names_the_file_it_tried(start, make_cert):
    srv = start()
    stranger, _ = make_cert("stranger")
    _, err = finish(run_client(srv.port, "alice", "", "--cafile", stranger))
    assert "use --cafile" not in err and stranger in err, err


@pytest.mark.parametrize("name", [b"bo\n", b"x\n", b"ann\n"])
def test_a_short_plain_name_is_refused_at_its_first_byte_not_at_the_name_timeout(start, name):
    """A name of up to three letters and LF is shorter than a TLS record header:
    OpenSSL would wait for more. The first byte already says it is no TLS handshake."""
    srv = start("--name-timeout", "30")
    began = time.monotonic()
    plain = Client(srv.address, hello=False, first=name)
    plain.expect_closed(timeout=5, allow_reset=True)
    assert time.monotonic() - began < 2.0
    srv.out.wait_for(f"client disconnected {re.escape(plain.here)} ")
    assert_one_failure_line(srv, plain.here, "(TLS handshake failed: not TLS: a plain-text client)")


def test_a_tls_client_at_a_plain_server_is_logged_as_what_it_is(tls_pair):
    """Not "bad-name": the log says a TLS handshake came to a plain-text server."""
    srv = ServerProc("--no-color")
    try:
        context = ssl.create_default_context(cafile=tls_pair[0])
        raw = socket.create_connection(srv.address, timeout=DEADLINE)
        with pytest.raises((ssl.SSLError, OSError)):
            context.wrap_socket(raw, server_hostname="localhost")  # HELLO is no ServerHello
        line = srv.out.wait_for(r"client disconnected \S+ \((.*)\)$")
        assert line.group(1) == "not a forkchat client: a TLS handshake to a plain-text server"
        raw.close()
        alice, bob = pair(srv.address)
        close_all((alice, bob))
    finally:
        srv.stop()
