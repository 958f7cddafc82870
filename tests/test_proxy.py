"""The real server with --proxy-protocol (issue 11): the PROXY header's address is the
client's address everywhere; a health check (v2 LOCAL) leaves no trace; every bad or
missing header costs one log line and a closed connection, and delays nobody."""

from __future__ import annotations

import ipaddress
import json
import re
import signal
import socket
import ssl
import struct
import time

import pytest
from test_tls import (
    ROOM_RE,
    Client,
    about,
    chat,
    chat_both_ways,
    leave,
    pair_up,
    wait_handshaking,
)

from support import DEADLINE, ServerProc, report, run_bin, wait_until

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def v1(source: str, port: int, dport: int = 33016) -> bytes:
    """A PROXY v1 line for a TCP client at ``source:port``."""
    family = "TCP6" if ":" in source else "TCP4"
    dest = "2001:db8::1" if ":" in source else "192.0.2.1"
    return f"PROXY {family} {source} {dest} {port} {dport}\r\n".encode()


def v2(source: str, port: int, dport: int = 33016) -> bytes:
    """A PROXY v2 PROXY/STREAM header over AF_INET or AF_INET6, as send-proxy-v2 writes it."""
    src = ipaddress.ip_address(source)
    dst = ipaddress.ip_address("2001:db8::1" if src.version == 6 else "192.0.2.1")
    family = 0x1 if src.version == 4 else 0x2
    block = src.packed + dst.packed + struct.pack("!HH", port, dport)
    return V2_SIGNATURE + bytes([0x21, family << 4 | 0x1]) + struct.pack("!H", len(block)) + block


V2_LOCAL = V2_SIGNATURE + b"\x20\x00\x00\x00"


@pytest.fixture
def start():
    """Start --proxy-protocol servers with extra options; stop and reap them after."""
    servers: list[ServerProc] = []

    def start(*args: str) -> ServerProc:
        srv = ServerProc("--no-color", "--proxy-protocol", *args)
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        srv.stop()


@pytest.fixture
def proxied(start) -> ServerProc:
    return start()


def refused(srv: ServerProc, client: Client, reason: str) -> None:
    """The server closed ``client`` and logged exactly one line for it, with ``reason``;
    then it still pairs and relays (it was not stalled)."""
    client.expect_closed(allow_reset=True)  # unread bytes make the close a reset
    srv.out.wait_for(f"client disconnected {client.here} ")
    alice, bob = pair_up(srv.address, None, header=v1("198.51.100.1", 1000))
    chat(alice, bob)
    lines = about(srv, client.here)
    assert len(lines) == 1 and reason in lines[0], lines
    leave(alice, bob)


# ---- the header's address is the client's ---------------------------------------------


@pytest.mark.parametrize(
    ("make", "alice_at", "bob_at"),
    [
        (v1, ("203.0.113.7", 5555), ("203.0.113.8", 6666)),
        (v1, ("2001:db8::7", 5555), ("2001:db8::8", 6666)),
        (v2, ("203.0.113.7", 5555), ("203.0.113.8", 6666)),
        (v2, ("2001:db8::7", 5555), ("2001:db8::8", 6666)),
    ],
    ids=["v1-tcp4", "v1-tcp6", "v2-inet", "v2-inet6"],
)
def test_the_header_address_is_the_client_address_in_the_log(proxied, make, alice_at, bob_at):
    def shown(at):
        return f"[{at[0]}]:{at[1]}" if ":" in at[0] else f"{at[0]}:{at[1]}"

    alice = Client(proxied.address, "alice", header=make(*alice_at))
    alice.expect("WAIT ")
    bob = Client(proxied.address, "bob", header=make(*bob_at))
    bob.expect("PAIRED alice", "TURN READ")
    alice.expect("PAIRED bob", "TURN WRITE")
    chat_both_ways(alice, bob)
    a, b = re.escape(shown(alice_at)), re.escape(shown(bob_at))
    out = proxied.out
    out.wait_for(f"client connected {a}$")
    out.wait_for(f"client named alice {a}$")
    out.wait_for(f"client named bob {b}$")
    out.wait_for(ROOM_RE + f"alice {a} \\+ bob {b}$")
    assert not about(proxied, alice.here) and not about(proxied, bob.here), "socket address shown"
    assert proxied.out.count(r"client connected ") == 2
    leave(alice, bob)
    out.wait_for(f"client disconnected alice {a} \\(exit\\)")


def test_bin_pids_copes_with_proxied_clients(proxied):
    alice, bob = pair_up(proxied.address, None, header=v1("203.0.113.7", 5555))
    room = int(proxied.out.wait_for(ROOM_RE).group(2))
    done = run_bin("pids", "--port", str(proxied.port), "--json")
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    entries = json.loads(done.stdout)
    roles = {(e["role"], e["pid"]) for e in entries}
    assert ("server", proxied.pid) in roles and ("room", room) in roles, entries
    for entry in entries:
        assert {"role", "pid", "ppid", "address"} <= entry.keys()
    leave(alice, bob)


def test_a_name_in_the_same_segment_as_the_header_is_read(proxied):
    """The header is taken out of the socket alone: what follows it is the stream."""
    alice = Client(proxied.address, header=v2("203.0.113.7", 5555) + b"alice\n")
    alice.expect("WAIT ")
    bob = Client(proxied.address, header=v1("203.0.113.8", 6666) + b"bob\nhello\n", hello=False)
    bob.expect("HELLO ", "PAIRED alice", "TURN READ", "ERR not-your-turn")
    alice.expect("PAIRED bob", "TURN WRITE")
    chat(alice, bob)
    leave(alice, bob)


@pytest.mark.parametrize("make", [v1, v2], ids=["v1", "v2"])
def test_a_header_split_byte_by_byte_still_works(proxied, make):
    header = make("203.0.113.9", 7777)
    split = Client(proxied.address, hello=False)
    for byte in header:
        split.sock.sendall(bytes([byte]))
        time.sleep(0.002)  # pacing, not synchronisation: makes separate segments likely
    split.expect("HELLO ")
    split.send("carol")
    split.expect("WAIT ")
    proxied.out.wait_for(r"client named carol 203\.0\.113\.9:7777$")
    split.send("exit")
    split.expect("BYE exit")


def test_a_v1_unknown_header_leaves_the_socket_address(proxied):
    """PROXY UNKNOWN: the proxy could not tell; the connection's own address stands."""
    alice = Client(proxied.address, "alice", header=b"PROXY UNKNOWN\r\n")
    alice.expect("WAIT ")
    proxied.out.wait_for(f"client named alice {re.escape(alice.here)}$")
    alice.send("exit")
    alice.expect("BYE exit")


# ---- health checks and bad headers ---------------------------------------------------


def test_a_v2_local_health_check_is_closed_without_a_log_line(proxied):
    check = Client(proxied.address, header=V2_LOCAL, hello=False)
    check.expect_closed()
    alice, bob = pair_up(proxied.address, None, header=v2("203.0.113.7", 5555))
    chat(alice, bob)
    assert about(proxied, check.here) == []
    assert proxied.out.count("client connected") == 2
    assert proxied.out.count("client disconnected") == 0
    assert report(proxied)[0] == 2
    leave(alice, bob)


def test_an_unknown_v2_family_is_one_line(proxied):
    header = V2_SIGNATURE + b"\x21\x41\x00\x0c" + bytes(12)
    client = Client(proxied.address, header=header, hello=False)
    refused(proxied, client, "PROXY header refused: PROXY v2 unknown address family 0x4")


def test_a_truncated_header_then_close_is_one_line(proxied):
    client = Client(proxied.address, header=v2("203.0.113.7", 5555)[:20], hello=False)
    client.sock.shutdown(socket.SHUT_WR)
    refused(proxied, client, "connection closed inside the PROXY header, after 20 bytes")


def test_an_oversized_v1_header_is_one_line(proxied):
    client = Client(proxied.address, header=b"PROXY TCP4 " + b"1" * 110, hello=False)
    refused(proxied, client, "PROXY v1 line without CRLF in its first 107 bytes")


def test_a_client_without_a_header_is_one_line(proxied):
    client = Client(proxied.address, header=b"alice\n", hello=False)
    refused(proxied, client, "no PROXY header: the connection starts with other bytes")


def test_no_header_within_the_name_timeout_is_one_line_and_delays_nobody(start):
    srv = start("--name-timeout", "1")
    began = time.monotonic()
    silent = Client(srv.address, hello=False)
    alice, bob = pair_up(srv.address, None, header=v1("198.51.100.1", 1000))
    chat_both_ways(alice, bob)
    assert time.monotonic() - began < 0.9, "the pair was held up by the silent connection"
    silent.expect_closed(timeout=5)
    assert 0.9 <= time.monotonic() - began < 3.0
    srv.out.wait_for("timeout: no PROXY header")  # logged before the close; read after
    lines = about(srv, silent.here)
    assert len(lines) == 1 and "timeout: no PROXY header" in lines[0], lines
    leave(alice, bob)


def test_sigusr1_closes_a_connection_still_in_its_header(proxied):
    alice, bob = pair_up(proxied.address, None, header=v1("203.0.113.7", 5555))
    partial = Client(proxied.address, header=b"PROXY TCP4 ", hello=False)
    wait_handshaking(proxied, 1)  # the partial header is a connection in handshake
    proxied.signal(signal.SIGUSR1)
    for peer in (alice, bob):
        peer.expect("BYE shutdown")
        peer.close()
    partial.expect_closed(allow_reset=True)
    partial.close()
    assert proxied.wait_exit() == 0


# ---- PROXY and TLS together --------------------------------------------------------------


def test_the_header_comes_before_the_tls_handshake(start, tls_pair):
    srv = start("--tls-cert", tls_pair[0], "--tls-key", tls_pair[1])
    trust = ssl.create_default_context(cafile=tls_pair[0])
    alice, bob = pair_up(srv.address, trust, header=v2("203.0.113.7", 5555))
    assert isinstance(alice.sock, ssl.SSLSocket)
    chat_both_ways(alice, bob)
    srv.out.wait_for(ROOM_RE + r"alice 203\.0\.113\.7:5555 \+ bob 203\.0\.113\.7:5555$")
    alice.send("exit")
    alice.expect("BYE exit")
    alice.expect_tls_close()
    bob.expect("BYE partner-exit")
    bob.expect_tls_close()
    leave_lines = [line for line in srv.out.lines if "client disconnected" in line]
    assert all("203.0.113.7:5555" in line for line in leave_lines), leave_lines


class BioTlsClient:
    """A TLS client over a memory BIO, so that a test chooses every TCP write: here the
    PROXY header and the TLS ClientHello leave in one segment."""

    def __init__(self, address, context: ssl.SSLContext, header: bytes) -> None:
        self.raw = socket.create_connection(address, timeout=DEADLINE)
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname="localhost")
        self.buf = b""
        try:
            self.tls.do_handshake()
        except ssl.SSLWantReadError:
            pass
        self.raw.sendall(header + self.outgoing.read())  # one write: header + ClientHello
        while not self.step(self.tls.do_handshake):
            pass

    def step(self, action) -> bool:
        """Try ``action``; on want-read, feed it what the server sent (one recv)."""
        try:
            action()
        except ssl.SSLWantReadError:
            self.flush()
            data = self.raw.recv(65536)
            assert data, "the server closed the connection"
            self.incoming.write(data)
            return False
        self.flush()
        return True

    def flush(self) -> None:
        pending = self.outgoing.read()
        if pending:
            self.raw.sendall(pending)

    def send(self, line: str) -> None:
        self.tls.write(line.encode() + b"\n")
        self.flush()

    def line(self) -> str:
        while b"\n" not in self.buf:
            self.step(lambda: setattr(self, "buf", self.buf + self.tls.read(65536)))
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode()

    def close(self) -> None:
        self.raw.close()


@pytest.mark.parametrize("make", [v1, v2], ids=["v1", "v2"])
def test_a_header_and_the_client_hello_in_one_segment(start, tls_pair, make):
    """The header is taken out of the socket alone: the ClientHello behind it is left
    whole for the TLS handshake."""
    srv = start("--tls-cert", tls_pair[0], "--tls-key", tls_pair[1])
    trust = ssl.create_default_context(cafile=tls_pair[0])
    client = BioTlsClient(srv.address, trust, make("203.0.113.5", 5050))
    try:
        assert client.line().startswith("HELLO ")
        client.send("alice")
        assert client.line().startswith("WAIT ")
        srv.out.wait_for(r"client named alice 203\.0\.113\.5:5050$")
        client.send("exit")
        assert client.line().startswith("BYE exit")
    finally:
        client.close()


def test_a_failed_handshake_after_a_header_is_one_line_with_the_header_address(start, tls_pair):
    srv = start("--tls-cert", tls_pair[0], "--tls-key", tls_pair[1])
    plain = Client(srv.address, header=v1("203.0.113.66", 6600) + b"alice\n", hello=False)
    plain.expect_closed(allow_reset=True)
    line = srv.out.wait_for(r"client disconnected 203\.0\.113\.66:6600 \((.*)\)$")
    assert line.group(1) == "TLS handshake failed: not TLS: a plain-text client"
    trust = ssl.create_default_context(cafile=tls_pair[0])
    alice, bob = pair_up(srv.address, trust, header=v1("198.51.100.1", 1000))
    chat(alice, bob)
    lines = about(srv, "203.0.113.66:6600")
    assert len(lines) == 1 and lines[0].endswith(line.group(0)), lines
    assert about(srv, plain.here) == []
    leave(alice, bob)


def test_the_name_timeout_starts_again_once_the_header_is_through(start):
    """``--name-timeout`` is the time to send a name once the connection speaks the
    protocol: a header that comes 1.5 s into a 2 s timeout leaves the client 2 s from
    then, not 0.5 s."""
    srv = start("--name-timeout", "2")
    began = time.monotonic()
    slow = Client(srv.address, hello=False)
    wait_until(lambda: time.monotonic() - began >= 1.5, what="1.5 s")
    slow.sock.sendall(v1("198.51.100.4", 4000))
    assert slow.line().startswith("HELLO ")
    slow.expect("BYE timeout", timeout=5)
    closed = time.monotonic() - began
    assert 3.3 <= closed < 5.0, closed
    slow.close()
