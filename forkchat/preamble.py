"""What a new connection goes through before ``HELLO``: the PROXY header, then TLS.

With ``--proxy-protocol`` every connection must begin with a PROXY header (version 1
or 2, ``proxyproto.py``), read before anything else, TLS included: the address it
carries becomes the client's address everywhere. A ``LOCAL`` header is the proxy's own
health check: it is closed quietly, never counted as a client. With ``--tls-cert`` the
server then does the TLS handshake (``tlsconf.py``). Both steps are non-blocking: the
parent calls :meth:`Preamble.step` each time the socket is ready, within the name
timeout, and never waits on one client.
"""

from __future__ import annotations

import selectors
import socket
import ssl

from .conn import Conn, format_peer
from .proxyproto import ProxyHeaderError, ProxyHeaderReader, recv_proxy_header
from .tlsconf import TlsError, handshake_step

TLS_HANDSHAKE = 0x16  # the content type of a TLS handshake record
PEEK_SIZE = 8
HTTP_METHODS = (b"GET ", b"POST ", b"HEAD ", b"PUT ", b"DELETE ", b"OPTIONS", b"CONNECT", b"PATCH ")


class PreambleError(Exception):
    """The connection failed its preamble (a bad PROXY header, a failed handshake):
    ``str()`` is the one line for the log; the connection is closed."""


class HealthCheck(Exception):
    """The connection is the proxy's own health check (PROXY v2 LOCAL): close it quietly."""


class Preamble:
    """A connection's steps before HELLO, as the server's options require them."""

    __slots__ = ("conn", "reader", "tls")

    def __init__(self, conn: Conn, proxy: bool, tls: ssl.SSLContext | None) -> None:
        self.conn = conn
        self.reader = ProxyHeaderReader() if proxy else None
        self.tls = tls

    def step(self) -> int:
        """Advance as far as the socket allows now. Returns the selector events to wait
        for, or 0 once done (the connection is then ready for HELLO, its ``peer`` the
        client's own address). Raises PreambleError or HealthCheck."""
        if self.reader is not None:
            try:
                header = recv_proxy_header(self.conn.sock, self.reader)
            except ProxyHeaderError as exc:
                raise PreambleError(f"PROXY header refused: {exc}") from None
            if header is None:
                return selectors.EVENT_READ
            self.reader = None
            if header.command == "local":
                raise HealthCheck()
            if header.source is not None:
                self.conn.peer = format_peer(header.source)
        if self.tls is not None:
            return self.step_tls()
        return 0

    def step_tls(self) -> int:
        """The TLS handshake, one non-blocking step at a time. A connection whose first
        byte cannot start a TLS handshake (a plain-text client) fails at once."""
        if not self.conn.tls:
            start = peek_start(self.conn.sock)
            if start is None:
                return selectors.EVENT_READ
            if start[0] != TLS_HANDSHAKE:
                raise PreambleError(f"TLS handshake failed: {describe_plain(start)}")
            self.conn.use_tls(
                self.tls.wrap_socket(
                    self.conn.sock, server_side=True, do_handshake_on_connect=False
                )
            )
        try:
            state = handshake_step(self.conn.sock)
        except TlsError as exc:
            raise PreambleError(str(exc)) from None
        if state == "want-read":
            return selectors.EVENT_READ
        if state == "want-write":
            return selectors.EVENT_WRITE
        return 0


def peek_start(sock: socket.socket) -> bytes | None:
    """The first bytes waiting on ``sock`` (not consumed), or None if none has come yet.
    Raises PreambleError if the connection was closed or reset first."""
    try:
        data = sock.recv(PEEK_SIZE, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError as exc:
        raise PreambleError(f"TLS handshake: the client went away ({exc.strerror})") from None
    if not data:
        raise PreambleError("TLS handshake: the client closed the connection")
    return data


def describe_plain(start: bytes) -> str:
    """Why a connection that does not start with a TLS record is refused, for the log."""
    if start.startswith(HTTP_METHODS):
        return "not TLS: a plain HTTP request"
    if 0x20 <= start[0] < 0x7F:
        return "not TLS: a plain-text client"
    return f"not TLS: the connection starts with byte 0x{start[0]:02x}"
