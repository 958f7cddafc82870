"""One client connection as the server sees it: a non-blocking socket, a line reader,
the lines read but not yet handled, and a bounded output buffer.

Used by the parent (handshake and waiting queue) and, after the fork, by the room
worker, which inherits the object as it was: bytes that arrived with the name, lines
not yet handled and output not yet sent all survive the hand-over.
"""

from __future__ import annotations

import errno
import selectors
import socket
from collections import deque
from typing import Any

from .protocol import DEFAULT_MAX_LINE, LineReader, TooLong

RECV_SIZE = 65536
# A read or write that cannot go on now, on plain TCP; a TLS connection's
# ``would_block`` adds ssl's want-read and want-write (either may need the other
# direction), set by use_tls().
WOULD_BLOCK = (BlockingIOError, InterruptedError)
# One receive buffer per process, reused by every read: a fresh 64 KiB object per recv()
# would make each room worker copy-on-write that much of the parent's heap.
RECV_BUFFER = bytearray(RECV_SIZE)
LINGER = 2.0  # seconds to deliver a BYE and see the peer close before closing anyway
# TCP keepalive: a peer that vanished without FIN is noticed in about 2 minutes.
KEEPALIVE_IDLE = 60
KEEPALIVE_INTERVAL = 15
KEEPALIVE_COUNT = 4

# Connection states in the parent (a room worker does not use them).
HANDSHAKE = "handshake"
WAITING = "waiting"
CLOSING = "closing"
IN_ROOM = "in-room"
GONE = "gone"


def out_limit_for(max_line: int) -> int:
    """Unsent output allowed per connection before it is dropped as a slow consumer.

    Room for a few dozen of the largest lines: a reader that keeps up never gets near it.
    """
    return max(65536, 16 * (max_line + 64))


def tune_socket(sock: socket.socket) -> None:
    """Make a client socket non-blocking, NODELAY (small lines back to back) and keepalive."""
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT)


def format_peer(addr: tuple) -> str:
    """``IP:port`` for IPv4, ``[IP]:port`` for IPv6."""
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class NeverRaised(Exception):
    """Stands for an ssl exception in a plain connection's except clauses."""


class Conn:
    """A client connection. ``fd`` stays valid as a key after ``close()``."""

    __slots__ = (
        "avoid",
        "deadline",
        "eof",
        "events",
        "fd",
        "id",
        "inbox",
        "name",
        "out",
        "out_limit",
        "peer",
        "reader",
        "sock",
        "state",
        "tls",
        "tls_eof",
        "tls_error",
        "would_block",
        "wr_shut",
    )

    def __init__(
        self, sock: socket.socket, peer: str, max_line: int = DEFAULT_MAX_LINE, id: int = 0
    ) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.id = id  # unique for the server's lifetime: survives hand-backs
        self.avoid: int | None = None  # the id of the partner it last left
        self.peer = peer
        self.name: str | None = None
        self.reader = LineReader(max_line)
        self.inbox: deque[bytes | TooLong] = deque()
        self.out = bytearray()
        self.out_limit = out_limit_for(max_line)
        self.state = HANDSHAKE
        self.deadline = 0.0
        self.wr_shut = False
        self.eof = False  # the peer closed its side (FIN): it sends no more
        self.events = 0  # what the owner's selector watches for on this socket now
        self.tls = False  # use_tls() makes it True, and the three below ssl's
        self.would_block: tuple[type[BaseException], ...] = WOULD_BLOCK
        self.tls_eof: type[BaseException] = NeverRaised
        self.tls_error: type[BaseException] = NeverRaised

    def use_tls(self, sslsock: Any) -> None:
        """Speak TLS from now on, over ``sslsock`` (an ``ssl.SSLSocket`` around our
        socket; the handshake is the preamble's)."""
        from .tlsconf import TLS_EOF, TLS_ERROR, TLS_WOULD_BLOCK  # the server has ssl

        self.sock = sslsock
        self.tls = True
        self.would_block, self.tls_eof, self.tls_error = TLS_WOULD_BLOCK, TLS_EOF, TLS_ERROR

    def __repr__(self) -> str:
        return f"<Conn {self.label} {self.state}>"

    @property
    def label(self) -> str:
        """``name ip:port`` once named, else ``ip:port``: how the log names this client."""
        return f"{self.name} {self.peer}" if self.name else self.peer

    def receive(self) -> bool:
        """Read what is available into ``inbox``. False when the peer closed or reset:
        ``eof`` then tells a FIN (it may still read what we send) from a reset.

        Never blocks; a read that would block counts as still open.
        """
        while True:
            try:
                size = self.sock.recv_into(RECV_BUFFER)
            except self.would_block:
                return True
            except self.tls_eof:
                size = 0  # TCP closed without TLS close_notify: still an end of input
            except OSError:
                return False  # reset, keepalive timeout: the peer is gone
            if not size:
                self.eof = True
                return False
            self.inbox.extend(self.reader.feed(RECV_BUFFER[:size]))
            # Bytes TLS has decrypted already are invisible to the selector: take them now.
            if not self.tls_pending():
                return True

    def tls_pending(self) -> int:
        """Decrypted bytes waiting inside the TLS session (0 for plain TCP)."""
        return self.sock.pending() if self.tls else 0

    def queue(self, data: bytes) -> bool:
        """Append output. False when the unsent output is over the bound (slow consumer)."""
        self.out += data
        return len(self.out) <= self.out_limit

    def flush(self) -> bool:
        """Send what the socket takes now. True when all output is sent.

        Raises OSError when the peer is gone (reset, broken pipe).
        """
        while self.out:
            try:
                sent = self.sock.send(self.out)
            except self.would_block:
                return False
            del self.out[:sent]
        return True

    def shut_write(self) -> None:
        """Send FIN after the last line (over TLS, close_notify first), so the peer reads
        everything before the close."""
        if not self.wr_shut:
            self.wr_shut = True
            if self.tls:
                try:
                    self.sock.unwrap()  # sends close_notify; the peer's may come later
                except (OSError, ValueError):
                    pass
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def peer_closed(self) -> bool:
        """True if the peer has already closed or reset (a peek at the TCP stream, below
        any TLS; nothing is consumed)."""
        try:
            return not socket.socket.recv(self.sock, 1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True

    def closing_events(self) -> int:
        """What a closing connection waits for: to write what is left, and the peer's FIN."""
        return (0 if self.eof else selectors.EVENT_READ) | (
            selectors.EVENT_WRITE if self.out else 0
        )

    def close_step(self, mask: int) -> bool:
        """One step of a graceful close (after the BYE is queued): send what is left,
        then FIN, reading and discarding input until the peer closes too. True when
        there is nothing more to wait for: all sent and the peer closed, or an error."""
        try:
            if self.flush():
                self.shut_write()
        except OSError:
            return True
        if mask & selectors.EVENT_READ and not self.eof:
            try:
                self.eof = not self.sock.recv(RECV_SIZE)
            except self.would_block:
                pass
            except self.tls_error:
                self.eof = True  # TLS trouble after our BYE: nothing more to read
            except OSError:
                return True
        return self.eof and not self.out

    def close(self) -> None:
        """Close the socket; safe to call twice."""
        self.sock.close()


def is_fd_exhaustion(exc: OSError) -> bool:
    """True for accept() failures that mean "out of file descriptors or memory"."""
    return exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
