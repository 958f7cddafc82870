"""The forkchat parent process: accept, names, waiting queue, pairing, reaping, signals.

:class:`Server` owns one selector over the listening socket, every client not yet in a
room, the signal wakeup socket, every room worker's sentinel and every room's channel.
Connections come in through its front door (``frontdoor.py``: accept, the PROXY/TLS
preamble, ``HELLO``); this module names them, keeps the waiting queue's I/O, handles
the signals and the shutdown. For each pair the queue gives (``waitlist.py``) it has a
room worker forked (by the room forker, ``forker.py``, or itself: ``keeper.py``,
``workers.py``; ``room.py`` relays) and takes back the clients rooms hand back. The
command line that builds its :class:`Options` is in ``cli.py``.
"""

from __future__ import annotations

import os
import selectors
import signal
import socket
import ssl
import time
from dataclasses import dataclass
from typing import Any

from . import protocol as p
from .activation import ActivationError, listen_socket_from_env
from .conn import (
    CLOSING,
    GONE,
    HANDSHAKE,
    WAITING,
    Conn,
    format_peer,
)
from .fdmap import FdMap
from .frontdoor import FrontDoor
from .keeper import STOP_GRACE, RoomKeeper
from .log import Log
from .pidfile import PidfileError, write_pidfile
from .preamble import Preamble
from .room import LINGER, PARENT_SIGNALS
from .tlsconf import TlsError, server_context
from .waitlist import WaitList, may_pair
from .workers import Counts, Forker, RoomProc, format_report

EXIT_OK = 0
BACKLOG = 4096


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
    requeue: bool = False
    tls_cert: str | None = None
    tls_key: str | None = None
    proxy_protocol: bool = False


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


class Server(FrontDoor, RoomKeeper):
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
        self.closing: dict[int, Conn] = {}
        self.waiting: WaitList[Conn] = WaitList()  # queue order and pairing policy
        self.by_fd: dict[int, Conn] = {}  # every client the parent holds, by socket
        self.rooms: dict[int, RoomProc] = {}  # sentinel fd -> room
        self.channels: dict[int, RoomProc] = {}  # channel fd -> room
        self.preambles: dict[int, Preamble] = {}  # fd -> PROXY/TLS steps not yet done
        self.tls: ssl.SSLContext | None = None
        self.forker: Forker | None = None  # forks the rooms (forker.py), if there is one
        self.counts = Counts(opts.max_rooms)  # reserved before the forker: see workers.py
        self.preamble = opts.proxy_protocol or bool(opts.tls_cert)  # steps before HELLO
        self.room_count = 0
        self.client_count = 0  # ids handed out
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
        if self.opts.tls_cert:
            try:
                self.tls = server_context(self.opts.tls_cert, self.opts.tls_key or "")
            except TlsError as exc:
                raise StartupError(str(exc)) from None
        self.listener = self.open_listener()
        self.fds.own(self.listener.fileno())
        host, port = self.listener.getsockname()[:2]
        self.address = format_peer((host, port))
        if self.opts.pidfile:
            try:
                write_pidfile(self.opts.pidfile)
            except PidfileError as exc:
                raise StartupError(str(exc)) from None
        no_forker = self.start_forker()
        self.sel.register(self.listener, selectors.EVENT_READ, self.accept_clients)
        self.install_signals()
        self.log.plain(f"forkchat server listening on {self.address} pid {os.getpid()}")
        if no_forker:
            self.log.error(no_forker)

    def open_listener(self) -> socket.socket:
        """The socket systemd passed on fd 3 (socket activation), or our own, bound to
        ``--host``/``--port``. Raises StartupError."""
        try:
            passed = listen_socket_from_env()
        except ActivationError as exc:
            raise StartupError(f"socket activation: {exc}") from None
        if passed is not None:
            return passed
        try:
            return make_listener(self.opts.host, self.opts.port)
        except OSError as exc:
            where = f"{self.opts.host}:{self.opts.port}"
            raise StartupError(f"cannot listen on {where}: {exc.strerror or exc}") from None

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
        self.stop_forker()  # its last log lines come before the last line
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
        self.stop_forker()
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
            preamble = self.preambles.pop(conn.fd, None)
            if preamble is not None:  # no protocol spoken yet: nothing to say BYE in
                what = "PROXY header" if preamble.reader is not None else "TLS handshake"
                self.drop(conn, f"timeout: no {what} within {self.opts.name_timeout:g} s")
                continue
            text = f"no name within {self.opts.name_timeout:g} s"
            self.say_bye(conn, p.BYE_TIMEOUT, text, why=f"timeout: {text}")
        while self.closing and (conn := next(iter(self.closing.values()))).deadline <= now:
            self.drop(conn)
        if self.accept_resume and now >= self.accept_resume:
            self.resume_accepting()

    # -- client I/O --------------------------------------------------------------------------

    def register(self, conn: Conn) -> None:
        conn.events = selectors.EVENT_READ | selectors.EVENT_WRITE
        self.sel.register(conn.fd, conn.events, self.on_client)
        self.by_fd[conn.fd] = conn

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
        elif conn.fd in self.preambles:
            self.step_preamble(conn)
        elif not mask & selectors.EVENT_READ or self.read_client(conn):
            self.write_client(conn)

    def find(self, fd: int) -> Conn | None:
        return self.by_fd.get(fd)

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
        conn.name = name
        if self.queue_full(conn):
            why = f"full: {len(self.waiting)} waiting, name {name}"
            self.say_bye(conn, p.BYE_FULL, "too many clients waiting, try again later", why)
            return
        del self.handshaking[conn.fd]
        self.log.event("name", f"client named {conn.label}")
        self.enqueue(conn)
        if conn.state == WAITING:
            self.tell_waiting(conn, "waiting for a partner")

    def queue_full(self, conn: Conn) -> bool:
        """No room in the queue for ``conn``: ``--max-waiting`` wait already and it
        would not go straight into a room."""
        if len(self.waiting) < self.opts.max_waiting:
            return False
        rooms_free = len(self.rooms) < self.opts.max_rooms and not self.stopping
        return not rooms_free or all(not may_pair(conn, other) for other in self.waiting)

    def enqueue(self, conn: Conn) -> None:
        """Queue ``conn`` at the end and open the rooms that can be opened now."""
        conn.state = WAITING
        self.waiting.add(conn)
        self.open_rooms()

    def tell_waiting(self, conn: Conn, text: str, told: bool = False) -> None:
        """WAIT ``text`` for a client left in the queue (unless ``told``: its WAIT is
        queued already); when it completes a pair that has no free room, it and its
        partner-to-be hear that too."""
        busy = ""
        if len(self.rooms) >= self.opts.max_rooms:
            partner = self.waiting.partner_in_line(conn)
            if partner is not None:
                busy = f"all {self.opts.max_rooms} rooms are busy, you are in line"
                self.send(partner, p.wait_line(busy))
        self.log.event("name", f"{conn.label} waiting ({busy or text})")
        if busy or not told:
            self.send(conn, p.wait_line(busy or text))
        else:
            self.write_client(conn)

    def take_waiting_line(self, conn: Conn, line: bytes | p.TooLong) -> None:
        """A line from a waiting client: ``exit`` leaves; ``next`` changes nothing (it
        is told it waits); a message is not its turn."""
        verdict = p.judge_line(line, my_turn=False)
        if verdict == p.LEAVE:
            self.say_bye(conn, p.BYE_EXIT, "goodbye")
        elif verdict == p.NEXT:
            self.send(conn, p.wait_line("still waiting for a partner"))
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
        for table in (self.handshaking, self.closing):
            table.pop(conn.fd, None)
        self.waiting.remove(conn)

    def drop(self, conn: Conn, why: str = "") -> None:
        """Close a client now, wherever it is in the parent; log why if it was still in
        play (a closing client's departure is logged already)."""
        if why and conn.state != CLOSING:
            self.log.departure(conn.label, why)
        self.forget(conn)
        self.sel.unregister(conn.fd)
        self.by_fd.pop(conn.fd, None)
        conn.state = GONE
        self.fds.disown(conn.fd)
        conn.close()

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
        the rooms, waiting and handshaking counts (see :func:`format_report`).

        Workers that have exited are reaped first (their sentinels may wait later in
        this batch): what they handed back is then in the queue, counted once.
        """
        for sentinel, room in list(self.rooms.items()):
            if room.proc.poll() is not None:
                self.reap_room(sentinel)
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
        for conn in [*self.handshaking.values(), *self.waiting]:
            if self.preambles.pop(conn.fd, None) is not None:  # it cannot read a BYE yet
                self.drop(conn, "server shutdown")
                continue
            self.say_bye(conn, p.BYE_SHUTDOWN, p.SHUTDOWN_TEXT)
        for room in self.rooms.values():
            # Through the pidfd: never another process that reused the PID. A worker
            # already gone is not signalled; its sentinel still ends it in the loop.
            room.proc.signal(signal.SIGUSR1)
