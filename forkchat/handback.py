"""Handing a client back from its room worker to the parent (protocol 1.1, ``next``).

Each room has its own channel: a Unix stream socketpair made at the fork, one end in
the parent, the other in the worker. A hand-back is one message on it: the client's
socket, passed as a file descriptor (``SCM_RIGHTS``), with everything the parent needs
to go on where the room stopped: the name, the address, the lines read but not yet
handled, the unfinished line, the output not yet sent, and why it came back.

Wire format: a 4-byte big-endian length, then a pickled :class:`HandBack`; the
descriptor travels with the message's first bytes. Both ends are the same program, so
pickle is safe here (nothing from the network is unpickled: a client's bytes are only
ever values inside the record).

The worker sends blocking (it is about to exit anyway); the parent reads without ever
blocking, through :class:`ChannelReader`, which pairs each complete message with the
descriptor that came with it. A worker killed in the middle of a message leaves a
partial one: :meth:`ChannelReader.leftover_fds` gives back its descriptor to close.
"""

from __future__ import annotations

import pickle
import socket
import struct
from collections import deque
from collections.abc import Sequence
from typing import NamedTuple

from .conn import Conn
from .protocol import TOO_LONG, TooLong

HEADER = struct.Struct(">I")
MAX_FDS_PER_READ = 64
READ_SIZE = 1 << 16


class HandBack(NamedTuple):
    """One client as its room leaves it. ``inbox`` holds lines as bytes, with ``None``
    standing for a line that was too long (pickle keeps no singletons)."""

    id: int
    name: str
    peer: str
    avoid: int  # the id of the partner it just left
    why: str  # for the log: "said next", "partner bob left", ...
    text: str  # the WAIT text it is to get
    inbox: Sequence[bytes | None] = ()
    pending: bytes = b""
    discarding: bool = False
    out: bytes = b""
    eof: bool = False


def pack_inbox(inbox: list[bytes | TooLong]) -> list[bytes | None]:
    """Lines for the record: TOO_LONG becomes None."""
    return [None if isinstance(line, TooLong) else bytes(line) for line in inbox]


def unpack_inbox(lines: list[bytes | None]) -> list[bytes | TooLong]:
    """Lines from the record: None becomes TOO_LONG again."""
    return [TOO_LONG if line is None else line for line in lines]


def snapshot(conn: Conn, avoid: int = 0, why: str = "", text: str = "") -> HandBack:
    """A record of ``conn`` as it is now, to rebuild it in another process: its name,
    address, lines not yet handled, unfinished line, unsent output, end of input."""
    return HandBack(
        id=conn.id,
        name=conn.name or "?",
        peer=conn.peer,
        avoid=avoid,
        why=why,
        text=text,
        inbox=pack_inbox(list(conn.inbox)),
        pending=bytes(conn.reader.pending),
        discarding=conn.reader.discarding,
        out=bytes(conn.out),
        eof=conn.eof,
    )


def restore_conn(conn: Conn, record: HandBack) -> None:
    """Give a rebuilt client what the record says it had: name, last partner, lines
    not yet handled, the unfinished line, output not yet sent, end of input."""
    conn.name = record.name
    conn.avoid = record.avoid
    conn.inbox.extend(unpack_inbox(record.inbox))
    conn.reader.pending[:] = record.pending
    conn.reader.discarding = record.discarding
    conn.out += record.out
    conn.eof = record.eof


def encode(record: object) -> bytes:
    """The message for ``record``: length, then the pickled record."""
    body = pickle.dumps(record, protocol=pickle.HIGHEST_PROTOCOL)
    return HEADER.pack(len(body)) + body


def send_message(sock: socket.socket, message: object, fds: list[int]) -> None:
    """Send one message (length, pickle) with ``fds`` on its first bytes (blocking).
    The hand-backs' framing; the room forker's orders and answers use it too."""
    data = encode(message)
    sent = socket.send_fds(sock, [data], fds) if fds else sock.send(data)
    if sent < len(data):
        sock.sendall(data[sent:])


def send_handback(channel: socket.socket, record: HandBack, fd: int) -> None:
    """Send ``record`` with the client's socket ``fd`` (blocking). Raises OSError if the
    parent is gone; the descriptor then stays with the caller, to close."""
    send_message(channel, record, [fd])


class ChannelReader:
    """The parent's side of one room's channel: bytes and descriptors in, complete
    hand-backs out, never blocking."""

    def __init__(self, channel: socket.socket) -> None:
        channel.setblocking(False)
        self.channel = channel
        self.buf = bytearray()
        self.fds: deque[int] = deque()  # received, not yet matched to a complete record

    def read(self) -> tuple[list[tuple[HandBack, int]], bool]:
        """Read what is there now. Returns the complete hand-backs (each with its
        descriptor, which is now the caller's) and True once the worker's end is closed."""
        closed = False
        while True:
            try:
                data, fds, _flags, _ = socket.recv_fds(self.channel, READ_SIZE, MAX_FDS_PER_READ)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                closed = True
                break
            self.fds.extend(fds)
            if not data:
                closed = True
                break
            self.buf += data
        return self.take_records(), closed

    def take_records(self) -> list[tuple[HandBack, int]]:
        """Split complete messages off the buffer, each with the next descriptor."""
        records = []
        while len(self.buf) >= HEADER.size:
            (size,) = HEADER.unpack_from(self.buf)
            if len(self.buf) < HEADER.size + size or not self.fds:
                break
            body = bytes(self.buf[HEADER.size : HEADER.size + size])
            del self.buf[: HEADER.size + size]
            records.append((pickle.loads(body), self.fds.popleft()))
        return records

    def leftover_fds(self) -> list[int]:
        """Descriptors that came without a complete message (a worker killed while it
        sent): the caller closes them. Clears the reader."""
        fds = list(self.fds)
        self.fds.clear()
        self.buf.clear()
        return fds
