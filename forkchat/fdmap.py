"""The parent's file descriptors as a byte map, so a forked room worker can close them
all by number.

Closing the parent's sockets through their Python objects would touch (and, after
fork, copy) every page those objects live on: with a thousand clients and rooms that
is most of a worker's memory and most of its start-up time. Instead the parent marks
each fd it owns here, and the new worker closes every marked fd but its own two with a
handful of ``os.closerange`` calls (``close_range`` on Linux), reading this one buffer
and nothing else. The inherited objects stay as they are, unused: the worker never
frees them, and they are frozen out of its garbage collector.

Fds the parent did not mark stay open in the worker: stdio, the worker's own end of its
channel (the parent never marks it), and multiprocessing's shared-memory arena.
"""

from __future__ import annotations

import os
from collections.abc import Iterable


class FdMap:
    """A set of fds stored as one byte per fd number."""

    def __init__(self) -> None:
        self.marks = bytearray(256)

    def own(self, fd: int) -> None:
        """Mark ``fd`` as the parent's: a new worker closes it."""
        if fd >= len(self.marks):
            self.marks.extend(bytes(max(fd + 1, 2 * len(self.marks)) - len(self.marks)))
        self.marks[fd] = 1

    def disown(self, fd: int) -> None:
        """Unmark ``fd``: call this before the parent closes it, or hands it to a worker."""
        if 0 <= fd < len(self.marks):
            self.marks[fd] = 0

    def close_all(self, keep: Iterable[int] = ()) -> None:
        """Close every marked fd except those in ``keep``, one closerange per run."""
        keep_sorted = sorted(keep)
        start = self.marks.find(1)
        while start >= 0:
            end = self.marks.find(0, start)
            if end < 0:
                end = len(self.marks)
            close_run(start, end, keep_sorted)
            start = self.marks.find(1, end)


def close_run(low: int, high: int, keep: list[int]) -> None:
    """Close fds ``low`` to ``high - 1`` except those in ``keep`` (sorted)."""
    for fd in keep:
        if low <= fd < high:
            os.closerange(low, fd)
            low = fd + 1
    os.closerange(low, high)
