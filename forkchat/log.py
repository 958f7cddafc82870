"""The event log: one timestamped line per event on stdout, flushed at once.

Colour only when stdout is a terminal, and never with ``--no-color`` or ``NO_COLOR``.
Each line goes out in one write, so the parent's and the room workers' lines never
interleave within a line. Nothing from the network reaches the log but validated names
and addresses.
"""

from __future__ import annotations

import os
import sys
import time
from typing import TextIO

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


class Log:
    """Writes event lines ``YYYY-mm-dd HH:MM:SS.mmm [who] text``."""

    def __init__(self, who: str, color: bool = False, stream: TextIO | None = None) -> None:
        self.who = who
        self.color = color
        self.stream = stream if stream is not None else sys.stdout  # None: stdout closed

    def event(self, kind: str, text: str) -> None:
        """Log one event; ``kind`` picks the colour (connect, name, room, leave, close, ...)."""
        now = time.time()
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))
        line = f"{stamp}.{int(now % 1 * 1000):03d} [{self.who}] {text}"
        if self.color and _COLORS.get(kind):
            line = f"{_COLORS[kind]}{line}{_RESET}"
        self.plain(line)

    def plain(self, text: str) -> None:
        """Write text as it is (reports; may hold several lines), in one flushed write.

        A closed stdout is ignored. Writes block: a reader that stops reading (a
        paused pager) pauses the process, as for any program writing to a pipe.
        """
        if self.stream is None:
            return
        try:
            fd = self.stream.fileno()
            data = (text + "\n").encode("utf-8", "replace")
            while data:  # one write() for a line (pipes take up to 4 KiB at once)
                data = data[os.write(fd, data) :]
        except (OSError, ValueError):
            pass  # a reader that went away must not take the server down

    def error(self, text: str) -> None:
        self.event("error", text)

    def departure(self, label: str, why: str) -> None:
        """The one form of the "client disconnected" line, parent and rooms alike."""
        self.event("leave", f"client disconnected {label} ({why})")
