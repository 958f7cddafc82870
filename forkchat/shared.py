"""Where a room's count lives, so that the server's next code can read it after an
upgrade in place.

A room's count is a ``multiprocessing.Value``: a C int in a file of shared memory that
multiprocessing maps (``/dev/shm``, deleted once open). The room worker keeps writing
it; an ``exec`` of the server unmaps it. multiprocessing says nowhere (but in private
attributes) which file and where in it; the process's own ``/proc`` entries do:
:func:`locate` finds the mapping that holds the value's address and the fd open on
that file, and :class:`Counts` maps it again in the new code. Without ``/proc`` (or
should a Value live elsewhere), the count is carried as the number it was at the
upgrade, exact again once that room ends.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import stat
from typing import Any


def locate(value: Any) -> list[int] | None:
    """[fd, offset]: an fd of this process open on the shared file that holds
    ``value`` (a ctypes object), and the value's offset in that file. None if it
    cannot be found."""
    address = ctypes.addressof(value)
    try:
        mapping = find_mapping(address)
    except OSError:
        return None
    if mapping is None:
        return None
    start, file_offset, device, inode = mapping
    fd = find_fd(device, inode)
    return None if fd is None else [fd, file_offset + address - start]


def find_mapping(address: int) -> tuple[int, int, int, int] | None:
    """(start, file offset, device, inode) of this process's file mapping that holds
    ``address`` (from /proc/self/maps), or None."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            low, high = (int(x, 16) for x in fields[0].split("-"))
            if low <= address < high:
                major, minor = (int(x, 16) for x in fields[3].split(":"))
                inode = int(fields[4])
                if not inode:
                    return None
                return low, int(fields[2], 16), os.makedev(major, minor), inode
    return None


def find_fd(device: int, inode: int) -> int | None:
    """An fd of this process open on the regular file (device, inode), or None."""
    for name in os.listdir("/proc/self/fd"):
        try:
            info = os.fstat(int(name))
        except OSError:
            continue
        if stat.S_ISREG(info.st_mode) and (info.st_dev, info.st_ino) == (device, inode):
            return int(name)
    return None


class Counts:
    """The counts of rooms carried across an upgrade: each file mapped once (the
    mapping keeps its own fd: the carried one is closed by :meth:`close`)."""

    def __init__(self) -> None:
        self.maps: dict[int, mmap.mmap] = {}  # carried fd -> its mapping

    def view(self, where: list[int] | None, now: int) -> Any:
        """The C int at ``where`` ([fd, offset] from :func:`locate`), shared with the
        room that writes it; or, without a place, a private int that stays ``now``."""
        if where is None:
            return ctypes.c_int(now)
        fd, offset = where
        if fd not in self.maps:
            self.maps[fd] = mmap.mmap(fd, os.fstat(fd).st_size)
        return ctypes.c_int.from_buffer(self.maps[fd], offset)

    def close(self) -> None:
        """Close the carried fds (each mapping holds a copy of its own)."""
        for fd in self.maps:
            os.close(fd)
        self.maps.clear()
