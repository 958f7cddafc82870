"""The parent's client connections: every socket of a client not in a room, its I/O, and
its way out.

:class:`Clients` owns the selector registrations of these sockets, sends and flushes
their output, and closes them: gracefully (the last line, FIN, a bounded wait for the
peer's close: the *closing* table) or at once. Each connection has an owner, the part
that handles its input (the front door while it names itself, the lobby while it
waits): the owner is told of readiness (``on_ready``) and told to ``forget`` a
connection that leaves it, whatever the reason.
"""

from __future__ import annotations

import selectors
import socket
import time
from typing import Any, Protocol

from . import protocol as p
from .conn import CLOSING, GONE, LINGER, Conn, tune_socket
from .fdmap import FdMap
from .handback import from_json, restore_conn, snapshot, to_json
from .log import Log

READ_WRITE = selectors.EVENT_READ | selectors.EVENT_WRITE


class Owner(Protocol):
    """A part that handles some of the parent's connections."""

    def on_ready(self, conn: Conn, mask: int) -> None:
        """``conn`` is readable or writable (``mask``)."""

    def forget(self, conn: Conn) -> None:
        """``conn`` is no longer this owner's (closing, closed, or in a room)."""


class Clients:
    """Every client connection the parent holds, by socket."""

    def __init__(self, sel: selectors.BaseSelector, fds: FdMap, log: Log, max_line: int) -> None:
        self.sel = sel
        self.fds = fds
        self.log = log
        self.max_line = max_line
        self.owners: dict[int, tuple[Conn, Owner | None]] = {}  # fd -> (conn, owner)
        self.closing: dict[int, Conn] = {}  # in deadline order (dicts keep insertion order)
        self.last_id = 0  # ids are unique for the server's lifetime

    def new_conn(self, sock: socket.socket, peer: str, id: int = 0) -> Conn:
        """A Conn for a socket the parent now owns (marked in the fd map); a new id
        unless it has one (a client handed back keeps its own)."""
        if not id:
            self.last_id += 1
            id = self.last_id
        conn = Conn(sock, peer, self.max_line, id)
        self.fds.own(conn.fd)
        return conn

    def add(self, conn: Conn, owner: Owner) -> None:
        """Watch ``conn`` for ``owner`` (reading, and writing what it has queued)."""
        conn.events = READ_WRITE
        self.sel.register(conn.fd, conn.events, self.on_ready)
        self.owners[conn.fd] = (conn, owner)

    def hand_to(self, conn: Conn, owner: Owner) -> None:
        """``conn`` changes owner (named: from the front door to the lobby)."""
        self.owners[conn.fd] = (conn, owner)

    def on_ready(self, key: Any, mask: int) -> None:
        """The selector's callback for every client socket."""
        conn, owner = self.owners[key.fd]
        if conn.state == CLOSING:
            self.step_closing(conn, mask)
        else:
            owner.on_ready(conn, mask)

    def watch(self, conn: Conn, events: int) -> None:
        """Change what the selector watches on ``conn``, only if it changed."""
        if events != conn.events:
            conn.events = events
            self.sel.modify(conn.fd, events, self.on_ready)

    def flush(self, conn: Conn) -> None:
        """Send pending output; watch for writability only while some is left."""
        try:
            done = conn.flush()
        except OSError:
            self.drop(conn, "connection reset")
            return
        self.watch(conn, selectors.EVENT_READ | (0 if done else selectors.EVENT_WRITE))

    def send(self, conn: Conn, data: bytes) -> None:
        """Send now what the socket takes, queue the rest; a client whose unsent output
        passes the bound is dropped."""
        if not conn.queue(data):
            self.drop(conn, f"dropped: more than {conn.out_limit} bytes unread")
            return
        self.flush(conn)

    def say_bye(self, conn: Conn, reason: str, text: str, why: str = "") -> None:
        """Log the departure, send the last line and close gracefully. ``why`` is for
        the log; the BYE reason by default."""
        self.close_gracefully(conn, why or reason, p.bye_line(reason, text))

    def close_gracefully(self, conn: Conn, why: str, last: bytes = b"") -> None:
        """Log the departure; deliver what is queued, then ``last``, then FIN, then wait
        (at most LINGER seconds) for the peer's close."""
        self.log.departure(conn.label, why)
        self.release_owner(conn)
        conn.state = CLOSING
        conn.inbox.clear()
        conn.out += last
        conn.deadline = time.monotonic() + LINGER
        self.closing[conn.fd] = conn
        self.step_closing(conn, 0)

    def step_closing(self, conn: Conn, mask: int) -> None:
        """One step of a graceful close (``Conn.close_step``); drop the client when done."""
        if conn.close_step(mask):
            self.drop(conn)
        else:
            self.watch(conn, conn.closing_events())

    def drop(self, conn: Conn, why: str = "") -> None:
        """Close a client now; log why if it was still in play (a closing client's
        departure is logged already)."""
        if why and conn.state != CLOSING:
            self.log.departure(conn.label, why)
        self.release(conn)
        conn.state = GONE
        conn.close()

    def release(self, conn: Conn) -> None:
        """Stop watching ``conn`` and forget it (its owner too): it is closed next, or
        goes to a room. The caller closes the socket."""
        self.release_owner(conn)
        self.closing.pop(conn.fd, None)
        self.sel.unregister(conn.fd)
        del self.owners[conn.fd]
        self.fds.disown(conn.fd)

    def release_owner(self, conn: Conn) -> None:
        """Tell the owner ``conn`` is no longer its own."""
        owner = self.owners[conn.fd][1]
        if owner is not None:
            owner.forget(conn)
            self.owners[conn.fd] = (conn, None)

    def next_deadline(self) -> float | None:
        """When the oldest closing client is given up on, if any is closing."""
        return next(iter(self.closing.values())).deadline if self.closing else None

    def expire(self, now: float) -> None:
        """Close the clients whose graceful close has taken too long."""
        while self.closing and (conn := next(iter(self.closing.values()))).deadline <= now:
            self.drop(conn)

    def drop_closing(self) -> None:
        """At the end of a shutdown: close every client still closing."""
        for conn in list(self.closing.values()):
            self.drop(conn)

    # -- across an upgrade in place (upgrade.py) -----------------------------------------

    def export(self, conn: Conn) -> dict[str, Any]:
        """``conn`` as data for the new code: its socket's fd, everything a hand-back
        carries, its deadline and whether its FIN is sent."""
        data = to_json(snapshot(conn, conn.avoid or 0))
        data.update(fd=conn.fd, deadline=conn.deadline, wr_shut=conn.wr_shut)
        return data

    def adopt(self, data: dict[str, Any], owner: Owner | None, state: str) -> Conn:
        """A connection the old code held, from :meth:`export`'s data: watched for
        ``owner`` in ``state`` (a closing one goes on closing)."""
        sock = socket.socket(fileno=data["fd"])
        sock.set_inheritable(False)
        tune_socket(sock)
        record = from_json(data)
        conn = self.new_conn(sock, record.peer, record.id)
        restore_conn(conn, record)
        conn.avoid = record.avoid or None
        conn.deadline = data["deadline"]
        conn.wr_shut = data.get("wr_shut", False)
        conn.state = state
        self.add(conn, owner)
        if state == CLOSING:
            self.closing[conn.fd] = conn
        return conn

    def open_fds(self) -> list[int]:
        """The fds of every connection the parent holds."""
        return list(self.owners)

    def export_closing(self) -> list[dict[str, Any]]:
        """Every client being closed gracefully, as data, in deadline order."""
        return [self.export(conn) for conn in self.closing.values()]

    def drop_tls(self, text: str, why: str) -> None:
        """Before an upgrade: a TLS session lives in this process's memory and cannot
        cross the exec. Each TLS client the parent holds is told ``BYE shutdown text``
        (where its handshake is through and the socket takes it now) and closed."""
        for conn, _ in list(self.owners.values()):
            if conn.tls:
                try:
                    conn.sock.send(bytes(conn.out) + p.bye_line(p.BYE_SHUTDOWN, text))
                except (OSError, ValueError):
                    pass
                self.drop(conn, why)
