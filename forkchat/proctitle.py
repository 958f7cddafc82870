"""How forkchat's processes name themselves, and how to recognise a forkchat server.

The server's ``comm`` (what ``top`` shows, 15 bytes) is ``forkchat-server``; its
command line stays as it was typed. Each room worker's ``comm`` is ``forkchat-room`` and
its full command line (``ps``, ``top -c``, ``bin/pids``) ``forkchat-room N alice+bob``,
set with ``setproctitle``: the library gunicorn and Celery use, because it rewrites the
process's own argv area, which is what ``/proc/PID/cmdline`` reads. ``bin/pids`` and
the pidfile check rely on these names.
"""

from __future__ import annotations

import os

try:
    from setproctitle import getproctitle, setproctitle
except ImportError:  # pragma: no cover - comm alone still names the process
    getproctitle = setproctitle = None

SERVER_NAME = "forkchat-server"
ROOM_NAME = "forkchat-room"


def set_title(title: str, comm: str) -> None:
    """Name this process: ``title`` for the full command line, ``comm`` (at most 15
    bytes) for ``top`` and ``ps -o comm``. Best effort: never raises."""
    if setproctitle is not None:
        setproctitle(title)
    set_comm(comm)


def prepare_titles() -> None:
    """In the parent, before any fork: let setproctitle make room for titles once (it
    moves the environment out of the argv area on first use). Done in each worker
    instead, that first use would copy the environment into every one of them."""
    if getproctitle is not None:
        getproctitle()


def set_comm(comm: str) -> None:
    """Set ``comm`` alone (at most 15 bytes). Best effort: never raises. (Plain
    ``os`` calls: ``open()`` would build a text file object, and a new room worker would
    copy the pages that takes.)"""
    try:
        fd = os.open("/proc/self/comm", os.O_WRONLY)
    except OSError:
        return
    try:
        os.write(fd, comm[:15].encode())
    except OSError:
        pass
    finally:
        os.close(fd)


def room_title(number: int, first: str | None, second: str | None) -> str:
    """``forkchat-room 7 alice+bob``: what a room worker calls itself."""
    return f"{ROOM_NAME} {number} {first or '?'}+{second or '?'}"


def is_server_pid(pid: int) -> bool:
    """True if ``pid`` is a running forkchat server (by its comm or command line)."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            if f.read().strip() == SERVER_NAME:
                return True
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().startswith(SERVER_NAME.encode())
    except OSError:
        return False
