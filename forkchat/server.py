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

from . import __version__
from . import protocol as p
from .activation import ActivationError, listen_socket_from_env
from .children import EXIT_OK, PARENT_SIGNALS
from .clients import Clients
from .conn import CLOSING, format_peer
from .fdmap import FdMap
from .frontdoor import FrontDoor
from .lobby import Lobby
from .log import Log
from .pidfile import PidfileError, write_pidfile
from .room import RoomRules
from .rooms import STOP_GRACE, Rooms
from .tlsconf import TlsError, server_context
from .upgrade import FORMAT, Upgrade, block_signals, hand_over

BACKLOG = 4096
UPGRADE_TLS_TEXT = "the server is being upgraded: reconnect to chat on"


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
        self.upgrade = Upgrade(self.sel, log, self.hand_over)

    # -- start and stop ------------------------------------------------------------------

    def start(self) -> None:
        """Load TLS, bind, write the pidfile, build the parts, install the signal
        plumbing, then print the listen line: once it is out, everything is ready.
        Raises StartupError."""
        tls = self.load_tls()
        self.adopt_listener(open_listener(self.opts))
        self.write_pidfile()
        self.build_parts(tls)
        self.install_signals()
        self.log.plain(f"forkchat server listening on {self.address} pid {os.getpid()}")

    def resume(self, state: dict[str, Any]) -> None:
        """The new code of an upgrade in place: take over the listener, the rooms, the
        waiting, handshaking and closing clients from ``state`` (``upgrade.py``), then
        install the signal plumbing (the signals that came meanwhile are delivered
        now) and say so in the log. Raises StartupError."""
        tls = self.load_tls()
        listener = socket.socket(fileno=state["door"]["listener"])
        listener.set_inheritable(False)
        listener.setblocking(False)
        self.adopt_listener(listener)
        self.write_pidfile()
        self.build_parts(tls)
        self.clients.last_id = state["last_id"]
        self.rooms.adopt(state["rooms"], state["opened"])
        self.door.adopt(state["door"]["handshaking"])
        self.lobby.adopt(state["lobby"])
        for data in state["closing"]:
            self.clients.adopt(data, None, CLOSING)
        self.install_signals()
        rooms = f"{len(self.rooms)} room{'' if len(self.rooms) == 1 else 's'}"
        carried = f"{rooms}, {len(self.lobby)} waiting, {len(self.door)} handshaking"
        self.log.event(
            "info",
            f"upgrade: forkchat {__version__} serves now on {self.address}, "
            f"pid {os.getpid()} (was {state['version']}): {carried} carried",
        )
        self.lobby.open_rooms()

    def load_tls(self) -> Any:
        """The TLS context, if the server speaks TLS. Raises StartupError."""
        opts = self.opts
        try:
            return server_context(opts.tls_cert, opts.tls_key or "") if opts.tls_cert else None
        except TlsError as exc:
            raise StartupError(str(exc)) from None

    def adopt_listener(self, listener: socket.socket) -> None:
        self.listener = listener
        self.fds.own(listener.fileno())
        self.address = format_peer(listener.getsockname())

    def write_pidfile(self) -> None:
        if self.opts.pidfile:
            try:
                write_pidfile(self.opts.pidfile)
            except PidfileError as exc:
                raise StartupError(str(exc)) from None

    def build_parts(self, tls: Any) -> None:
        """The rooms, the lobby and the front door, wired to each other."""
        opts = self.opts
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
        # Blocked across an upgrade's exec: what came meanwhile is delivered now.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, PARENT_SIGNALS)

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
        deadlines = [
            self.door.next_deadline(),
            self.clients.next_deadline(),
            self.upgrade.next_deadline(),
        ]
        if self.stopping:
            deadlines.append(self.stop_deadline)
        soonest = min((d for d in deadlines if d is not None), default=None)
        return None if soonest is None else max(0.0, soonest - time.monotonic())

    def expire_timers(self) -> None:
        """Act on every deadline that has passed."""
        now = time.monotonic()
        self.door.expire(now)
        self.clients.expire(now)
        self.upgrade.expire(now)
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

    def handle_rtmin(self) -> None:
        """SIGRTMIN: upgrade in place to the code now on disk (``upgrade.py``)."""
        if self.stopping:
            self.log.event("info", "SIGRTMIN during shutdown: no upgrade")
            return
        self.upgrade.begin("SIGRTMIN")

    def hand_over(self, version: str) -> None:
        """The new code (``version``) passed its check: settle what is in flight (the
        pairs given a room, the hand-backs in the channels), say BYE to the TLS clients
        not in a room, and re-execute with the parts' state. Returns only if the exec
        failed: the server then goes on with this code."""
        block_signals()
        self.rooms.drain()
        while self.rooms.ready:
            self.rooms.fork_ready()
        if self.door.tls is not None:
            why = "server upgrade: a TLS session cannot be carried"
            self.clients.drop_tls(UPGRADE_TLS_TEXT, why)
        state, fds = self.export_state()
        error = hand_over(state, fds)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, PARENT_SIGNALS)
        self.log.error(
            f"upgrade failed: cannot execute forkchat {version}: {error.strerror or error}; "
            f"forkchat {__version__} serves on"
        )

    def export_state(self) -> tuple[dict[str, Any], list[int]]:
        """Everything the new code takes over, as data, and the fds it needs open."""
        state = {
            "format": FORMAT,
            "version": __version__,
            "last_id": self.clients.last_id,
            "opened": self.rooms.opened,
            "door": self.door.export(),
            "lobby": self.lobby.export(),
            "closing": self.clients.export_closing(),
            "rooms": self.rooms.export(),
        }
        fds = [self.listener.fileno(), *self.clients.open_fds()]
        for room in state["rooms"]:
            fds += [room["pidfd"], room["channel"], *filter(None, room["channel_fds"])]
            fds += [room["count"][0]] if room["count"] else []
        return state, sorted(set(fds))

    def begin_shutdown(self, why: str) -> None:
        """Stop accepting, say BYE to every client the parent holds, stop every room."""
        if self.stopping:
            self.log.event("info", f"{why} during shutdown: already stopping")
            return
        self.stopping = True
        self.upgrade.cancel()
        self.stop_deadline = time.monotonic() + STOP_GRACE
        self.log.event("close", f"{why}: shutting down")
        self.rooms.stop_all(why)
        self.door.close()
        self.listener = None
        self.lobby.close()
