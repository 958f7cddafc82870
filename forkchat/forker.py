"""The room forker: a small process, started by the server, that forks the rooms.

Why: a fork copies the forking process's page tables, and every page the forking
process writes afterwards stays with the worker forked just before, alone. The server
writes a few hundred KiB between two forks (the objects it touches to accept, name,
pair and log the next clients), so each of its workers kept that much of the server as
private memory. The forker does nothing but fork: between two forks it touches a
handful of objects, so its workers share nearly everything with it and with each
other. This is the idea of ``multiprocessing``'s "forkserver" and of Android's zygote.

It is a fresh interpreter (``python -I -c ...``, started by ``workers.start_forker``)
that imports only what a room needs, and that is the point: every module a process
has imported costs each child it forks. Its at-fork hooks run in every child
(``threading``'s, ``logging``'s, ``random``'s reseeding: the server has all three, through
``multiprocessing``, ``tempfile`` and setproctitle's package), its pages are written
by them (a copy-on-write fault each), and its mappings make ``fork()`` itself slower.
Forked from the server, a room started at about twice the cost; the README's
Performance section has the figures. Nothing here may import ``multiprocessing``,
``threading``, ``logging``, ``ctypes`` or ``random``, nor ``ssl`` or ``dataclasses``
(the first maps two big libraries, the second pulls in ``inspect`` and ``ast``: over
3 MiB together, which every ``fork()`` copies the page tables of), which is why the
records below are named tuples and ``conn.py`` leaves ssl to TLS connections
(``tests/test_forker.py`` checks).

The server keeps one end of a Unix stream socketpair; a message is a length and a
pickle (``handback``'s framing; both ends are this program):

- first, the set-up: :class:`RoomSetup` (the options rooms need), answered
  ``("ready", pid)``;
- then, per room, an order: :class:`RoomOrder` (room number, where its count lies, both
  clients' state as :class:`~forkchat.handback.HandBack` records), with three
  descriptors: the two clients' sockets and the worker's end of the room's channel;
  answered ``("ok", pid)`` with the worker's pidfd, or ``("error", text)``.

The counts: each room's count is a ``multiprocessing.Value`` the server made in one
shared-memory arena (``workers.Counts``). The forker maps that arena (its fd is passed
at start), and its worker writes its Value's C int through that mapping
(:class:`SharedCount`): the server reads the same int.

A new worker touches nothing (clients, count) until the server, holding its pidfd,
lets it go with one byte on the room's channel. If the answer is lost (the forker died
or stalled after its fork, or the server had no fd left for the pidfd), the server
closes its end of that channel instead, and the worker exits without a word: a failed
order never leaves a room behind, whatever the forker did.

The forker reaps its workers through their pidfds and logs an abnormal exit as the
server would. When the server closes its end (shutdown, or the server died) the forker
takes no more orders, reaps the workers it has left, and exits.

A TLS server forks its rooms itself: a TLS session's state is in the server's memory,
and a fork is the only way to hand it on. If the forker dies, the server logs it and
forks later rooms itself; as a subreaper it adopts the forker's orphans.
"""

from __future__ import annotations

import gc
import mmap
import os
import pickle
import select
import signal
import socket
from typing import Any, NamedTuple

from .children import Worker, WorkerError, describe_exit, fork_child
from .conn import IN_ROOM, Conn
from .fdmap import FdMap
from .handback import HEADER, HandBack, restore_conn, send_message
from .log import Log
from .proctitle import FORKER_NAME, prepare_titles, set_title
from .room import RoomRules, start_room

GO = b"\x01"  # the server's go-ahead to a new worker, on the room's channel
FORKER_IGNORED = (signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
ORDER_FDS = 3  # the two clients' sockets, the worker's end of the channel
COUNT_SIZE = 4  # a Value("i"): one C int


class RoomSetup(NamedTuple):
    """What every room needs from the server's options, sent once at start."""

    max_line: int
    idle_timeout: float
    requeue: bool
    color: bool


class RoomOrder(NamedTuple):
    """What the forker needs to fork a room, besides the descriptors."""

    number: int
    count_offset: int  # where its multiprocessing.Value lies in the counts' arena
    clients: tuple[HandBack, HandBack]


class SharedCount:
    """A room's client count as a worker forked here writes it: the C int of the
    server's ``multiprocessing.Value``, through this process's mapping of the same
    shared memory. ``value`` reads and writes it, as a Value's does."""

    __slots__ = ("view",)

    def __init__(self, arena: mmap.mmap, offset: int) -> None:
        self.view = memoryview(arena)[offset : offset + COUNT_SIZE].cast("i")

    @property
    def value(self) -> int:
        return self.view[0]

    @value.setter
    def value(self, clients: int) -> None:
        self.view[0] = clients


def read_message(sock: socket.socket, max_fds: int) -> tuple[Any, list[int]]:
    """Read one whole message and the descriptors that came with it (blocking); the
    descriptors are then the caller's. Raises EOFError if the other end closed first,
    or what reading or unpickling raised; no descriptor is left open then."""
    fds: list[int] = []
    try:
        head = bytearray()
        while len(head) < HEADER.size:
            data, got, _flags, _ = socket.recv_fds(sock, HEADER.size - len(head), max_fds)
            fds.extend(got)
            if not data:
                raise EOFError
            head += data
        (size,) = HEADER.unpack(head)
        body = bytearray(size)
        view = memoryview(body)
        done = 0
        while done < size:
            n = sock.recv_into(view[done:])
            if not n:
                raise EOFError
            done += n
        return pickle.loads(body), fds
    except BaseException:
        close_all(fds)
        raise


def close_all(fds: list[int]) -> None:
    """Close each of ``fds``."""
    for fd in fds:
        os.close(fd)


# -- the forker process --------------------------------------------------------------------


def main(argv: list[str]) -> int:
    """The forker's life (``argv``: its socket's fd, the counts' arena's fd): take the
    set-up, answer ready, then fork a room for each order until the server closes its
    end. Returns the exit status: 0, or 1 if the set-up failed."""
    for sig in FORKER_IGNORED:  # the terminal's, or meant for the server: not ours
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_SETMASK, ())
    gc.disable()  # the heap stays as it is; each fork freezes it anyway
    prepare_titles()
    set_title(FORKER_NAME, FORKER_NAME)
    sock = socket.socket(fileno=int(argv[0]))
    arena_fd = int(argv[1])
    try:
        setup, _ = read_message(sock, 0)
        arena = mmap.mmap(arena_fd, 0)  # all of it: the file is the arena's size
        send_message(sock, ("ready", os.getpid()), [])
    except (OSError, EOFError, ValueError, pickle.UnpicklingError):
        return 1
    finally:
        os.close(arena_fd)  # mmap keeps a descriptor of its own (rooms inherit it)
    log = Log(f"forker pid {os.getpid()}", setup.color)
    return ForkerLoop(sock, setup, arena, log).run()


class ForkerLoop:
    """Take orders, fork rooms, reap them: one epoll over the socket and the pidfds
    (epoll: a wake-up costs the same with five thousand rooms as with one)."""

    def __init__(self, sock: socket.socket, setup: RoomSetup, arena: mmap.mmap, log: Log) -> None:
        self.sock = sock
        self.setup = setup
        self.arena = arena
        self.log = log
        self.fds = FdMap()  # the forker's own, for its workers to close
        self.fds.own(sock.fileno())
        self.poller = select.epoll()
        self.fds.own(self.poller.fileno())
        self.poller.register(sock, select.EPOLLIN)
        self.workers: dict[int, tuple[Worker, int]] = {}  # pidfd -> (worker, room number)
        self.taking_orders = True

    def run(self) -> int:
        """Serve until no orders can come and every worker is reaped."""
        while self.taking_orders or self.workers:
            for fd, _events in self.poller.poll():
                if fd in self.workers:
                    self.reap(fd)
                elif self.taking_orders:
                    self.take_order()
        return 0

    def take_order(self) -> None:
        """Read one order, fork its room, answer; the server gone: take no more."""
        try:
            order, fds = read_message(self.sock, ORDER_FDS)
        except (OSError, EOFError, pickle.UnpicklingError):
            self.stop_orders()
            return
        answer, pidfd = self.fork_room(order, fds)
        close_all(fds)
        try:
            send_message(self.sock, answer, [] if pidfd is None else [pidfd])
        except OSError:
            self.stop_orders()

    def fork_room(self, order: RoomOrder, fds: list[int]) -> tuple[tuple, int | None]:
        """Fork the room's worker. Returns the answer and the worker's pidfd (None if
        the fork failed)."""
        if len(fds) != ORDER_FDS:
            return ("error", f"an order came with {len(fds)} descriptors"), None
        try:
            pid, pidfd = fork_child(become_room, (self, order, fds))
        except WorkerError as exc:
            return ("error", str(exc)), None
        self.fds.own(pidfd)  # later workers close it
        self.workers[pidfd] = (Worker(pid, pidfd), order.number)
        self.poller.register(pidfd, select.EPOLLIN)
        return ("ok", pid), pidfd

    def reap(self, pidfd: int) -> None:
        """A worker exited: reap it, log an abnormal end as the server would."""
        worker, number = self.workers.pop(pidfd)
        self.poller.unregister(pidfd)
        code = worker.join()
        if code:
            self.log.error(f"room {number} worker pid {worker.pid} {describe_exit(code)}")
        self.fds.disown(pidfd)
        worker.close()

    def stop_orders(self) -> None:
        """The server closed its end (or died): no more orders."""
        self.taking_orders = False
        self.poller.unregister(self.sock)
        self.fds.disown(self.sock.fileno())
        self.sock.close()


def become_room(forker: ForkerLoop, order: RoomOrder, fds: list[int]) -> int:
    """In the new worker: wait for the server's GO (none: exit 0, having touched
    nothing), rebuild both clients from the order, then become the room as a worker
    forked by the server itself would (``room.start_room``). The forker's objects are
    frozen out of this worker's gc, which can run again."""
    first_fd, second_fd, channel_fd = fds
    if not wait_for_go(channel_fd):
        return 0
    gc.enable()
    setup = forker.setup
    first = rebuild_conn(first_fd, order.clients[0], setup.max_line)
    second = rebuild_conn(second_fd, order.clients[1], setup.max_line)
    clients = SharedCount(forker.arena, order.count_offset)
    rules = RoomRules(setup.idle_timeout, setup.requeue, socket.socket(fileno=channel_fd))
    return start_room(order.number, first, second, clients, rules, forker.log, forker.fds)


def wait_for_go(channel_fd: int) -> bool:
    """Block until the server lets this worker go (True), or closes its end (False)."""
    try:
        return os.read(channel_fd, len(GO)) == GO
    except OSError:
        return False


def rebuild_conn(fd: int, record: HandBack, max_line: int) -> Conn:
    """A client in a room, from its socket and its record (``handback.restore_conn``)."""
    sock = socket.socket(fileno=fd)
    sock.setblocking(False)
    conn = Conn(sock, record.peer, max_line, record.id)
    restore_conn(conn, record)
    conn.state = IN_ROOM
    return conn
