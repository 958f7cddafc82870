"""Unit tests of the PROXY protocol reader: every shape HAProxy sends, and what it must refuse."""

import ipaddress
import select
import socket
import struct
from dataclasses import replace

import pytest

from forkchat.proxyproto import (
    V1_MAX_LENGTH,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyHeaderError,
    ProxyHeaderReader,
    recv_proxy_header,
)

TLS_CLIENT_HELLO = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"
IPV6_MAX = ":".join(["ffff"] * 8)


def v2(command: int, family: int, block: bytes) -> bytes:
    """A v2 header with version 2, the given command and family bytes, and its block."""
    return V2_SIGNATURE + struct.pack("!BBH", 0x20 | command, family, len(block)) + block


def inet_block(src: str, dst: str, sport: int, dport: int) -> bytes:
    """The packed address block of a TCP v2 header (IPv4 or IPv6 by the addresses)."""
    packed = ipaddress.ip_address(src).packed + ipaddress.ip_address(dst).packed
    return packed + struct.pack("!HH", sport, dport)


def tlv(kind: int, value: bytes) -> bytes:
    """One type-length-value record."""
    return struct.pack("!BH", kind, len(value)) + value


def feed_all(data: bytes, step: int = 0) -> ProxyHeader | None:
    """Feed data at once (step 0) or in pieces of ``step`` bytes until a header comes.

    The header's ``rest`` then also holds the pieces that were not fed, as if they had
    come in the same read.
    """
    reader = ProxyHeaderReader()
    if not step:
        return reader.feed(data)
    for start in range(0, len(data), step):
        header = reader.feed(data[start : start + step])
        if header is not None:
            return replace(header, rest=header.rest + data[start + step :])
    return None


def error_of(data: bytes) -> str:
    """The one-line reason the reader gives for data, fed at once."""
    with pytest.raises(ProxyHeaderError) as info:
        feed_all(data)
    reason = str(info.value)
    assert "\n" not in reason
    return reason


# ---- version 1 ------------------------------------------------------------------------


@pytest.mark.parametrize("step", [0, 1, 3])
def test_v1_tcp4(step):
    header = feed_all(b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\nalice\n", step)
    assert header == ProxyHeader(
        1, "proxy", ("192.168.0.1", 56324), ("192.168.0.11", 443), 47, b"alice\n"
    )


@pytest.mark.parametrize("step", [0, 1])
def test_v1_tcp6(step):
    header = feed_all(b"PROXY TCP6 2001:DB8::1 ::1 65535 0\r\n", step)
    assert header.source == ("2001:db8::1", 65535)
    assert header.dest == ("::1", 0)
    assert header.rest == b""


def test_v1_tcp6_v4_mapped_is_plain_ipv4():
    header = feed_all(b"PROXY TCP6 ::ffff:10.0.0.1 ::ffff:10.0.0.2 1 2\r\n")
    assert (header.source, header.dest) == (("10.0.0.1", 1), ("10.0.0.2", 2))


def test_v2_inet6_v4_mapped_is_plain_ipv4():
    header = feed_all(v2(0x1, 0x21, inet_block("::ffff:192.0.2.9", "::1", 3, 4)))
    assert header.source == ("192.0.2.9", 3)


@pytest.mark.parametrize(
    "line",
    [b"PROXY UNKNOWN\r\n", b"PROXY UNKNOWN whatever the sender likes 1 2\r\n"],
)
def test_v1_unknown_has_no_address(line):
    header = feed_all(line + b"\x16\x03")
    assert (header.command, header.source, header.dest) == ("proxy", None, None)
    assert header.length == len(line)
    assert header.rest == b"\x16\x03"


def test_v1_worst_case_of_107_bytes_is_accepted():
    line = f"PROXY UNKNOWN {IPV6_MAX} {IPV6_MAX} 65535 65535\r\n".encode()
    assert len(line) == V1_MAX_LENGTH
    assert feed_all(line, 1).length == V1_MAX_LENGTH


def test_v1_a_cr_at_byte_106_may_still_end_the_line():
    reader = ProxyHeaderReader()
    line = b"PROXY UNKNOWN " + b"x" * (V1_MAX_LENGTH - 16) + b"\r"
    assert reader.feed(line) is None
    assert reader.feed(b"\n").length == V1_MAX_LENGTH


def test_v1_longer_than_107_bytes_is_refused():
    line = b"PROXY UNKNOWN " + b"x" * (V1_MAX_LENGTH - 15) + b"\r\n"
    assert "107" in error_of(line)


def test_v1_without_crlf_fails_at_byte_106_not_later():
    reader = ProxyHeaderReader()
    reader.feed(b"PROXY TCP4 " + b"1" * (V1_MAX_LENGTH - 2 - 11))
    with pytest.raises(ProxyHeaderError, match="without CRLF"):
        reader.feed(b"1")


@pytest.mark.parametrize(
    "line",
    [
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",
        b"PROXY TCP4 1.2.3.4\r5.6.7.8 1 2\r\n",
        b"PROXY UNKNOWN\r\r\n",
        b"PROXY UNKNOWN \n\r\n",
    ],
)
def test_v1_lone_cr_or_lf_is_refused(line):
    assert "CRLF" in error_of(line)


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "4 fields"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", "4 fields"),
        (b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n", "4 fields"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", "4 fields"),
        (b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n", "unknown protocol"),
        (b"PROXY  TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "unknown protocol"),
        (b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n", "bad IPv4"),
        (b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", "bad IPv4"),
        (b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n", "bad IPv4"),
        (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", "bad IPv6"),
        (b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "bad IPv6"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.\xff 1 2\r\n", "bad IPv4"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 +80 2\r\n", "bad port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 080 2\r\n", "bad port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1_0 2\r\n", "bad port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n", "bad port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 -1\r\n", "bad port"),
        (b"PROXY \r\n", "unknown protocol"),
    ],
)
def test_v1_malformed_lines_are_refused(line, reason):
    assert reason in error_of(line)


def test_v1_lowercase_is_not_proxy():
    assert "no PROXY header" in error_of(b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n")


# ---- version 2 ------------------------------------------------------------------------


@pytest.mark.parametrize("step", [0, 1, 5])
def test_v2_proxy_inet(step):
    data = v2(0x1, 0x11, inet_block("203.0.113.7", "10.0.0.1", 40000, 33016))
    header = feed_all(data + TLS_CLIENT_HELLO, step)
    assert header == ProxyHeader(
        2, "proxy", ("203.0.113.7", 40000), ("10.0.0.1", 33016), 28, TLS_CLIENT_HELLO
    )


@pytest.mark.parametrize("step", [0, 1])
def test_v2_proxy_inet6(step):
    data = v2(0x1, 0x21, inet_block("2001:db8::7", "::1", 1, 65535))
    header = feed_all(data, step)
    assert (header.source, header.dest, header.length) == (("2001:db8::7", 1), ("::1", 65535), 52)


@pytest.mark.parametrize("step", [0, 1])
def test_v2_local_is_a_health_check_without_address(step):
    header = feed_all(v2(0x0, 0x00, b""), step)
    assert header == ProxyHeader(2, "local", None, None, 16, b"")


def test_v2_local_skips_whatever_block_it_has():
    block = inet_block("127.0.0.1", "127.0.0.1", 5, 6) + tlv(0x04, b"pad")
    header = feed_all(v2(0x0, 0x11, block) + b"after")
    assert (header.command, header.source, header.rest) == ("local", None, b"after")


def test_v2_tlvs_are_skipped():
    block = inet_block("198.51.100.2", "127.0.0.1", 7, 8)
    tlvs = (
        tlv(0x01, b"h2") + tlv(0x05, b"id" * 64) + tlv(0x20, b"\x01\x00\x00\x00\x00") + tlv(4, b"")
    )
    header = feed_all(v2(0x1, 0x11, block + tlvs) + b"bob\n", 2)
    assert header.source == ("198.51.100.2", 7)
    assert header.rest == b"bob\n"
    assert header.length == 16 + len(block) + len(tlvs)


@pytest.mark.parametrize("family", [0x00, 0x30, 0x31, 0x12, 0x22, 0x10])
def test_v2_proxy_without_tcp_address_falls_back_to_the_socket(family):
    header = feed_all(v2(0x1, family, b"\x00" * 216))
    assert (header.command, header.source, header.dest) == ("proxy", None, None)


@pytest.mark.parametrize(
    ("fixed", "reason"),
    [
        (b"\x11", "version 1"),
        (b"\x31", "version 3"),
        (b"\x22", "unknown command 0x2"),
        (b"\x2f", "unknown command 0xf"),
        (b"\x21\x41", "unknown address family 0x4"),
        (b"\x21\xf1", "unknown address family 0xf"),
        (b"\x21\x13", "unknown transport 0x3"),
    ],
)
def test_v2_bad_fixed_bytes_are_refused_as_soon_as_seen(fixed, reason):
    reader = ProxyHeaderReader()
    assert reader.feed(V2_SIGNATURE + fixed[:-1]) is None
    with pytest.raises(ProxyHeaderError, match=reason):
        reader.feed(fixed[-1:])


def test_v2_unknown_family_is_refused_with_one_line():
    assert "unknown address family" in error_of(v2(0x1, 0x41, b"\x00" * 12))


@pytest.mark.parametrize(("family", "size"), [(0x11, 12), (0x21, 36)])
def test_v2_short_address_block_is_refused(family, size):
    reason = error_of(v2(0x1, family, b"\x00" * (size - 1)))
    assert f"needs {size} address bytes" in reason


@pytest.mark.parametrize("tlvs", [b"\x01", b"\x01\x00", tlv(1, b"abc")[:-1], tlv(1, b"") + b"\x02"])
def test_v2_malformed_tlv_is_refused(tlvs):
    block = inet_block("127.0.0.1", "127.0.0.1", 1, 2) + tlvs
    assert "TLV" in error_of(v2(0x1, 0x11, block))


def test_v2_oversized_length_is_refused_before_the_payload_arrives():
    reader = ProxyHeaderReader(max_v2_payload=512)
    with pytest.raises(ProxyHeaderError, match="announces 513 bytes, more than 512"):
        reader.feed(V2_SIGNATURE + struct.pack("!BBH", 0x21, 0x11, 513))


def test_v2_default_bound_refuses_the_largest_length():
    assert "more than" in error_of(V2_SIGNATURE + b"\x21\x11\xff\xff")


def test_v2_max_payload_is_accepted():
    reader = ProxyHeaderReader(max_v2_payload=64)
    block = inet_block("127.0.0.1", "127.0.0.1", 1, 2) + tlv(4, b"\x00" * 49)
    assert len(block) == 64
    assert reader.feed(v2(0x1, 0x11, block)).length == 80


# ---- not PROXY at all, and truncation -------------------------------------------------


@pytest.mark.parametrize(
    ("first", "kind"),
    [
        (TLS_CLIENT_HELLO, "TLS handshake"),
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "HTTP request"),
        (b"CONNECT example:443 HTTP/1.1\r\n", "HTTP request"),
        (b"alice\n", "other bytes"),
        (b"\x00\x01\x02", "other bytes"),
        (b"\r\n\r\n\x00\r\nQUIX", "other bytes"),
        (b"PROXY\r\n", "other bytes"),
    ],
)
def test_streams_that_are_not_proxy_are_refused(first, kind):
    reason = error_of(first)
    assert reason.startswith("no PROXY header") and kind in reason


@pytest.mark.parametrize("first", [b"\x16", b"G", b"a", b"\x00", b"\r\x0a\r\x0a\x01"])
def test_not_proxy_is_decided_on_the_first_wrong_byte(first):
    reader = ProxyHeaderReader()
    with pytest.raises(ProxyHeaderError, match="no PROXY header"):
        reader.feed(first)


@pytest.mark.parametrize("prefix", [b"P", b"PROXY", b"\r\n", V2_SIGNATURE, V2_SIGNATURE + b"\x21"])
def test_a_possible_prefix_waits_for_more(prefix):
    assert ProxyHeaderReader().feed(prefix) is None


@pytest.mark.parametrize(
    "data",
    [
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r",
        V2_SIGNATURE[:7],
        v2(0x1, 0x11, inet_block("1.2.3.4", "5.6.7.8", 1, 2))[:-1],
    ],
)
def test_end_of_stream_inside_a_header_is_refused(data):
    reader = ProxyHeaderReader()
    assert reader.feed(data) is None
    with pytest.raises(ProxyHeaderError, match=f"after {len(data)} bytes"):
        reader.feed(b"")


def test_end_of_stream_before_anything():
    with pytest.raises(ProxyHeaderError, match="closed before a PROXY header"):
        ProxyHeaderReader().feed(b"")


# ---- on a socket: exactly the header is taken -----------------------------------------


@pytest.fixture
def pair():
    """A connected non-blocking socket pair: (sender, receiver)."""
    left, right = socket.socketpair()
    right.setblocking(False)
    yield left, right
    left.close()
    right.close()


def test_recv_leaves_the_stream_after_the_header_in_the_socket(pair):
    sender, receiver = pair
    sender.sendall(v2(0x1, 0x11, inet_block("192.0.2.1", "127.0.0.1", 9, 10)) + TLS_CLIENT_HELLO)
    header = recv_proxy_header(receiver, ProxyHeaderReader())
    assert header.source == ("192.0.2.1", 9)
    assert header.rest == b""
    assert receiver.recv(100) == TLS_CLIENT_HELLO


def test_recv_takes_split_headers_piece_by_piece(pair):
    sender, receiver = pair
    reader = ProxyHeaderReader()
    sender.sendall(b"PROXY TCP4 192.0.2.1 ")
    assert recv_proxy_header(receiver, reader) is None
    with pytest.raises(BlockingIOError):
        receiver.recv(1)  # the piece was taken out of the socket: no busy loop
    sender.sendall(b"127.0.0.1 5 6\r\nbob\n")
    assert recv_proxy_header(receiver, reader).source == ("192.0.2.1", 5)
    assert receiver.recv(100) == b"bob\n"


def test_recv_without_data_waits(pair):
    assert recv_proxy_header(pair[1], ProxyHeaderReader()) is None


def test_recv_at_end_of_stream_raises(pair):
    sender, receiver = pair
    sender.sendall(b"PROXY TCP")
    sender.close()
    reader = ProxyHeaderReader()
    assert recv_proxy_header(receiver, reader) is None
    with pytest.raises(ProxyHeaderError, match="after 9 bytes"):
        recv_proxy_header(receiver, reader)


def test_recv_on_a_reset_connection_raises():
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        accepted, _ = server.accept()
    with accepted:
        client.sendall(b"PROXY ")
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()  # linger 0: the close sends RST
        reader = ProxyHeaderReader()
        with pytest.raises(ProxyHeaderError, match=r"connection failed.*reset"):
            for _ in range(10):  # the header's first bytes, then the reset
                select.select([accepted], [], [], 5)
                assert recv_proxy_header(accepted, reader) is None
