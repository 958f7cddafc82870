"""The event log: one timestamped line per event on stdout, never blocking the server.

Colour only when stdout is a terminal, and never with ``--no-color`` or ``NO_COLOR``.
Each line goes out in one ``write()`` of at most ``PIPE_BUF`` bytes, so the parent's and
the room workers' lines never interleave within a line. Nothing from the network
reaches the log but validated names and addresses.

A log must never stall the server: a paused pager or a stalled log shipper on the
other end of a pipe would otherwise freeze the parent (no accepts, no reaping, no
signals) and every room. :func:`detach_stdout` gives the server its own non-blocking
open file description of stdout; a line that does not fit in the pipe is dropped, and
the next line that does get through is preceded by how many were dropped.
"""

from __future__ import annotations

import errno
import os
import stat
import sys
import time
from typing import TextIO

# Lines up to PIPE_BUF bytes are written atomically to a pipe: all of it or nothing.
PIPE_BUF = 4096

_COLORS = {
    "connect": "\033[32m",  # green
    "name": "\033[36m",  # cyan
    "room": "\033[1;34m",  # bold blue
    "leave": "\033[33m",  # yellow
    "close": "\033[35m",  # magenta
    "error": "\033[1;31m",  # bold red
    "info": "",
}
_RESET = "\033[0m"


def want_color(stream: TextIO | None, no_color: bool) -> bool:
    """Colour is for people: a terminal, and nobody asked for none."""
    if stream is None or no_color or os.environ.get("NO_COLOR"):
        return False
    try:
        return stream.isatty()
    except (ValueError, OSError):
        return False


def detach_stdout(fd: int = 1) -> str:
    """Make writes to ``fd`` non-blocking without touching anyone else's view of it.

    ``O_NONBLOCK`` belongs to an open file description, which a shell shares with its
    terminal and every program in the pipeline: setting it on fd 1 itself would change
    the shell's terminal too. So for a pipe or a terminal the server opens the same
    pipe or terminal again (``/proc/self/fd/1``): a description of its own, made
    non-blocking, put in place of fd 1 (the room workers inherit it). A socket (systemd's
    journal stream) cannot be opened again; it is the service's own, so it is made
    non-blocking as it is. A regular file never blocks and is left alone.
    Returns what was done, for tests and the curious: "reopened", "nonblocking",
    "file", "closed" or "left".
    """
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return "closed"
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISSOCK(mode):
        os.set_blocking(fd, False)
        return "nonblocking"
    if not (stat.S_ISFIFO(mode) or stat.S_ISCHR(mode)):
        return "left"
    try:
        own = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError:
        return "left"
    os.dup2(own, fd)
    os.close(own)
    return "reopened"


class Log:
    """Writes event lines ``YYYY-mm-dd HH:MM:SS.mmm [who] text``.

    Never blocks when stdout was prepared by :func:`detach_stdout`: a line the pipe
    cannot take now is dropped and counted; ``dropped`` is reported before the next line
    that gets through.
    """

    def __init__(self, who: str, color: bool = False, stream: TextIO | None = None) -> None:
        self.who = who
        self.color = color
        self.stream = stream if stream is not None else sys.stdout  # None: stdout closed
        self.dropped = 0

    def event(self, kind: str, text: str) -> None:
        """Log one event; ``kind`` picks the colour (connect, name, room, leave, close, ...)."""
        self.plain(self.stamp(text, kind))

    def stamp(self, text: str, kind: str = "info") -> str:
        """The line as logged: timestamp, who, text, and colour where wanted."""
        now = time.time()
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))
        line = f"{when}.{int(now % 1 * 1000):03d} [{self.who}] {text}"
        if self.color and _COLORS.get(kind):
            line = f"{_COLORS[kind]}{line}{_RESET}"
        return line

    def plain(self, text: str) -> None:
        """Write text as it is (reports may hold several lines) in one write, or drop it.

        A closed stdout is ignored. Text over PIPE_BUF bytes is cut there, so that a pipe
        takes each line whole or not at all.
        """
        if self.stream is None:
            return
        data = (text + "\n").encode("utf-8", "replace")
        if self.dropped:
            note = self.stamp(f"log output was blocked: {self.dropped} lines dropped", "error")
            data = (note + "\n").encode() + data
        if len(data) > PIPE_BUF:
            data = data[: PIPE_BUF - 1] + b"\n"
        try:
            fd = self.stream.fileno()
            written = os.write(fd, data)
        except BlockingIOError:
            self.dropped += 1
            return
        except (OSError, ValueError) as exc:
            if getattr(exc, "errno", None) == errno.EAGAIN:
                self.dropped += 1
            return  # a reader that went away must not take the server down
        self.dropped = 0
        if written < len(data):  # a regular file on a full disk, a slow terminal
            self.write_rest(fd, data[written:])

    def write_rest(self, fd: int, data: bytes) -> None:
        """Finish a partial write where it can be finished now; drop the rest."""
        while data:
            try:
                data = data[os.write(fd, data) :]
            except OSError:
                self.dropped += 1
                return

    def error(self, text: str) -> None:
        self.event("error", text)

    def departure(self, label: str, why: str) -> None:
        """The one form of the "client disconnected" line, parent and rooms alike."""
        self.event("leave", f"client disconnected {label} ({why})")
