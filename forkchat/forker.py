"""The room forker: a small process, forked by the server at start, that forks the rooms.

Why: a fork copies the forking process's page tables, and every page the forking
process writes afterwards stays with the worker forked just before, alone. The server
writes a few hundred KiB between two forks (the objects it touches to accept, name,
pair and log the next clients), so each of its workers kept that much of the server as
private memory, and each fork cost the server a copy-on-write fault per page it then
wrote. The forker is forked once, before the server has accepted anyone, and does
nothing but fork: between two forks it touches a handful of objects, so its workers
share nearly everything with it and with each other. This is the idea of
``multiprocessing``'s "forkserver" and of Android's zygote, kept small; the README's
Performance section has the figures.

The server keeps one end of a Unix stream socketpair; an order and its answer are one
message each way (``handback``'s framing: a length, then a pickle; both ends are this
program), and the server waits for the answer as it would wait for ``fork()`` itself:

- order: :class:`RoomOrder` (room number, where its count lies, both clients' state as
  :class:`~forkchat.handback.HandBack` records), with three descriptors: the two
  clients' sockets and the worker's end of the room's channel;
- answer: ``("ok", pid)`` with the worker's pidfd, or ``("error", text)``.

A new worker touches nothing (clients, count) until the server, holding its pidfd,
lets it go with one byte on the room's channel. If the answer is lost (the forker died
or stalled after its fork, or the server had no fd left for the pidfd), the server
closes its end of that channel instead, and the worker exits without a word: a failed
order never leaves a room behind, whatever the forker did.

The forker reaps its workers through their pidfds and logs an abnormal exit as the
server would. The server watches and signals each worker through its own pidfd
(``workers.Worker``). When the server closes its end (shutdown, or the server died)
the forker takes no more orders, reaps the workers it has left, and exits.

A TLS server forks its rooms itself: a TLS session's state is in the server's memory,
and a fork is the only way to hand it on. If the forker dies, the server logs it and
forks later rooms itself; as a subreaper it adopts the forker's orphans.
"""

from __future__ import annotations

import gc
import os
import pickle
import select
import signal
import socket
from dataclasses import dataclass
from typing import Any

from .conn import IN_ROOM, Conn
from .fdmap import FdMap
from .handback import HEADER, HandBack, restore_conn, send_message, snapshot
from .log import Log
from .proctitle import FORKER_NAME, set_title
from .room import PARENT_SIGNALS
from .workers import Worker, WorkerError, count_at, describe_exit, fork_child

ANSWER_TIMEOUT = 5.0  # seconds the server waits for an answer before giving up on it
KILL_WAIT = 5.0  # seconds to wait for a SIGKILLed forker to exit
GO = b"\x01"  # the server's go-ahead to a new worker, on the room's channel
FORKER_IGNORED = (signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
ORDER_FDS = 3  # the two clients' sockets, the worker's end of the channel


class ForkerGone(Exception):
    """The forker cannot take orders any more (it exited, or stopped answering)."""


@dataclass
class RoomOrder:
    """What the forker needs to fork a room, besides the descriptors."""

    number: int
    count_address: int  # its multiprocessing.Value, in memory the forker has mapped
    clients: tuple[HandBack, HandBack]


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
        self, number: int, count_address: int, first: Conn, second: Conn, channel: socket.socket
    ) -> Worker:
        """Have the forker fork room ``number`` for the pair, with ``channel`` (the
        worker's end) and its count at ``count_address`` (``workers.Counts``). The
        server keeps its own copies of the sockets, to close once the room is under
        way; the worker waits for :data:`GO` on the channel. Raises WorkerError if no
        worker can be watched (the forker goes on), ForkerGone if the forker is no use
        any more."""
        records = (snapshot(first, first.avoid or 0), snapshot(second, second.avoid or 0))
        try:
            send_message(
                self.sock,
                RoomOrder(number, count_address, records),
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


def start_forker(server: Any) -> Forker:
    """Fork the room forker from ``server`` (before it has accepted anyone). Raises
    WorkerError. The server's end of the socketpair is marked in ``server.fds``."""
    try:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    except OSError as exc:
        raise WorkerError(f"cannot make the forker's socket: {exc.strerror or exc}") from None
    server.fds.own(ours.fileno())
    try:
        pid, sentinel = fork_child(run_forker, (server, theirs))
    except WorkerError:
        server.fds.disown(ours.fileno())
        ours.close()
        raise
    finally:
        theirs.close()
    server.fds.own(sentinel)
    ours.settimeout(ANSWER_TIMEOUT)
    return Forker(Worker(pid, sentinel), ours)


def run_forker(server: Any, sock: socket.socket) -> int:
    """The forker's life: shed the server's descriptors and signal handlers, then
    fork a room for each order until the server closes its end. Returns 0."""
    signal.set_wakeup_fd(-1)
    for sig in FORKER_IGNORED:  # the terminal's, or meant for the server: not ours
        signal.signal(sig, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, PARENT_SIGNALS)  # blocked around its fork
    gc.disable()  # its heap stays as the server left it: each fork freezes it anyway
    server.fds.close_all(keep=(sock.fileno(),))
    server.fds = FdMap()  # the forker's own, for its workers to close
    server.fds.own(sock.fileno())
    set_title(FORKER_NAME, FORKER_NAME)
    server.log = Log(f"forker pid {os.getpid()}", server.log.color, server.log.stream)
    return ForkerLoop(server, sock).run()


class ForkerLoop:
    """Take orders, fork rooms, reap them: one epoll over the socket and the pidfds
    (epoll: a wake-up costs the same with five thousand rooms as with one)."""

    def __init__(self, server: Any, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.poller = select.epoll()
        server.fds.own(self.poller.fileno())  # its workers close it
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
            pid, pidfd = fork_child(become_room, (self.server, order, fds))
        except WorkerError as exc:
            return ("error", str(exc)), None
        self.server.fds.own(pidfd)  # later workers close it
        self.workers[pidfd] = (Worker(pid, pidfd), order.number)
        self.poller.register(pidfd, select.EPOLLIN)
        return ("ok", pid), pidfd

    def reap(self, pidfd: int) -> None:
        """A worker exited: reap it, log an abnormal end as the server would."""
        worker, number = self.workers.pop(pidfd)
        self.poller.unregister(pidfd)
        code = worker.join()
        if code:
            self.server.log.error(f"room {number} worker pid {worker.pid} {describe_exit(code)}")
        self.server.fds.disown(pidfd)
        worker.close()

    def stop_orders(self) -> None:
        """The server closed its end (or died): no more orders."""
        self.taking_orders = False
        self.poller.unregister(self.sock)
        self.server.fds.disown(self.sock.fileno())
        self.sock.close()


def become_room(server: Any, order: RoomOrder, fds: list[int]) -> int:
    """In the new worker: wait for the server's GO (none: exit 0, having touched
    nothing), rebuild both clients from the order, then become the room as a worker
    forked by the server itself would (``server.become_room``). The forker's objects
    are frozen out of this worker's gc, which can run again."""
    first_fd, second_fd, channel_fd = fds
    if not wait_for_go(channel_fd):
        return 0
    gc.enable()
    max_line = server.opts.max_line
    first = rebuild_conn(first_fd, order.clients[0], max_line)
    second = rebuild_conn(second_fd, order.clients[1], max_line)
    channel = socket.socket(fileno=channel_fd)
    clients = count_at(order.count_address)
    return server.become_room(order.number, first, second, clients, channel)


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
