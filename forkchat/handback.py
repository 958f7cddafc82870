"""A room's channel to the parent: clients handed back (``next``, ``--requeue``), the
parent's verdict on each, and the parent's shutdown note.

Each room has its own channel: a Unix stream socketpair made at the fork, one end in the
parent, the other in the worker. A hand-back is one message: a 4-byte big-endian length,
then a JSON :class:`HandBack` (the client's name, address, lines read but not handled,
unfinished line, unsent output, and why it came back), sent in one ``sendmsg`` with the
client's socket attached (``SCM_RIGHTS``). JSON rather than pickle: the two ends may be
different versions of forkchat (a room opened before an upgrade in place), and a record
is only data.

The kernel attaches a message's descriptor to its first bytes and ends a read right
after them, so each read that carries a descriptor (or says one was lost, ``MSG_CTRUNC``:
the parent out of fds) starts exactly one message: :class:`ChannelReader` pairs each
message with its own descriptor, or with none. A message whose descriptor is lost is
refused, never matched with another's.

The parent answers every message with one verdict byte, ``TAKEN`` or ``REFUSED``. The
room keeps its copy of the client's socket until then; a refused client is the room's
again, and is told ``BYE error``. At shutdown the parent writes a note (:func:`note_line`)
before it signals the room, so the room can log what the operator did.
"""

from __future__ import annotations

import json
import socket
import struct
import time
from collections import deque
from collections.abc import Sequence
from typing import Any, NamedTuple

from .conn import Conn
from .protocol import TOO_LONG, TooLong

HEADER = struct.Struct(">I")
READ_SIZE = 1 << 16
MAX_FDS_PER_READ = 4
TAKEN = b"+"
REFUSED = b"-"
NOTE = b"!"  # "!SIGINT\n": the server is shutting down, because of SIGINT
NOT_VERDICTS = bytes(b for b in range(256) if b not in TAKEN + REFUSED)
VERDICT_TIMEOUT = 5.0  # seconds a room waits for the parent's verdicts


class HandBack(NamedTuple):
    """One client as its room leaves it. ``inbox`` holds lines as bytes, with ``None``
    standing for a line that was too long."""

    id: int
    name: str | None  # None: not named yet (a handshaking client, at an upgrade)
    peer: str
    avoid: int  # the id of the partner it just left
    why: str  # for the log: "said next", "partner bob left", ...
    text: str  # the WAIT text it is to get
    inbox: Sequence[bytes | None] = ()
    pending: bytes = b""
    discarding: bool = False
    out: bytes = b""
    eof: bool = False


def snapshot(conn: Conn, avoid: int = 0, why: str = "", text: str = "") -> HandBack:
    """A record of ``conn`` as it is now, to rebuild it in another process: its name,
    address, lines not yet handled, unfinished line, unsent output, end of input."""
    return HandBack(
        id=conn.id,
        name=conn.name,
        peer=conn.peer,
        avoid=avoid,
        why=why,
        text=text,
        inbox=tuple(None if isinstance(line, TooLong) else bytes(line) for line in conn.inbox),
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
    conn.inbox.extend(TOO_LONG if line is None else line for line in record.inbox)
    conn.reader.pending[:] = record.pending
    conn.reader.discarding = record.discarding
    conn.out += record.out
    conn.eof = record.eof


def to_json(record: HandBack) -> dict[str, Any]:
    """The record as JSON-ready data: bytes as latin-1 strings (lossless)."""
    data = record._asdict()
    data["inbox"] = [None if line is None else line.decode("latin-1") for line in record.inbox]
    for key in ("pending", "out"):
        data[key] = data[key].decode("latin-1")
    return data


def from_json(data: dict[str, Any]) -> HandBack:
    """A record from :func:`to_json`'s data; fields it does not know are ignored, missing
    ones take their defaults. Raises ValueError (or KeyError, TypeError) on bad data."""
    fields = {key: data[key] for key in HandBack._fields if key in data}
    fields["inbox"] = tuple(None if x is None else x.encode("latin-1") for x in data["inbox"])
    for key in ("pending", "out"):
        fields[key] = data.get(key, "").encode("latin-1")
    return HandBack(**fields)


def encode(record: HandBack) -> bytes:
    """The message for ``record``: length, then its JSON."""
    body = json.dumps(to_json(record), separators=(",", ":")).encode("ascii")
    return HEADER.pack(len(body)) + body


def send_handback(channel: socket.socket, record: HandBack, fd: int) -> None:
    """Send ``record`` with the client's socket ``fd`` attached (blocking). Raises
    OSError if the parent is gone."""
    data = encode(record)
    sent = socket.send_fds(channel, [data], [fd])
    if sent < len(data):
        channel.sendall(data[sent:])


def note_line(why: str) -> bytes:
    """The parent's shutdown note: the server is stopping because of ``why`` (its text
    never holds a verdict byte)."""
    text = why.encode("ascii", "replace").translate(None, TAKEN + REFUSED + b"\n")
    return NOTE + text + b"\n"


class RoomEnd:
    """The room's side of its channel: what the parent says (verdicts, the note)."""

    def __init__(self, channel: socket.socket) -> None:
        self.channel = channel
        self.buf = bytearray()
        self.closed = False

    def read(self) -> None:
        """Take what the parent sent, never blocking; ``closed`` once it is gone."""
        while not self.closed:
            try:
                data = self.channel.recv(READ_SIZE, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                self.closed = True
            self.buf += data

    def note(self) -> str | None:
        """The parent's shutdown note (why it is stopping), if one came."""
        start = self.buf.find(NOTE)
        end = self.buf.find(b"\n", start)
        if start < 0 or end < 0:
            return None
        return self.buf[start + 1 : end].decode("ascii", "replace")

    def await_verdicts(self, count: int, timeout: float = VERDICT_TIMEOUT) -> list[bool]:
        """Wait (bounded) for the parent's verdicts on the last ``count`` hand-backs, in
        order: True for taken. A parent that is gone, or silent past ``timeout``, has
        taken none of those not yet answered."""
        deadline = time.monotonic() + timeout
        while len(self.verdicts()) < count and not self.closed:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self.channel.settimeout(left)
            try:
                data = self.channel.recv(READ_SIZE)
            except TimeoutError:
                break
            except OSError:
                data = b""
            finally:
                self.channel.settimeout(None)
            if not data:
                self.closed = True
            self.buf += data
        got = self.verdicts()
        return [v == TAKEN[0] for v in got[:count]] + [False] * (count - len(got))

    def verdicts(self) -> bytes:
        """The verdict bytes received so far, in order (a note holds none)."""
        return bytes(self.buf).translate(None, NOT_VERDICTS)


class ChannelReader:
    """The parent's side of one room's channel: bytes and descriptors in, complete
    hand-backs out, each with its own descriptor (or None if it was lost), never
    blocking."""

    def __init__(self, channel: socket.socket) -> None:
        channel.setblocking(False)
        self.channel = channel
        self.buf = bytearray()
        self.fds: deque[int | None] = deque()  # one per message started, in order

    def read(self) -> tuple[list[tuple[HandBack | None, int | None]], bool]:
        """Read what is there now. Returns the complete messages, each with its
        descriptor (now the caller's; None if it was lost) and its record (None if it
        could not be read), and True once the worker's end is closed."""
        closed = False
        while True:
            try:
                data, fds, flags, _ = socket.recv_fds(self.channel, READ_SIZE, MAX_FDS_PER_READ)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                closed = True
                break
            if fds or flags & socket.MSG_CTRUNC:
                self.fds.append(fds[0] if fds else None)  # this read starts one message
                for extra in fds[1:]:
                    socket.close(extra)
            if not data:
                closed = True
                break
            self.buf += data
        return self.take_records(), closed

    def take_records(self) -> list[tuple[HandBack | None, int | None]]:
        """Split complete messages off the buffer, each with its own descriptor."""
        records: list[tuple[HandBack | None, int | None]] = []
        while len(self.buf) >= HEADER.size and self.fds:
            (size,) = HEADER.unpack_from(self.buf)
            if len(self.buf) < HEADER.size + size:
                break
            body = bytes(self.buf[HEADER.size : HEADER.size + size])
            del self.buf[: HEADER.size + size]
            records.append((decode(body), self.fds.popleft()))
        return records

    def answer(self, taken: bool) -> None:
        """Tell the room the verdict on its oldest unanswered hand-back (never blocks:
        a room that is gone, or not reading, learns nothing more)."""
        try:
            self.channel.send(TAKEN if taken else REFUSED)
        except OSError:
            pass

    def leftover_fds(self) -> list[int]:
        """Descriptors that came without a complete message (a worker killed while it
        sent): the caller closes them. Clears the reader."""
        fds = [fd for fd in self.fds if fd is not None]
        self.fds.clear()
        self.buf.clear()
        return fds


def decode(body: bytes) -> HandBack | None:
    """A message's record, or None if it cannot be read."""
    try:
        return from_json(json.loads(body))
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
