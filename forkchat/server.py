"""The forkchat parent process: the loop, the signals, the shutdown, and the parts it wires.

:class:`Server` owns one selector and the signal wakeup socket, and four parts that own
their state: the front door (``frontdoor.py``: accept, PROXY/TLS preamble, ``HELLO``,
names), the lobby (``lobby.py``: the waiting queue and its pairing policy), the rooms
(``rooms.py``: one forked worker per pair, counts, hand-backs, reaping), and the client
connections they share (``clients.py``: I/O and the way out). Every room worker is a
child of this process. The command line that builds :class:`Options` is ``cli.py``'s.
"""

from __future__ import annotations

import os
import selectors
import signal
import socket
import time
from dataclasses import dataclass
from typing import Any

from . import protocol as p
from .activation import ActivationError, listen_socket_from_env
from .children import EXIT_OK, PARENT_SIGNALS
from .clients import Clients
from .conn import format_peer
from .fdmap import FdMap
from .frontdoor import FrontDoor
from .lobby import Lobby
from .log import Log
from .pidfile import PidfileError, write_pidfile
from .room import RoomRules
from .rooms import STOP_GRACE, Rooms
from .tlsconf import TlsError, server_context

BACKLOG = 4096


class StartupError(Exception):
    """The server cannot start (address, pidfile, TLS files): one line, exit status 1."""


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


def open_listener(opts: Options) -> socket.socket:
    """The socket systemd passed on fd 3 (socket activation), or our own, bound to
    ``--host``/``--port``. Raises StartupError."""
    try:
        passed = listen_socket_from_env()
    except ActivationError as exc:
        raise StartupError(f"socket activation: {exc}") from None
    if passed is not None:
        return passed
    try:
        return make_listener(opts.host, opts.port)
    except OSError as exc:
        where = f"{opts.host}:{opts.port}"
        raise StartupError(f"cannot listen on {where}: {exc.strerror or exc}") from None


def format_report(clients: int, rooms: int, waiting: int, handshaking: int) -> str:
    """The SIGUSR2 report: ``NUMBER OF CLIENTS : ** N **``, then the counts line."""
    return (
        f"NUMBER OF CLIENTS : ** {clients} **\n"
        f"rooms {rooms}, waiting {waiting}, handshaking {handshaking}"
    )


class Server:
    """The parent process: one selector loop over the listener, the clients not in a
    room, the rooms' sentinels and channels, and the signal wakeup socket. Nothing in
    it blocks on one client."""

    def __init__(self, opts: Options, log: Log) -> None:
        self.opts = opts
        self.log = log
        self.sel = selectors.DefaultSelector()
        self.fds = FdMap()  # every fd the parent owns, for new workers to close
        self.wake_r, self.wake_w = socket.socketpair()
        for fd in (self.sel.fileno(), self.wake_r.fileno(), self.wake_w.fileno()):
            self.fds.own(fd)
        self.clients = Clients(self.sel, self.fds, log, opts.max_line)
        self.door: FrontDoor | None = None
        self.lobby: Lobby | None = None
        self.rooms: Rooms | None = None
        self.listener: socket.socket | None = None
        self.address = ""
        self.stopping = False
        self.stop_deadline = 0.0

    # -- start and stop ------------------------------------------------------------------

    def start(self) -> None:
        """Load TLS, bind, write the pidfile, build the parts, install the signal
        plumbing, then print the listen line: once it is out, everything is ready.
        Raises StartupError."""
        opts = self.opts
        try:
            tls = server_context(opts.tls_cert, opts.tls_key or "") if opts.tls_cert else None
        except TlsError as exc:
            raise StartupError(str(exc)) from None
        self.listener = open_listener(opts)
        self.fds.own(self.listener.fileno())
        self.address = format_peer(self.listener.getsockname())
        if opts.pidfile:
            try:
                write_pidfile(opts.pidfile)
            except PidfileError as exc:
                raise StartupError(str(exc)) from None
        rules = RoomRules(opts.idle_timeout, opts.requeue, None, tls is not None)
        self.rooms = Rooms(self.sel, self.clients, rules, opts.max_rooms, self.requeue, self.pair)
        self.lobby = Lobby(self.clients, self.rooms, opts.max_waiting, opts.max_line)
        self.door = FrontDoor(
            self.listener,
            self.sel,
            self.clients,
            self.lobby.admit,
            opts.name_timeout,
            opts.max_waiting,
            opts.proxy_protocol,
            tls,
        )
        self.install_signals()
        self.log.plain(f"forkchat server listening on {self.address} pid {os.getpid()}")

    def requeue(self, conn: Any, text: str) -> None:
        """A room handed ``conn`` back: the lobby's (see Rooms.on_back)."""
        self.lobby.requeue(conn, text)

    def pair(self) -> None:
        """A room was freed: the lobby may open more (see Rooms.on_free)."""
        self.lobby.open_rooms()

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
        while not (self.stopping and not self.rooms and not self.clients.closing):
            for key, mask in self.sel.select(self.next_timeout()):
                # An earlier handler in this batch may have closed this fd, or closed it
                # and reused the number: act only on keys that are still registered.
                if live.get(key.fd) is key:
                    key.data(key, mask)
            self.expire_timers()
            self.rooms.fork_ready()  # the pairs this pass gave a room, back to back
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
        if self.rooms.ready:
            return 0.0  # pairs wait for their fork: the next pass forks them
        deadlines = [self.door.next_deadline(), self.clients.next_deadline()]
        if self.stopping:
            deadlines.append(self.stop_deadline)
        soonest = min((d for d in deadlines if d is not None), default=None)
        return None if soonest is None else max(0.0, soonest - time.monotonic())

    def expire_timers(self) -> None:
        """Act on every deadline that has passed."""
        now = time.monotonic()
        self.door.expire(now)
        self.clients.expire(now)
        if self.stopping and now >= self.stop_deadline and (self.rooms or self.clients.closing):
            self.rooms.kill_stragglers()
            self.clients.drop_closing()

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
        the rooms, waiting and handshaking counts.

        Workers that have exited are reaped first (their sentinels may wait later in
        this batch): what they handed back is then in the queue, counted once.
        """
        self.rooms.reap_exited()
        waiting, handshaking = len(self.lobby), len(self.door)
        clients = self.rooms.held() + waiting + handshaking
        self.log.plain(format_report(clients, self.rooms.count(), waiting, handshaking))

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
        self.rooms.stop_all(why)
        self.door.close()
        self.listener = None
        self.lobby.close()
