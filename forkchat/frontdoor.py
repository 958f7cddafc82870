"""The server's front door: accepting connections, the PROXY/TLS preamble, HELLO, names.

:class:`FrontDoor` owns the listening socket and every connection not yet named (the
*handshaking*, in name-timeout order). A connection leaves it named (handed to the
``admit`` callback: the lobby) or turned away: a bad name, a timeout, too many
connections, a failed preamble, or the shutdown.
"""

from __future__ import annotations

import selectors
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from typing import Any

from . import protocol as p
from .clients import Clients
from .conn import HANDSHAKE, Conn, format_peer, is_fd_exhaustion, tune_socket
from .preamble import HealthCheck, Preamble, PreambleError

ACCEPT_BATCH = 256  # accepts per wake-up, so a connect storm cannot starve the rest
ACCEPT_PAUSE = 0.5  # seconds without accepting after running out of file descriptors
BACKLOG_GRACE = 1.0  # seconds to accept and tell the kernel's queue at shutdown
TLS_RECORD_START = b"\x16\x03"  # a TLS handshake record: what a TLS client sends first


class FrontDoor:
    """Accept, preamble, greet, name, turn away."""

    def __init__(
        self,
        listener: socket.socket,
        sel: selectors.BaseSelector,
        clients: Clients,
        admit: Callable[[Conn], None],
        name_timeout: float,
        max_handshaking: int,
        proxy: bool = False,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.listener = listener
        self.sel = sel
        self.clients = clients
        self.log = clients.log
        self.admit = admit
        self.name_timeout = name_timeout
        self.max_handshaking = max_handshaking
        self.proxy = proxy
        self.tls = tls
        self.handshaking: dict[int, Conn] = {}  # fd -> conn, in deadline order
        self.preambles: dict[int, Preamble] = {}  # fd -> PROXY/TLS steps not yet done
        self.accept_resume = 0.0  # when accepting resumes after running out of fds
        self.closed = False
        sel.register(listener, selectors.EVENT_READ, self.accept_clients)

    def __len__(self) -> int:
        return len(self.handshaking)

    def __iter__(self) -> Iterator[Conn]:
        return iter(list(self.handshaking.values()))

    # -- accepting ----------------------------------------------------------------------

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
        """Greet a new connection (after its preamble, if the server wants one) and give
        it ``--name-timeout`` seconds to send a name."""
        try:
            tune_socket(sock)
        except OSError:
            sock.close()
            return
        conn = self.clients.new_conn(sock, format_peer(addr))
        self.clients.add(conn, self)
        if len(self.handshaking) >= self.max_handshaking:
            self.turn_away(conn, f"full: {len(self.handshaking)} handshaking")
            return
        self.start_timer(conn)
        if not (self.proxy or self.tls):
            self.greet(conn)
            return
        # "client connected" once the preamble is through: one that fails it costs one
        # line, and with PROXY the client's own address is known only then.
        self.preambles[conn.fd] = Preamble(conn, self.proxy, self.tls)
        self.step_preamble(conn)

    def start_timer(self, conn: Conn) -> None:
        """The name timeout starts now (at connect, and again once the preamble is
        through): ``conn`` goes to the end of the deadline order."""
        self.handshaking.pop(conn.fd, None)
        conn.deadline = time.monotonic() + self.name_timeout
        self.handshaking[conn.fd] = conn

    def greet(self, conn: Conn) -> None:
        """The connection speaks the protocol now: log it and send HELLO."""
        self.log.event("connect", f"client connected {conn.peer}")
        self.clients.send(conn, p.hello_line())

    def turn_away(self, conn: Conn, why: str) -> None:
        """Too many connections: ``BYE full`` where the client can read it (plain TCP),
        a plain close where it cannot (before a PROXY header or a TLS handshake)."""
        if self.proxy or self.tls:
            self.clients.drop(conn, why)
            return
        self.greet(conn)
        self.clients.say_bye(conn, p.BYE_FULL, "too many connections, try again later", why)

    def pause_accepting(self, exc: OSError) -> None:
        """Out of fds: stop accepting for a moment instead of spinning on the listener."""
        if not self.accept_resume:
            self.log.error(
                f"accept failed ({exc.strerror}); pausing accepts for {ACCEPT_PAUSE:g} s"
            )
            self.sel.unregister(self.listener)
        self.accept_resume = time.monotonic() + ACCEPT_PAUSE

    # -- a connection's steps -----------------------------------------------------------

    def on_ready(self, conn: Conn, mask: int) -> None:
        """A handshaking connection is ready: its preamble, or its name."""
        if conn.fd in self.preambles:
            self.step_preamble(conn)
            return
        if mask & selectors.EVENT_READ and not self.receive(conn):
            return
        self.take_lines(conn)

    def step_preamble(self, conn: Conn) -> None:
        """Advance the PROXY header and TLS handshake; greet the client once both are
        through. A bad header, a failed handshake: one log line and the close. A health
        check (PROXY LOCAL): closed without a word."""
        try:
            events = self.preambles[conn.fd].step()
        except HealthCheck:
            self.clients.drop(conn)
            return
        except PreambleError as exc:
            self.clients.drop(conn, str(exc))
            return
        if events:
            self.clients.watch(conn, events)
            return
        del self.preambles[conn.fd]
        self.start_timer(conn)
        self.greet(conn)
        # A name may have come in the same TLS record as the handshake's end.
        if self.receive(conn):
            self.take_lines(conn)

    def receive(self, conn: Conn) -> bool:
        """Read what the connection sent. False if it is no longer handshaking: reset,
        or a TLS client at a plain-text server (told ``BYE bad-name``, logged as what it
        is)."""
        if not (conn.tls or conn.reader.pending) and starts_tls(conn.sock):
            why = "not a forkchat client: a TLS handshake to a plain-text server"
            self.clients.say_bye(conn, p.BYE_BAD_NAME, "this server speaks plain text", why)
            return False
        if not conn.receive() and not conn.eof:
            self.clients.drop(conn, "connection reset")
            return False
        return True

    def take_lines(self, conn: Conn) -> None:
        """Handle the complete lines until the name; what follows it is the lobby's (or
        its room's). A client whose input ended without a name leaves."""
        while conn.inbox and conn.state == HANDSHAKE:
            self.take_name(conn, conn.inbox.popleft())
        if conn.state != HANDSHAKE:
            return
        if conn.eof:
            self.clients.close_gracefully(conn, "closed before naming")
        else:
            self.clients.flush(conn)

    def take_name(self, conn: Conn, line: bytes | p.TooLong) -> None:
        """The first non-blank line: the name, or ``exit``."""
        if isinstance(line, bytes) and p.is_blank(line):
            return
        if isinstance(line, bytes) and p.is_exit(line):
            self.clients.say_bye(conn, p.BYE_EXIT, "goodbye")
            return
        name = p.parse_name(line) if isinstance(line, bytes) else None
        if name is None:
            self.clients.say_bye(conn, p.BYE_BAD_NAME, f"a name is {p.NAME_RULE}")
            return
        conn.name = name
        self.forget(conn)
        self.admit(conn)

    def forget(self, conn: Conn) -> None:
        """``conn`` is no longer handshaking (named, closing or closed)."""
        self.handshaking.pop(conn.fd, None)
        self.preambles.pop(conn.fd, None)

    # -- timers -------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """The earliest of the oldest name timeout and the end of an accept pause."""
        deadlines = [self.accept_resume] if self.accept_resume else []
        if self.handshaking:
            deadlines.append(next(iter(self.handshaking.values())).deadline)
        return min(deadlines, default=None)

    def expire(self, now: float) -> None:
        """Turn away the connections past their name timeout; resume accepting."""
        while self.handshaking and (conn := next(iter(self.handshaking.values()))).deadline <= now:
            preamble = self.preambles.get(conn.fd)
            if preamble is not None:  # no protocol spoken yet: nothing to say BYE in
                what = "PROXY header" if preamble.reader is not None else "TLS handshake"
                self.clients.drop(conn, f"timeout: no {what} within {self.name_timeout:g} s")
                continue
            text = f"no name within {self.name_timeout:g} s"
            self.clients.say_bye(conn, p.BYE_TIMEOUT, text, why=f"timeout: {text}")
        if self.accept_resume and now >= self.accept_resume:
            self.accept_resume = 0.0
            if not self.closed:
                self.sel.register(self.listener, selectors.EVENT_READ, self.accept_clients)

    # -- across an upgrade in place (upgrade.py) -----------------------------------------

    def export(self) -> dict[str, Any]:
        """The listener's fd and every handshaking connection as data, in deadline
        order, with how far its preamble got (none over TLS is left: ``drop_tls``)."""
        entries = []
        for conn in self:
            data = self.clients.export(conn)
            preamble = self.preambles.get(conn.fd)
            if preamble is not None:
                data["preamble"] = "proxy" if preamble.reader is not None else "tls"
                if preamble.reader is not None:
                    data["proxy_bytes"] = bytes(preamble.reader.buffer).decode("latin-1")
            entries.append(data)
        return {"listener": self.listener.fileno(), "handshaking": entries}

    def adopt(self, entries: list[dict[str, Any]]) -> None:
        """The old code's handshaking connections, each where it was: its name timeout
        runs on, its preamble goes on from the bytes already read."""
        for data in entries:
            conn = self.clients.adopt(data, self, HANDSHAKE)
            self.handshaking[conn.fd] = conn
            kind = data.get("preamble")
            if kind is not None:
                preamble = Preamble(conn, kind == "proxy", self.tls)
                if preamble.reader is not None:
                    preamble.reader.buffer[:] = data.get("proxy_bytes", "").encode("latin-1")
                self.preambles[conn.fd] = preamble

    # -- the end ------------------------------------------------------------------------

    def close(self) -> None:
        """At shutdown: stop accepting, tell the kernel's queue and every handshaking
        client ``BYE shutdown`` (a plain close before the preamble is through), close
        the listening socket."""
        self.closed = True
        if not self.accept_resume:
            self.sel.unregister(self.listener)
        self.accept_resume = 0.0
        self.turn_away_backlog()
        self.clients.fds.disown(self.listener.fileno())
        self.listener.close()
        for conn in list(self.handshaking.values()):
            if conn.fd in self.preambles:
                self.clients.drop(conn, "server shutdown")
            else:
                self.clients.say_bye(conn, p.BYE_SHUTDOWN, p.SHUTDOWN_TEXT)

    def turn_away_backlog(self) -> None:
        """Accept the connections still in the kernel's queue and tell them ``BYE
        shutdown`` rather than let the close reset them (bounded in time)."""
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
            conn = self.clients.new_conn(sock, format_peer(addr))
            self.clients.add(conn, self)
            if self.proxy or self.tls:
                self.clients.drop(conn, "server shutdown")  # no protocol spoken yet
                continue
            self.log.event("connect", f"client connected {conn.peer}")
            self.clients.say_bye(conn, p.BYE_SHUTDOWN, p.SHUTDOWN_TEXT)


def starts_tls(sock: socket.socket) -> bool:
    """Does what has arrived on ``sock`` start a TLS handshake record? (A peek: nothing
    is consumed.)"""
    try:
        return sock.recv(2, socket.MSG_PEEK | socket.MSG_DONTWAIT) == TLS_RECORD_START
    except OSError:
        return False
