"""The parent's rooms: forking a worker for each pair, counting its clients, taking back
the clients it hands back, reaping it.

A room worker is a plain ``os.fork()`` child of the server (``children.fork_children``),
watched through its pidfd. Each room gets, before the fork, its client count (a
lock-free ``multiprocessing.Value`` from the fork context pinned below, inherited by the
worker, which alone writes it until it is gone) and its channel (a Unix socketpair for
hand-backs and the shutdown note, ``handback.py``; the worker also sees the server die
through it). The relay in the new process is ``room.py``'s.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.sharedctypes  # imported now: lazily, at the first room, fds may be short
import os
import selectors
import signal
import socket
import time
from collections.abc import Callable
from typing import Any

from . import protocol as p
from .children import Child, ForkError, describe_exit, fork_children
from .clients import Clients
from .conn import IN_ROOM, Conn
from .handback import ChannelReader, HandBack, note_line, restore_conn
from .room import RoomRules, start_room
from .shared import Counts, locate

# The start method is pinned once, here: the counts live in the fork context's shared
# memory, which forked workers inherit (Python 3.14 changes the Linux default).
MP = multiprocessing.get_context("fork")
STOP_GRACE = 5.0  # seconds rooms get to say BYE at shutdown before they are killed
# Rooms forked back to back in one pass of the loop, at most: enough that the parent's
# own work (accept, names, log) does not come between every two forks, few enough that
# the new rooms, all starting at once, do not starve it of the CPU.
FORK_BATCH = 32


class RoomProc:
    """What the parent keeps of a room: its worker, that worker's client count, and the
    parent's end of the room's channel."""

    __slots__ = ("channel", "child", "clients", "number", "reader", "received")

    def __init__(self, number: int, child: Child, clients: Any, channel: socket.socket):
        self.number = number
        self.child = child
        self.clients = clients  # multiprocessing.Value("i"): 2 at the fork, then the worker's
        self.channel = channel
        self.reader = ChannelReader(channel)
        self.received = 0  # clients taken back from the channel: no longer the room's

    @property
    def held(self) -> int:
        """The room's clients that the parent has not taken back: exact whenever read."""
        return max(0, self.clients.value - self.received)


class Rooms:
    """Every open room, by its worker's sentinel."""

    def __init__(
        self,
        sel: selectors.BaseSelector,
        clients: Clients,
        rules: RoomRules,
        max_rooms: int,
        on_back: Callable[[Conn, str], None],
        on_free: Callable[[], None],
    ) -> None:
        self.sel = sel
        self.clients = clients
        self.fds = clients.fds
        self.log = clients.log
        self.rules = rules
        self.max_rooms = max_rooms
        self.on_back = on_back  # a client handed back, and its WAIT text: the lobby's
        self.on_free = on_free  # a room was freed: the lobby may pair more
        self.rooms: dict[int, RoomProc] = {}  # sentinel -> room
        self.channels: dict[int, RoomProc] = {}  # channel fd -> room
        self.opened = 0  # rooms opened so far: the last room number
        self.ready: list[tuple[Conn, Conn]] = []  # pairs given a room, to fork in this pass
        self.stopping = False

    def __len__(self) -> int:
        return len(self.rooms)

    def can_open(self) -> bool:
        return len(self.rooms) + len(self.ready) < self.max_rooms and not self.stopping

    def is_full(self) -> bool:
        return len(self.rooms) + len(self.ready) >= self.max_rooms

    # -- opening ------------------------------------------------------------------------

    def open(self, first: Conn, second: Conn) -> None:
        """Give the pair a room: its worker is forked at the end of this pass of the
        loop (:meth:`fork_ready`), with the other pairs made in the same pass. Forking
        them back to back keeps the parent's work between two forks small: every page
        the parent writes after a fork is copied, for the parent, and for the room
        forked just before, whose own it then stays. Until then the pair is this part's,
        and its input waits in the kernel, for the room."""
        for conn in (first, second):
            conn.state = IN_ROOM
            self.clients.hand_to(conn, self)
        self.ready.append((first, second))

    def fork_ready(self) -> None:
        """Fork a worker for each pair given a room (FORK_BATCH at most: the others in
        the next pass), back to back, each room's count and channel made first; then
        settle each: the parent closes its copies of the pair's sockets and watches the
        worker. The worker logs "room N opened" itself, so that line comes before its
        others. A pair whose room cannot be made is told ``BYE error``."""
        launches = []  # (the worker's arguments, our end of its channel)
        batch, self.ready = self.ready[:FORK_BATCH], self.ready[FORK_BATCH:]
        for first, second in batch:
            try:
                launches.append(self.prepare(first, second))
            except ForkError as exc:
                self.refuse(first, second, exc)
        jobs = [(self.become_room, args) for args, _ in launches]
        children = fork_children(jobs, "a room worker") if jobs else []
        for (args, ours), child in zip(launches, children, strict=True):
            number, first, second, count, theirs = args
            self.fds.disown(theirs.fileno())
            theirs.close()
            if isinstance(child, ForkError):
                self.fds.disown(ours.fileno())
                ours.close()
                self.refuse(first, second, child)
                continue
            self.settle(RoomProc(number, child, count, ours), first, second)

    def prepare(self, first: Conn, second: Conn) -> tuple[tuple, socket.socket]:
        """A room's number, count (2) and channel: its worker's arguments, and our end
        of the channel. Both ends are marked in the fd map, so every worker forked in
        the same pass closes those that are not its own. Raises ForkError, leaving
        nothing."""
        try:
            count = MP.Value("i", 2, lock=False)
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        except OSError as exc:  # a new arena of shared memory, or the pair, needs fds
            raise ForkError(f"cannot make a room channel: {exc.strerror or exc}") from None
        self.fds.own(ours.fileno())
        self.fds.own(theirs.fileno())
        self.opened += 1
        return (self.opened, first, second, count, theirs), ours

    def settle(self, room: RoomProc, first: Conn, second: Conn) -> None:
        """The worker runs: the parent closes its copies of the pair's sockets and
        watches the worker's sentinel (marked in the fd map: later workers close it)
        and its channel."""
        for conn in (first, second):
            self.clients.release(conn)
            conn.close()
        self.fds.own(room.child.sentinel)
        self.rooms[room.child.sentinel] = room
        self.channels[room.channel.fileno()] = room
        self.sel.register(room.child.sentinel, selectors.EVENT_READ, self.on_sentinel)
        self.sel.register(room.channel, selectors.EVENT_READ, self.on_channel)

    def refuse(self, first: Conn, second: Conn, exc: ForkError) -> None:
        """No room for the pair: log why, tell both ``BYE error``."""
        self.log.error(f"room for {first.label} + {second.label}: {exc}")
        for conn in (first, second):
            self.clients.say_bye(conn, p.BYE_ERROR, "could not open a room, try again later")

    def on_ready(self, conn: Conn, mask: int) -> None:
        """A client waiting for its room's fork: its input is the room's."""

    def forget(self, conn: Conn) -> None:
        """A client given a room leaves this part only through the fork (or its BYE)."""

    def become_room(
        self, number: int, first: Conn, second: Conn, count: Any, channel: socket.socket
    ) -> int:
        """The child's side of the fork: become the room. Returns its exit status."""
        rules = self.rules._replace(channel=channel)
        return start_room(number, first, second, count, rules, self.log, self.fds)

    # -- hand-backs ---------------------------------------------------------------------

    def on_channel(self, key: Any, mask: int) -> None:
        self.read_channel(self.channels[key.fd])

    def read_channel(self, room: RoomProc) -> None:
        """Take back every client the room has handed back so far (never blocks)."""
        records, closed = room.reader.read()
        for record, fd in records:
            self.take_back(room, record, fd)
        if closed:
            self.unwatch_channel(room)

    def take_back(self, room: RoomProc, record: HandBack | None, fd: int | None) -> None:
        """A client handed back: restore it as its room left it and give it to the lobby,
        counted there from the same step of the loop; or, if its socket was lost on the
        way (the parent out of fds) or the record cannot be read, refuse it: the room
        tells it ``BYE error``."""
        sock = None
        if fd is not None and record is not None:
            try:
                sock = socket.socket(fileno=fd)
            except OSError:
                pass
        if sock is None:
            if fd is not None:
                os.close(fd)
            room.reader.answer(False)
            lost = "its socket was lost (out of file descriptors?)" if fd is None else "bad record"
            self.log.error(f"room {room.number}: cannot take back a client: {lost}")
            return
        conn = self.clients.new_conn(sock, record.peer, record.id)
        restore_conn(conn, record)
        room.received += 1
        room.reader.answer(True)
        self.log.event("name", f"client requeued {conn.label} ({record.why})")
        self.on_back(conn, record.text)

    def unwatch_channel(self, room: RoomProc) -> None:
        """Stop watching the room's channel (its worker's end is closed); safe to repeat."""
        if self.channels.pop(room.channel.fileno(), None) is not None:
            self.sel.unregister(room.channel)

    # -- the end of a room --------------------------------------------------------------

    def on_sentinel(self, key: Any, mask: int) -> None:
        self.reap(key.fd)

    def reap(self, sentinel: int, timeout: float | None = None) -> None:
        """A worker has exited (its sentinel fired, or it was SIGKILLed): take back what
        it handed back, reap it, log an abnormal exit, free its room, and let the lobby
        pair more."""
        room = self.rooms.pop(sentinel)
        self.sel.unregister(sentinel)
        code = room.child.join(timeout)
        self.close_channel(room)
        room.clients.value = 0
        self.fds.disown(sentinel)
        room.child.close()
        if code is None:  # stuck in the kernel even after SIGKILL
            self.log.error(f"room {room.number} pid {room.child.pid} did not exit; leaving it")
            return
        if code:
            self.log.error(f"room {room.number} worker pid {room.child.pid} {describe_exit(code)}")
        self.on_free()

    def reap_exited(self) -> None:
        """Reap every worker that has exited, whether or not its sentinel was seen yet."""
        for sentinel, room in list(self.rooms.items()):
            if room.child.poll() is not None:
                self.reap(sentinel)

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

    def held(self) -> int:
        """Clients in rooms, the pairs about to be forked included."""
        return 2 * len(self.ready) + sum(room.held for room in self.rooms.values())

    def count(self) -> int:
        """Rooms open, the pairs about to be forked included."""
        return len(self.rooms) + len(self.ready)

    # -- across an upgrade in place (upgrade.py) -----------------------------------------

    def export(self) -> list[dict[str, Any]]:
        """Every room as data: its worker (PID, pidfd), its channel (fd, and what came
        of a hand-back not yet whole), where its count lives (``shared.locate``)."""
        rooms = []
        for room in self.rooms.values():
            count = locate(room.clients)
            rooms.append(
                {
                    "number": room.number,
                    "pid": room.child.pid,
                    "pidfd": room.child.sentinel,
                    "channel": room.channel.fileno(),
                    "channel_bytes": bytes(room.reader.buf).decode("latin-1"),
                    "channel_fds": list(room.reader.fds),
                    "received": room.received,
                    "count": count,
                    "count_now": room.clients.value,
                }
            )
        return rooms

    def adopt(self, rooms: list[dict[str, Any]], opened: int) -> None:
        """The old code's rooms: still this process's children, their workers running
        the old code to the end; their counts read where they live, and the room
        numbers going on from ``opened``."""
        self.opened = opened
        counts = Counts()
        for data in rooms:
            child = Child(data["pid"], data["pidfd"])
            channel = socket.socket(fileno=data["channel"])
            count = counts.view(data["count"], data["count_now"])
            room = RoomProc(data["number"], child, count, channel)
            room.reader.buf[:] = data["channel_bytes"].encode("latin-1")
            room.reader.fds.extend(data["channel_fds"])
            room.received = data["received"]
            for fd in (child.sentinel, channel.fileno()):
                os.set_inheritable(fd, False)
                self.fds.own(fd)
            self.rooms[child.sentinel] = room
            self.channels[channel.fileno()] = room
            self.sel.register(child.sentinel, selectors.EVENT_READ, self.on_sentinel)
            self.sel.register(channel, selectors.EVENT_READ, self.on_channel)
        counts.close()

    def drain(self) -> None:
        """Before an upgrade: take back every whole hand-back waiting in a channel."""
        for room in list(self.rooms.values()):
            if room.channel.fileno() in self.channels:
                self.read_channel(room)

    # -- shutdown -----------------------------------------------------------------------

    def stop_all(self, why: str) -> None:
        """Shutdown: no more rooms; each room gets the note saying ``why`` on its channel,
        then SIGUSR1 through its pidfd (never another process that reused the PID). A
        worker gone already is not signalled; its sentinel still ends it in the loop."""
        self.stopping = True
        for pair in self.ready:
            for conn in pair:
                self.clients.say_bye(conn, p.BYE_SHUTDOWN, p.SHUTDOWN_TEXT)
        self.ready.clear()
        note = note_line(why)
        for room in self.rooms.values():
            try:
                room.channel.send(note)
            except OSError:
                pass
            room.child.signal(signal.SIGUSR1)

    def kill_stragglers(self) -> None:
        """The shutdown's deadline passed: SIGKILL every room still there and reap them
        against one short deadline."""
        stragglers = list(self.rooms.items())
        for _, room in stragglers:
            self.log.error(f"room {room.number} pid {room.child.pid} did not stop; killing it")
            room.child.kill()
        deadline = time.monotonic() + STOP_GRACE
        for sentinel, _ in stragglers:
            self.reap(sentinel, timeout=max(0.0, deadline - time.monotonic()))
