"""The parent's side of room workers: forking one, watching it, reaping it.

A room worker is a plain ``os.fork()`` child, watched through a pidfd: a file
descriptor the kernel makes readable when that one process exits, the sentinel the
server's selector waits on. It is reaped by its own PID (``waitpid(pid)``, never
``waitpid(-1)``). ``multiprocessing.Process`` did the same with more: two pipes, a
finalizer and a bootstrap per child. Its bootstrap clears the finalizer registry, which
holds an entry per live child, so each new worker wrote to as many of the parent's
objects as there were rooms open (memory per room grew with the rooms); its pipes cost
four fds and a dozen syscalls per fork. See the README's Performance section.

Each room gets, at the fork, its client count (a lock-free ``multiprocessing.Value`` from
the fork context pinned below, only the worker writes it until it is reaped) and its
channel (a Unix socketpair for hand-backs, ``handback.py``; the worker also sees the
parent die through it). The server (``server.py``) decides when to open and reap rooms;
this module does the forking and the bookkeeping around it.
"""

from __future__ import annotations

import gc
import multiprocessing
import multiprocessing.sharedctypes  # imported now: lazily, at the first room, fds may be short
import os
import select
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .fdmap import FdMap
from .handback import ChannelReader
from .room import EXIT_CRASH, PARENT_SIGNALS

# The start method is pinned once, here: the counts live in the fork context's shared
# memory, which forked workers inherit (Python 3.14 changes the Linux default).
MP = multiprocessing.get_context("fork")


class WorkerError(Exception):
    """A room worker cannot be started now (out of fds, processes or memory)."""


class Worker:
    """A forked room worker as its parent sees it: PID, sentinel (a pidfd), exit code."""

    __slots__ = ("exitcode", "pid", "sentinel")

    def __init__(self, pid: int, sentinel: int) -> None:
        self.pid = pid
        self.sentinel = sentinel  # readable once the worker has exited
        self.exitcode: int | None = None  # as multiprocessing: -N for signal N

    def poll(self) -> int | None:
        """Reap the worker if it has exited (never blocks); its exit code or None.

        Once reaped, its PID may belong to another process: signal it only while this
        returns None."""
        if self.exitcode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.exitcode = os.waitstatus_to_exitcode(status)
        return self.exitcode

    def join(self, timeout: float | None = None) -> int | None:
        """Wait up to ``timeout`` seconds (None: for ever) for the exit, then reap.
        (poll(2), not select(2): the sentinel's number may be past 1023.)"""
        if self.exitcode is None:
            waiter = select.poll()
            waiter.register(self.sentinel, select.POLLIN)
            waiter.poll(None if timeout is None else max(0, int(timeout * 1000)))
        return self.poll()

    def kill(self) -> None:
        """SIGKILL, if not reaped yet."""
        if self.poll() is None:
            os.kill(self.pid, signal.SIGKILL)

    def close(self) -> None:
        """Release the sentinel (after the reap)."""
        os.close(self.sentinel)


@dataclass
class RoomProc:
    """What the parent keeps of a room: its worker, that worker's client count, and the
    parent's end of the room's channel (hand-backs)."""

    number: int
    proc: Worker
    clients: Any  # multiprocessing.Value("i"): 2 at the fork, then the worker's to write
    channel: socket.socket
    reader: ChannelReader
    received: int = 0  # clients taken back from the channel: no longer the room's

    @property
    def held(self) -> int:
        """The room's clients that the parent has not taken back: exact whenever read."""
        return max(0, self.clients.value - self.received)


def fork_room(number: int, target: Callable[..., int], args: tuple, fds: FdMap) -> RoomProc:
    """Fork the worker for room ``number``: ``target(*args, clients, channel)`` runs in
    the child and its return value is the exit status. Raises WorkerError if it cannot be
    done now; nothing is left half made.

    Signals are blocked around the fork so none lands in a half-made worker, and the
    heap is frozen so the child's gc never touches (and copies) the parent's objects.
    The parent's end of the channel and the sentinel are marked in ``fds`` (later
    workers close them); the parent's copy of the worker's end is closed at once.
    """
    try:
        clients = MP.Value("i", 2, lock=False)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    except OSError as exc:
        raise WorkerError(f"cannot make a room channel: {exc.strerror or exc}") from None
    fds.own(ours.fileno())  # the worker closes the parent's end with the rest
    old = signal.pthread_sigmask(signal.SIG_BLOCK, PARENT_SIGNALS)
    gc.freeze()
    pid = 0
    try:
        pid = os.fork()
        if pid == 0:
            run_child(target, (*args, clients, theirs))  # never returns
        sentinel = os.pidfd_open(pid)
    except OSError as exc:
        if pid:  # forked, but it cannot be watched (out of fds): undo it, leave no zombie
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        fds.disown(ours.fileno())
        ours.close()
        raise WorkerError(f"cannot fork a room worker: {exc.strerror or exc}") from None
    finally:
        gc.unfreeze()
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
        theirs.close()
    fds.own(sentinel)
    ours.setblocking(False)
    return RoomProc(number, Worker(pid, sentinel), clients, ours, ChannelReader(ours))


def run_child(target: Callable[..., int], args: tuple) -> None:
    """The child's side of the fork. This must never return, hence os._exit(): the
    parent's stack above us is not ours to unwind."""
    code = EXIT_CRASH
    try:
        code = target(*args)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else EXIT_CRASH
    finally:
        os._exit(code)


def describe_exit(code: int) -> str:
    """``exited with status 3`` or ``killed by SIGKILL`` for a Worker.exitcode."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with status {code}"


def format_report(rooms: Any, waiting: int, handshaking: int) -> str:
    """The SIGUSR2 report: ``NUMBER OF CLIENTS : ** N **`` and the counts line.

    ``rooms`` are the RoomProcs not yet reaped. A worker already reaped (its exitcode
    set) counts neither as a room nor for its clients: it holds none, and the parent has
    taken what it handed back before reaping it (see ``Server.handle_usr2``).
    """
    live = [room for room in rooms if room.proc.exitcode is None]
    clients = handshaking + waiting + sum(room.held for room in live)
    return (
        f"NUMBER OF CLIENTS : ** {clients} **\n"
        f"rooms {len(live)}, waiting {waiting}, handshaking {handshaking}"
    )
