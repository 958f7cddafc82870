"""The parent's side of room workers: starting one (ordered from the room forker, or
forked here), watching it, reaping it; and starting and ordering the forker itself.

A room worker is a plain ``os.fork()`` child, forked by the room forker
(``forker.py``) or, for a TLS server or once the forker is gone, by the server itself.
The server watches each one through a pidfd (``children.py``): it waits on it, signals
through it and reaps its own children through it; the forker's are reaped by the
forker. ``multiprocessing.Process`` did the same with more: two pipes, a
finalizer and a bootstrap per child. Its bootstrap clears the finalizer registry, which
holds an entry per live child, so each new worker wrote to as many of the parent's
objects as there were rooms open (memory per room grew with the rooms); its pipes cost
four fds and a dozen syscalls per fork. See the README's Performance section.

Each room gets its client count, a ``multiprocessing.Value`` from the fork context
pinned below, in the arena the forker maps too (:class:`Counts`; only the worker
writes it until it is gone), and its channel (a Unix socketpair for hand-backs,
``handback.py``; the worker also sees the server die through it). The server (``server.py``,
``keeper.py``) decides when to open and reap rooms; this module does the forking and
the bookkeeping around it.
"""

from __future__ import annotations

import ctypes
import mmap
import multiprocessing
import multiprocessing.sharedctypes  # imported now: lazily, at the first room, fds may be short
import os
import pickle
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .children import Worker, WorkerError, describe_exit, fork_child, open_pidfd
from .conn import Conn
from .fdmap import FdMap
from .forker import RoomOrder, RoomSetup, close_all, read_message
from .handback import ChannelReader, send_message, snapshot
from .room import PARENT_SIGNALS

# The start method is pinned once, here: the counts live in the fork context's shared
# memory, which forked workers inherit (Python 3.14 changes the Linux default).
MP = multiprocessing.get_context("fork")
PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>
COUNT_BLOCK = 8  # bytes multiprocessing's heap gives a Value("i") (4, aligned to 8)
ANSWER_TIMEOUT = 5.0  # seconds the server waits for the forker's answer before giving up
KILL_WAIT = 5.0  # seconds to wait for a SIGKILLed forker to exit
# The forker's command line: a fresh interpreter, isolated (-I: no PYTHON* variables,
# no user site, no script directory), that then takes this process's module path (its
# first argument), so that it imports forkchat and setproctitle from where we did.
FORKER_PATH = "import os, sys; sys.path[:] = sys.argv[1].split(os.pathsep)\n"
FORKER_BOOT = FORKER_PATH + "from forkchat.forker import main; sys.exit(main(sys.argv[2:]))"


class Counts:
    """Every room's client count: a ``multiprocessing.Value("i", lock=False)`` of its
    own, a C int in the fork context's shared memory.

    The room forker is another interpreter: it maps one arena of that shared memory,
    passed at its start, and its workers write their counts there. So, first thing,
    :meth:`__init__` has multiprocessing's heap map one arena big enough for twice
    ``rooms`` Values and gives that block straight back: the heap cuts the later Values
    from it (it takes a new arena only when no free block fits). :meth:`offset_of`
    places each one in that arena (the guard: a room whose Value lies elsewhere is
    forked by the server itself), and the forker's worker writes the Value at that
    offset (``forker.SharedCount``). Only that worker writes it until it is gone.

    Where a Value lies is multiprocessing's private ``_wrapper._state`` (stable since
    Python 3.8); without it, :attr:`arena` is None and the server forks its rooms itself.
    """

    def __init__(self, rooms: int) -> None:
        size = -(-2 * rooms * COUNT_BLOCK // mmap.PAGESIZE) * mmap.PAGESIZE
        reserve = MP.RawArray(ctypes.c_char, size)
        self.arena = block_of(reserve)[0]
        del reserve  # the block goes back to the heap; its arena stays mapped

    @staticmethod
    def new() -> Any:
        """A room's count: a Value set to 2 (the pair). Raises WorkerError."""
        try:
            return MP.Value("i", 2, lock=False)
        except OSError as exc:  # a new arena needs an fd
            raise WorkerError(f"cannot make a room count: {exc.strerror or exc}") from None

    def offset_of(self, value: Any) -> int | None:
        """Where ``value`` lies in the arena the forker maps; None if elsewhere."""
        arena, start = block_of(value)
        return start if arena is not None and arena is self.arena else None


def block_of(shared: Any) -> tuple[Any, int]:
    """The heap arena a ``multiprocessing.sharedctypes`` object lies in, and its offset
    there; (None, 0) if this Python keeps that elsewhere."""
    try:
        (arena, start, _stop), _size = shared._wrapper._state
    except (AttributeError, TypeError, ValueError):
        return None, 0
    return (arena, start) if hasattr(arena, "fd") and hasattr(arena, "size") else (None, 0)


def become_subreaper() -> bool:
    """Make this process adopt its orphaned descendants (``PR_SET_CHILD_SUBREAPER``):
    should the room forker die, its rooms become the server's children, to reap. Best
    effort; False if the kernel refused."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


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


def fork_worker(target: Callable[..., int], args: tuple, fds: FdMap) -> Worker:
    """Fork a room worker from this process: ``target(*args)`` runs in it. Its
    sentinel is marked in ``fds`` (later workers close it). Raises WorkerError."""
    pid, sentinel = fork_child(target, args)
    fds.own(sentinel)
    return Worker(pid, sentinel)


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


# -- the server's side of the room forker --------------------------------------------------


class ForkerGone(Exception):
    """The forker cannot take orders any more (it exited, or stopped answering)."""


class Forker:
    """The server's handle on its room forker: the process (a :class:`Worker`: pid,
    pidfd) and the server's end of their socket."""

    def __init__(self, proc: Worker, sock: socket.socket) -> None:
        self.proc = proc
        self.sock = sock

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def sentinel(self) -> int:
        """Its pidfd: readable once it has exited."""
        return self.proc.sentinel

    def order(
        self, number: int, count_offset: int, first: Conn, second: Conn, channel: socket.socket
    ) -> Worker:
        """Have the forker fork room ``number`` for the pair, with ``channel`` (the
        worker's end) and its count at ``count_offset`` in the counts' arena. The
        server keeps its own copies of the sockets, to close once the room is under
        way; the worker waits for ``forker.GO`` on the channel. Raises WorkerError if no
        worker can be watched (the forker goes on), ForkerGone if the forker is no use
        any more."""
        records = (snapshot(first, first.avoid or 0), snapshot(second, second.avoid or 0))
        try:
            send_message(
                self.sock,
                RoomOrder(number, count_offset, records),
                [first.fd, second.fd, channel.fileno()],
            )
            answer, fds = read_message(self.sock, 1)
        except (OSError, EOFError, pickle.UnpicklingError) as exc:
            raise ForkerGone(describe_failure(exc)) from None
        kind, value = answer
        if kind == "ok" and len(fds) == 1:
            return Worker(value, fds[0])
        close_all(fds)
        if kind == "ok":  # forked, but its pidfd did not fit: it waits for a GO never sent
            raise WorkerError(f"room {number}: cannot watch its worker (out of fds)")
        raise WorkerError(str(value))

    def stop(self, timeout: float) -> int | None:
        """Close the server's end (the forker then reaps what it has left and exits),
        wait up to ``timeout`` seconds (0: it failed, or has exited already), SIGKILL it
        if it is still there, and reap it. Returns its exit code (None if it could not
        be reaped)."""
        self.sock.close()
        code = self.proc.join(timeout)
        if code is None:
            self.proc.kill()
            code = self.proc.join(KILL_WAIT)
        self.proc.close()
        return code


def describe_failure(exc: BaseException) -> str:
    """Why talking to the forker failed, in a few words for the log."""
    if isinstance(exc, EOFError):
        return "it closed its socket"
    if isinstance(exc, TimeoutError):
        return f"no answer within {ANSWER_TIMEOUT:g} s"
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def start_forker(setup: RoomSetup, counts: Counts, fds: FdMap) -> Forker:
    """Start the room forker, send it ``setup`` and wait (up to ANSWER_TIMEOUT) until
    it is ready. Raises WorkerError, leaving nothing behind. The server's end of their
    socket and the forker's pidfd are marked in ``fds``."""
    if counts.arena is None:
        raise WorkerError("cannot find the counts' shared memory for a room forker")
    try:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    except OSError as exc:
        raise WorkerError(f"cannot make the forker's socket: {exc.strerror or exc}") from None
    try:
        proc = spawn_forker(theirs.fileno(), counts.arena.fd)
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    forker = Forker(proc, ours)
    ours.settimeout(ANSWER_TIMEOUT)
    try:
        send_message(ours, setup, [])
        answer, _ = read_message(ours, 0)
        if answer[0] != "ready":
            raise EOFError
    except (OSError, EOFError, pickle.UnpicklingError) as exc:
        ended = isinstance(exc, (EOFError, ConnectionError))  # it exits: wait, say how
        code = forker.stop(ANSWER_TIMEOUT if ended else 0)
        why = describe_exit(code) if ended and code is not None else describe_failure(exc)
        raise WorkerError(f"the room forker did not start ({why})") from None
    except BaseException:  # interrupted (the server is going): leave no forker behind
        forker.stop(0)
        raise
    fds.own(ours.fileno())
    fds.own(proc.sentinel)
    return forker


def spawn_forker(sock_fd: int, arena_fd: int) -> Worker:
    """Start the forker's interpreter (``posix_spawn``: no fork of this process) with
    ``sock_fd`` and ``arena_fd``, and no other of our descriptors (they are all
    close-on-exec). Raises WorkerError."""
    path = os.pathsep.join([str(Path(__file__).resolve().parent.parent), *sys.path])
    flags = ["-I", "-B"] if sys.dont_write_bytecode else ["-I"]  # -I drops PYTHON*
    argv = [sys.executable, *flags, "-c", FORKER_BOOT, path, str(sock_fd), str(arena_fd)]
    try:
        if not sys.executable:
            raise OSError("no Python executable to start")
        os.set_inheritable(sock_fd, True)
        os.set_inheritable(arena_fd, True)
        # The server's stop signals blocked until the forker has set its own (main()).
        pid = os.posix_spawn(sys.executable, argv, os.environ, setsigmask=PARENT_SIGNALS)
    except OSError as exc:
        raise WorkerError(f"cannot start the room forker: {exc.strerror or exc}") from None
    finally:
        os.set_inheritable(arena_fd, False)
    return Worker(pid, open_pidfd(pid, "start the room forker"))
