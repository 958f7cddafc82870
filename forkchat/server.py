"""The forkchat parent process: accept, names, waiting queue, pairing, reaping, signals.

:class:`Server` owns one selector over the listening socket, every client not yet in a
room, the signal wakeup socket and every room worker's sentinel. For each complete pair
it forks a room worker (``room.py``) with the fork context pinned below. The command
line that builds its :class:`Options` is in ``cli.py``.
"""

from __future__ import annotations

import gc
import multiprocessing
import multiprocessing.sharedctypes  # imported now: lazily, at the first room, fds may be short
import os
import selectors
import signal
import socket
import stat
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from . import protocol as p
from .conn import (
    CLOSING,
    GONE,
    HANDSHAKE,
    IN_ROOM,
    WAITING,
    Conn,
    format_peer,
    is_fd_exhaustion,
    tune_socket,
)
from .fdmap import FdMap
from .log import Log
from .proctitle import ROOM_NAME, is_server_pid, room_title, set_title
from .room import LINGER, PARENT_SIGNALS, reset_inherited_signals, run_room

# The start method is pinned once, here: rooms are forked (Python 3.14 changes the default).
MP = multiprocessing.get_context("fork")

EXIT_OK = 0
BACKLOG = 4096
ACCEPT_BATCH = 256  # accepts per wake-up, so a connect storm cannot starve the rest
ACCEPT_PAUSE = 0.5  # seconds without accepting after running out of file descriptors
STOP_GRACE = 5.0  # seconds rooms get to say BYE at shutdown before they are killed
BACKLOG_GRACE = 1.0  # seconds to accept and tell the kernel's queue at shutdown


class StartupError(Exception):
    """The server cannot start (address, pidfile): reported in one line, exit status 1."""


@dataclass(frozen=True)
class Options:
    """The server's settings, checked."""

    host: str = "127.0.0.1"
    port: int = 33016
    max_rooms: int = 200
    max_waiting: int = 1000
    max_line: int = p.DEFAULT_MAX_LINE
    name_timeout: float = 30.0
    idle_timeout: float = 1800.0
    pidfile: str | None = None
    no_color: bool = False


@dataclass
class RoomProc:
    """What the parent keeps of a room: its worker and that worker's client count."""

    number: int
    proc: Any  # multiprocessing.Process
    clients: Any  # multiprocessing.Value("i"): 2 at the fork, then the worker's to write


def make_listener(host: str, port: int) -> socket.socket:
    """Bind and listen (SO_REUSEADDR, large backlog, non-blocking). Raises OSError."""
    family, kind, proto, _, addr = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class Server:
    """The parent process: accept, names, waiting queue, pairing, reaping, signals.

    One selector waits on the listener, the clients not yet in a room, the signal
    wakeup socket and every room worker's sentinel. Nothing in it blocks on one client.
    """

    def __init__(self, opts: Options, log: Log) -> None:
        self.opts = opts
        self.log = log
        self.sel = selectors.DefaultSelector()
        self.listener: socket.socket | None = None
        self.address = ""
        # fd -> Conn; dicts keep insertion order, which is arrival order and deadline order.
        self.handshaking: dict[int, Conn] = {}
        self.waiting: dict[int, Conn] = {}
        self.closing: dict[int, Conn] = {}
        self.rooms: dict[int, RoomProc] = {}  # sentinel fd -> room
        self.room_count = 0
        self.stopping = False
        self.stop_deadline = 0.0
        self.accept_resume = 0.0
        self.wake_r, self.wake_w = socket.socketpair()
        self.fds = FdMap()  # every fd the parent owns, for new workers to close
        for fd in (self.sel.fileno(), self.wake_r.fileno(), self.wake_w.fileno()):
            self.fds.own(fd)

    # -- start and stop ------------------------------------------------------------------

    def start(self) -> None:
        """Bind, write the pidfile, install the signal plumbing, then announce the listen
        line: once it is printed, everything is ready. Raises StartupError on failure."""
        try:
            self.listener = make_listener(self.opts.host, self.opts.port)
        except OSError as exc:
            where = f"{self.opts.host}:{self.opts.port}"
            raise StartupError(f"cannot listen on {where}: {exc.strerror or exc}") from None
        self.fds.own(self.listener.fileno())
        host, port = self.listener.getsockname()[:2]
        self.address = format_peer((host, port))
        if self.opts.pidfile:
            write_pidfile(self.opts.pidfile)
        self.sel.register(self.listener, selectors.EVENT_READ, self.accept_clients)
        self.install_signals()
        self.log.plain(f"forkchat server listening on {self.address} pid {os.getpid()}")

    def install_signals(self) -> None:
        """Handlers only wake the loop: the C handler writes the signal number to wake_w.

        A SIGHUP that was ignored when we started (``nohup``) stays ignored.
        """
        for sock in (self.wake_r, self.wake_w):
            sock.setblocking(False)
        signal.set_wakeup_fd(self.wake_w.fileno(), warn_on_full_buffer=False)
        for sig in PARENT_SIGNALS:
            if sig == signal.SIGHUP and signal.getsignal(sig) == signal.SIG_IGN:
                continue
            signal.signal(sig, lambda *_: None)
        self.sel.register(self.wake_r, selectors.EVENT_READ, self.read_signals)

    def serve_forever(self) -> int:
        """Run the loop until a shutdown completes. Returns the exit status."""
        live = self.sel.get_map()
        while not (self.stopping and not self.rooms and not self.closing):
            for key, mask in self.sel.select(self.next_timeout()):
                # An earlier handler in this batch may have closed this fd, or closed it
                # and reused the number: act only on keys that are still registered.
                if live.get(key.fd) is key:
                    key.data(key, mask)
            self.expire_timers()
            if self.stopping and time.monotonic() >= self.stop_deadline:
                self.kill_stragglers()
        self.log.plain("SERVER WILL DISCONNECT")
        return EXIT_OK

    def close(self) -> None:
        """Release the parent's resources (after the loop, or on a start-up error).

        The stop signals are blocked first: the interpreter restores their default
        action on its way out, and a second SIGTERM then would make a clean shutdown
        end with status -15.
        """
        signal.pthread_sigmask(signal.SIG_BLOCK, PARENT_SIGNALS)
        signal.set_wakeup_fd(-1)
        if self.listener is not None:
            self.listener.close()
        self.wake_r.close()
        self.wake_w.close()
        self.sel.close()

    # -- timers -----------------------------------------------------------------------------

    def next_timeout(self) -> float | None:
        """Seconds until the earliest deadline (name timeout, linger, pause, shutdown)."""
        deadlines = [
            conns[next(iter(conns))].deadline for conns in (self.handshaking, self.closing) if conns
        ]
        if self.accept_resume:
            deadlines.append(self.accept_resume)
        if self.stopping:
            deadlines.append(self.stop_deadline)
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - time.monotonic())

    def expire_timers(self) -> None:
        """Act on every deadline that has passed; each dict is in deadline order."""
        now = time.monotonic()
        while self.handshaking and (conn := next(iter(self.handshaking.values()))).deadline <= now:
            text = f"no name within {self.opts.name_timeout:g} s"
            self.say_bye(conn, p.BYE_TIMEOUT, text, why=f"timeout: {text}")
        while self.closing and (conn := next(iter(self.closing.values()))).deadline <= now:
            self.drop(conn)
        if self.accept_resume and now >= self.accept_resume:
            self.resume_accepting()

    # -- accepting ------------------------------------------------------------------------

    def accept_clients(self, key: Any = None, mask: int = 0) -> None:
        """Accept the connections waiting in the backlog (a batch at most)."""
        for _ in range(ACCEPT_BATCH):
            try:
                sock, addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if is_fd_exhaustion(exc):
                    self.pause_accepting(exc)
                    return
                continue  # ECONNABORTED and the like: that client is gone already
            self.add_client(sock, addr)

    def add_client(self, sock: socket.socket, addr: tuple) -> None:
        """Greet a new connection and give it ``--name-timeout`` seconds to send a name."""
        try:
            tune_socket(sock)
        except OSError:
            sock.close()
            return
        conn = Conn(sock, format_peer(addr), self.opts.max_line)
        self.fds.own(conn.fd)
        self.log.event("connect", f"client connected {conn.peer}")
        conn.queue(p.hello_line())
        if len(self.handshaking) >= self.opts.max_waiting:
            self.register(conn)
            text = "too many connections, try again later"
            self.say_bye(conn, p.BYE_FULL, text, why=f"full: {len(self.handshaking)} handshaking")
            return
        conn.deadline = time.monotonic() + self.opts.name_timeout
        self.handshaking[conn.fd] = conn
        self.register(conn)

    def turn_away_backlog(self) -> None:
        """At shutdown: accept the connections still in the kernel's queue and tell
        them ``BYE shutdown`` rather than let the close reset them (bounded in time)."""
        deadline = time.monotonic() + BACKLOG_GRACE
        while time.monotonic() < deadline:
            try:
                sock, addr = self.listener.accept()
            except OSError:
                return  # empty (EAGAIN), or out of fds: the rest get the reset
            try:
                tune_socket(sock)
            except OSError:
                sock.close()
                continue
            conn = Conn(sock, format_peer(addr), self.opts.max_line)
            self.fds.own(conn.fd)
            self.log.event("connect", f"client connected {conn.peer}")
            self.register(conn)
            self.say_bye(conn, p.BYE_SHUTDOWN, p.SHUTDOWN_TEXT)

    def pause_accepting(self, exc: OSError) -> None:
        """Out of fds: stop accepting for a moment instead of spinning on the listener."""
        if not self.accept_resume:
            self.log.error(
                f"accept failed ({exc.strerror}); pausing accepts for {ACCEPT_PAUSE:g} s"
            )
            self.sel.unregister(self.listener)
        self.accept_resume = time.monotonic() + ACCEPT_PAUSE

    def resume_accepting(self) -> None:
        self.accept_resume = 0.0
        if not self.stopping:
            self.sel.register(self.listener, selectors.EVENT_READ, self.accept_clients)

    # -- client I/O --------------------------------------------------------------------------

    def register(self, conn: Conn) -> None:
        conn.events = selectors.EVENT_READ | selectors.EVENT_WRITE
        self.sel.register(conn.fd, conn.events, self.on_client)

    def watch(self, conn: Conn, events: int) -> None:
        """Change what the selector watches on ``conn``, only if it changed."""
        if events != conn.events:
            conn.events = events
            self.sel.modify(conn.fd, events, self.on_client)

    def on_client(self, key: Any, mask: int) -> None:
        """One client socket is ready: read and handle what arrived, write what is due."""
        conn = self.find(key.fd)
        if conn is None:
            return
        if conn.state == CLOSING:
            self.close_client(conn, mask)
        elif not mask & selectors.EVENT_READ or self.read_client(conn):
            self.write_client(conn)

    def find(self, fd: int) -> Conn | None:
        return self.handshaking.get(fd) or self.waiting.get(fd) or self.closing.get(fd)

    def read_client(self, conn: Conn) -> bool:
        """Read and handle input. False if the connection left the parent's hands.

        A FIN only means the client sends no more: the lines before it are handled in
        order (a name, then ``exit``, may pair it first), and what is queued for it is
        still delivered before the close. A reset loses it at once.
        """
        alive = conn.receive()
        if not alive and not conn.eof:
            self.drop(conn, "connection reset")
            return False
        self.handle_inbox(conn)
        if not alive and conn.state in (HANDSHAKE, WAITING):
            self.end_input(conn)
        return alive and conn.state in (HANDSHAKE, WAITING)

    def end_input(self, conn: Conn) -> None:
        """A client in the parent closed its side with nothing left to handle: deliver
        what is queued for it, then close (it will never name itself or write)."""
        where = "before naming" if conn.state == HANDSHAKE else "while waiting"
        self.close_gracefully(conn, f"closed {where}")

    def write_client(self, conn: Conn) -> None:
        """Send pending output; watch for writability only while some is left."""
        try:
            done = conn.flush()
        except OSError:
            self.drop(conn, "connection reset")
            return
        self.watch(conn, selectors.EVENT_READ | (0 if done else selectors.EVENT_WRITE))

    def close_client(self, conn: Conn, mask: int) -> None:
        """A step of a client's graceful close (``Conn.close_step``); drop it when done."""
        if conn.close_step(mask):
            self.drop(conn)
        else:
            self.watch(conn, conn.closing_events())

    def send(self, conn: Conn, data: bytes) -> None:
        """Send to a client in the parent now, queueing what the socket does not take;
        a client whose unsent output passes the bound is dropped."""
        if not conn.queue(data):
            self.drop(conn, f"dropped: more than {conn.out_limit} bytes unread")
            return
        self.write_client(conn)

    def handle_inbox(self, conn: Conn) -> None:
        """Handle complete lines while the client is the parent's; the rest goes to its room."""
        while conn.inbox and conn.state in (HANDSHAKE, WAITING):
            line = conn.inbox.popleft()
            if conn.state == HANDSHAKE:
                self.take_name(conn, line)
            else:
                self.take_waiting_line(conn, line)

    def take_name(self, conn: Conn, line: bytes | p.TooLong) -> None:
        """The first non-blank line: the name, or ``exit``."""
        if isinstance(line, bytes) and p.is_blank(line):
            return
        if isinstance(line, bytes) and p.is_exit(line):
            self.say_bye(conn, p.BYE_EXIT, "goodbye")
            return
        name = p.parse_name(line) if isinstance(line, bytes) else None
        if name is None:
            self.say_bye(conn, p.BYE_BAD_NAME, f"a name is {p.NAME_RULE}")
            return
        if len(self.waiting) >= self.opts.max_waiting and not self.pairs_at_once():
            why = f"full: {len(self.waiting)} waiting, name {name}"
            self.say_bye(conn, p.BYE_FULL, "too many clients waiting, try again later", why)
            return
        del self.handshaking[conn.fd]
        conn.name, conn.state = name, WAITING
        self.waiting[conn.fd] = conn
        self.log.event("name", f"client named {conn.label}")
        self.open_rooms()
        if conn.state == WAITING:
            self.tell_waiting(conn)

    def pairs_at_once(self) -> bool:
        """Would a newly named client go straight into a room? (Then it never waits.)"""
        return bool(self.waiting) and len(self.rooms) < self.opts.max_rooms and not self.stopping

    def tell_waiting(self, conn: Conn) -> None:
        """WAIT for a newly named client; when it completes a pair that has no free room,
        its partner-to-be hears that too."""
        if len(self.waiting) % 2 == 0 and len(self.rooms) >= self.opts.max_rooms:
            text = f"all {self.opts.max_rooms} rooms are busy, you are in line"
            newest = reversed(self.waiting.values())
            next(newest)  # conn itself
            self.send(next(newest), p.wait_line(text))
        else:
            text = "waiting for a partner"
        self.log.event("name", f"{conn.label} waiting ({text})")
        self.send(conn, p.wait_line(text))

    def take_waiting_line(self, conn: Conn, line: bytes | p.TooLong) -> None:
        """A line from a waiting client: ``exit`` leaves; a message is not its turn."""
        verdict = p.judge_line(line, my_turn=False)
        if verdict == p.LEAVE:
            self.say_bye(conn, p.BYE_EXIT, "goodbye")
        elif verdict != p.IGNORE:
            self.send(conn, p.err_line(verdict, self.opts.max_line))

    def say_bye(self, conn: Conn, reason: str, text: str, why: str = "") -> None:
        """Log the departure, send the last line and move the client to closing (FIN,
        then wait for its close). ``why`` is for the log; the BYE reason by default."""
        self.close_gracefully(conn, why or reason, p.bye_line(reason, text))

    def close_gracefully(self, conn: Conn, why: str, last: bytes = b"") -> None:
        """Log the departure and move the client to closing: what is queued, then
        ``last``, is delivered, then FIN, then the wait for its close (bounded)."""
        self.log.departure(conn.label, why)
        self.forget(conn)
        conn.state = CLOSING
        conn.inbox.clear()
        conn.out += last
        conn.deadline = time.monotonic() + LINGER
        self.closing[conn.fd] = conn
        self.close_client(conn, 0)

    def forget(self, conn: Conn) -> None:
        """Remove the client from the handshake, waiting and closing tables."""
        for table in (self.handshaking, self.waiting, self.closing):
            table.pop(conn.fd, None)

    def drop(self, conn: Conn, why: str = "") -> None:
        """Close a client now, wherever it is in the parent; log why if it was still in
        play (a closing client's departure is logged already)."""
        if why and conn.state != CLOSING:
            self.log.departure(conn.label, why)
        self.forget(conn)
        self.sel.unregister(conn.fd)
        conn.state = GONE
        self.fds.disown(conn.fd)
        conn.close()

    # -- rooms ---------------------------------------------------------------------------

    def open_rooms(self) -> None:
        """Pair waiting clients in arrival order while there is a free room."""
        while (
            len(self.waiting) >= 2 and len(self.rooms) < self.opts.max_rooms and not self.stopping
        ):
            fds = iter(self.waiting)
            first, second = self.waiting[next(fds)], self.waiting[next(fds)]
            # A client that closed (the loop has not read it yet) with no line left to
            # handle has nothing to do in a room; with lines left (``exit``) it goes in.
            dead = [conn for conn in (first, second) if not conn.inbox and conn.peer_closed()]
            for conn in dead:
                self.end_input(conn)
            if not dead:
                self.open_room(first, second)

    def open_room(self, first: Conn, second: Conn) -> None:
        """Fork a worker for the pair; the parent then closes its copies of both sockets.
        The worker logs "room N opened" itself, so that line comes before its others."""
        number = self.room_count + 1
        for conn in (first, second):
            self.forget(conn)
            self.sel.unregister(conn.fd)
            conn.state = IN_ROOM
        started = self.start_worker(number, first, second)
        if started is None:
            self.refuse_pair(first, second)
            return
        proc, clients = started
        self.room_count = number
        for conn in (first, second):
            self.fds.disown(conn.fd)
            conn.close()
        for fd in parent_pipe_fds(proc):
            self.fds.own(fd)
        self.rooms[proc.sentinel] = RoomProc(number, proc, clients)
        self.sel.register(proc.sentinel, selectors.EVENT_READ, self.on_sentinel)

    def start_worker(self, number: int, first: Conn, second: Conn) -> tuple[Any, Any] | None:
        """Fork the room worker and its shared client count. None if it cannot be done
        now (out of fds, processes or memory); nothing is left half made.

        Signals are blocked around the fork so none lands in a half-made worker, and the
        heap is frozen so the child's gc never touches (and copies) the parent's objects.
        """
        old = signal.pthread_sigmask(signal.SIG_BLOCK, PARENT_SIGNALS)
        free = self.lowest_free_fds(6)  # where a failed start would leave its pipes
        gc.freeze()
        try:
            clients = MP.Value("i", 2, lock=False)
            proc = MP.Process(
                target=self.become_room,
                args=(number, first, second, clients),
                name=f"forkchat-room-{number}",
                daemon=True,
            )
            proc.start()
            forget_child(proc)
        except OSError as exc:
            self.log.error(f"cannot fork a room worker: {exc.strerror or exc}")
            close_stray_pipes(free)
            return None
        finally:
            gc.unfreeze()
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        return proc, clients

    def lowest_free_fds(self, count: int) -> list[int]:
        """The ``count`` lowest fd numbers not in use (fewer if fds run out): the numbers
        the next pipes will get. Probed with dup, a few syscalls."""
        probes: list[int] = []
        try:
            for _ in range(count):
                probes.append(os.dup(self.wake_r.fileno()))
        except OSError:
            pass
        for fd in probes:
            os.close(fd)
        return probes

    def refuse_pair(self, first: Conn, second: Conn) -> None:
        """The fork failed: tell both, the server goes on."""
        for conn in (first, second):
            self.register(conn)
            self.say_bye(conn, p.BYE_ERROR, "could not open a room, try again later")

    def become_room(self, number: int, first: Conn, second: Conn, clients: Any) -> None:
        """Child side of the fork: drop everything of the parent's but the pair, then relay.

        Runs in the new process; its return value becomes the exit status via SystemExit.
        """
        reset_inherited_signals()
        self.close_inherited(keep=(first, second))
        set_title(room_title(number, first.name, second.name), ROOM_NAME)
        log = Log(f"room {number} pid {os.getpid()}", self.log.color, self.log.stream)
        sys.exit(run_room(number, first, second, clients, self.opts.idle_timeout, log))

    def close_inherited(self, keep: tuple[Conn, Conn]) -> None:
        """In a new worker: close every fd the parent owns but the pair's two sockets
        (listener, wakeup pair, selector, other clients, sibling rooms' pipes), by number,
        without touching the objects that hold them (see ``fdmap``)."""
        self.fds.close_all(keep=(keep[0].fd, keep[1].fd))

    def on_sentinel(self, key: Any, mask: int) -> None:
        self.reap_room(key.fd)

    def reap_room(self, sentinel: int, timeout: float | None = None) -> None:
        """A worker has exited (its sentinel fired, or it was SIGKILLed): join it, log an
        abnormal exit, free its room, and open the next ones from the queue."""
        room = self.rooms.pop(sentinel)
        self.sel.unregister(sentinel)
        room.proc.join(timeout)
        if room.proc.exitcode is None:  # stuck in the kernel even after SIGKILL
            self.log.error(f"room {room.number} pid {room.proc.pid} did not exit; leaving it")
            return
        code = room.proc.exitcode
        if code:
            self.log.error(f"room {room.number} worker pid {room.proc.pid} {describe_exit(code)}")
        room.clients.value = 0
        for fd in parent_pipe_fds(room.proc):
            self.fds.disown(fd)
        room.proc.close()
        self.open_rooms()

    def kill_stragglers(self) -> None:
        """Shutdown deadline passed: SIGKILL every room still there, reap them against
        one short deadline, close the clients still lingering."""
        stragglers = list(self.rooms.items())
        for _, room in stragglers:
            self.log.error(f"room {room.number} pid {room.proc.pid} did not stop; killing it")
            room.proc.kill()
        deadline = time.monotonic() + STOP_GRACE
        for sentinel, _ in stragglers:
            self.reap_room(sentinel, timeout=max(0.0, deadline - time.monotonic()))
        for conn in list(self.closing.values()):
            self.drop(conn)

    # -- signals ----------------------------------------------------------------------------

    def read_signals(self, key: Any = None, mask: int = 0) -> None:
        """Dispatch every signal number the wakeup fd received, in order."""
        try:
            data = self.wake_r.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        for signum in data:
            name = signal.Signals(signum).name
            getattr(self, "handle_" + name[3:].lower())()

    def handle_usr2(self) -> None:
        """SIGUSR2: the number of connected clients, then, on the next line (one write),
        the rooms, waiting and handshaking counts (see :func:`format_report`)."""
        self.log.plain(format_report(self.rooms.values(), len(self.waiting), len(self.handshaking)))

    def handle_usr1(self) -> None:
        self.begin_shutdown("SIGUSR1")

    def handle_term(self) -> None:
        self.begin_shutdown("SIGTERM")

    def handle_int(self) -> None:
        self.begin_shutdown("SIGINT")

    def handle_hup(self) -> None:
        """The terminal went away: shut down cleanly rather than die with the rooms."""
        self.begin_shutdown("SIGHUP")

    def begin_shutdown(self, why: str) -> None:
        """Stop accepting, say BYE to every client the parent holds, stop every room."""
        if self.stopping:
            self.log.event("info", f"{why} during shutdown: already stopping")
            return
        self.stopping = True
        self.stop_deadline = time.monotonic() + STOP_GRACE
        self.log.event("close", f"{why}: shutting down")
        if not self.accept_resume:
            self.sel.unregister(self.listener)
        self.accept_resume = 0.0
        self.turn_away_backlog()
        self.fds.disown(self.listener.fileno())
        self.listener.close()
        for conn in [*self.handshaking.values(), *self.waiting.values()]:
            self.say_bye(conn, p.BYE_SHUTDOWN, p.SHUTDOWN_TEXT)
        for room in self.rooms.values():
            # exitcode polls: a worker already reaped is never signalled (its PID may
            # belong to someone else by now); its sentinel still ends it in the loop.
            if room.proc.exitcode is None:
                os.kill(room.proc.pid, signal.SIGUSR1)


def format_report(rooms: Any, waiting: int, handshaking: int) -> str:
    """The SIGUSR2 report: ``NUMBER OF CLIENTS : ** N **`` and the counts line.

    ``rooms`` are the RoomProcs not yet reaped. A worker that has exited (exitcode set,
    reaped or not) counts neither as a room nor for its clients: it holds none.
    """
    live = [room for room in rooms if room.proc.exitcode is None]
    clients = handshaking + waiting + sum(max(0, room.clients.value) for room in live)
    return (
        f"NUMBER OF CLIENTS : ** {clients} **\n"
        f"rooms {len(live)}, waiting {waiting}, handshaking {handshaking}"
    )


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


def write_pidfile(path: str) -> None:
    """Write our PID atomically. Raises StartupError if the file names a running
    forkchat server, or cannot be written.

    A stale file (after a SIGKILL or an OOM kill) naming some other live process does
    not stop a restart. The temporary file is made by ``mkstemp`` (unpredictable name,
    ``O_EXCL``), so a symlink planted next to the pidfile cannot redirect the write.
    """
    try:
        with open(path) as f:
            other = int(f.read().strip() or 0)
    except (OSError, ValueError):
        other = 0
    if other and other != os.getpid() and is_server_pid(other):
        raise StartupError(f"pidfile {path} names running forkchat server {other}")
    folder, base = os.path.split(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{base}.", dir=folder)
    except OSError as exc:
        raise StartupError(f"cannot write pidfile {path}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), 0o644)
            f.write(f"{os.getpid()}\n")
        os.replace(tmp, path)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise StartupError(f"cannot write pidfile {path}: {exc.strerror or exc}") from None


def remove_pidfile(path: str) -> None:
    """Remove the pidfile if it still names us."""
    try:
        with open(path) as f:
            if int(f.read().strip()) == os.getpid():
                os.unlink(path)
    except (OSError, ValueError):
        pass
