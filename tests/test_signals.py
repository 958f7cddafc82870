"""Signals against real processes: SIGUSR2 report, SIGUSR1/TERM/INT shutdown, SIGKILL faults."""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import sys

import pexpect
import psutil
import pytest

from support import (
    BIN,
    DEADLINE,
    REPORT_RE,
    Peer,
    ServerProc,
    child_env,
    pair,
    report,
    wait_until,
)


def reaped(server: ServerProc, pid: int) -> None:
    """Wait until the server logged the end of worker ``pid`` and it is no longer a child."""
    wait_until(lambda: pid not in {c.pid for c in server.children()}, what=f"worker {pid} reaped")


NAME_TIMEOUT = 2.5  # the steps before the shy client's timeout take ~0.3 s unloaded


def test_usr2_count_follows_every_kind_of_arrival_and_departure():
    srv = ServerProc("--no-color", "--name-timeout", f"{NAME_TIMEOUT:g}")
    try:
        assert report(srv) == (0, 0, 0, 0)
        # Connected, no name: it stays counted as handshaking through every step
        # below, then leaves by its name timeout (so those steps overlap the wait).
        shy = Peer(srv.address)
        assert report(srv) == (1, 0, 0, 1)
        a, b = pair(srv.address)
        assert report(srv) == (3, 1, 0, 1)
        w = Peer(srv.address, "waiter")
        w.expect("WAIT ")
        assert report(srv) == (4, 1, 1, 1)
        w.close()
        srv.out.wait_for("waiter .* \\(closed while waiting\\)")
        assert report(srv)[:4:2] == (3, 0)
        a.send("exit")
        a.expect("BYE exit")
        b.expect("BYE partner-exit")
        assert report(srv)[::3] == (1, 1)
        c, d = pair(srv.address, "c", "d")
        c.close()  # vanished without exit
        d.expect("BYE partner-lost")
        assert report(srv)[::3] == (1, 1)
        shy.expect("BYE timeout", timeout=NAME_TIMEOUT + DEADLINE)  # handshake timed out
        assert report(srv)[::2] == (0, 0)
        for peer in (a, b, d, shy):
            peer.close()
    finally:
        srv.stop()


def test_sigkill_of_a_room_worker_closes_both_and_count_drops_by_two(server):
    a, b = pair(server.address)
    x, y = pair(server.address, "x", "y")
    assert report(server)[0] == 4
    opened = re.findall(r"room 1 opened pid (\d+)", server.out.text())
    pid = int(opened[0])
    psutil.Process(pid).kill()
    a.expect_closed()
    b.expect_closed()
    server.out.wait_for(rf"room 1 worker pid {pid} killed by SIGKILL")
    reaped(server, pid)
    assert report(server)[:2] == (2, 1)
    assert all(c.status() != psutil.STATUS_ZOMBIE for c in server.children())
    x.send("still fine")
    y.expect("MSG still fine")


def test_count_stays_exact_when_workers_die_at_random_moments(server):
    rng = random.Random(1234)
    rooms = [pair(server.address, f"a{i}", f"b{i}") for i in range(8)]
    server.out.wait_for("room 8 opened")
    pids = [int(p) for p in re.findall(r"room \d+ opened pid (\d+)", server.out.text())]
    victims = rng.sample(range(8), 4)
    for i in victims:  # kill each in the middle of traffic
        a, b = rooms[i]
        a.send(b"x" * rng.randrange(1, 3000) + b"\n")
        psutil.Process(pids[i]).kill()
    for i in victims:
        server.out.wait_for(rf"worker pid {pids[i]} killed by SIGKILL")
        reaped(server, pids[i])
    assert report(server)[:2] == (8, 4)
    for a, b in rooms:
        a.close()
        b.close()


def test_a_frozen_worker_cannot_freeze_the_report(server):
    """The count has no lock: a worker stopped (or killed) at any moment cannot hold one."""
    a, b = pair(server.address)
    worker = server.children()[0]
    worker.suspend()
    try:
        assert report(server)[0] == 2
    finally:
        worker.kill()
    server.out.wait_for("killed by SIGKILL")
    reaped(server, worker.pid)
    assert report(server)[0] == 0
    a.close()
    b.close()


def test_burst_of_usr2_never_crashes(server):
    a, b = pair(server.address)
    for _ in range(100):
        server.signal(signal.SIGUSR2)
    # A last report after the burst proves the server is alive and right.
    assert report(server)[0] == 2
    # Signals of one number sent while one is pending merge in the kernel, so how many
    # reports came is not known; but every one of them is whole and right.
    lines = server.out.lines[:]
    reports = [i for i, line in enumerate(lines[:-1]) if re.search(REPORT_RE, line)]
    assert reports  # (a last one whose second line is still in the pipe is left out)
    for i in reports:
        assert lines[i].endswith("** 2 **") and lines[i + 1] == "rooms 1, waiting 0, handshaking 0"
    a.send("alive")
    b.expect("MSG alive")


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM, signal.SIGINT])
def test_shutdown_tells_every_client_in_every_state(sig):
    srv = ServerProc("--no-color")
    try:
        rooms = [pair(srv.address, f"a{i}", f"b{i}") for i in range(3)]
        waiting = Peer(srv.address, "w")
        waiting.expect("WAIT ")
        shy = Peer(srv.address)
        workers = srv.children()
        assert len(workers) == 3
        srv.signal(sig)
        for peer in [*[p for room in rooms for p in room], waiting, shy]:
            peer.expect("BYE shutdown SERVER WILL CLOSE NOW")
            peer.expect_closed()
            peer.close()  # the server waits (bounded) for its clients to close too
        assert srv.wait_exit() == 0
        srv.out.wait_closed()
        assert srv.out.lines[-1] == "SERVER WILL DISCONNECT"
        assert "Traceback" not in srv.err.text() + srv.out.text()
        _, alive = psutil.wait_procs(workers, timeout=DEADLINE)
        assert not alive
        # The port can be bound again at once.
        again = ServerProc("--no-color", port=srv.port)
        again.stop()
    finally:
        srv.stop()


def test_port_is_free_the_moment_the_server_exits():
    srv = ServerProc("--no-color")
    a, b = pair(srv.address)
    srv.signal(signal.SIGTERM)
    a.expect("BYE shutdown")
    b.expect("BYE shutdown")
    assert srv.wait_exit() == 0
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", srv.port))
        s.listen()
    srv.stop()


def test_second_signal_during_shutdown_does_no_harm():
    srv = ServerProc("--no-color")
    try:
        a, b = pair(srv.address)
        worker = srv.children()[0]
        worker.suspend()  # a room that will not stop in time
        srv.signal(signal.SIGUSR1)
        srv.out.wait_for("SIGUSR1: shutting down")
        srv.signal(signal.SIGTERM)
        srv.signal(signal.SIGUSR1)
        srv.out.wait_for("already stopping")
        # The frozen worker is killed at the deadline; the server still exits cleanly.
        assert srv.wait_exit(timeout=DEADLINE) == 0
        srv.out.wait_for(r"did not stop; killing it")
        assert srv.out.lines[-1] == "SERVER WILL DISCONNECT"
        assert not psutil.pid_exists(worker.pid) or worker.status() == psutil.STATUS_ZOMBIE
        a.expect_closed()
        b.expect_closed()
    finally:
        srv.stop()


def test_ctrl_c_in_the_server_terminal_ends_cleanly():
    """SIGINT to the whole foreground group: parent and room workers all get it."""
    child = pexpect.spawn(
        sys.executable,
        [str(BIN / "server"), "--port", "0", "--no-color"],
        env=child_env(),
        timeout=DEADLINE,
    )
    try:
        child.expect(r"listening on 127\.0\.0\.1:(\d+)")
        address = ("127.0.0.1", int(child.match.group(1)))
        a, b = pair(address)
        child.expect("room 1 opened")
        child.sendintr()
        a.expect("BYE shutdown SERVER WILL CLOSE NOW")
        b.expect("BYE shutdown SERVER WILL CLOSE NOW")
        a.close()
        b.close()
        child.expect(r"room 1 closed: server shutdown \(SIGINT\)")  # what the operator did
        child.expect("SERVER WILL DISCONNECT")
        child.expect(pexpect.EOF)
        assert b"Traceback" not in child.before
        child.close()
        assert child.exitstatus == 0
    finally:
        if child.isalive():
            child.kill(signal.SIGKILL)
        child.close()


def test_parent_killed_rooms_close_instead_of_lingering(server):
    a, b = pair(server.address)
    family = server.children()  # the room
    assert len(family) == 1
    psutil.Process(server.pid).kill()
    server.wait_exit()
    a.expect("BYE shutdown server lost")
    b.expect("BYE shutdown server lost")
    a.close()
    b.close()
    # The orphaned worker ends by itself (the suite is its subreaper: reap it here).
    _, alive = psutil.wait_procs(family, timeout=DEADLINE)
    assert not alive


def test_sigterm_to_the_whole_process_group_is_a_shutdown_for_the_rooms_too(server):
    """``kill -TERM -- -PGID`` (as some supervisors stop a service) reaches the rooms at
    the same moment as the server: a room that gets SIGTERM while its server shuts
    down is part of the shutdown (BYE shutdown, and the log names SIGTERM), not an
    operator closing that one room."""
    a, b = pair(server.address)
    (room,) = server.children()
    assert os.getpgid(room.pid) == os.getpgid(server.pid) == server.pid
    os.killpg(server.pid, signal.SIGTERM)
    for peer in (a, b):
        peer.expect("BYE shutdown SERVER WILL CLOSE NOW")
        peer.close()
    server.out.wait_for(r"room 1 closed: server shutdown \(SIGTERM\)$")
    assert server.wait_exit() == 0
    assert server.out.count("BYE closed|operator closed") == 0
