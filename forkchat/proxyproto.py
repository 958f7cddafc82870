"""PROXY protocol header reader, versions 1 (text) and 2 (binary), as HAProxy sends them.

The reference is HAProxy's ``doc/proxy-protocol.txt``. A proxy that speaks it writes one
header at the very start of each connection, before any byte of the client's own stream
(TLS included); the header carries the client's address. ``ProxyHeaderReader`` is pure and
incremental: feed it the bytes as they arrive and it answers ``None`` (need more), a
``ProxyHeader``, or raises ``ProxyHeaderError`` with a one-line reason. It decides "this is
not a PROXY header" from the first byte that cannot belong to one.

``recv_proxy_header`` is the socket step for a non-blocking server: it peeks, and takes out
of the kernel exactly the header's bytes, so what follows (a TLS ClientHello, a name) is
still in the socket for ``ssl`` or the line reader.

We own this parser rather than use the ``proxy-protocol`` package: that one is built
around asyncio readers, needs the caller to hand it exactly the header (it cannot return
the bytes after it), accepts ports such as ``+80`` or ``1_0``, has no 107-byte bound, and
lets ``struct.error`` escape on a short v2 address block.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import struct
from dataclasses import dataclass, replace

V1_PREFIX = b"PROXY "
V1_MAX_LENGTH = 107  # "PROXY UNKNOWN <ipv6> <ipv6> 65535 65535\r\n", the spec's worst case
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED_LENGTH = 16  # signature, version/command, family/transport, 2-byte length
V2_MAX_PAYLOAD = 4096  # addresses + TLVs; HAProxy sends at most a few hundred bytes
V2_ADDRESS_LENGTHS = {0x1: 12, 0x2: 36}  # AF_INET, AF_INET6 with their ports
V2_FAMILIES = {0x0: "AF_UNSPEC", 0x1: "AF_INET", 0x2: "AF_INET6", 0x3: "AF_UNIX"}
V2_TRANSPORTS = {0x0: "UNSPEC", 0x1: "STREAM", 0x2: "DGRAM"}
PORT_PATTERN = re.compile(rb"0|[1-9][0-9]{0,4}")
HTTP_METHODS = (b"GET ", b"POST", b"HEAD", b"PUT ", b"DELE", b"OPTI", b"CONN", b"PATC")

Address = tuple[str, int]


class ProxyHeaderError(Exception):
    """The connection does not start with a valid PROXY header; str() is one line."""


@dataclass(frozen=True)
class ProxyHeader:
    """A complete PROXY header.

    ``command`` is "proxy" (a relayed client) or "local" (the proxy's own connection, a
    health check). ``source`` and ``dest`` are ``(ip, port)`` of the client and of the
    address it reached, or None when the header carries none (v2 LOCAL, v1 UNKNOWN, an
    unspecified or non-TCP v2 family): then use the socket's own peer address. An
    IPv4-mapped IPv6 address is given as plain IPv4.
    ``length`` is the header's size in bytes; ``rest`` the bytes fed after it, which belong
    to the stream.
    """

    version: int
    command: str
    source: Address | None
    dest: Address | None
    length: int
    rest: bytes = b""


class ProxyHeaderReader:
    """Reads one PROXY header, v1 or v2, from bytes fed in any pieces.

    Single use: once ``feed`` has returned a header, do not feed it again.
    """

    def __init__(self, max_v2_payload: int = V2_MAX_PAYLOAD) -> None:
        """Accept v2 headers whose address and TLV block is at most ``max_v2_payload``."""
        self.buffer = bytearray()
        self.max_v2_payload = max_v2_payload

    @property
    def max_length(self) -> int:
        """The largest header this reader accepts, in bytes (a sensible peek size)."""
        return V2_FIXED_LENGTH + self.max_v2_payload

    def feed(self, data: bytes) -> ProxyHeader | None:
        """Add ``data``; return the header once complete, None while more is needed.

        ``data == b""`` means end of stream (what ``recv`` returns): an incomplete header
        then raises. Raises ``ProxyHeaderError`` as soon as the bytes cannot be a header.
        """
        if not data:
            raise ProxyHeaderError(describe_eof(len(self.buffer)))
        self.buffer += data
        if self.buffer[:1] == V1_PREFIX[:1]:
            return self.feed_v1()
        return self.feed_v2()

    def feed_v1(self) -> ProxyHeader | None:
        """Parse the buffer as a v1 line once its CRLF is in; check every byte before."""
        check_prefix(self.buffer, V1_PREFIX)
        end = self.buffer.find(b"\r\n")
        if end < 0:  # a CR at the very end may be the start of the CRLF
            check_v1_line(self.buffer.removesuffix(b"\r"))
            return None
        check_v1_line(self.buffer[:end])
        line = bytes(self.buffer[len(V1_PREFIX) : end])
        return parse_v1(line, length=end + 2, rest=bytes(self.buffer[end + 2 :]))

    def feed_v2(self) -> ProxyHeader | None:
        """Parse the buffer as a v2 header once its fixed part and payload are in."""
        check_prefix(self.buffer, V2_SIGNATURE)
        check_v2_fixed(self.buffer[len(V2_SIGNATURE) : V2_FIXED_LENGTH])
        if len(self.buffer) < V2_FIXED_LENGTH:
            return None
        version_command, family_transport, payload = struct.unpack_from("!BBH", self.buffer, 12)
        if payload > self.max_v2_payload:
            raise ProxyHeaderError(
                f"PROXY v2 header announces {payload} bytes, more than {self.max_v2_payload}"
            )
        length = V2_FIXED_LENGTH + payload
        if len(self.buffer) < length:
            return None
        block = bytes(self.buffer[V2_FIXED_LENGTH:length])
        return parse_v2(version_command, family_transport, block, rest=bytes(self.buffer[length:]))


def recv_proxy_header(sock: socket.socket, reader: ProxyHeaderReader) -> ProxyHeader | None:
    """One non-blocking read step on a plain socket; never takes a byte past the header.

    Peeks at what has arrived, feeds it to ``reader`` and removes from the socket only
    the bytes that belong to the header: the returned header's ``rest`` is empty and the
    stream that follows is still in the socket. Returns None while more is needed (or on
    a spurious wake-up). Raises ``ProxyHeaderError`` for a bad header, end of stream, or
    a reset connection.
    """
    try:
        data = sock.recv(reader.max_length, socket.MSG_PEEK)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError as exc:
        raise ProxyHeaderError(f"connection failed in the PROXY header: {exc.strerror}") from exc
    header = reader.feed(data)
    # Bytes that did not complete a header are all part of it: take them out of the
    # socket, or the selector would report them again and again.
    taken = len(data) if header is None else len(data) - len(header.rest)
    sock.recv(taken)
    return header if header is None else replace(header, rest=b"")


def check_prefix(buffer: bytearray, prefix: bytes) -> None:
    """Raise unless the buffer starts with ``prefix`` as far as both go."""
    size = min(len(buffer), len(prefix))
    if buffer[:size] != prefix[:size]:
        raise ProxyHeaderError(f"no PROXY header: the connection starts with {describe(buffer)}")


def check_v1_line(line: bytearray) -> None:
    """Raise if v1 text (CRLF excluded, finished or not) is too long or holds a CR or LF."""
    if len(line) > V1_MAX_LENGTH - 2:
        raise ProxyHeaderError(f"PROXY v1 line without CRLF in its first {V1_MAX_LENGTH} bytes")
    if b"\r" in line or b"\n" in line:
        raise ProxyHeaderError("PROXY v1 line has a lone CR or LF; it must end with CRLF")


def parse_v1(line: bytes, length: int, rest: bytes) -> ProxyHeader:
    """Parse what follows "PROXY " in a v1 line, CRLF excluded."""
    protocol, _, addresses = line.partition(b" ")
    if protocol == b"UNKNOWN":  # the spec says: ignore whatever follows
        return ProxyHeader(1, "proxy", None, None, length, rest)
    if protocol not in (b"TCP4", b"TCP6"):
        raise ProxyHeaderError(f"PROXY v1 unknown protocol {shorten(protocol)}")
    fields = addresses.split(b" ")
    if len(fields) != 4:
        raise ProxyHeaderError(f"PROXY v1 {protocol.decode()} line needs 4 fields after it")
    version = 4 if protocol == b"TCP4" else 6
    source_ip, dest_ip = (parse_v1_ip(field, version) for field in fields[:2])
    source_port, dest_port = (parse_v1_port(field) for field in fields[2:])
    return ProxyHeader(1, "proxy", (source_ip, source_port), (dest_ip, dest_port), length, rest)


def parse_v1_ip(field: bytes, version: int) -> str:
    """Return the canonical text of a v1 address of the given IP version, or raise."""
    try:
        text = field.decode("ascii")
        address = ipaddress.ip_address(text)
    except ValueError:
        address = None
    if address is None or address.version != version or "%" in text:
        raise ProxyHeaderError(f"PROXY v1 bad IPv{version} address {shorten(field)}")
    return ip_text(address)


def parse_v1_port(field: bytes) -> int:
    """Return a v1 port: decimal, no sign, no leading zero, at most 65535; or raise."""
    if not PORT_PATTERN.fullmatch(field) or int(field) > 65535:
        raise ProxyHeaderError(f"PROXY v1 bad port {shorten(field)}")
    return int(field)


def check_v2_fixed(fixed: bytearray) -> None:
    """Raise unless the version is 2, the command known, the family and transport valid.

    ``fixed`` holds the bytes after the signature that have arrived (0 to 4); each is
    checked as soon as it is there.
    """
    if fixed[:1]:
        version, command = fixed[0] >> 4, fixed[0] & 0xF
        if version != 2:
            raise ProxyHeaderError(f"PROXY v2 signature with version {version}")
        if command not in (0x0, 0x1):
            raise ProxyHeaderError(f"PROXY v2 unknown command 0x{command:x}")
    if not fixed[1:2]:
        return
    family, transport = fixed[1] >> 4, fixed[1] & 0xF
    if family not in V2_FAMILIES:
        raise ProxyHeaderError(f"PROXY v2 unknown address family 0x{family:x}")
    if transport not in V2_TRANSPORTS:
        raise ProxyHeaderError(f"PROXY v2 unknown transport 0x{transport:x}")


def parse_v2(version_command: int, family_transport: int, block: bytes, rest: bytes) -> ProxyHeader:
    """Build the header from a complete v2 address and TLV block."""
    length = V2_FIXED_LENGTH + len(block)
    if version_command & 0xF == 0x0:  # LOCAL: the proxy's own connection; ignore the block
        return ProxyHeader(2, "local", None, None, length, rest)
    size = V2_ADDRESS_LENGTHS.get(family_transport >> 4)
    if size is None or family_transport & 0xF != 0x1:
        # AF_UNSPEC, AF_UNIX or UDP: valid, but no TCP address; the spec says fall back.
        return ProxyHeader(2, "proxy", None, None, length, rest)
    if len(block) < size:
        raise ProxyHeaderError(
            f"PROXY v2 {V2_FAMILIES[family_transport >> 4]} needs {size} address bytes,"
            f" header has {len(block)}"
        )
    check_tlvs(block[size:])
    source, dest = parse_v2_addresses(block[:size])
    return ProxyHeader(2, "proxy", source, dest, length, rest)


def parse_v2_addresses(block: bytes) -> tuple[Address, Address]:
    """Return (source, dest) from a 12-byte IPv4 or 36-byte IPv6 address block."""
    width = (len(block) - 4) // 2
    source_ip = ipaddress.ip_address(block[:width])
    dest_ip = ipaddress.ip_address(block[width : 2 * width])
    source_port, dest_port = struct.unpack_from("!HH", block, 2 * width)
    return (ip_text(source_ip), source_port), (ip_text(dest_ip), dest_port)


def ip_text(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """The canonical text of an address, an IPv4-mapped IPv6 one as plain IPv4.

    A dual-stack proxy sees its IPv4 clients as ::ffff:a.b.c.d; the log should not.
    """
    mapped = getattr(address, "ipv4_mapped", None)
    return str(mapped or address)


def check_tlvs(tlvs: bytes) -> None:
    """Raise unless ``tlvs`` is a whole number of type-length-value records (then skipped)."""
    offset = 0
    while offset < len(tlvs):
        if offset + 3 > len(tlvs):
            raise ProxyHeaderError("PROXY v2 truncated TLV")
        (size,) = struct.unpack_from("!H", tlvs, offset + 1)
        offset += 3 + size
        if offset > len(tlvs):
            raise ProxyHeaderError("PROXY v2 TLV runs past the end of the header")


def describe(data: bytes | bytearray) -> str:
    """Name what a stream that is not a PROXY header looks like, for the log."""
    head = bytes(data[:16])
    if head[:1] == b"\x16" and head[1:2] in (b"\x03", b""):
        kind = "a TLS handshake"
    elif head[:4] in HTTP_METHODS:
        kind = "an HTTP request"
    else:
        kind = "other bytes"
    return f"{kind} {head!r}"


def describe_eof(received: int) -> str:
    """The reason for an end of stream after ``received`` bytes of an unfinished header."""
    if not received:
        return "connection closed before a PROXY header"
    return f"connection closed inside the PROXY header, after {received} bytes"


def shorten(field: bytes) -> str:
    """A log-safe repr of a header field, cut to 48 bytes."""
    return repr(field[:48])
