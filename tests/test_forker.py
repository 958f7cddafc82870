"""The room forker (forkchat/forker.py): the process that forks a plain server's rooms.

Against real processes: who is whose parent, what the forker holds, what the server
does when the forker dies or stops answering, and that nothing is left behind.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from support import (
    DEADLINE,
    ROOT,
    Peer,
    ServerProc,
    child_env,
    close_all,
    pair,
    report,
    socket_fds,
    wait_until,
)

GONE_RE = r"room forker pid (\d+) (.+); the server forks the rooms itself"


def room_pid(srv: ServerProc, number: int) -> int:
    """The PID of room ``number``, from its own "room N opened pid P" line."""
    return int(srv.out.wait_for(rf"room {number} opened pid (\d+)").group(1))


def check_first_room_is_the_servers(srv: ServerProc, a: Peer, b: Peer) -> None:
    """Room 1, a's and b's, was forked by the server itself (no forker), relays, and is
    counted; then both leave."""
    assert psutil.Process(room_pid(srv, 1)).ppid() == srv.pid
    chat(a, b, "hello")
    assert report(srv) == (2, 1, 0, 0)
    close_all((a, b))


def chat(writer: Peer, reader: Peer, text: str) -> None:
    writer.send(text)
    reader.expect(f"MSG {text}", "TURN WRITE")
    writer.expect("TURN READ")


def extensions(pid: int) -> set[str]:
    """The C extension modules process ``pid`` has loaded (from its memory map)."""
    with open(f"/proc/{pid}/maps") as f:
        names = {line.split()[-1].rsplit("/", 1)[-1] for line in f if ".cpython-" in line}
    return {name.split(".", 1)[0] for name in names}


def test_the_forker_imports_nothing_whose_at_fork_hooks_would_run_in_every_room():
    """Breaks if forker.py (or what it imports) pulls in a module that registers an
    at-fork hook (threading, logging, random) or the server's machinery."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import forkchat.forker; "
        "print(' '.join(sys.modules))"
    )
    run = subprocess.run(
        [sys.executable, "-I", "-c", code, str(ROOT)],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        check=True,
    )
    modules = set(run.stdout.split())
    assert "forkchat.room" in modules
    heavy = {"threading", "logging", "random", "multiprocessing", "ctypes", "ssl", "dataclasses"}
    heavy |= {"forkchat.workers", "forkchat.server"}
    assert not heavy & modules


def test_a_plain_server_forks_its_rooms_through_one_forker_that_holds_nothing_of_it(server):
    forker = server.forker()
    assert forker.ppid() == server.pid
    assert forker.cmdline()[0] == "forkchat-forker"
    a, b = pair(server.address)
    c, d = pair(server.address, "carol", "dave")
    rooms = [room_pid(server, 1), room_pid(server, 2)]
    assert [psutil.Process(pid).ppid() for pid in rooms] == [forker.pid, forker.pid]
    assert sorted(p.pid for p in server.children()) == sorted(rooms)
    # The forker holds its socket to the server and nothing else that is a socket: no
    # listener, no client (each room holds its own two and its channel).
    assert forker.net_connections(kind="inet") == []
    assert socket_fds(forker.pid) == 1
    assert all(socket_fds(pid) == 3 for pid in rooms)
    # A fresh interpreter, not a fork of the server: none of the server's extension
    # modules that a room does not need (each costs every fork), the rooms' counts
    # still exact (they write the server's Values through the forker's mapping).
    not_for_rooms = {"_ctypes", "_random", "_posixsubprocess", "_ssl"}
    assert not_for_rooms <= extensions(server.pid)
    assert not not_for_rooms & extensions(forker.pid)
    chat(a, b, "hello")
    chat(c, d, "hi")
    assert report(server) == (4, 2, 0, 0)
    a.send("exit")
    b.expect("BYE partner-exit")
    wait_until(lambda: rooms[0] not in {p.pid for p in server.children()}, what="room 1 reaped")
    assert report(server) == (2, 1, 0, 0)
    close_all((a, b, c, d))


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["KILL", "TERM"])
def test_a_killed_forker_costs_no_room_and_its_orphans_are_reaped_by_the_server(server, sig):
    a, b = pair(server.address)
    first = room_pid(server, 1)
    forker = server.forker()
    forker.send_signal(sig)
    pid, how = server.out.wait_for(GONE_RE).groups()
    assert (int(pid), how) == (forker.pid, f"killed by {signal.Signals(sig).name}")
    # The server, a subreaper, adopts the orphaned room; the room goes on.
    wait_until(lambda: psutil.Process(first).ppid() == server.pid, what="room 1 adopted")
    chat(a, b, "still here")
    # Later rooms are forked by the server itself.
    c, d = pair(server.address, "carol", "dave")
    second = room_pid(server, 2)
    assert psutil.Process(second).ppid() == server.pid
    chat(c, d, "new room")
    assert report(server) == (4, 2, 0, 0)
    # The adopted room ends and is reaped by the server: no zombie is left.
    a.send("exit")
    b.expect("BYE partner-exit")
    wait_until(lambda: not psutil.pid_exists(first), what="adopted room reaped")
    assert report(server) == (2, 1, 0, 0)
    assert server.out.count("forks the rooms itself") == 1
    close_all((a, b, c, d))


def test_a_stopped_forker_is_given_up_on_and_the_pair_still_gets_a_room():
    srv = ServerProc("--no-color")
    try:
        forker = srv.forker()
        forker.suspend()
        a = Peer(srv.address, "alice")
        a.expect("WAIT ")
        b = Peer(srv.address, "bob")
        # Its answer never comes: after the deadline the forker is killed and reaped,
        # and the server forks this room itself.
        b.expect("PAIRED alice", "TURN READ", timeout=2 * DEADLINE)
        a.expect("PAIRED bob", "TURN WRITE")
        pid, how = srv.out.wait_for(GONE_RE).groups()
        assert (int(pid), how) == (forker.pid, "failed (no answer within 5 s)")
        assert not psutil.pid_exists(forker.pid)
        check_first_room_is_the_servers(srv, a, b)
    finally:
        srv.stop()


def test_a_room_that_ended_while_the_forker_was_stopped_is_reaped_when_it_dies(server):
    a, b = pair(server.address)
    first = room_pid(server, 1)
    forker = server.forker()
    forker.suspend()  # it cannot reap for now (stopped, or just slow)
    a.send("exit")
    b.expect("BYE partner-exit")
    wait_until(lambda: report(server)[1] == 0, what="the server saw room 1 end")
    forker.kill()  # its unreaped room goes to the server, a subreaper
    server.out.wait_for(GONE_RE)
    wait_until(lambda: not psutil.pid_exists(first), what="room 1 reaped by the server")
    assert psutil.Process(server.pid).children() == []  # no zombie, no forker
    close_all((a, b))


def test_a_worker_whose_pidfd_cannot_be_received_never_starts(server):
    """The server has one free fd left for the pair's channel... and none for the
    worker's pidfd in the forker's answer: the worker must not run its room (it waits
    for a go-ahead that never comes), the pair is told, the count stays exact."""
    forker = server.forker()
    a = Peer(server.address, "alice")
    a.expect("WAIT ")
    b = Peer(server.address)  # connected, not named yet
    wait_until(lambda: report(server)[3] == 1, what="bob handshaking")
    used = {int(fd) for fd in os.listdir(f"/proc/{server.pid}/fd")}
    free = [n for n in range(max(used) + 3) if n not in used]
    soft, hard = resource.prlimit(server.pid, resource.RLIMIT_NOFILE)
    resource.prlimit(server.pid, resource.RLIMIT_NOFILE, (free[1] + 1, hard))  # two left
    try:
        b.send("bob")
        a.expect("BYE error")
        b.expect("BYE error")
        server.out.wait_for("cannot watch its worker")
    finally:
        resource.prlimit(server.pid, resource.RLIMIT_NOFILE, (soft, hard))
    wait_until(lambda: not forker.children(), what="the worker gone")
    assert "room 1 opened" not in server.out.text()
    assert report(server) == (0, 0, 0, 0)
    c, d = pair(server.address, "carol", "dave")
    chat(c, d, "hello")
    close_all((a, b, c, d))


def test_the_forker_ignores_the_terminal_and_leaves_with_the_server(server):
    forker = server.forker()
    a, b = pair(server.address)
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        forker.send_signal(sig)  # what a terminal or a group kill sends it too
    chat(a, b, "hello")
    assert forker.is_running() and forker.status() != psutil.STATUS_ZOMBIE
    server.signal(signal.SIGUSR1)
    a.expect("BYE shutdown")
    b.expect("BYE shutdown")
    close_all((a, b))
    assert server.wait_exit() == 0
    # The server reaped it before its last line: nothing of it is left.
    assert not psutil.pid_exists(forker.pid)
    assert server.out.lines[-1] == "SERVER WILL DISCONNECT"


BROKEN_FORKER_SERVER = """\
import sys
sys.path.insert(0, sys.argv.pop(1))
import forkchat.cli, forkchat.workers
forkchat.workers.FORKER_BOOT = "import sys; sys.exit(3)"  # the forker's interpreter fails
sys.exit(forkchat.cli.main(sys.argv[1:]))
"""


def test_a_forker_that_cannot_start_is_logged_and_the_server_forks_the_rooms_itself():
    launcher = [sys.executable, "-c", BROKEN_FORKER_SERVER, str(ROOT)]
    srv = ServerProc("--no-color", launcher=launcher)
    try:
        srv.out.wait_for(
            r"the room forker did not start \(exited with status 3\): the server forks the rooms "
            r"itself"
        )
        assert srv.descendants() == []  # it was reaped
        a, b = pair(srv.address)
        check_first_room_is_the_servers(srv, a, b)
    finally:
        srv.stop()


def test_the_forker_imports_from_the_servers_module_path(tmp_path):
    """Breaks if the forker (an isolated interpreter) looks for its modules elsewhere
    than the server did: here setproctitle and docopt are only on PYTHONPATH, and the
    forker and its rooms must still be named by setproctitle."""
    site = Path(psutil.__file__).resolve().parent.parent  # the project venv's
    for name in ("setproctitle", "docopt"):
        (tmp_path / name).symlink_to(site / name)
    base = Path(sys.base_prefix) / "bin" / "python3"  # has neither of them
    launcher = [str(base), "-c", PLAIN_SERVER, str(ROOT)]
    env = {**child_env(), "PYTHONPATH": str(tmp_path)}
    srv = ServerProc("--no-color", launcher=launcher, env=env)
    try:
        forker = srv.forker()
        assert forker.cmdline()[0] == "forkchat-forker"
        a, b = pair(srv.address)
        room = psutil.Process(room_pid(srv, 1))
        assert room.ppid() == forker.pid
        assert room.cmdline()[0] == "forkchat-room 1 alice+bob"
        close_all((a, b))
    finally:
        srv.stop()


PLAIN_SERVER = """\
import sys
sys.path.insert(0, sys.argv.pop(1))
import forkchat.cli
sys.exit(forkchat.cli.main(sys.argv[1:]))
"""
