"""The room worker: one forked process per pair, relaying lines and keeping the turns.

The worker holds its two client sockets and its end of its channel to the server, and
nothing else of the server's (:func:`start_room` closes the rest, by number). The first
client to arrive writes first. After a message the writer gets ``TURN READ``; the
reader gets ``MSG`` then ``TURN WRITE``. ``exit`` ends the room for both at any time.

The number of this room's clients still connected lives in ``clients``, a lock-free
``multiprocessing.Value`` inherited from the server: the server sets it to 2 before the
fork and zeroes it when the worker is gone; in between only this worker writes it. A
SIGKILL at any moment cannot leave a lock held.
"""

from __future__ import annotations

import os
import select
import selectors
import signal
import socket
import time
from typing import Any, NamedTuple

from . import protocol as p
from .children import (
    EXIT_CRASH,
    EXIT_OK,
    PARENT_SIGNALS,
    ROOM_IGNORED_SIGNALS,
    ROOM_STOP_SIGNALS,
)
from .conn import LINGER, RECV_BUFFER, Conn
from .fdmap import FdMap
from .handback import RoomEnd, send_handback, snapshot
from .log import Log
from .proctitle import ROOM_NAME, room_title, set_title

READ = select.EPOLLIN
MSG_TAIL = b"\n" + p.TURN_WRITE_LINE  # after "MSG " and the message
Byes = dict[Conn, tuple[str, str]]  # client -> (BYE reason, text)
Back = tuple[Conn, str, str]  # client handed back, why (for the log), its WAIT text

# A SIGTERM sent to the whole process group reaches the server too: a room waits this
# long for the server's shutdown (its note, or SIGUSR1) before it takes the SIGTERM as
# meant for itself alone.
GROUP_GRACE = 0.5
NO_PARTNER_TEXT = "could not find you a new partner"  # a hand-back that failed


def wake_only(signum: int, frame: Any) -> None:
    """A stop signal's handler in a room: nothing; the wakeup fd wakes the loop."""


def reset_inherited_signals() -> None:
    """First thing in a fresh worker: drop the parent's wakeup fd and handlers."""
    signal.set_wakeup_fd(-1)
    for sig in ROOM_STOP_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    for sig in ROOM_IGNORED_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class RoomRules(NamedTuple):
    """How a room ends: the idle timeout, and whether a client whose partner leaves is
    handed back to the parent (``--requeue``) through ``channel``, the room's own end of
    its Unix socket to the parent (None: every ending is a BYE)."""

    idle_timeout: float = 0.0
    requeue: bool = False
    channel: socket.socket | None = None
    tls: bool = False  # a TLS session cannot travel: next and --requeue end with BYE


class Room:
    """The relay between two clients; ``run()`` returns the worker's exit status.

    The room's client count (``clients``) holds the clients it still has plus those it
    handed back: the parent subtracts the ones it has taken from the channel, so a
    client in flight is counted once, whenever the count is read.
    """

    def __init__(
        self, number: int, first: Conn, second: Conn, clients: Any, rules: RoomRules, log: Log
    ) -> None:
        self.number = number
        self.conns = (first, second)
        self.writer = first
        self.clients = clients
        self.idle_timeout = rules.idle_timeout
        self.rules = rules
        self.log = log
        # The loop waits on epoll itself: a room has three or four fds, and every layer
        # between a readable socket and the relay is paid on every message.
        self.epoll = select.epoll()
        self.watched: dict[int, Any] = {}  # fd -> Conn, or "signal" / "parent"
        self.last_message = time.monotonic()
        self.ended = False
        self.handed = 0  # clients the parent has taken back (or that are on their way)
        self.wake_r = -1
        self.parent = RoomEnd(rules.channel) if rules.channel is not None else None

    def partner(self, conn: Conn) -> Conn:
        return self.conns[1] if conn is self.conns[0] else self.conns[0]

    # -- set-up -----------------------------------------------------------------------

    def install_signals(self) -> None:
        """Stop signals only wake the loop through a pipe (no socket: we hold only our
        clients' and the channel). The channel wakes it too: the parent's shutdown note,
        or its end closed (the server is gone)."""
        self.wake_r, wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        for sig in ROOM_STOP_SIGNALS:
            signal.signal(sig, wake_only)
        self.watch(self.wake_r, select.EPOLLIN, "signal")
        if self.rules.channel is not None:
            self.watch(self.rules.channel.fileno(), select.EPOLLIN, "parent")
        # The parent blocked these around the fork; pending ones arrive now.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, PARENT_SIGNALS)

    def greet(self) -> None:
        """PAIRED and the first turns; then the lines that came with the names, in order."""
        first, second = self.conns
        label = f"{first.label} + {second.label}"
        self.log.event("room", f"room {self.number} opened pid {os.getpid()}: {label}")
        first.queue(p.paired_line(second.name or "?") + p.TURN_WRITE_LINE)
        second.queue(p.paired_line(first.name or "?") + p.TURN_READ_LINE)
        for conn in self.conns:
            conn.events = select.EPOLLIN
            self.watch(conn.fd, conn.events, conn)
        for conn in self.conns:
            self.handle_inbox(conn)

    def watch(self, fd: int, events: int, what: Any) -> None:
        """Wait for ``events`` on ``fd``; ``what`` is handed to the loop when they come."""
        self.epoll.register(fd, events)
        self.watched[fd] = what

    def unwatch(self, fd: int) -> None:
        """Stop waiting on ``fd`` (before it is closed or handed back); safe to repeat."""
        if self.watched.pop(fd, None) is not None:
            self.epoll.unregister(fd)

    # -- the loop -----------------------------------------------------------------------

    def run(self) -> int:
        """Relay until the room ends, then close both sockets. Returns the exit status."""
        self.install_signals()
        self.greet()
        first, second = self.conns
        poll, watched = self.epoll.poll, self.watched
        while not self.ended:
            # Output left over, or a socket still watched for writing: flush. On the
            # usual path the relay has sent everything already and this is skipped.
            if first.out or second.out or first.events != READ or second.events != READ:
                self.flush_all()
                if self.ended:
                    break
            elif self.is_steady():
                self.relay_steady()
                if self.ended:
                    break
                if first.out or second.out:
                    continue  # a send fell short: flush (and watch for writing) first
            for fd, _mask in poll(self.time_left()):
                what = watched.get(fd)
                if what.__class__ is Conn:
                    self.handle_readable(what)
                elif what is not None:
                    self.dispatch(what)
                if self.ended:
                    break
            self.check_idle()
        return EXIT_OK

    def is_steady(self) -> bool:
        """Nothing pending anywhere (no line read but not handled, no unfinished line,
        no output left over) on plain sockets: :meth:`relay_steady` may run."""
        if self.rules.tls:
            return False
        for conn in self.conns:
            if conn.inbox or conn.reader.pending or conn.reader.discarding or conn.out:
                return False
        return True

    def relay_steady(self) -> None:
        """The room's usual life, kept as small as it can be: the writer sends one whole,
        plain line (printable ASCII or TAB, not blank, not ``exit`` or ``next``), the
        reader gets ``MSG`` and ``TURN WRITE``, the writer ``TURN READ``, turns swap.

        With a hundred rooms taking turns on a CPU, each message finds the worker's
        memory cold: every object and page it touches is a cache miss. So this loop
        touches a handful of locals. It returns as soon as anything else happens (a
        line it does not take is handed to the general path first; other events stay
        in epoll, which is level-triggered, for the general loop).
        """
        writer, reader = self.writer, self.partner(self.writer)
        wsock, rsock, wfd = writer.sock, reader.sock, writer.fd
        poll, monotonic, turn_read = self.epoll.poll, time.monotonic, p.TURN_READ_LINE
        buf, take, find = RECV_BUFFER, p.PLAIN_LINE.fullmatch, RECV_BUFFER.find
        idle, limit = self.idle_timeout, writer.reader.max_line + 1  # + the LF
        timeout = self.last_message + idle - monotonic() if idle else -1
        while True:
            if idle and timeout <= 0:
                return
            events = poll(timeout)
            if len(events) != 1:
                return
            fd, mask = events[0]
            if fd != wfd or mask != READ:
                return
            try:
                size = wsock.recv_into(buf)
            except OSError:
                return  # the general path reads it again and says why
            if (
                not take(buf, 0, size)
                or size > limit
                or find(b"exit", 0, size) >= 0
                or find(b"next", 0, size) >= 0
            ):
                self.take_bytes(writer, buf[:size])
                return
            self.last_message = monotonic()
            self.writer = reader
            if not self.send_whole(reader, b"MSG " + buf[: size - 1] + MSG_TAIL):
                if not self.ended:  # TURN READ after the MSG, queued in order
                    self.send(writer, turn_read)
                return
            if not self.send_whole(writer, turn_read):
                return
            writer, reader, wsock, rsock = reader, writer, rsock, wsock
            wfd = writer.fd
            timeout = idle or -1  # the deadline just moved to a full idle period

    def send_whole(self, conn: Conn, data: bytes) -> bool:
        """Send ``data`` now; True if the socket took all of it. What it did not take is
        queued (the general loop flushes it); a failed socket loses the client."""
        try:
            sent = conn.sock.send(data)
        except conn.would_block:
            sent = 0
        except OSError:
            self.lose(conn, "connection reset")
            return False
        if sent == len(data):
            return True
        conn.out += data[sent:]
        return False

    def take_bytes(self, conn: Conn, data: bytes | bytearray) -> None:
        """Bytes read from ``conn`` outside :meth:`Conn.receive`: the end of input if
        empty, else lines for the general path."""
        if not data:
            conn.eof = True
            self.lose(conn, "closed without exit")
            return
        conn.inbox.extend(conn.reader.feed(data))
        self.handle_inbox(conn)

    def time_left(self) -> float:
        """Seconds epoll may wait: until the idle deadline, or for ever (-1)."""
        if not self.idle_timeout:
            return -1
        return max(0.0, self.last_message + self.idle_timeout - time.monotonic())

    def dispatch(self, what: str) -> None:
        """A signal arrived, or the parent wrote (its shutdown note) or is gone."""
        if what == "signal":
            self.handle_signal()
            return
        self.parent.read()
        if self.parent.note() is not None:
            self.shut_down()
        elif self.parent.closed:
            byes = {c: (p.BYE_SHUTDOWN, "server lost") for c in self.conns}
            self.end("the server process is gone", byes)

    def handle_signal(self) -> None:
        """SIGUSR1: the server is shutting down. SIGTERM: this room alone is stopped,
        unless the server is shutting down too (a SIGTERM to the whole process group)."""
        try:
            data = os.read(self.wake_r, 64)
        except BlockingIOError:
            return
        if signal.SIGUSR1 in data or (data and self.server_stopping()):
            self.shut_down()
        elif data:
            byes = {c: (p.BYE_CLOSED, p.CLOSED_TEXT) for c in self.conns}
            self.end(f"stopped by {signal.Signals(data[0]).name}", byes)

    def server_stopping(self) -> bool:
        """Is the server shutting down? Waits up to GROUP_GRACE for its note or its
        SIGUSR1: a signal sent to the whole group reaches the server at the same time."""
        if self.parent is None:
            return False
        waiter = select.poll()
        waiter.register(self.wake_r, select.POLLIN)
        waiter.register(self.parent.channel.fileno(), select.POLLIN)
        deadline = time.monotonic() + GROUP_GRACE
        while (left := deadline - time.monotonic()) > 0:
            self.parent.read()
            if self.parent.note() is not None:
                return True
            if self.parent.closed:
                return False
            try:
                if signal.SIGUSR1 in os.read(self.wake_r, 64):
                    return True
            except BlockingIOError:
                pass
            waiter.poll(left * 1000)
        return False

    def shut_down(self) -> None:
        """The server is shutting down: BYE shutdown to both; the log says why (the
        operator's signal, from the server's note)."""
        why = (self.parent.note() if self.parent is not None else None) or "SIGUSR1"
        byes = {c: (p.BYE_SHUTDOWN, p.SHUTDOWN_TEXT) for c in self.conns}
        self.end(f"server shutdown ({why})", byes)

    def check_idle(self) -> None:
        if self.ended or not self.idle_timeout:
            return
        if time.monotonic() - self.last_message >= self.idle_timeout:
            text = f"no message for {self.idle_timeout:g} s"
            self.end(f"idle timeout ({text})", {c: (p.BYE_TIMEOUT, text) for c in self.conns})

    def handle_readable(self, conn: Conn) -> None:
        """Read what ``conn`` sent and handle it line by line: the general path (the
        usual case, in the steady state, is :meth:`relay_steady`'s)."""
        if conn.receive():
            self.handle_inbox(conn)
        elif not conn.eof:
            self.lose(conn, "vanished without exit")  # a reset: what it sent is lost too
        else:
            # A FIN only means it sends no more: the lines before it count (a ``next``
            # or ``exit`` in the same segment as the FIN is still a next or an exit).
            self.handle_inbox(conn)
            self.lose(conn, "closed without exit")

    def handle_inbox(self, conn: Conn) -> None:
        while conn.inbox and not self.ended:
            self.handle_line(conn, conn.inbox.popleft())

    def handle_line(self, conn: Conn, line: bytes | p.TooLong) -> None:
        """Apply one line from ``conn`` to the room (``protocol.judge_line``)."""
        verdict = p.judge_line(line, my_turn=conn is self.writer)
        if verdict == p.RELAY:
            self.relay(conn, line)
        elif verdict == p.LEAVE:
            self.part(conn, f"{conn.name} left", {conn: (p.BYE_EXIT, "goodbye")}, [])
        elif verdict == p.NEXT and self.rules.tls:
            bye = (p.BYE_EXIT, "over TLS a new partner needs a new connection: reconnect")
            self.part(conn, f"{conn.name} left for a new partner", {conn: bye}, [])
        elif verdict == p.NEXT:
            back = (conn, "said next", "looking for a new partner")
            self.part(conn, f"{conn.name} asked for a new partner", {}, [back])
        elif verdict != p.IGNORE:
            self.send(conn, p.err_line(verdict, conn.reader.max_line))

    def relay(self, writer: Conn, line: bytes) -> None:
        """The writer's message to the reader, then swap the turns. The reader's ``MSG``
        goes first: it is what the room waits on."""
        reader = self.partner(writer)
        self.last_message = time.monotonic()
        self.writer = reader
        self.send(reader, b"MSG " + line + MSG_TAIL)
        if not self.ended:
            self.send(writer, p.TURN_READ_LINE)

    def send(self, conn: Conn, data: bytes) -> None:
        """Send now what the socket takes, queue the rest; a client past the output bound
        is dropped as a slow consumer, one whose socket fails is lost."""
        if conn.out or conn.wr_shut:
            if not conn.queue(data):
                self.lose(conn, f"dropped: more than {conn.out_limit} bytes unread")
            return
        self.send_whole(conn, data)

    def flush_all(self) -> None:
        """Send pending output; watch for writability only while some is left over.

        The selector is changed only when the wanted events change: re-arming epoll on
        every message would cost two syscalls per relay.
        """
        # The one whose turn it now is goes first: its MSG is what the room waits on.
        for conn in (self.writer, self.partner(self.writer)):
            try:
                done = conn.flush()
            except OSError:
                self.lose(conn, "connection reset")
                return
            events = READ if done else READ | select.EPOLLOUT
            if events != conn.events:
                conn.events = events
                self.epoll.modify(conn.fd, events)

    # -- the end --------------------------------------------------------------------------

    def part(self, leaver: Conn, why: str, byes: Byes, backs: list[Back]) -> None:
        """``leaver`` leaves its partner (``exit`` or ``next``): the partner is handed back
        under ``--requeue``, ahead of a leaver who said ``next``; otherwise it gets
        ``BYE partner-exit``."""
        partner = self.partner(leaver)
        if self.said_next_too(partner):
            backs = [(partner, "said next", "looking for a new partner"), *backs]
        elif self.requeues():
            text = f"{leaver.name} left, waiting for a new partner"
            backs = [(partner, f"partner {leaver.name} left", text), *backs]
        else:
            byes = {**byes, partner: (p.BYE_PARTNER_EXIT, f"{leaver.name} left the chat")}
        self.end(why, byes, backs=backs)

    def said_next_too(self, conn: Conn) -> bool:
        """Has ``conn`` said ``next`` too, in what it has sent and we have not handled
        yet (both at once)? Then it goes back to the queue as well, with or without
        ``--requeue``; the line is taken. Looks only at what is there now."""
        if self.rules.tls or self.rules.channel is None or conn.eof:
            return False
        if not conn.inbox:
            conn.receive()
        first = conn.inbox[0] if conn.inbox else None
        if isinstance(first, bytes) and p.is_next(first):
            conn.inbox.popleft()
            return True
        return False

    def lose(self, gone: Conn, why: str) -> None:
        """``gone`` left without ``exit`` (closed, reset, or dropped): tell the partner.

        One that only closed its side (FIN) may still read: what is queued for it is
        delivered before the close. Otherwise it is closed now.
        """
        if self.ended:
            return
        self.clients.value = 1  # before anything that may block, such as the log
        self.unwatch(gone.fd)
        if not gone.eof:
            gone.close()
        self.log.departure(gone.label, why)
        partner = self.partner(gone)
        also = [gone] if gone.eof else []
        if self.requeues():
            how = "was dropped for not reading" if why.startswith("dropped") else "vanished"
            text = f"{gone.name} {how}, waiting for a new partner"
            back = (partner, f"partner {gone.name} lost", text)
            self.end(f"{gone.name} lost", {}, also, backs=[back])
        else:
            byes = {partner: (p.BYE_PARTNER_LOST, f"{gone.name} vanished")}
            self.end(f"{gone.name} lost", byes, also)

    def end(
        self, why: str, byes: Byes, also: list[Conn] | None = None, backs: list[Back] = ()
    ) -> None:
        """End the room: hand ``backs`` back to the parent, in order; say BYE to
        ``byes``; let them (and ``also``, told nothing more) read what is queued; close;
        log the room closed."""
        if self.ended:
            return
        self.ended = True
        sent = [conn for conn, reason, text in backs if self.hand_back(conn, reason, text)]
        self.handed = len(sent)
        # The count goes down before the BYE leaves: a client that has read its BYE
        # never sees itself counted. Clients handed back stay counted here until the
        # parent has taken them (or refused them: then they are ours to say BYE to).
        self.clients.value = self.handed
        refused = self.take_verdicts(sent)
        byes = {**byes, **{c: (p.BYE_ERROR, NO_PARTNER_TEXT) for c in refused}}
        for conn, (reason, text) in byes.items():
            self.log.departure(conn.label, reason)
            conn.out += p.bye_line(reason, text)
        self.linger([*byes, *(also or [])])
        for conn in self.conns:
            conn.close()
        self.log.event("close", f"room {self.number} closed: {why}")

    def requeues(self) -> bool:
        """Does a client whose partner leaves go back to the queue (``--requeue``)?"""
        return self.rules.requeue and self.rules.channel is not None and not self.rules.tls

    def hand_back(self, conn: Conn, why: str, text: str) -> bool:
        """Send ``conn`` to the parent's waiting queue with all its state (``why`` for
        the log, ``text`` for its WAIT); this process keeps its copy until the parent's
        verdict. False (logged, the client told ``BYE error``) if it cannot be sent."""
        self.unwatch(conn.fd)
        record = snapshot(conn, self.partner(conn).id, why, text)
        try:
            send_handback(self.rules.channel, record, conn.fd)
        except OSError as exc:
            self.log.departure(conn.label, f"hand-back failed: {exc.strerror or exc}")
            send_now(conn, p.bye_line(p.BYE_ERROR, NO_PARTNER_TEXT))
            conn.close()
            return False
        return True

    def take_verdicts(self, sent: list[Conn]) -> list[Conn]:
        """Wait for the parent's verdict on each client sent back: one it took is its
        own (our copy is closed); one it refused is ours again, to tell ``BYE error``.
        Returns the refused, no longer counted."""
        if not sent:
            return []
        verdicts = self.parent.await_verdicts(len(sent))
        refused = [conn for conn, taken in zip(sent, verdicts, strict=True) if not taken]
        self.handed -= len(refused)
        self.clients.value = self.handed
        for conn in sent:
            if conn not in refused:
                conn.close()
        for conn in refused:
            self.log.event("error", f"the server could not take back {conn.label}")
        return refused

    def linger(self, conns: list[Conn]) -> None:
        """Deliver pending output, send FIN, wait for each peer's close (bounded by LINGER)."""
        deadline = time.monotonic() + LINGER
        sel = selectors.DefaultSelector()
        for conn in conns:
            self.unwatch(conn.fd)
            if not conn.close_step(0):
                sel.register(conn.fd, conn.closing_events(), conn)
        while sel.get_map() and (left := deadline - time.monotonic()) > 0:
            for key, mask in sel.select(left):
                conn = key.data
                if conn.close_step(mask):
                    sel.unregister(conn.fd)
                else:
                    sel.modify(conn.fd, conn.closing_events(), conn)
        sel.close()


def say_error(conns: tuple[Conn, Conn]) -> None:
    """Best effort after a crash: tell each client still open ``BYE error``, unblocking."""
    line = p.bye_line(p.BYE_ERROR, "the room failed, sorry")
    for conn in conns:
        send_now(conn, line)


def send_now(conn: Conn, data: bytes) -> None:
    """Best effort, never blocking: what the socket takes now of ``data``."""
    try:
        conn.sock.send(data)
    except OSError:
        pass


def start_room(
    number: int, first: Conn, second: Conn, clients: Any, rules: RoomRules, parent: Log, fds: FdMap
) -> int:
    """In a new worker (``parent`` is the server's log, ``fds`` its fd map): drop
    everything of the server's but the pair and the room's end of its channel, name the
    process, then relay (:func:`run_room`). Returns the worker's exit status."""
    reset_inherited_signals()
    keep = [first.fd, second.fd]
    if rules.channel is not None:
        keep.append(rules.channel.fileno())
    fds.close_all(keep=keep)
    set_title(room_title(number, first.name, second.name), ROOM_NAME)
    log = Log(f"room {number} pid {os.getpid()}", parent.color, parent.stream)
    return run_room(number, first, second, clients, rules, log)


def run_room(
    number: int, first: Conn, second: Conn, clients: Any, rules: RoomRules, log: Log
) -> int:
    """Body of a room worker process (called in the forked child). Returns its exit status.

    Whatever happens, both sockets are closed and the room's client count is zero when
    this returns; a bug is logged in one line, the pair is told ``BYE error``, and the
    status is :data:`EXIT_CRASH`.
    """
    room = Room(number, first, second, clients, rules, log)
    try:
        return room.run()
    except Exception as exc:  # a bug must not hang the clients: log, tell, close, exit
        clients.value = room.handed
        if not room.ended:
            say_error(room.conns)
        log.error(f"room {number} crashed: {type(exc).__name__}: {exc}")
        return EXIT_CRASH
    finally:
        # Clients handed back stay counted until the parent has taken them.
        clients.value = room.handed
        for conn in (first, second):
            conn.close()
