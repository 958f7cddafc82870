"""``next`` against the real server (protocol 1.1, issue 10): rooms hand clients back to
the parent, which queues and pairs them again.

Every test starts its own ``bin/server`` (readiness from the listen line), talks over
loopback with raw peers, waits against deadlines, and reaps what it started.
"""

from __future__ import annotations

import os
import random
import re
import resource
import selectors
import signal
import socket
import time

import psutil
import pytest

from support import (
    DEADLINE,
    REPORT_RE,
    Peer,
    ServerProc,
    close_all,
    pair,
    report,
    socket_fds,
    wait_until,
)

LOCAL = r"127\.0\.0\.1:\d+"


@pytest.fixture
def start():
    """Factory of servers (``--no-color`` plus the options given), all reaped at teardown."""
    started: list[ServerProc] = []

    def make(*args: str) -> ServerProc:
        started.append(ServerProc("--no-color", *args))
        return started[-1]

    yield make
    for srv in started:
        srv.stop()


@pytest.fixture
def peers():
    """Every raw peer a test opens, closed at teardown."""
    opened: list[Peer] = []
    yield opened
    close_all(opened)


def join(srv: ServerProc, peers: list[Peer], name: str | None = None) -> Peer:
    peer = Peer(srv.address, name)
    peers.append(peer)
    return peer


def meet(srv: ServerProc, peers: list[Peer], a: str, b: str) -> tuple[Peer, Peer]:
    """A room of ``a`` (writes first) and ``b``, both tracked for teardown."""
    first, second = pair(srv.address, a, b)
    peers += [first, second]
    return first, second


def rest(peer: Peer, allow_reset: bool = False) -> list[str]:
    """Every line until the server closes the connection."""
    lines = []
    while (raw := peer.raw_line(allow_reset=allow_reset)) is not None:
        lines.append(raw.decode("utf-8", "replace"))
    return lines


def first_not_wait(peer: Peer) -> str:
    """The next line that is not a WAIT (a waiting client may be told again why)."""
    while (line := peer.line()).startswith("WAIT "):
        pass
    return line


def assert_silent(peer: Peer, until: float) -> None:
    """Nothing arrives on ``peer`` (no line, no close) before ``time.monotonic()`` passes
    ``until``: a deadline, not a sleep; any byte fails at once."""
    sel = selectors.DefaultSelector()
    sel.register(peer.sock, selectors.EVENT_READ)
    try:
        while (left := until - time.monotonic()) > 0:
            assert not sel.select(left), f"unexpected data: {peer.sock.recv(200, 0x40)!r}"
    finally:
        sel.close()
    assert peer.buf == b""


def addr_of(peer: Peer) -> str:
    host, port = peer.sock.getsockname()[:2]
    return f"{host}:{port}"


def counts(srv: ServerProc) -> tuple[int, int, int]:
    """SIGUSR2's clients, waiting and handshaking counts. (Its room count also holds a
    room whose worker has handed its clients back but not yet exited.)"""
    clients, _rooms, waiting, handshaking = report(srv)
    return clients, waiting, handshaking


def rooms_of(srv: ServerProc) -> list[psutil.Process]:
    return [p for p in srv.children() if p.status() != psutil.STATUS_ZOMBIE]


def room_pid(srv: ServerProc, number: int) -> int:
    m = srv.out.wait_for(rf"room {number} opened pid (\d+)")
    return int(m.group(1))


# ---------------------------------------------------------------- next in a room


@pytest.mark.parametrize("who", ["writer", "reader"])
def test_next_on_or_off_turn_requeues_the_sender_and_the_partner_gets_bye(start, peers, who):
    srv = start()
    alice, bob = meet(srv, peers, "alice", "bob")
    sender, partner = (alice, bob) if who == "writer" else (bob, alice)
    sender.send("next")
    sender.expect("WAIT ")
    partner.expect("BYE partner-exit")
    partner.expect_closed()
    name = "alice" if who == "writer" else "bob"
    srv.out.wait_for(rf"client requeued {name} {re.escape(addr_of(sender))} \(said next\)")
    carol = join(srv, peers, "carol")
    carol.expect(f"PAIRED {name}", "TURN READ")  # the sender waited first: it writes
    sender.expect("PAIRED carol", "TURN WRITE")
    sender.send("hello carol")
    sender.expect("TURN READ")
    carol.expect("MSG hello carol", "TURN WRITE")
    carol.send("hi")
    sender.expect("MSG hi", "TURN WRITE")
    assert counts(srv) == (2, 0, 0)


@pytest.mark.parametrize("line", [b"  next \r\n", b"\tnext\n"])
def test_next_with_spaces_around_or_crlf_is_next(start, peers, line):
    srv = start()
    alice, bob = meet(srv, peers, "alice", "bob")
    alice.send(line)
    alice.expect("WAIT looking for a new partner")
    bob.expect("BYE partner-exit")


def test_next_as_a_message_word_is_a_message(start, peers):
    srv = start()
    alice, bob = meet(srv, peers, "alice", "bob")
    alice.send("next time")
    alice.expect("TURN READ")
    bob.expect("MSG next time", "TURN WRITE")


def test_the_log_names_each_hand_back_once(start, peers):
    srv = start()
    alice, bob = meet(srv, peers, "alice", "bob")
    bob.send("next")
    bob.expect("WAIT ")
    alice.expect("BYE partner-exit")
    carol = join(srv, peers, "carol")
    carol.expect("PAIRED bob")
    bob.expect("PAIRED carol")
    assert srv.out.count(r"client requeued bob ") == 1
    assert srv.out.count(r"client requeued alice ") == 0


def test_next_while_waiting_gets_wait_again_and_keeps_the_place_in_the_queue(start, peers):
    """Under --requeue a split pair waits: bob (left behind) ahead of alice (said next).
    bob's ``next`` while waiting must not move him behind alice."""
    srv = start("--requeue")
    alice, bob = meet(srv, peers, "alice", "bob")
    alice.send("next")
    bob.expect("WAIT ")
    alice.expect("WAIT ")
    bob.expect("WAIT waiting for a partner: the only other person waiting is your last partner")
    bob.send("next")
    bob.expect("WAIT still waiting")
    bob.send("next")
    bob.expect("WAIT ")
    assert counts(srv) == (2, 2, 0)
    carol = join(srv, peers, "carol")
    carol.expect("PAIRED bob", "TURN READ")
    bob.expect("PAIRED carol", "TURN WRITE")


def both_say_next(srv: ServerProc, alice: Peer, bob: Peer) -> None:
    """Both send ``next`` while their room worker is stopped: both lines are waiting in
    the kernel when the room handles the first one."""
    worker = next(p for p in srv.children() if "alice+bob" in " ".join(p.cmdline()))
    worker.suspend()
    try:
        alice.send("next")
        bob.send("next")
    finally:
        worker.resume()


@pytest.mark.parametrize("requeue", [(), ("--requeue",)], ids=["plain", "requeue"])
def test_both_say_next_at_once_both_wait_and_each_meets_someone_new(start, peers, requeue):
    """Two ``next`` at once: the room sees the partner's ``next`` when it handles the
    first, and hands both back as having said it (no BYE, with or without --requeue).
    They are not paired together again; each meets a new arrival."""
    srv = start(*requeue)
    alice, bob = meet(srv, peers, "alice", "bob")
    both_say_next(srv, alice, bob)
    alice.expect("WAIT looking for a new partner")
    bob.expect("WAIT looking for a new partner")
    wait_until(lambda: srv.out.count(r"\(said next\)") == 2, what="both requeued")
    assert counts(srv) == (2, 2, 0)
    carol = join(srv, peers, "carol")
    carol.expect("PAIRED ", "TURN READ")
    dave = join(srv, peers, "dave")
    dave.expect("PAIRED ", "TURN READ")
    paired = {first_not_wait(alice), first_not_wait(bob)}
    assert paired == {"PAIRED carol", "PAIRED dave"}, paired


# ---------------------------------------------------------------- lines after next


@pytest.mark.parametrize("who", ["writer", "reader"])
def test_lines_pipelined_after_next_are_handled_in_order_while_waiting(start, peers, who):
    srv = start()
    alice, bob = meet(srv, peers, "alice", "bob")
    sender, partner = (alice, bob) if who == "writer" else (bob, alice)
    sender.send(b"next\nhello\nexit\n")  # one segment
    partner.expect("BYE partner-exit")
    lines = rest(sender)
    assert [line.split(" ", 2)[:2] for line in lines] == [
        ["WAIT", "looking"],
        ["ERR", "not-your-turn"],
        ["BYE", "exit"],
    ], lines
    srv.out.wait_for(r"client requeued \S+ .*\(said next\)")
    assert counts(srv) == (0, 0, 0)


def test_a_line_after_next_goes_to_the_next_room_when_one_opens_at_once(start, peers):
    """carol waits; alice says ``next`` with ``hello`` in the same segment. The lines
    the server holds are handled before alice is paired again: ``hello`` is refused
    while she waits (after her WAIT), then she is paired with carol, who came first."""
    srv = start()
    alice, bob = meet(srv, peers, "alice", "bob")
    carol = join(srv, peers, "carol")
    carol.expect("WAIT ")
    alice.send(b"next\nhello\n")
    bob.expect("BYE partner-exit")
    alice.expect("WAIT ", "ERR not-your-turn", "PAIRED carol", "TURN READ")
    carol.expect("PAIRED alice", "TURN WRITE")
    carol.send("hi alice")
    carol.expect("TURN READ")
    alice.expect("MSG hi alice", "TURN WRITE")
    alice.send("hi carol")
    carol.expect("MSG hi carol", "TURN WRITE")


def test_an_unfinished_line_after_next_is_finished_in_the_next_room(start, peers):
    srv = start()
    alice, bob = meet(srv, peers, "alice", "bob")
    carol = join(srv, peers, "carol")
    carol.expect("WAIT ")
    alice.send(b"next\nhel")  # the rest of the line comes in the next room
    bob.expect("BYE partner-exit")
    alice.expect("WAIT ", "PAIRED carol", "TURN READ")
    carol.expect("PAIRED alice", "TURN WRITE")
    carol.send("your turn soon")
    carol.expect("TURN READ")
    alice.expect("MSG your turn soon", "TURN WRITE")
    alice.send(b"lo carol\n")
    alice.expect("TURN READ")
    carol.expect("MSG hello carol", "TURN WRITE")


def test_an_unfinished_exit_after_next_is_finished_while_waiting(start, peers):
    srv = start()
    alice, _bob = meet(srv, peers, "alice", "bob")
    alice.send(b"next\nex")
    alice.expect("WAIT ")
    alice.send(b"it\n")
    assert rest(alice) == ["BYE exit goodbye"]


def test_a_line_cut_for_length_before_next_s_hand_back_stays_cut(start, peers):
    """The too-long line after ``next`` is refused once; its tail, sent later, is still
    discarded up to its LF in the parent (the reader's state travels with the socket)."""
    srv = start("--max-line", "16")
    alice, _bob = meet(srv, peers, "alice", "bob")
    alice.send(b"next\n" + b"x" * 40)
    alice.expect("WAIT ", "ERR too-long")
    alice.send(b"tail of the long line\nexit\n")
    assert rest(alice) == ["BYE exit goodbye"]


def test_next_then_a_half_close_is_handed_back_then_closed_and_never_paired(start, peers):
    srv = start()
    alice, bob = meet(srv, peers, "alice", "bob")
    carol = join(srv, peers, "carol")
    carol.expect("WAIT ")
    alice.send("next")
    alice.sock.shutdown(socket.SHUT_WR)  # sends no more, still reads
    bob.expect("BYE partner-exit")
    assert rest(alice) == ["WAIT looking for a new partner"]
    assert counts(srv) == (1, 1, 0)  # carol, still waiting for someone who can talk
    dave = join(srv, peers, "dave")
    dave.expect("PAIRED carol")


# ---------------------------------------------------------------- two who split


def test_two_who_split_wait_for_others_until_each_had_another_partner(start, peers):
    srv = start("--requeue")
    alice, bob = meet(srv, peers, "alice", "bob")
    alice.send("next")
    bob.expect("WAIT alice left")
    alice.expect("WAIT looking for a new partner: the only other person waiting is your last")
    bob.expect("WAIT waiting for a partner: the only other person waiting is your last partner")
    assert counts(srv) == (2, 2, 0)  # alone together in the queue: no room
    carol = join(srv, peers, "carol")
    carol.expect("PAIRED bob", "TURN READ")  # bob, left behind, was ahead of alice
    bob.expect("PAIRED carol", "TURN WRITE")
    carol.send("exit")
    carol.expect("BYE exit")
    bob.expect("WAIT carol left, waiting for a new partner: the only other person waiting is a")
    alice.expect("WAIT waiting for a partner: the only other person waiting is your last partner")
    # bob has had another partner, alice has not: still not together.
    assert counts(srv) == (2, 2, 0)
    dave = join(srv, peers, "dave")
    dave.expect("PAIRED alice", "TURN READ")  # alice is first in the queue now
    alice.expect("PAIRED dave", "TURN WRITE")
    dave.send("exit")
    dave.expect("BYE exit")
    alice.expect("WAIT dave left")
    # Each has had someone else since: they may meet again (bob waited first).
    bob.expect("PAIRED alice", "TURN WRITE")
    alice.expect("PAIRED bob", "TURN READ")
    bob.send("again")
    alice.expect("MSG again", "TURN WRITE")


# ---------------------------------------------------------------- --requeue


@pytest.mark.parametrize(
    ("how", "text", "why"),
    [
        ("exit", r"alice left", r"partner alice left"),
        ("next", r"alice left", r"partner alice left"),
        ("vanish", r"alice vanished", r"partner alice lost"),
    ],
)
def test_under_requeue_the_partner_who_is_left_waits_and_meets_the_next_arrival(
    start, peers, how, text, why
):
    srv = start("--requeue")
    alice, bob = meet(srv, peers, "alice", "bob")
    if how == "vanish":
        alice.close()  # no exit
    else:
        alice.send(how)
    line = bob.line()
    assert re.match(rf"WAIT .*{text}", line), line
    srv.out.wait_for(rf"client requeued bob {re.escape(addr_of(bob))} \({why}\)")
    if how == "exit":
        assert rest(alice) == ["BYE exit goodbye"]
    elif how == "next":
        alice.expect("WAIT ")
        bob.expect("WAIT waiting for a partner: the only other person waiting is your last")
    carol = join(srv, peers, "carol")
    carol.expect("PAIRED bob", "TURN READ")  # bob first: ahead of alice after a next
    bob.expect("PAIRED carol", "TURN WRITE")
    bob.send("hi carol")
    carol.expect("MSG hi carol", "TURN WRITE")
    if how == "next":
        dave = join(srv, peers, "dave")
        dave.expect("PAIRED alice", "TURN READ")
        alice.expect("PAIRED dave", "TURN WRITE")
        assert counts(srv) == (4, 0, 0)
    else:
        assert counts(srv) == (2, 0, 0)


def test_under_requeue_a_partner_dropped_for_not_reading_sends_the_other_back(start, peers):
    """bob writes when it is his turn but never reads, while alice sends the largest
    lines: the room drops bob once his unsent output passes its bound (64 KiB at this
    --max-line, after the kernel's buffers fill), and alice waits for someone new."""
    srv = start("--requeue", "--max-line", "4032")
    alice, bob = meet(srv, peers, "alice", "bob")
    big = "x" * 4032
    alice.send(big)
    deadline = time.monotonic() + 20
    while not (line := alice.line()).startswith("WAIT "):
        assert time.monotonic() < deadline, "bob was never dropped"
        if line == "TURN WRITE":
            alice.send(big)
        elif line == "TURN READ":
            try:
                bob.send("y")  # his turn: he writes, he never reads
            except OSError:
                pass  # dropped already: alice's WAIT is on its way
    assert "bob" in line, line
    srv.out.wait_for(r"client disconnected bob .*dropped: more than \d+ bytes unread")
    srv.out.wait_for(rf"client requeued alice {re.escape(addr_of(alice))} \(partner bob lost\)")
    carol = join(srv, peers, "carol")
    carol.expect("PAIRED alice", "TURN READ")
    alice.expect("PAIRED carol", "TURN WRITE")
    assert counts(srv) == (2, 0, 0)


def test_under_requeue_idle_timeout_still_ends_with_bye(start, peers):
    srv = start("--requeue", "--idle-timeout", "0.5")
    alice, bob = meet(srv, peers, "alice", "bob")
    assert rest(alice) == ["BYE timeout no message for 0.5 s"]
    assert rest(bob) == ["BYE timeout no message for 0.5 s"]
    assert srv.out.count("client requeued") == 0
    assert counts(srv) == (0, 0, 0)


def test_under_requeue_shutdown_still_ends_with_bye(start, peers):
    srv = start("--requeue")
    alice, bob = meet(srv, peers, "alice", "bob")
    carol = join(srv, peers, "carol")
    carol.expect("WAIT ")
    srv.signal(signal.SIGUSR1)
    for peer in (alice, bob, carol):
        assert rest(peer) == ["BYE shutdown SERVER WILL CLOSE NOW"]
        peer.close()  # the room waits for our close (bounded): do not make it wait
    assert srv.wait_exit() == 0
    assert srv.out.count("client requeued") == 0


def test_a_client_handed_back_into_a_full_queue_gets_bye_full(start, peers):
    """--max-waiting 1 under --requeue: bob, left behind, takes the one place; alice,
    who said next and may not be paired with bob, finds the queue full."""
    srv = start("--requeue", "--max-waiting", "1")
    alice, bob = meet(srv, peers, "alice", "bob")
    alice.send("next")
    bob.expect("WAIT alice left")
    assert rest(alice) == ["BYE full too many clients waiting, try again later"]
    srv.out.wait_for(r"client disconnected alice .*full")
    assert counts(srv) == (1, 1, 0)
    carol = join(srv, peers, "carol")  # the place is bob's to pair from
    carol.expect("PAIRED bob")


def test_a_client_handed_back_pairs_at_once_even_when_the_queue_is_at_its_limit(start, peers):
    """--max-waiting counts clients that would wait: alice, handed back while carol
    holds the one place, goes straight into a room with her."""
    srv = start("--max-waiting", "1")
    alice, bob = meet(srv, peers, "alice", "bob")
    carol = join(srv, peers, "carol")
    carol.expect("WAIT ")
    alice.send("next")
    alice.expect("WAIT ", "PAIRED carol", "TURN READ")
    carol.expect("PAIRED alice", "TURN WRITE")
    bob.expect("BYE partner-exit")


# ---------------------------------------------------------------- no new name timeout


def test_a_requeued_client_gets_no_new_name_timeout(start, peers):
    srv = start("--name-timeout", "0.5")
    alice, bob = meet(srv, peers, "alice", "bob")
    alice.send("next")
    alice.expect("WAIT ")
    bob.expect("BYE partner-exit")
    quiet_until = time.monotonic() + 1.2  # more than twice the name timeout
    mute = join(srv, peers)  # never names itself: the timeout is on, and short
    mute.expect("BYE timeout")
    assert_silent(alice, quiet_until)
    assert counts(srv) == (1, 1, 0)
    carol = join(srv, peers, "carol")
    carol.expect("PAIRED alice", "TURN READ")
    alice.expect("PAIRED carol", "TURN WRITE")
    alice.send("still here")
    carol.expect("MSG still here")


# ---------------------------------------------------------------- the room worker


def test_a_room_worker_is_titled_and_holds_its_two_clients_and_its_channel(start, peers):
    srv = start()
    alice, bob = meet(srv, peers, "alice", "bob")
    check_room(srv, 1, "alice+bob", {addr_of(alice), addr_of(bob)})
    bob.send("next")
    bob.expect("WAIT ")
    alice.expect("BYE partner-exit")
    carol = join(srv, peers, "carol")
    carol.expect("PAIRED bob")
    check_room(srv, 2, "bob+carol", {addr_of(bob), addr_of(carol)})
    # The parent kept no copy of the socket it took back and gave to room 2.
    parent_tcp = psutil.Process(srv.pid).net_connections(kind="tcp")
    assert all(c.status == psutil.CONN_LISTEN for c in parent_tcp), parent_tcp


def test_each_room_has_its_own_channel(start, peers):
    srv = start()
    meet(srv, peers, "alice", "bob")
    meet(srv, peers, "carol", "dave")
    channels = []
    for number in (1, 2):
        proc = psutil.Process(room_pid(srv, number))
        [unix] = proc.net_connections(kind="unix")
        channels.append(os.readlink(f"/proc/{proc.pid}/fd/{unix.fd}"))
    assert channels[0] != channels[1], channels


def check_room(srv: ServerProc, number: int, names: str, clients: set[str]) -> None:
    proc = psutil.Process(room_pid(srv, number))
    # setproctitle pads the old argv area with NULs: psutil shows them as empty args.
    title, *padding = proc.cmdline()
    assert title == f"forkchat-room {number} {names}"
    assert not any(padding), padding
    assert proc.name() == "forkchat-room"
    tcp = proc.net_connections(kind="tcp")
    assert all(c.status == psutil.CONN_ESTABLISHED for c in tcp), tcp  # no listener
    assert {f"{c.raddr.ip}:{c.raddr.port}" for c in tcp} == clients
    assert len(tcp) == 2
    assert len(proc.net_connections(kind="unix")) == 1  # its own channel
    assert socket_fds(proc.pid) == 3


# ---------------------------------------------------------------- races


@pytest.mark.parametrize("requeue", [False, True], ids=["plain", "requeue"])
def test_next_racing_a_shutdown_ends_every_client_with_exactly_one_bye(start, peers, requeue):
    """Eight rooms; in each one says ``next``; SIGUSR1 goes at once, while hand-backs are
    in flight. Whatever won each race, every client reads exactly one BYE, as its last
    line, then a clean close; the server exits 0 and leaves nothing behind."""
    srv = start(*(["--requeue"] if requeue else []))
    rooms = [meet(srv, peers, f"a{i}", f"b{i}") for i in range(8)]
    senders = {id(rooms[i][i % 2]) for i in range(8)}  # writers and readers alike
    for i, room in enumerate(rooms):
        room[i % 2].send("next")
    srv.signal(signal.SIGUSR1)
    for peer in peers:
        lines = rest(peer)
        peer.close()
        byes = [line for line in lines if line.startswith("BYE ")]
        assert len(byes) == 1 and lines[-1] == byes[0], lines
        if requeue or id(peer) in senders:
            assert byes[0] == "BYE shutdown SERVER WILL CLOSE NOW", lines
        else:
            assert byes[0].split()[1] in ("shutdown", "partner-exit"), lines
    assert srv.wait_exit() == 0
    assert srv.out.lines[-1].endswith("SERVER WILL DISCONNECT")
    assert "Traceback" not in srv.err.text()


def gone_or_zombie(proc: psutil.Process) -> bool:
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_worker_killed_after_handing_back_loses_only_what_it_held(start, peers):
    """Without --requeue the room hands alice back, tells bob BYE and waits for his
    close: SIGKILL lands between the hand-back and the worker's exit. alice is counted
    once and chats on; the parent logs the kill; no zombie."""
    srv = start()
    alice, bob = meet(srv, peers, "alice", "bob")
    worker = psutil.Process(room_pid(srv, 1))
    alice.send("next")
    alice.expect("WAIT ")
    bob.expect("BYE partner-exit")
    assert worker.status() != psutil.STATUS_ZOMBIE  # still lingering on bob
    worker.kill()
    srv.out.wait_for(rf"room 1 worker pid {worker.pid} killed by SIGKILL")
    bob.expect_closed(allow_reset=True)
    assert counts(srv) == (1, 1, 0)
    carol = join(srv, peers, "carol")
    carol.expect("PAIRED alice", "TURN READ")
    alice.expect("PAIRED carol", "TURN WRITE")
    alice.send("survived")
    carol.expect("MSG survived")
    assert counts(srv) == (2, 0, 0)
    assert not any(p.status() == psutil.STATUS_ZOMBIE for p in srv.children())


def until_wait_or_close(peer: Peer) -> bool:
    """Read ``peer`` until a WAIT (True: it was handed back) or the close (False)."""
    while (raw := peer.raw_line(allow_reset=True)) is not None:
        if raw.startswith(b"WAIT "):
            return True
        assert raw.startswith((b"TURN ", b"BYE partner-exit")), raw
    return False


def test_workers_killed_at_random_moments_of_a_next_keep_the_count_exact(start, peers):
    """Under --requeue, 24 rooms each see a ``next`` and a SIGKILL at a random moment:
    before the line is read, between the two hand-backs, or around the exit. Every
    client is then either waiting (it got WAIT) or closed; SIGUSR2 counts exactly the
    waiting ones; each kill of a live worker is logged; no zombie is left."""
    srv = start("--requeue")
    rng = random.Random(1010)
    outcomes = set()
    for number in range(1, 25):
        a, b = meet(srv, peers, f"a{number}", f"b{number}")
        worker = psutil.Process(room_pid(srv, number))
        sender = rng.choice((a, b))
        moment = rng.choice(("at once", "first line", "after a WAIT"))
        sender.send("next")
        if moment == "first line":
            sel = selectors.DefaultSelector()
            for peer in (a, b):
                sel.register(peer.sock, selectors.EVENT_READ)
            assert sel.select(DEADLINE), "nothing came back after next"
            sel.close()
        elif moment == "after a WAIT":
            assert until_wait_or_close(sender)
        try:
            worker.kill()
        except psutil.NoSuchProcess:
            pass
        wait_until(lambda w=worker: gone_or_zombie(w), what="the killed worker gone")
        stayed = [p for p in (a, b) if moment == "after a WAIT" and p is sender]
        stayed += [p for p in (a, b) if p not in stayed and until_wait_or_close(p)]
        outcomes.add(len(stayed))
        assert counts(srv) == (len(stayed), len(stayed), 0), (number, moment)
        for peer in stayed:
            peer.send("exit")
            assert [line for line in rest(peer) if not line.startswith("WAIT ")] == [
                "BYE exit goodbye"
            ]
        ended = srv.out.wait_for(
            rf"room {number} (closed|worker pid {worker.pid} killed by SIGKILL)"
        )
        assert ended
    wait_until(lambda: not srv.children(), what="every worker reaped")
    assert counts(srv) == (0, 0, 0)
    assert outcomes >= {0, 2}, outcomes  # both ends of the race were hit
    assert "Traceback" not in srv.err.text() + srv.out.text()


# ---------------------------------------------------------------- many cycles


class Cyclers:
    """Raw peers on a --requeue server that say ``next`` as soon as it is their turn to
    write: every room splits at once and its two clients are paired anew, forever."""

    def __init__(self, srv: ServerProc, peers: list[Peer], names: list[str]) -> None:
        self.srv = srv
        self.sel = selectors.DefaultSelector()
        self.nexts = 0
        self.usr2_sent = 0
        for name in names:
            peer = join(srv, peers, name)
            self.sel.register(peer.sock, selectors.EVENT_READ, peer)

    def run(self, nexts: int, usr2_every: int = 0, timeout: float = 60) -> None:
        """Go on until ``nexts`` more ``next`` lines are sent; SIGUSR2 the server after
        every ``usr2_every`` of them (0: never)."""
        goal = self.nexts + nexts
        deadline = time.monotonic() + timeout
        while self.nexts < goal:
            assert time.monotonic() < deadline, f"only {self.nexts} nexts in {timeout}s"
            for key, _ in self.sel.select(max(0.0, deadline - time.monotonic())):
                self.on_readable(key.data, usr2_every)

    def on_readable(self, peer: Peer, usr2_every: int) -> None:
        chunk = peer.sock.recv(65536)
        assert chunk, f"server closed a cycling client; had {peer.buf!r}"
        peer.buf += chunk
        *lines, peer.buf = peer.buf.split(b"\n")
        for line in lines:
            assert not line.startswith((b"BYE", b"ERR")), line
            if line == b"TURN WRITE":
                peer.sock.sendall(b"next\n")
                self.nexts += 1
                if usr2_every and self.nexts % usr2_every == 0:
                    self.srv.signal(signal.SIGUSR2)
                    self.usr2_sent += 1

    def close(self) -> None:
        for key in list(self.sel.get_map().values()):
            key.data.close()
        self.sel.close()


def test_the_count_stays_exact_while_six_clients_cycle_through_next(start, peers):
    """Six clients, three rooms, all splitting and pairing again as fast as they can,
    with SIGUSR2 landing all the while: no client ever leaves, so every report says 6."""
    srv = start("--requeue")
    cyclers = Cyclers(srv, peers, [f"c{i}" for i in range(6)])
    mark = srv.out.mark()
    cyclers.run(300, usr2_every=2)
    final = report(srv)
    reports = [
        int(m.group(1)) for line in srv.out.lines[mark:] if (m := re.search(REPORT_RE, line))
    ]
    assert len(reports) >= 20, f"only {len(reports)} reports for {cyclers.usr2_sent} signals"
    assert set(reports) == {6}, sorted(set(reports))
    assert final[0] == 6
    assert srv.out.count("client requeued") >= 2 * (300 - 3)  # 3 rooms may be in flight


def wait_quiet(srv: ServerProc) -> None:
    """Every client gone and every room reaped."""
    wait_until(lambda: not srv.children(), what="every room worker reaped")
    wait_until(lambda: report(srv) == (0, 0, 0, 0), what="no client left")


def test_a_thousand_nexts_leave_the_parent_as_it_was(start, peers):
    """1,000 ``next`` cycles (1,000 rooms forked, 2,000 hand-backs) by four clients:
    afterwards the parent holds the same fds, its memory is back within 2 MiB, and no
    worker or zombie is left."""
    srv = start("--requeue")
    parent = psutil.Process(srv.pid)
    warm = Cyclers(srv, peers, ["w1", "w2", "w3", "w4"])
    warm.run(50)
    warm.close()
    wait_quiet(srv)
    fds, rss = parent.num_fds(), parent.memory_info().rss
    cyclers = Cyclers(srv, peers, ["alice", "bob", "carol", "dave"])
    cyclers.run(1000)
    cyclers.close()
    wait_quiet(srv)
    wait_until(lambda: parent.num_fds() <= fds, what=f"the parent's fds back to {fds}")
    assert parent.num_fds() == fds
    grown = parent.memory_info().rss - rss
    assert grown < 2 << 20, f"RSS grew by {grown} bytes"
    assert srv.out.count(r"room \d+ opened") >= 1000
    assert srv.out.count("client requeued") >= 2000
    assert not srv.children()


# ---------------------------------------------------------------- issue 18


def test_next_then_exit_pipelined_while_someone_waits_never_pairs_the_leaver(start, peers):
    """carol waits; alice sends ``next`` and ``exit`` in one segment. The lines the
    server holds are handled before alice is paired again: she leaves from the queue,
    and carol, never paired with her, goes on waiting."""
    srv = start()
    alice, bob = meet(srv, peers, "alice", "bob")
    carol = join(srv, peers, "carol")
    carol.expect("WAIT ")
    alice.send(b"next\nexit\n")
    bob.expect("BYE partner-exit")
    assert rest(alice) == ["WAIT looking for a new partner", "BYE exit goodbye"]
    srv.out.wait_for(r"client disconnected alice \S+ \(exit\)")
    bob.close()
    srv.out.wait_for(r"room 1 closed")
    wait_until(lambda: not srv.children(), what="room 1 reaped")
    assert report(srv) == (1, 0, 1, 0)
    assert srv.out.count(r"room 2 opened") == 0
    dave = join(srv, peers, "dave")
    dave.expect("PAIRED carol")
    carol.expect("PAIRED dave", "TURN WRITE")  # carol's first words since she came


def fill_fds(srv: ServerProc) -> list[socket.socket]:
    """Connect idle clients until the server runs out of fds (it says so and pauses
    its accepts): those it accepted hold its last fds; the rest wait in the backlog."""
    held = []
    mark = srv.out.mark()
    while not srv.out.count("accept failed"):
        assert len(held) < 200, "the server never ran out of fds"
        sock = socket.create_connection(srv.address, timeout=DEADLINE)
        held.append(sock)
        sel = selectors.DefaultSelector()
        sel.register(sock, selectors.EVENT_READ)
        deadline = time.monotonic() + DEADLINE
        while not sel.select(0.02) and not srv.out.count("accept failed"):
            assert time.monotonic() < deadline, "neither HELLO nor 'accept failed'"
        sel.close()
    srv.out.wait_for("accept failed", start=mark)
    return held


def test_a_client_the_server_cannot_take_back_is_told_by_its_room_and_counted_once(peers):
    """The server out of fds when alice says ``next``: her socket cannot be received
    with its record (MSG_CTRUNC). That record alone is refused (never matched with the
    next descriptor), the room tells alice ``BYE error``, the log says what happened,
    and the count stays exact throughout."""
    limit = 48
    srv = ServerProc(
        "--no-color",
        "--max-waiting",
        "500",
        preexec=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit)),
    )
    fillers: list[socket.socket] = []
    try:
        alice, bob = pair(srv.address)
        peers += [alice, bob]
        fillers = fill_fds(srv)
        alice.send("next")
        assert rest(alice) == ["BYE error could not find you a new partner"]
        bob.expect("BYE partner-exit")
        srv.out.wait_for(r"room 1: cannot take back a client: its socket was lost")
        srv.out.wait_for(r"\[room 1 pid \d+\] the server could not take back alice ")
        srv.out.wait_for(r"room 1 closed")
        wait_until(lambda: not srv.children(), what="room 1 reaped")
        clients, rooms, waiting, handshaking = report(srv)
        assert (clients, rooms, waiting) == (handshaking, 0, 0)
        assert srv.out.count(r"client requeued alice") == 0
        for sock in fillers:
            sock.close()
        carol, dave = pair(srv.address, "carol", "dave")  # fds are free again
        peers += [carol, dave]
    finally:
        for sock in fillers:
            sock.close()
        srv.stop()


def test_under_requeue_the_one_left_behind_hears_why_even_when_every_room_is_busy(start, peers):
    """The only room busy and a pair in line for it: a client whose partner left is
    told so, and that the room is busy, not only the latter."""
    srv = start("--requeue", "--max-rooms", "1")
    alice, bob = meet(srv, peers, "alice", "bob")
    carol = join(srv, peers, "carol")
    carol.expect("WAIT waiting for a partner: nobody else is waiting")
    dave = join(srv, peers, "dave")
    dave.expect("WAIT waiting for a partner: the only room is busy, you are in line")
    carol.expect("WAIT waiting for a partner: the only room is busy, you are in line")
    erin = join(srv, peers, "erin")
    erin.expect("WAIT waiting for a partner: 2 others waiting")
    alice.send("next")  # the room frees: carol and dave take it; bob and erin wait
    carol.expect("PAIRED dave")
    bob.expect("WAIT alice left, waiting for a new partner: the only room is busy, you are in")
