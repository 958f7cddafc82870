"""The server's front door: accepting connections, the PROXY/TLS preamble, HELLO.

:class:`FrontDoor` is a mixin of :class:`forkchat.server.Server`, as ``keeper.py``'s
:class:`~forkchat.keeper.RoomKeeper` is: it uses the server's tables (``handshaking``,
``preambles``, ``fds``), its selector, its listener and its client I/O (``register``,
``watch``, ``read_client``, ``write_client``, ``say_bye``, ``drop``). A connection
leaves the front door greeted (``HELLO`` queued, in ``handshaking`` with its name
timeout) or turned away; naming it and queueing it are the server's.
"""

from __future__ import annotations

import selectors
import socket
import time
from typing import Any

from . import protocol as p
from .conn import Conn, format_peer, is_fd_exhaustion, tune_socket
from .preamble import HealthCheck, Preamble, PreambleError

ACCEPT_BATCH = 256  # accepts per wake-up, so a connect storm cannot starve the rest
ACCEPT_PAUSE = 0.5  # seconds without accepting after running out of file descriptors
BACKLOG_GRACE = 1.0  # seconds to accept and tell the kernel's queue at shutdown


class FrontDoor:
    """Accept, preamble, greet, turn away (a mixin of the server; see the module)."""

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
        conn = self.new_conn(sock, format_peer(addr))
        self.register(conn)
        if len(self.handshaking) >= self.opts.max_waiting:
            self.turn_away(conn, f"full: {len(self.handshaking)} handshaking")
            return
        conn.deadline = time.monotonic() + self.opts.name_timeout
        self.handshaking[conn.fd] = conn
        if not self.preamble:
            self.greet(conn)
            self.write_client(conn)
            return
        # "client connected" once the preamble is through: one that fails it costs one
        # line, and with PROXY the client's own address is known only then.
        self.preambles[conn.fd] = Preamble(conn, self.opts.proxy_protocol, self.tls)
        self.step_preamble(conn)

    def greet(self, conn: Conn) -> None:
        """The connection speaks the protocol now: log it and queue HELLO."""
        self.log.event("connect", f"client connected {conn.peer}")
        conn.queue(p.hello_line())

    def turn_away(self, conn: Conn, why: str) -> None:
        """Too many connections: ``BYE full`` where the client can read it (plain TCP),
        a plain close where it cannot (before a PROXY header or a TLS handshake)."""
        if not self.preamble:
            self.greet(conn)
            self.say_bye(conn, p.BYE_FULL, "too many connections, try again later", why)
        else:
            self.drop(conn, why)

    def step_preamble(self, conn: Conn) -> None:
        """Advance the PROXY header and TLS handshake; greet the client once both are
        through. A bad header, a failed handshake: one log line and the close. A health
        check (PROXY LOCAL): closed without a word."""
        preamble = self.preambles[conn.fd]
        try:
            events = preamble.step()
        except HealthCheck:
            del self.preambles[conn.fd]
            self.drop(conn)
            return
        except PreambleError as exc:
            del self.preambles[conn.fd]
            self.drop(conn, str(exc))
            return
        if events:
            self.watch(conn, events)
            return
        del self.preambles[conn.fd]
        self.greet(conn)
        # A name may have come in the same TLS record as the handshake's end.
        if self.read_client(conn):
            self.write_client(conn)

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
            conn = self.new_conn(sock, format_peer(addr))
            self.register(conn)
            if self.preamble:
                self.drop(conn, "server shutdown")  # no protocol spoken yet: a clean close
                continue
            self.log.event("connect", f"client connected {conn.peer}")
            self.say_bye(conn, p.BYE_SHUTDOWN, p.SHUTDOWN_TEXT)

    def new_conn(self, sock: socket.socket, peer: str, id: int = 0) -> Conn:
        """A Conn for a socket the parent now owns; a new id unless it has one."""
        if not id:
            self.client_count += 1
            id = self.client_count
        conn = Conn(sock, peer, self.opts.max_line, id)
        self.fds.own(conn.fd)
        return conn

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
