"""The client's connection to the server, on the asyncio event loop: connect, the TLS
handshake, then bytes in and out of one non-blocking socket.

The socket stays a plain ``socket.socket`` or an ``ssl.SSLSocket`` driven through the
loop's readiness callbacks (``add_reader``/``add_writer``), rather than an asyncio
transport: OpenSSL then writes its alert to the server when the handshake fails (a
certificate the client does not trust), so the server can log why.
"""

from __future__ import annotations

import asyncio
import socket
import ssl

from forkchat.chatview import handshake_error_text, verify_error_text

CONNECT_TIMEOUT = 10.0  # seconds to connect, and again to shake hands over TLS
READ_SIZE = 65536
WOULD_BLOCK = (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


class TlsFailed(Exception):
    """The TLS handshake failed: the message is the one line to print."""


class Link:
    """One connected non-blocking socket (plain or TLS): ``recv`` waits for bytes,
    ``send`` queues them and the loop writes them as the socket takes them."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.loop = asyncio.get_running_loop()
        self.outbuf = bytearray()
        self.writing = False
        self.closed = False

    @property
    def tls_version(self) -> str | None:
        """The negotiated TLS version (``TLSv1.3``), None for plain TCP."""
        return self.sock.version() if isinstance(self.sock, ssl.SSLSocket) else None

    def peer(self) -> tuple[str, int] | None:
        """The server's (host, port), None once the connection is gone."""
        try:
            return self.sock.getpeername()[:2]
        except OSError:
            return None

    async def wait_ready(self, write: bool) -> None:
        """Wait until the socket is readable (or writable)."""
        ready = self.loop.create_future()
        watch, unwatch = (
            (self.loop.add_writer, self.loop.remove_writer)
            if write
            else (self.loop.add_reader, self.loop.remove_reader)
        )
        watch(self.fd, lambda: ready.done() or ready.set_result(None))
        try:
            await ready
        finally:
            unwatch(self.fd)
            if write and self.writing:  # the fd's one writer callback was ours a moment
                self.loop.add_writer(self.fd, self.flush)

    async def recv(self) -> bytes:
        """The next bytes from the server; b"" once it closed (or failed). Over TLS,
        bytes OpenSSL already decrypted are returned without waiting."""
        while not self.closed:
            try:
                data = self.sock.recv(READ_SIZE)
            except ssl.SSLWantWriteError:
                await self.wait_ready(write=True)
                continue
            except WOULD_BLOCK:
                await self.wait_ready(write=False)
                continue
            except OSError:
                return b""
            self.flush()  # a TLS write that wanted to read first may go now
            return data
        return b""

    def send(self, data: bytes) -> None:
        """Queue bytes for the server and write what the socket takes now."""
        if not self.closed:
            self.outbuf += data
            self.flush()

    def flush(self) -> None:
        """Write queued bytes; watch for writability while some are left."""
        if self.outbuf and not self.closed:
            try:
                del self.outbuf[: self.sock.send(self.outbuf)]
            except WOULD_BLOCK:
                pass
            except OSError:
                self.outbuf.clear()  # the reader sees the close and ends the session
        want = bool(self.outbuf) and not self.closed
        if want != self.writing:
            if want:
                self.loop.add_writer(self.fd, self.flush)
            else:
                self.loop.remove_writer(self.fd)
            self.writing = want

    def close(self) -> None:
        """Close the socket (what is still queued is dropped)."""
        if not self.closed:
            if self.writing:
                self.loop.remove_writer(self.fd)
            self.closed = True
            self.sock.close()

    async def shake_hands(self) -> None:
        """Drive the TLS handshake to its end, waiting for whatever it asks for."""
        while True:
            try:
                self.sock.do_handshake()
                return
            except ssl.SSLWantReadError:
                await self.wait_ready(write=False)
            except ssl.SSLWantWriteError:
                await self.wait_ready(write=True)


async def connect_socket(host: str, port: int) -> socket.socket:
    """A connected non-blocking socket with TCP_NODELAY: every address ``host``
    resolves to, in turn. Raises OSError (the last address's error)."""
    error: OSError = OSError(f"{host} resolves to no address")
    loop = asyncio.get_running_loop()
    for family, kind, proto, _, address in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        sock = socket.socket(family, kind, proto)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, address)
        except BaseException as exc:
            sock.close()
            if not isinstance(exc, OSError):
                raise
            error = exc
            continue
        # The protocol sends small lines back to back: never let Nagle hold one.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    raise error


async def open_link(
    host: str, port: int, context: ssl.SSLContext | None, cafile: str | None = None
) -> Link:
    """Connect (then shake hands when there is a TLS ``context``), each step bounded by
    CONNECT_TIMEOUT. Raises OSError, or :class:`TlsFailed` for the handshake."""
    sock = await asyncio.wait_for(connect_socket(host, port), CONNECT_TIMEOUT)
    if context is None:
        return Link(sock)
    link = Link(context.wrap_socket(sock, server_hostname=host, do_handshake_on_connect=False))
    try:
        await asyncio.wait_for(link.shake_hands(), CONNECT_TIMEOUT)
    except ssl.SSLCertVerificationError as exc:
        link.close()
        reason = exc.verify_message or str(exc)
        raise TlsFailed(verify_error_text(host, port, reason, cafile)) from None
    except OSError as exc:  # TimeoutError included
        link.close()
        reason = getattr(exc, "reason", None) or exc.strerror or str(exc) or "timed out"
        raise TlsFailed(handshake_error_text(host, port, reason)) from None
    except BaseException:
        link.close()
        raise
    return link
