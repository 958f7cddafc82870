"""The parent's side of room workers: forking one, watching it, reaping it.

A room worker is a plain ``os.fork()`` child, forked by the room forker
(``forker.py``) or, for a TLS server or once the forker is gone, by the server itself.
The server watches each one through a pidfd: a file descriptor the kernel makes
readable when that one process exits, the sentinel the server's selector waits on. It
signals through it too (``pidfd_send_signal``: never another process that reused the
PID) and reaps its own children through it (``waitid(P_PIDFD)``); the forker's are
reaped by the forker. ``multiprocessing.Process`` did the same with more: two pipes, a
finalizer and a bootstrap per child. Its bootstrap clears the finalizer registry, which
holds an entry per live child, so each new worker wrote to as many of the parent's
objects as there were rooms open (memory per room grew with the rooms); its pipes cost
four fds and a dozen syscalls per fork. See the README's Performance section.

Each room gets its client count, a ``multiprocessing.Value`` from the fork context
pinned below, in memory reserved before any fork (:class:`Counts`; only the worker
writes it until it is gone), and its channel (a Unix socketpair for hand-backs,
``handback.py``; the worker also sees the server die through it). The server (``server.py``,
``keeper.py``) decides when to open and reap rooms; this module does the forking and
the bookkeeping around it.
"""

from __future__ import annotations

import ctypes
import gc
import mmap
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
PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>


COUNT_BLOCK = 8  # bytes multiprocessing's heap gives a Value("i") (4, aligned to 8)


class Counts:
    """Every room's client count: a ``multiprocessing.Value("i", lock=False)`` of its
    own, a C int in the fork context's shared memory.

    The room forker, forked at start, sees only the shared memory mapped by then, and a
    Value made later for a room it forks must lie there. So, before the forker,
    :meth:`__init__` has multiprocessing's heap map one arena big enough for twice
    ``rooms`` Values and gives that block straight back: the heap cuts the later Values
    from it (it takes a new arena only when no free block fits). :meth:`address_of`
    checks each one (the guard: a room whose Value lies elsewhere is forked by the
    server itself), and the forker's worker writes the Value through that address
    (:func:`count_at`). Only that worker writes it until it is gone.
    """

    def __init__(self, rooms: int) -> None:
        size = -(-2 * rooms * COUNT_BLOCK // mmap.PAGESIZE) * mmap.PAGESIZE
        reserve = MP.RawArray(ctypes.c_char, size)
        self.low = ctypes.addressof(reserve)
        self.high = self.low + size
        del reserve  # the block goes back to the heap; its arena stays mapped, here and in forks

    @staticmethod
    def new() -> Any:
        """A room's count: a Value set to 2 (the pair). Raises WorkerError."""
        try:
            return MP.Value("i", 2, lock=False)
        except OSError as exc:  # a new arena needs an fd
            raise WorkerError(f"cannot make a room count: {exc.strerror or exc}") from None

    def address_of(self, value: Any) -> int | None:
        """Where ``value`` lies, if that is in the memory reserved before the forker
        (so the forker and its workers see it too); None if not."""
        address = ctypes.addressof(value)
        return address if self.low <= address < self.high else None


def count_at(address: int) -> ctypes.c_int:
    """The room's count at ``address`` (from :meth:`Counts.address_of`), in a process
    forked after the Counts were made: the same C int as the server's Value."""
    return ctypes.c_int.from_address(address)


def become_subreaper() -> bool:
    """Make this process adopt its orphaned descendants (``PR_SET_CHILD_SUBREAPER``):
    should the room forker die, its rooms become the server's children, to reap. Best
    effort; False if the kernel refused."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


class WorkerError(Exception):
    """A room worker cannot be started now (out of fds, processes or memory)."""


class Worker:
    """A room worker as the server sees it: PID, sentinel (a pidfd), exit code.

    The server's own child is reaped through its pidfd and gets its exit code. A worker
    the room forker forked is reaped, and its ending logged, by the forker: the server
    learns only that it exited (its pidfd is readable), and records exit code 0. Should
    the forker die first, the worker becomes the server's child (the server is a
    subreaper): reaped here through its pidfd if still watched, else by the server's
    ``reap_strays``.
    """

    __slots__ = ("exitcode", "pid", "sentinel")

    def __init__(self, pid: int, sentinel: int) -> None:
        self.pid = pid
        self.sentinel = sentinel  # readable once the worker has exited
        self.exitcode: int | None = None  # as multiprocessing: -N for signal N

    def poll(self) -> int | None:
        """Reap the worker if it has exited (never blocks); its exit code or None.

        Once this returns a code the worker is gone: signal it only while it is None."""
        if self.exitcode is None:
            try:
                result = os.waitid(os.P_PIDFD, self.sentinel, os.WEXITED | os.WNOHANG)
            except ChildProcessError:  # the forker's child: it reaps, and logs how it ended
                if is_readable(self.sentinel):
                    self.exitcode = 0
            else:
                if result is not None:
                    self.exitcode = exit_code(result)
        return self.exitcode

    def join(self, timeout: float | None = None) -> int | None:
        """Wait up to ``timeout`` seconds (None: for ever) for the exit, then reap."""
        if self.exitcode is None:
            is_readable(self.sentinel, timeout)
        return self.poll()

    def signal(self, signum: int) -> None:
        """Send ``signum`` through the pidfd, if the worker has not exited."""
        if self.poll() is None:
            try:
                signal.pidfd_send_signal(self.sentinel, signum)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        """SIGKILL, if not exited yet."""
        self.signal(signal.SIGKILL)

    def close(self) -> None:
        """Release the sentinel (after the reap)."""
        os.close(self.sentinel)


def own_children() -> list[int]:
    """This process's children, by PID, from /proc (its main thread's list)."""
    pid = os.getpid()
    try:
        with open(f"/proc/{pid}/task/{pid}/children", "rb") as f:
            return [int(word) for word in f.read().split()]
    except OSError:
        return []


def is_readable(fd: int, timeout: float | None = 0) -> bool:
    """Whether ``fd`` is readable within ``timeout`` seconds (None: wait for ever).
    (poll(2), not select(2): the fd's number may be past 1023.)"""
    waiter = select.poll()
    waiter.register(fd, select.POLLIN)
    return bool(waiter.poll(None if timeout is None else max(0, int(timeout * 1000))))


def exit_code(result: os.waitid_result) -> int:
    """A waitid result as an exit code: the status, or -N for a signal N."""
    if result.si_code == os.CLD_EXITED:
        return result.si_status
    return -result.si_status


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


def prepare_room(counts: Counts, fds: FdMap) -> tuple[Any, socket.socket, socket.socket]:
    """What a room needs before its worker starts: its count (2) and its channel.
    Returns (count, the server's end, marked in ``fds``; the worker's end, for the
    caller to close once the worker has it). Raises WorkerError, leaving nothing."""
    clients = counts.new()
    try:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    except OSError as exc:
        raise WorkerError(f"cannot make a room channel: {exc.strerror or exc}") from None
    fds.own(ours.fileno())  # later workers close the server's end with the rest
    ours.setblocking(False)
    return clients, ours, theirs


def abandon_room(channel: socket.socket, fds: FdMap) -> None:
    """Undo :func:`prepare_room` for a worker that could not be started (its count
    goes with it)."""
    fds.disown(channel.fileno())
    channel.close()


def fork_child(target: Callable[..., int], args: tuple) -> tuple[int, int]:
    """Fork a child that runs ``target(*args)`` and exits with its return value.
    Returns (pid, pidfd). Raises WorkerError if it cannot be done now; a child that was
    forked but cannot be watched (out of fds) is killed and reaped.

    Signals are blocked around the fork so none lands in a half-made child, and the
    heap is frozen so the child's gc never touches (and copies) the parent's objects.
    """
    old = signal.pthread_sigmask(signal.SIG_BLOCK, PARENT_SIGNALS)
    gc.freeze()
    pid = 0
    try:
        pid = os.fork()
        if pid == 0:
            run_child(target, args)  # never returns
        return pid, os.pidfd_open(pid)
    except OSError as exc:
        if pid:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        raise WorkerError(f"cannot fork a room worker: {exc.strerror or exc}") from None
    finally:
        gc.unfreeze()
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def fork_worker(target: Callable[..., int], args: tuple, fds: FdMap) -> Worker:
    """Fork a room worker from this process: ``target(*args)`` runs in it. Its
    sentinel is marked in ``fds`` (later workers close it). Raises WorkerError."""
    pid, sentinel = fork_child(target, args)
    fds.own(sentinel)
    return Worker(pid, sentinel)


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
