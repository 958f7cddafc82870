"""The parent's waiting room: named clients without a partner, their lines, their WAIT.

:class:`Lobby` owns the waiting queue (a :class:`~forkchat.waitlist.WaitList`, which
holds the pairing policy) and the clients in it: it admits a newly named client (or
turns it away when the queue is full), takes back a client a room handed back,
answers what waiting clients send (``exit`` leaves, ``next`` changes nothing, a
message is not their turn), tells each why it waits, and asks for a room for each pair
the queue gives while the rooms part has one free.
"""

from __future__ import annotations

from typing import Protocol

from . import protocol as p
from .clients import Clients
from .conn import WAITING, Conn
from .waitlist import WaitList, may_pair


class RoomSupply(Protocol):
    """What the lobby needs of the rooms part."""

    max_rooms: int

    def can_open(self) -> bool:
        """A room may be opened now (one is free, and the server is not stopping)."""

    def open(self, first: Conn, second: Conn) -> None:
        """Give the pair a room (or tell both it failed)."""

    def is_full(self) -> bool:
        """Every room is taken."""


class Lobby:
    """Named clients waiting for a partner, in queue order."""

    def __init__(self, clients: Clients, rooms: RoomSupply, max_waiting: int, max_line: int):
        self.clients = clients
        self.rooms = rooms
        self.max_waiting = max_waiting
        self.max_line = max_line
        self.log = clients.log
        self.queue: WaitList[Conn] = WaitList()
        self.stopping = False

    def __len__(self) -> int:
        return len(self.queue)

    # -- coming in ----------------------------------------------------------------------

    def admit(self, conn: Conn) -> None:
        """A client just named itself: queue it (and pair it if a partner waits), or
        turn it away with ``BYE full``. The lines that came with its name are handled
        in its room if it is paired at once, else here."""
        if self.is_full_for(conn):
            self.turn_away_full(conn, f"name {conn.name}")
            return
        self.log.event("name", f"client named {conn.label}")
        self.clients.hand_to(conn, self)
        self.enqueue(conn, "waiting for a partner")
        if conn.state == WAITING:
            self.take_lines(conn)

    def requeue(self, conn: Conn, text: str) -> None:
        """A client its room handed back: ``WAIT text`` first; then the lines it sent
        after leaving its partner are handled here, in order (``exit`` leaves); then it
        is paired if it can be. ``BYE`` if the server is stopping or the queue is full."""
        self.clients.add(conn, self)
        if self.stopping:
            self.clients.say_bye(conn, p.BYE_SHUTDOWN, p.SHUTDOWN_TEXT)
            return
        if self.is_full_for(conn):
            self.turn_away_full(conn, "requeued")
            return
        conn.state = WAITING
        self.queue.add(conn)
        if self.rooms.can_open() and self.queue.partner_in_line(conn) is not None:
            conn.queue(p.wait_line(text))  # a room opens at once: PAIRED follows
            self.log.event("name", f"{conn.label} waiting ({text})")
        else:
            self.tell_waiting(conn, text)
        self.take_lines(conn)
        if conn.state == WAITING:
            self.open_rooms()

    def is_full_for(self, conn: Conn) -> bool:
        """No place in the queue for ``conn``: ``--max-waiting`` wait already, and it
        would not go straight into a room."""
        if len(self.queue) < self.max_waiting:
            return False
        return not self.rooms.can_open() or all(not may_pair(conn, w) for w in self.queue)

    def turn_away_full(self, conn: Conn, detail: str) -> None:
        """``BYE full``: the queue has no place for ``conn`` (``detail`` for the log)."""
        why = f"full: {len(self.queue)} waiting, {detail}"
        self.clients.say_bye(conn, p.BYE_FULL, "too many clients waiting, try again later", why)

    def enqueue(self, conn: Conn, text: str) -> None:
        """Queue ``conn`` at the end, open the rooms that can be opened now, and if it
        still waits tell it why (``WAIT text``)."""
        conn.state = WAITING
        self.queue.add(conn)
        self.open_rooms()
        if conn.state == WAITING:
            self.tell_waiting(conn, text)

    def open_rooms(self) -> None:
        """Open a room for each pair the queue gives while one is free."""
        while self.rooms.can_open():
            pair = self.queue.next_pair()
            if pair is None:
                return
            # A client that closed (the loop has not read it yet) with no line left to
            # handle has nothing to do in a room; with lines left (``exit``) it goes in.
            dead = [conn for conn in pair if not conn.inbox and conn.peer_closed()]
            for conn in dead:
                self.clients.close_gracefully(conn, "closed while waiting")
            if not dead:
                for conn in pair:
                    self.queue.remove(conn)
                self.rooms.open(*pair)

    # -- telling why --------------------------------------------------------------------

    def tell_waiting(self, conn: Conn, text: str) -> None:
        """``WAIT`` for a client left in the queue, saying why it waits: ``text`` (how it
        came to wait), then what keeps it waiting (every room busy, its last partner
        the only other one, or who else waits). When it completes a pair that has no
        free room, its partner-to-be hears that too; when the only other one waiting is
        its last partner, that one hears it too."""
        partner = self.queue.partner_in_line(conn)
        others = [w for w in self.queue if w is not conn]
        if partner is not None and self.rooms.is_full():
            busy = busy_text(self.rooms.max_rooms)
            self.clients.send(partner, p.wait_line(f"waiting for a partner: {busy}"))
            text = f"{text}: {busy}"
        elif len(others) == 1 and not may_pair(conn, others[0]):
            other = others[0]
            self.clients.send(
                other, p.wait_line(f"waiting for a partner: {only_other(other, conn)}")
            )
            text = f"{text}: {only_other(conn, other)}"
        else:
            text = f"{text}: {describe_others(len(others))}"
        self.log.event("name", f"{conn.label} waiting ({text})")
        self.clients.send(conn, p.wait_line(text))

    # -- what waiting clients send ------------------------------------------------------

    def on_ready(self, conn: Conn, mask: int) -> None:
        """A waiting client's socket is ready: read, handle, write."""
        if mask & 1 and not conn.receive() and not conn.eof:  # EVENT_READ
            self.clients.drop(conn, "connection reset")
            return
        self.take_lines(conn)

    def take_lines(self, conn: Conn) -> None:
        """Handle the complete lines a waiting client sent, in order; a client whose
        input has ended leaves once they are handled. Then flush its output."""
        while conn.inbox and conn.state == WAITING:
            self.take_line(conn, conn.inbox.popleft())
        if conn.state != WAITING:
            return
        if conn.eof:
            self.clients.close_gracefully(conn, "closed while waiting")
        else:
            self.clients.flush(conn)

    def take_line(self, conn: Conn, line: bytes | p.TooLong) -> None:
        """``exit`` leaves; ``next`` changes nothing (it is told it waits); a message is
        not its turn; a blank line is ignored."""
        verdict = p.judge_line(line, my_turn=False)
        if verdict == p.LEAVE:
            self.clients.say_bye(conn, p.BYE_EXIT, "goodbye")
        elif verdict == p.NEXT:
            self.clients.send(conn, p.wait_line("still waiting for a partner"))
        elif verdict != p.IGNORE:
            self.clients.send(conn, p.err_line(verdict, self.max_line))

    def forget(self, conn: Conn) -> None:
        """``conn`` left the queue (a room, a BYE, a close)."""
        self.queue.remove(conn)

    # -- across an upgrade in place (upgrade.py) -----------------------------------------

    def export(self) -> list[dict]:
        """Every waiting client as data, in queue order."""
        return [self.clients.export(conn) for conn in self.queue]

    def adopt(self, entries: list[dict]) -> None:
        """The old code's waiting clients, in their order, with their last partners,
        unread lines and unsent output."""
        for data in entries:
            self.queue.add(self.clients.adopt(data, self, WAITING))

    # -- the end ------------------------------------------------------------------------

    def close(self) -> None:
        """At shutdown: ``BYE shutdown`` to every waiting client; none is queued again."""
        self.stopping = True
        for conn in list(self.queue):
            self.clients.say_bye(conn, p.BYE_SHUTDOWN, p.SHUTDOWN_TEXT)


def busy_text(max_rooms: int) -> str:
    """Why a client with a partner-to-be waits, for a WAIT text."""
    rooms = "the only room is busy" if max_rooms == 1 else f"all {max_rooms} rooms are busy"
    return f"{rooms}, you are in line"


def describe_others(count: int) -> str:
    """Who else waits, for a WAIT text."""
    if count == 0:
        return "nobody else is waiting"
    return f"{count} other{'s' if count > 1 else ''} waiting"


def only_other(me: Conn, other: Conn) -> str:
    """Why ``me`` waits when ``other``, who may not be its partner yet, is the only other
    one waiting, for a WAIT text."""
    if other.id == me.avoid:
        return "the only other person waiting is your last partner"
    return "the only other person waiting is a recent partner of yours"
