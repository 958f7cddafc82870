"""The forkchat wire protocol, version 1.1: framing, validation and the server's lines.

Everything here is pure (no sockets, no clocks) so it can be unit-tested on its own.
The server, the room worker, the client and the benchmark all speak through it.

Lines are UTF-8 text ending in LF; a CR right before the LF is dropped. A line holds at
most ``max_line`` bytes, LF (and that CR) excluded. See ``docs/protocol.md``.
"""

from __future__ import annotations

import re
from typing import NamedTuple

PROTOCOL_VERSION = "1.1"
DEFAULT_MAX_LINE = 4096
NAME_MAX = 32
NAME_RULE = "1 to 32 characters, each a letter, a digit, _, - or ."
_NAME_RE = re.compile(rb"[A-Za-z0-9_.-]{1,%d}" % NAME_MAX)
# C0 controls other than TAB, and DEL: refused in messages (ERR bad-char).
_BAD_CHAR_RE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")

# Server-to-client keywords.
HELLO = "HELLO"
WAIT = "WAIT"
PAIRED = "PAIRED"
TURN = "TURN"
MSG = "MSG"
ERR = "ERR"
BYE = "BYE"

# ERR codes: the line was refused and dropped; the connection stays.
ERR_NOT_YOUR_TURN = "not-your-turn"
ERR_TOO_LONG = "too-long"
ERR_BAD_ENCODING = "bad-encoding"
ERR_BAD_CHAR = "bad-char"

# What the server does with a chat line (see judge_line); any other verdict is an ERR code.
LEAVE = "leave"
NEXT = "next"  # protocol 1.1: leave this partner, wait for another
IGNORE = "ignore"
RELAY = "relay"

# BYE reasons: the last line before the server closes the connection.
BYE_EXIT = "exit"
BYE_PARTNER_EXIT = "partner-exit"
BYE_PARTNER_LOST = "partner-lost"
BYE_SHUTDOWN = "shutdown"
BYE_TIMEOUT = "timeout"
BYE_FULL = "full"
BYE_BAD_NAME = "bad-name"
BYE_ERROR = "error"
BYE_CLOSED = "closed"  # the operator stopped this room alone (SIGTERM to its worker)
BYE_REASONS = frozenset(
    {
        BYE_CLOSED,
        BYE_EXIT,
        BYE_PARTNER_EXIT,
        BYE_PARTNER_LOST,
        BYE_SHUTDOWN,
        BYE_TIMEOUT,
        BYE_FULL,
        BYE_BAD_NAME,
        BYE_ERROR,
    }
)

SHUTDOWN_TEXT = "SERVER WILL CLOSE NOW"
CLOSED_TEXT = "the server's operator closed this room"
HELLO_TEXT = f"forkchat/{PROTOCOL_VERSION} send your name: {NAME_RULE}"

_ERR_TEXT = {
    ERR_NOT_YOUR_TURN: "wait for TURN WRITE before you write",
    ERR_TOO_LONG: "line longer than {max_line} bytes, dropped",
    ERR_BAD_ENCODING: "line is not valid UTF-8, dropped",
    ERR_BAD_CHAR: "line holds a control character, dropped",
}


class TooLong:
    """Marker yielded by :class:`LineReader` in place of a line over the limit."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "TOO_LONG"


TOO_LONG = TooLong()


class LineReader:
    """Split a byte stream into lines without ever buffering more than one line.

    ``feed(data)`` returns the complete lines found so far, each as ``bytes`` without
    its LF (and without a CR right before it), or :data:`TOO_LONG` for a line over
    ``max_line`` bytes. A too-long line is reported once, as soon as it passes the limit,
    and the rest of it is discarded up to its LF: memory stays bounded by ``max_line``
    whatever the peer sends. ``pending`` holds the bytes of the unfinished line.
    """

    __slots__ = ("discarding", "max_line", "pending")

    def __init__(self, max_line: int = DEFAULT_MAX_LINE) -> None:
        self.max_line = max_line
        self.pending = bytearray()
        self.discarding = False

    def feed(self, data: bytes | bytearray) -> list[bytes | TooLong]:
        """Take the next chunk of the stream; return the lines it completes, in order."""
        lines: list[bytes | TooLong] = []
        start = 0
        while True:
            lf = data.find(b"\n", start)
            if lf < 0:
                self._keep_tail(data[start:], lines)
                return lines
            if self.discarding:
                self.discarding = False
            else:
                if self.pending:
                    self.pending += data[start:lf]
                    line = bytes(self.pending)
                    self.pending.clear()
                else:
                    line = bytes(data[start:lf])
                if line.endswith(b"\r"):
                    line = line[:-1]
                lines.append(line if len(line) <= self.max_line else TOO_LONG)
            start = lf + 1

    def _keep_tail(self, tail: bytes, lines: list[bytes | TooLong]) -> None:
        """Buffer an unfinished line; switch to discarding once it cannot fit."""
        if self.discarding or not tail:
            return
        self.pending += tail
        # max_line + 1: the last byte may still be a CR that the LF will drop.
        if len(self.pending) > self.max_line + 1:
            self.pending.clear()
            self.discarding = True
            lines.append(TOO_LONG)


def is_blank(line: bytes) -> bool:
    """True for an empty or all-blank line (spaces and tabs): ignored by the server."""
    return not line.strip(b" \t")


def is_exit(line: bytes) -> bool:
    """True for a line that is just ``exit``, surrounding spaces ignored."""
    return line.strip(b" \t") == b"exit"


def is_next(line: bytes) -> bool:
    """True for a line that is just ``next``, surrounding spaces ignored (protocol 1.1)."""
    return line.strip(b" \t") == b"next"


def check_message(line: bytes) -> str | None:
    """Return the ERR code that refuses this chat line, or None if it may be relayed."""
    try:
        line.decode("utf-8")
    except UnicodeDecodeError:
        return ERR_BAD_ENCODING
    if _BAD_CHAR_RE.search(line):
        return ERR_BAD_CHAR
    return None


# One whole line of printable ASCII (and TAB) that is not blank, LF included: a message
# judge_line relays as it is (the room's steady loop; exit and next are checked apart).
PLAIN_LINE = re.compile(rb"[\t ]*[\x21-\x7e][\t\x20-\x7e]*\n")


def judge_line(line: bytes | TooLong, my_turn: bool) -> str:
    """The protocol's rules for a chat line, in order: LEAVE for ``exit`` and NEXT for
    ``next`` (at any time), IGNORE for a blank line, RELAY for a valid message on the
    sender's turn, else the ERR code that refuses it (too-long, bad-encoding, bad-char,
    not-your-turn)."""
    if isinstance(line, TooLong):
        return ERR_TOO_LONG
    if is_exit(line):
        return LEAVE
    if is_next(line):
        return NEXT
    if is_blank(line):
        return IGNORE
    return check_message(line) or (RELAY if my_turn else ERR_NOT_YOUR_TURN)


def parse_name(line: bytes) -> str | None:
    """Return the user name carried by a first line, or None if it breaks the rule.

    Surrounding spaces and tabs are ignored (a person typing into ``nc`` adds them).
    """
    name = line.strip(b" \t")
    if _NAME_RE.fullmatch(name):
        return name.decode("ascii")
    return None


def make_line(keyword: str, *args: str) -> bytes:
    """Encode one server line: the keyword, then its arguments separated by spaces."""
    return " ".join((keyword, *args)).encode("utf-8") + b"\n"


def hello_line() -> bytes:
    """The greeting sent on connect, asking for the name."""
    return make_line(HELLO, HELLO_TEXT)


def wait_line(text: str) -> bytes:
    """``WAIT <text>``: the name is accepted, no room yet."""
    return make_line(WAIT, text)


def paired_line(partner: str) -> bytes:
    """``PAIRED <partner-name>``: the room is open."""
    return make_line(PAIRED, partner)


def turn_line(write: bool) -> bytes:
    """``TURN WRITE`` or ``TURN READ``."""
    return make_line(TURN, "WRITE" if write else "READ")


TURN_WRITE_LINE = turn_line(write=True)
TURN_READ_LINE = turn_line(write=False)


def msg_line(message: bytes) -> bytes:
    """``MSG <text>``: the partner's line, byte for byte."""
    return b"MSG " + message + b"\n"


def err_line(code: str, max_line: int = DEFAULT_MAX_LINE) -> bytes:
    """``ERR <code> <text>`` for one of the ERR codes."""
    return make_line(ERR, code, _ERR_TEXT[code].format(max_line=max_line))


def bye_line(reason: str, text: str) -> bytes:
    """``BYE <reason> <text>``: the last line before the server closes the connection."""
    if reason not in BYE_REASONS:
        raise ValueError(f"unknown BYE reason {reason!r}")
    return make_line(BYE, reason, text)


class ServerLine(NamedTuple):
    """One line from the server, split into keyword, first argument and the rest."""

    keyword: str
    arg: str
    rest: str

    @property
    def text(self) -> str:
        """Everything after the keyword."""
        return f"{self.arg} {self.rest}" if self.rest else self.arg


def parse_server_line(line: bytes) -> ServerLine:
    """Split a server line for a client. Never raises: bad bytes become U+FFFD."""
    text = line.decode("utf-8", errors="replace")
    keyword, _, tail = text.partition(" ")
    if keyword == MSG:
        return ServerLine(keyword, tail, "")
    arg, _, rest = tail.partition(" ")
    return ServerLine(keyword, arg, rest)
