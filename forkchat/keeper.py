"""The parent's keeping of rooms: opening one for each pair the queue gives, reaping
its worker through its sentinel, and taking back the clients it hands back.

:class:`RoomKeeper` is a mixin of :class:`forkchat.server.Server`, as
``socketserver.ForkingMixIn`` is of a server: it uses the server's tables (``waiting``,
``rooms``, ``channels``, ``fds``), its selector and its client I/O (``register``,
``say_bye``, ``enqueue``, ``tell_waiting``...). It orders each worker from the room
forker (``forker.py``) while there is one, and forks it itself otherwise (TLS, or the
forker gone); starting a worker is ``workers.py``'s (forking and watching one,
``children.py``'s), the relay in the new process ``room.py``'s.
"""

from __future__ import annotations

import os
import selectors
import signal
import socket
import time
from typing import Any

from . import protocol as p
from .children import Worker, WorkerError, describe_exit, own_children
from .conn import IN_ROOM, WAITING, Conn
from .forker import GO, RoomSetup
from .handback import ChannelReader, HandBack, restore_conn
from .room import RoomRules, start_room
from .workers import (
    ForkerGone,
    RoomProc,
    abandon_room,
    become_subreaper,
    fork_worker,
    prepare_room,
    start_forker,
)

STOP_GRACE = 5.0  # seconds rooms get to say BYE at shutdown before they are killed


class RoomKeeper:
    """Open, reap and take back from rooms (a mixin of the server; see the module)."""

    def open_rooms(self) -> None:
        """Open a room for each pair the queue gives (``waitlist``) while one is free."""
        while len(self.rooms) < self.opts.max_rooms and not self.stopping:
            pair = self.waiting.next_pair()
            if pair is None:
                return
            # A client that closed (the loop has not read it yet) with no line left to
            # handle has nothing to do in a room; with lines left (``exit``) it goes in.
            dead = [conn for conn in pair if not conn.inbox and conn.peer_closed()]
            for conn in dead:
                self.end_input(conn)
            if not dead:
                self.open_room(*pair)

    def open_room(self, first: Conn, second: Conn) -> None:
        """Fork a worker for the pair; the parent then closes its copies of both sockets.
        The worker logs "room N opened" itself, so that line comes before its others."""
        number = self.room_count + 1
        for conn in (first, second):
            self.forget(conn)
            self.sel.unregister(conn.fd)
            del self.by_fd[conn.fd]
            conn.state = IN_ROOM
        started = self.start_worker(number, first, second)
        if started is None:
            self.refuse_pair(first, second)
            return
        room = started
        self.room_count = number
        for conn in (first, second):
            self.fds.disown(conn.fd)
            conn.close()
        self.rooms[room.proc.sentinel] = room
        self.channels[room.channel.fileno()] = room
        self.sel.register(room.proc.sentinel, selectors.EVENT_READ, self.on_sentinel)
        self.sel.register(room.channel, selectors.EVENT_READ, self.on_channel)

    def start_worker(self, number: int, first: Conn, second: Conn) -> RoomProc | None:
        """Start the room's worker, through the forker while there is one; None
        (logged) if it cannot be done now, with nothing left half made. A forker that
        fails is given up on, and this room is forked here."""
        try:
            if self.forker is not None:
                try:
                    return self.open_worker(number, first, second, self.order_worker)
                except ForkerGone as exc:
                    self.lose_forker(str(exc))
            return self.open_worker(number, first, second, self.fork_here)
        except WorkerError as exc:
            self.log.error(str(exc))
            return None

    def open_worker(self, number: int, first: Conn, second: Conn, launch: Any) -> RoomProc:
        """Make the room's count and channel, then ``launch`` the worker
        (``order_worker`` or ``fork_here``). What it raises goes on, and nothing is
        left: the channel's both ends are closed."""
        clients, ours, theirs = prepare_room(self.counts, self.fds)
        try:
            worker = launch(number, clients, first, second, ours, theirs)
        except BaseException:
            abandon_room(ours, self.fds)
            raise
        finally:
            theirs.close()
        return RoomProc(number, worker, clients, ours, ChannelReader(ours))

    def order_worker(
        self, number: int, clients: Any, first: Conn, second: Conn, ours: socket.socket, theirs: Any
    ) -> Worker:
        """Have the forker fork the worker; once its pidfd is here, let it go (``GO`` on
        the channel). Until then it touches nothing: a failed order, whatever the forker
        did, leaves no room (the caller closes ``ours``: the worker sees it and exits).
        A count the forker cannot see (outside the memory reserved for counts) makes
        this room one the server forks itself."""
        offset = self.counts.offset_of(clients)
        if offset is None:
            return self.fork_here(number, clients, first, second, ours, theirs)
        worker = self.forker.order(number, offset, first, second, theirs)
        try:
            ours.send(GO)
        except OSError:
            worker.close()
            raise WorkerError(f"room {number}: its worker exited before it started") from None
        self.fds.own(worker.sentinel)
        return worker

    def fork_here(
        self, number: int, clients: Any, first: Conn, second: Conn, ours: socket.socket, theirs: Any
    ) -> Worker:
        """Fork the worker from this process (TLS, or no forker)."""
        return fork_worker(self.become_room, (number, first, second, clients, theirs), self.fds)

    def refuse_pair(self, first: Conn, second: Conn) -> None:
        """The fork failed: tell both, the server goes on."""
        for conn in (first, second):
            self.register(conn)
            self.say_bye(conn, p.BYE_ERROR, "could not open a room, try again later")

    def become_room(
        self, number: int, first: Conn, second: Conn, clients: Any, channel: socket.socket
    ) -> int:
        """Child side of the fork: become the room (``room.start_room``). Returns the
        worker's exit status."""
        rules = RoomRules(self.opts.idle_timeout, self.opts.requeue, channel, self.tls is not None)
        return start_room(number, first, second, clients, rules, self.log, self.fds)

    def on_sentinel(self, key: Any, mask: int) -> None:
        self.reap_room(key.fd)

    def on_channel(self, key: Any, mask: int) -> None:
        self.read_channel(self.channels[key.fd])

    def read_channel(self, room: RoomProc) -> None:
        """Take back every client the room has handed back so far (never blocks). Each
        one moves from the room's count to the queue in one step of the loop."""
        records, closed = room.reader.read()
        for record, fd in records:
            room.received += 1
            self.take_back(record, fd)
        if closed:
            self.unwatch_channel(room)

    def unwatch_channel(self, room: RoomProc) -> None:
        """Stop watching the room's channel (its worker's end is closed); safe to repeat."""
        if self.channels.pop(room.channel.fileno(), None) is not None:
            self.sel.unregister(room.channel)

    def take_back(self, record: HandBack, fd: int) -> None:
        """A client handed back by its room: restore it as it was there, log it, and
        queue it as a new arrival (``WAIT``), or tell it ``BYE`` if the server is
        stopping or the queue is full. Its lines are handled as a waiting client's."""
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            os.close(fd)
            return
        conn = self.new_conn(sock, record.peer, record.id)
        restore_conn(conn, record)
        self.log.event("name", f"client requeued {conn.label} ({record.why})")
        self.register(conn)
        if self.stopping:
            self.say_bye(conn, p.BYE_SHUTDOWN, p.SHUTDOWN_TEXT)
        elif self.queue_full(conn):
            why = f"full: {len(self.waiting)} waiting, requeued"
            self.say_bye(conn, p.BYE_FULL, "too many clients waiting, try again later", why)
        else:
            self.requeue(conn, record.text)

    def requeue(self, conn: Conn, text: str) -> None:
        """Queue a handed-back client with its ``WAIT text`` (queued first: it comes
        before PAIRED if a room opens at once), then handle its lines as a waiting
        client's. One whose input has ended and has no line left gets no room."""
        conn.queue(p.wait_line(text))
        if conn.eof and not conn.inbox:
            conn.state = WAITING
            self.end_input(conn)
            return
        self.enqueue(conn)
        if conn.state == WAITING:
            self.tell_waiting(conn, text, told=True)
            self.handle_inbox(conn)
        if conn.state == WAITING and conn.eof:
            self.end_input(conn)

    def reap_room(self, sentinel: int, timeout: float | None = None) -> None:
        """A worker has exited (its sentinel fired, or it was SIGKILLed): take back what
        it handed back, join it, log an abnormal exit, free its room, and open the next
        ones from the queue."""
        room = self.rooms.pop(sentinel)
        self.sel.unregister(sentinel)
        code = room.proc.join(timeout)
        self.close_channel(room)
        room.clients.value = 0
        self.fds.disown(room.proc.sentinel)
        room.proc.close()
        if code is None:  # stuck in the kernel even after SIGKILL
            self.log.error(f"room {room.number} pid {room.proc.pid} did not exit; leaving it")
            return
        if code:
            self.log.error(f"room {room.number} worker pid {room.proc.pid} {describe_exit(code)}")
        self.open_rooms()

    def close_channel(self, room: RoomProc) -> None:
        """After the worker's exit: take the last hand-backs, close what came without a
        whole message (a worker killed while it sent), close the channel."""
        self.read_channel(room)
        lost = room.reader.leftover_fds()
        for fd in lost:
            os.close(fd)
        if lost:
            self.log.error(f"room {room.number}: {len(lost)} client(s) lost in a hand-back")
        self.unwatch_channel(room)
        self.fds.disown(room.channel.fileno())
        room.channel.close()

    def start_forker(self) -> str | None:
        """Start the room forker (``forker.py``), unless rooms need this process's memory
        (TLS sessions). Without one, or once it is gone, rooms are forked here. Returns
        why it could not be started, for the log (after the listen line), or None."""
        become_subreaper()  # should the forker die, its rooms are ours to reap
        if self.tls is not None:
            return None
        try:
            setup = RoomSetup(
                self.opts.max_line, self.opts.idle_timeout, self.opts.requeue, self.log.color
            )
            self.forker = start_forker(setup, self.counts, self.fds)
        except WorkerError as exc:
            return f"{exc}: the server forks the rooms itself"
        self.sel.register(self.forker.sentinel, selectors.EVENT_READ, self.on_forker_exit)
        return None

    def on_forker_exit(self, key: Any, mask: int) -> None:
        self.lose_forker()

    def lose_forker(self, failure: str = "") -> None:
        """The forker exited, or ``failure`` made it no use (it is then killed): reap
        it, log it; later rooms are forked here. Its rooms go on, watched through their
        pidfds; orphaned, they are this subreaper's children, reaped here, and so is any
        that had exited unreaped (from now on at every SIGCHLD: :meth:`reap_strays`)."""
        forker, self.forker = self.forker, None
        signal.signal(signal.SIGCHLD, lambda *_: None)  # wakes the loop: handle_chld
        self.sel.unregister(forker.sentinel)
        self.fds.disown(forker.sentinel)
        self.fds.disown(forker.sock.fileno())
        code = forker.stop(timeout=0)  # exited already, or failed: then it is killed
        how = f"failed ({failure})" if failure else describe_exit(code or 0)
        self.log.error(f"room forker pid {forker.pid} {how}; the server forks the rooms itself")
        self.reap_strays()

    def handle_chld(self) -> None:
        """SIGCHLD (watched once the forker is gone): reap the strays."""
        self.reap_strays()

    def reap_strays(self) -> None:
        """Reap, by PID, every exited child of this process that no watched worker
        stands for: a room of the dead forker's whose end was already seen, or one an
        order left behind. A watched worker is reaped through its own pidfd."""
        watched = {room.proc.pid for room in self.rooms.values() if room.proc.exitcode is None}
        for pid in own_children():
            if pid not in watched:
                try:
                    os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    pass

    def stop_forker(self) -> None:
        """At exit: the forker reaps its last rooms and exits; log an abnormal end."""
        if self.forker is not None:
            forker, self.forker = self.forker, None
            code = forker.stop(timeout=STOP_GRACE)
            if code:
                self.log.error(f"room forker pid {forker.pid} {describe_exit(code)}")

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
