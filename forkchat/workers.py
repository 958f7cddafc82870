"""The parent's side of room workers: forking one, what the parent keeps of it, and the
multiprocessing details that keep forks cheap and clean.

The start method is pinned here, once: rooms are forked (Python 3.14 changes the Linux
default). Each room gets, at the fork, its client count (a lock-free
``multiprocessing.Value`` only the worker writes until it is reaped) and its channel (a
Unix socketpair for hand-backs, ``handback.py``). The server (``server.py``) decides when
to open and reap rooms; this module does the forking and the bookkeeping around it.
"""

from __future__ import annotations

import gc
import multiprocessing
import multiprocessing.sharedctypes  # imported now: lazily, at the first room, fds may be short
import os
import signal
import socket
import stat
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .fdmap import FdMap
from .handback import ChannelReader
from .room import PARENT_SIGNALS

MP = multiprocessing.get_context("fork")


class WorkerError(Exception):
    """A room worker cannot be started now (out of fds, processes or memory)."""


@dataclass
class RoomProc:
    """What the parent keeps of a room: its worker, that worker's client count, and the
    parent's end of the room's channel (hand-backs)."""

    number: int
    proc: Any  # multiprocessing.Process
    clients: Any  # multiprocessing.Value("i"): 2 at the fork, then the worker's to write
    channel: socket.socket
    reader: ChannelReader
    received: int = 0  # clients taken back from the channel: no longer the room's

    @property
    def held(self) -> int:
        """The room's clients that the parent has not taken back: exact whenever read."""
        return max(0, self.clients.value - self.received)


def fork_room(number: int, target: Callable[..., None], args: tuple, fds: FdMap) -> RoomProc:
    """Fork the worker for room ``number``: ``target(*args, clients, channel)`` runs in
    the child. Raises WorkerError if it cannot be done now; nothing is left half made.

    Signals are blocked around the fork so none lands in a half-made worker, and the
    heap is frozen so the child's gc never touches (and copies) the parent's objects.
    The parent's end of the channel is marked in ``fds`` (later workers close it); its
    copy of the worker's end is closed at once.
    """
    try:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    except OSError as exc:
        raise WorkerError(f"cannot make a room channel: {exc.strerror or exc}") from None
    fds.own(ours.fileno())  # the worker closes the parent's end with the rest
    old = signal.pthread_sigmask(signal.SIG_BLOCK, PARENT_SIGNALS)
    free = lowest_free_fds(ours.fileno(), 6)  # where a failed start would leave its pipes
    gc.freeze()
    try:
        clients = MP.Value("i", 2, lock=False)
        proc = MP.Process(
            target=target,
            args=(*args, clients, theirs),
            name=f"forkchat-room-{number}",
            daemon=True,
        )
        proc.start()
        forget_child(proc)
    except OSError as exc:
        close_stray_pipes(free)
        fds.disown(ours.fileno())
        ours.close()
        raise WorkerError(f"cannot fork a room worker: {exc.strerror or exc}") from None
    finally:
        gc.unfreeze()
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
        theirs.close()
    ours.setblocking(False)
    return RoomProc(number, proc, clients, ours, ChannelReader(ours))


def lowest_free_fds(probe: int, count: int) -> list[int]:
    """The ``count`` lowest fd numbers not in use (fewer if fds run out): the numbers
    the next pipes will get. Probed by duplicating the open fd ``probe``."""
    probes: list[int] = []
    try:
        for _ in range(count):
            probes.append(os.dup(probe))
    except OSError:
        pass
    for fd in probes:
        os.close(fd)
    return probes


def close_stray_pipes(candidates: list[int]) -> None:
    """After a failed start: close the pipes multiprocessing made before fork() failed.

    ``candidates`` were free just before the start, so a pipe there now is a leftover;
    anything else (a regular file, an fd from a supervisor) is left alone.
    """
    for fd in candidates:
        try:
            if stat.S_ISFIFO(os.fstat(fd).st_mode):
                os.close(fd)
        except OSError:
            pass


def forget_child(proc: Any) -> None:
    """Take a started worker out of multiprocessing's set of children.

    ``Process.start()`` polls every child in that set (a waitpid each) before it forks,
    which makes each fork cost as much as the rooms already open. Rooms are reaped here
    through their sentinels and ``join()``, which do not need the set.
    """
    children = getattr(multiprocessing.process, "_children", None)
    if isinstance(children, set):
        children.discard(proc)


def parent_pipe_fds(proc: Any) -> tuple[int, ...]:
    """The parent's ends of a worker's two pipes: its sentinel, and the write end whose
    close tells the worker the parent died. A newer worker must close both, or an older
    one would never see the parent die. CPython's fork Popen keeps them as the arguments
    of its finalizer; the sentinel alone is the public fallback."""
    finalizer = getattr(getattr(proc, "_popen", None), "finalizer", None)
    args = getattr(finalizer, "_args", None)
    if isinstance(args, tuple) and all(isinstance(fd, int) for fd in args):
        return args
    return (proc.sentinel,)


def describe_exit(code: int) -> str:
    """``exited with status 3`` or ``killed by SIGKILL`` for a Process.exitcode."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with status {code}"


def format_report(rooms: Any, waiting: int, handshaking: int) -> str:
    """The SIGUSR2 report: ``NUMBER OF CLIENTS : ** N **`` and the counts line.

    ``rooms`` are the RoomProcs not yet reaped. A worker that has exited (exitcode set,
    reaped or not) counts neither as a room nor for its clients: it holds none.
    """
    live = [room for room in rooms if room.proc.exitcode is None]
    clients = handshaking + waiting + sum(room.held for room in live)
    return (
        f"NUMBER OF CLIENTS : ** {clients} **\n"
        f"rooms {len(live)}, waiting {waiting}, handshaking {handshaking}"
    )
