"""Hardening against real processes: limits, timeouts, slow consumers, faults, hostile input."""

from __future__ import annotations

import ctypes
import os
import random
import resource
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from forkchat.conn import KEEPALIVE_IDLE, tune_socket
from support import (
    BIN,
    DEADLINE,
    Peer,
    ServerProc,
    child_env,
    close_all,
    pair,
    reap_tree,
    report,
    socket_fds,
    tcp_sockets,
    wait_until,
)


def raw_connect(address: tuple[str, int]) -> socket.socket:
    return socket.create_connection(address, timeout=DEADLINE)


def expect_room_works(address: tuple[str, int], a: str = "ctl1", b: str = "ctl2") -> None:
    """A fresh pair can still chat: the server is alive and unaffected."""
    x, y = pair(address, a, b)
    x.send("still ok")
    y.expect("MSG still ok", "TURN WRITE")
    x.close()
    y.close()


# -- options ------------------------------------------------------------------------------


def test_pidfile_is_written_at_start_and_removed_at_clean_exit(tmp_path):
    pidfile = tmp_path / "forkchat.pid"
    srv = ServerProc("--no-color", "--pidfile", str(pidfile))
    try:
        assert pidfile.read_text().strip() == str(srv.pid)
        srv.signal(signal.SIGTERM)
        assert srv.wait_exit() == 0
        assert not pidfile.exists()
    finally:
        srv.stop()


def test_a_clean_exit_leaves_a_pidfile_that_names_another_pid(tmp_path):
    """Another server (or the operator) took the pidfile over: it is not ours to remove."""
    pidfile = tmp_path / "forkchat.pid"
    srv = ServerProc("--no-color", "--pidfile", str(pidfile))
    try:
        assert pidfile.read_text().strip() == str(srv.pid)
        pidfile.write_text(f"{os.getpid()}\n")
        srv.signal(signal.SIGTERM)
        assert srv.wait_exit() == 0
        assert pidfile.read_text() == f"{os.getpid()}\n"
    finally:
        srv.stop()


def test_pidfile_of_a_live_server_is_refused(tmp_path):
    pidfile = tmp_path / "forkchat.pid"
    first = ServerProc("--no-color", "--pidfile", str(pidfile))
    try:
        result = subprocess.run(
            [sys.executable, str(BIN / "server"), "--port", "0", "--pidfile", str(pidfile)],
            capture_output=True,
            text=True,
            env=child_env(),
            timeout=DEADLINE,
        )
        assert result.returncode == 1
        assert len(result.stderr.strip().splitlines()) == 1
        assert f"names running forkchat server {first.pid}" in result.stderr
        assert pidfile.read_text().strip() == str(first.pid)
    finally:
        first.stop()


# -- framing --------------------------------------------------------------------------------


def test_too_long_line_is_refused_and_the_room_goes_on():
    srv = ServerProc("--no-color", "--max-line", "64")
    try:
        a, b = pair(srv.address)
        a.send("x" * 65)
        a.expect("ERR too-long")
        a.send("x" * 64)
        a.expect("TURN READ")
        b.expect("MSG " + "x" * 64, "TURN WRITE")
    finally:
        srv.stop()


@pytest.mark.parametrize("where", ["room", "waiting"])
def test_ten_megabytes_without_lf_never_grow_memory(server, where):
    if where == "room":
        a, b = pair(server.address)
        holder = server.children()[0]
    else:
        a = Peer(server.address, "alice")
        a.expect("WAIT ")
        holder = psutil.Process(server.pid)
    before = holder.memory_info().rss
    chunk = b"y" * 65536
    for _ in range(160):  # 10 MiB, no LF
        a.send(chunk)
    a.send(b"\n")
    a.expect("ERR too-long")
    growth = holder.memory_info().rss - before
    assert growth < 2 * 1024 * 1024, f"grew by {growth} bytes"
    # One ERR for the whole line, and the connection goes on.
    if where == "room":
        a.send("after")
        a.expect("TURN READ")
        b.expect("MSG after")
    else:
        a.send("exit")
        a.expect("BYE exit")


def test_bad_encoding_bad_chars_and_line_endings(server):
    a, b = pair(server.address)
    a.send(b"\xff\xfebad\n")
    a.expect("ERR bad-encoding")
    a.send(b"\xc3\n")  # half a character, then the line ends
    a.expect("ERR bad-encoding")
    for bad in (b"bell\x07", b"esc\x1b[2J", b"del\x7f", b"nul\x00"):
        a.send(bad + b"\n")
        a.expect("ERR bad-char")
    # A character split across two segments is fine; CR-LF and LF both end a line.
    euro = "€".encode()
    a.send(b"price " + euro[:1])
    a.send(euro[1:] + b"5\r\n")
    a.expect("TURN READ")
    assert b.raw_line() == b"MSG price \xe2\x82\xac5"
    b.expect("TURN WRITE")
    b.send(b"tab\tok\n")
    b.expect("TURN READ")
    assert a.raw_line() == b"MSG tab\tok"


# -- names ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", [b"has space", b"x" * 33, b"\xc3\xa9t\xc3\xa9", b"esc\x1b[31m", b"semi;colon"]
)
def test_bad_names_get_bye_bad_name_with_the_rule(server, name):
    peer = Peer(server.address)
    peer.send(name + b"\n")
    line = peer.line()
    assert line.startswith("BYE bad-name ") and "32" in line, line
    peer.expect_closed()


def test_silent_and_half_named_clients_time_out_without_delaying_others():
    srv = ServerProc("--no-color", "--name-timeout", "2")
    try:
        silent = Peer(srv.address)
        half = Peer(srv.address)
        half.send(b"bo")
        a, b = pair(srv.address)  # pairing is not held up by the silent ones: by the
        # server's own order of events, the room opened before their name timeout.
        srv.out.wait_for("room 1 opened")
        lines = srv.out.lines[:]
        opened = next(i for i, line in enumerate(lines) if "room 1 opened" in line)
        assert not [line for line in lines[:opened] if "(timeout" in line]
        silent.expect("BYE timeout")
        half.expect("BYE timeout")
        silent.expect_closed()
        a.send("hi")
        b.expect("MSG hi")
    finally:
        srv.stop()


# -- rooms ----------------------------------------------------------------------------------


def test_idle_room_is_closed_with_bye_timeout():
    srv = ServerProc("--no-color", "--idle-timeout", "0.5")
    try:
        a, b = pair(srv.address)
        a.expect("BYE timeout")
        b.expect("BYE timeout")
        a.expect_closed()
        close_all((a, b))  # the room waits (bounded) for its clients to close
        srv.out.wait_for("room 1 closed: idle timeout")
    finally:
        srv.stop()


def test_full_rooms_make_pairs_wait_and_open_in_order():
    """Pairs wait for a room in order, and WAIT says why: nobody else, the only room
    busy, or how many others wait."""
    srv = ServerProc("--no-color", "--max-rooms", "1")
    try:
        a, b = pair(srv.address)
        c = Peer(srv.address, "carol")
        c.expect("WAIT waiting for a partner: nobody else is waiting")
        d = Peer(srv.address, "dave")  # both of a pair in line are told
        d.expect("WAIT waiting for a partner: the only room is busy, you are in line")
        c.expect("WAIT waiting for a partner: the only room is busy, you are in line")
        e = Peer(srv.address, "erin")
        e.expect("WAIT waiting for a partner: 2 others waiting")
        srv.out.wait_for(r"erin \S+ waiting \(waiting for a partner: 2 others waiting\)$")
        f = Peer(srv.address, "frank")
        f.expect("WAIT waiting for a partner: the only room is busy")
        e.expect("WAIT waiting for a partner: the only room is busy")
        a.send("exit")
        b.expect("BYE partner-exit")
        a.close()
        b.close()
        c.expect("PAIRED dave", "TURN WRITE")  # first in line, first in the room
        d.expect("PAIRED carol", "TURN READ")
        c.send("exit")
        d.expect("BYE partner-exit")
        c.close()
        d.close()
        e.expect("PAIRED frank", "TURN WRITE")
        f.expect("PAIRED erin", "TURN READ")
    finally:
        srv.stop()


def test_past_max_waiting_new_clients_get_bye_full():
    srv = ServerProc("--no-color", "--max-rooms", "1", "--max-waiting", "2")
    try:
        busy = pair(srv.address)  # the only room, kept busy
        c = Peer(srv.address, "carol")
        c.expect("WAIT ")
        d = Peer(srv.address, "dave")
        d.expect("WAIT ")
        c.expect("WAIT waiting for a partner: the only room is busy")  # dave completed carol's pair
        e = Peer(srv.address, "erin")
        e.expect("BYE full")
        e.expect_closed()
        c.send("exit")  # room for one more
        c.expect("BYE exit")
        f = Peer(srv.address, "frank")
        f.expect("WAIT ")
        g = Peer(srv.address, "gina")  # dave and frank fill the queue again
        g.expect("BYE full")
        x, y = busy  # and the busy room never noticed
        x.send("still busy")
        y.expect("MSG still busy")
    finally:
        srv.stop()


# -- slow consumers -----------------------------------------------------------------------


def flood_until_partner_lost(flooder: socket.socket, partner: Peer) -> None:
    """Send off-turn lines without ever reading, until the partner hears BYE partner-lost."""
    flooder.setblocking(False)
    burst = b"not my turn\n" * 4096
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            flooder.send(burst)
        except BlockingIOError:
            pass
        except OSError:
            break  # the server dropped us
        ready, _, _ = select.select([partner.sock], [], [], 0.01)
        if ready:
            break
    partner.expect("BYE partner-lost")


def small_buffers_peer(address: tuple[str, int], name: str) -> Peer:
    peer = Peer.__new__(Peer)
    peer.sock = socket.socket()
    peer.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    peer.sock.settimeout(DEADLINE)
    peer.sock.connect(address)
    peer.buf = b""
    peer.hello = peer.line()
    peer.send(name)
    return peer


def test_flooding_reader_is_dropped_and_partner_told(server):
    a = Peer(server.address, "alice")
    a.expect("WAIT ")
    b = small_buffers_peer(server.address, "bob")
    b.expect("PAIRED alice")
    a.expect("PAIRED bob", "TURN WRITE")
    other_a, other_b = pair(server.address, "c", "d")
    flood_until_partner_lost(b.sock, a)
    server.out.wait_for(r"client disconnected bob .*\(dropped: more than \d+ bytes unread\)")
    other_a.send("unaffected")  # the other room never stalled
    other_b.expect("MSG unaffected")


def test_flooding_waiting_client_is_dropped_by_the_parent(server):
    a, b = pair(server.address)
    w = small_buffers_peer(server.address, "w")
    w.expect("WAIT ")
    w.sock.setblocking(False)
    burst = b"hello?\n" * 8192
    deadline = time.monotonic() + 20
    dropped = False
    while time.monotonic() < deadline and not dropped:
        try:
            w.sock.send(burst)
        except BlockingIOError:
            select.select([], [w.sock], [], 0.05)
        except OSError:
            dropped = True
        dropped = dropped or server.out.count(r"client disconnected w ") > 0
    server.out.wait_for(r"client disconnected w .*\(dropped: more than \d+ bytes unread\)")
    a.send("parent never blocked")
    b.expect("MSG parent never blocked")


# -- faults --------------------------------------------------------------------------------


def test_reset_mid_room_gives_partner_lost(server):
    a, b = pair(server.address)
    a.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    a.close()  # RST, not FIN
    b.expect("BYE partner-lost")
    expect_room_works(server.address)


def test_client_sockets_use_keepalive_and_nodelay():
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    conn, _ = listener.accept()
    tune_socket(conn)
    assert conn.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == KEEPALIVE_IDLE
    assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    for s in (conn, client, listener):
        s.close()


def test_vanished_client_without_fin_is_closed_by_the_idle_timeout():
    srv = ServerProc("--no-color", "--idle-timeout", "2")
    try:
        a, b = pair(srv.address)
        worker = srv.children()[0]
        # b "vanishes": it neither reads nor closes; a is still there.
        a.send("anyone?")
        a.expect("TURN READ")
        a.expect("BYE timeout")
        psutil.wait_procs([worker], timeout=DEADLINE)
        b.close()
    finally:
        srv.stop()


def test_out_of_file_descriptors_pauses_accepting_and_recovers():
    def low_fd_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (24, 24))

    srv = ServerProc("--no-color", preexec=low_fd_limit)
    try:
        socks = [raw_connect(srv.address) for _ in range(30)]
        srv.out.wait_for("accept failed .*pausing accepts")
        # While out of fds the server must sleep, not spin on the listener. A spinning
        # server burns nearly all of a core even on a loaded machine; a sleeping one a
        # few milliseconds. The window is wide and the bar low so neither can be mistaken.
        waiter = raw_connect(srv.address)
        server = psutil.Process(srv.pid)
        cpu_before, started = server.cpu_times(), time.monotonic()
        waiter.settimeout(2.0)
        with pytest.raises(TimeoutError):
            waiter.recv(100)
        cpu = server.cpu_times()
        spent = (cpu.user + cpu.system) - (cpu_before.user + cpu_before.system)
        assert spent < 0.2 * (time.monotonic() - started)
        for s in socks:
            s.close()
        waiter.settimeout(DEADLINE)
        assert waiter.recv(100).startswith(b"HELLO ")  # served again once fds are free
        waiter.close()
        assert srv.proc.poll() is None
        expect_room_works(srv.address)
    finally:
        srv.stop()


def test_failed_room_start_tells_the_pair_and_server_goes_on():
    """Out of fds at the moment of pairing: the worker cannot be started."""

    def low_fd_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (24, 24))

    srv = ServerProc("--no-color", preexec=low_fd_limit)
    try:
        base = psutil.Process(srv.pid).num_fds()
        a = Peer(srv.address, "alice")
        a.expect("WAIT ")
        fillers = [raw_connect(srv.address) for _ in range(24 - base - 2)]
        for s in fillers:
            assert s.recv(100).startswith(b"HELLO")
        b = Peer(srv.address, "bob")
        a.expect("BYE error")
        b.expect("BYE error")
        srv.out.wait_for("cannot (fork a room worker|make a room channel)")
        for s in fillers:
            s.close()
        wait_until(lambda: psutil.Process(srv.pid).num_fds() <= base, what="fds released")
        expect_room_works(srv.address)
    finally:
        srv.stop()


class PidsCgroupLimit:
    """No fork for the server: alone in a cgroup v1 pids group with ``pids.max`` 1."""

    ROOT = Path("/sys/fs/cgroup/pids")
    why_not = None if os.access(ROOT, os.W_OK) else "no writable cgroup v1 pids hierarchy"
    preexec = None

    def __init__(self) -> None:
        self.group = self.ROOT / f"forkchat-test-{os.getpid()}"

    def apply(self, srv: ServerProc) -> None:
        self.group.mkdir()
        (self.group / "pids.max").write_text("1")
        (self.group / "cgroup.procs").write_text(str(srv.pid))

    def lift(self, srv: ServerProc) -> None:
        (self.ROOT / "cgroup.procs").write_text(str(srv.pid))

    def cleanup(self, srv: ServerProc) -> None:
        if self.group.exists():
            if srv.proc.poll() is None:
                self.lift(srv)
            self.group.rmdir()


PR_SET_SECUREBITS = 28
SECBIT_NOROOT = 1


class NprocLimit:
    """No fork for the server: ``RLIMIT_NPROC`` 2 under a real uid of its own, with one
    room already open (works on cgroup v2 hosts too). The limit counts processes by real
    uid and does not bind root, so the server runs with a real uid nobody else uses,
    effective uid 0 (to run a Python that may live under /root) and, through
    SECBIT_NOROOT, no capabilities after its exec. Forks work again once the open room
    ends (the test may lack CAP_SYS_RESOURCE to raise the limit from outside)."""

    why_not = None if os.geteuid() == 0 else "needs root to give the server a uid of its own"

    def __init__(self) -> None:
        used = {p.info["uids"].real for p in psutil.process_iter(["uids"]) if p.info["uids"]}
        self.uid = next(u for u in range(61000 + os.getpid() % 3000, 65000) if u not in used)
        self.holders: tuple[Peer, Peer] | None = None

    def preexec(self) -> None:
        resource.setrlimit(resource.RLIMIT_NPROC, (2, 2))
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_SECUREBITS, SECBIT_NOROOT, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECUREBITS)")
        os.setresuid(self.uid, 0, 0)

    def apply(self, srv: ServerProc) -> None:
        assert psutil.Process(srv.pid).uids().real == self.uid
        self.holders = pair(srv.address, "hold1", "hold2")  # the one process allowed

    def lift(self, srv: ServerProc) -> None:
        x, y = self.holders
        x.send("exit")
        y.expect("BYE partner-exit")
        close_all(self.holders)
        wait_until(lambda: not srv.children(), what="holding room reaped")

    def cleanup(self, srv: ServerProc) -> None:
        if self.holders:
            close_all(self.holders)


@pytest.mark.parametrize("limit_kind", [PidsCgroupLimit, NprocLimit], ids=["cgroup", "nproc"])
def test_fork_failure_tells_the_pair_and_leaks_nothing(limit_kind):
    if limit_kind.why_not:
        pytest.skip(limit_kind.why_not)
    limit = limit_kind()
    srv = ServerProc("--no-color", preexec=limit.preexec)
    try:
        limit.apply(srv)
        rooms = len(srv.children())
        idle_sockets = socket_fds(srv.pid)  # listener, wakeup pair, open rooms' channels
        base = None
        for i in range(4):
            a = Peer(srv.address, f"a{i}")
            a.expect("WAIT ")
            b = Peer(srv.address, f"b{i}")
            a.expect("BYE error")
            b.expect("BYE error")
            a.expect_closed()
            b.expect_closed()
            a.close()
            b.close()
            # After the first try (which creates the shared-memory arena for the
            # counts), every failed fork must leave the fd count where it was.
            if base is None:
                srv.out.wait_for("cannot fork a room worker")
                wait_until(lambda: socket_fds(srv.pid) == idle_sockets, what="pair closed")
                base = psutil.Process(srv.pid).num_fds()
        wait_until(lambda: srv.out.count("cannot fork a room worker") == 4, what="4 logged")
        wait_until(lambda: socket_fds(srv.pid) == idle_sockets, what="pairs closed")
        assert psutil.Process(srv.pid).num_fds() == base
        assert len(srv.children()) == rooms
        limit.lift(srv)
        expect_room_works(srv.address)
    finally:
        limit.cleanup(srv)
        srv.stop()


def test_random_bytes_never_kill_the_server_or_other_rooms(server):
    rng = random.Random(20261125)
    a, b = pair(server.address, "steady1", "steady2")
    for round_no in range(40):
        s = raw_connect(server.address)
        for _ in range(rng.randrange(1, 6)):
            size = rng.randrange(1, 9000)
            s.sendall(bytes(rng.randrange(256) for _ in range(size)))
        if round_no % 3 == 0:  # some of them hang up abruptly
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
    # Random bytes inside a room too.
    x, y = pair(server.address, "fx", "fy")
    x.send(bytes(rng.randrange(256) for _ in range(20000)))
    y.send(bytes(rng.randrange(256) for _ in range(20000)))
    a.send("steady")
    b.expect("MSG steady", "TURN WRITE")
    assert server.proc.poll() is None
    assert "crashed" not in server.out.text() and "Traceback" not in server.err.text()
    expect_room_works(server.address)


@pytest.mark.parametrize(
    "payload",
    [
        b"GET / HTTP/1.1\r\nHost: localhost\r\nUser-Agent: curl/8\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(256)) * 2,
    ],
    ids=["http", "tls"],
)
def test_misdirected_http_or_tls_client_is_turned_away(payload):
    srv = ServerProc("--no-color", "--name-timeout", "1")
    try:
        s = raw_connect(srv.address)
        s.sendall(payload)
        data = b""
        while not data.endswith(b"\n") or b"BYE" not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        assert b"BYE bad-name" in data or b"BYE timeout" in data, data
        s.close()
        expect_room_works(srv.address)
    finally:
        srv.stop()


def test_a_thousand_connects_at_once_are_all_served():
    srv = ServerProc("--no-color", "--max-rooms", "20")
    socks = []
    try:
        for _ in range(1000):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(srv.address)
            socks.append(s)
        for i, s in enumerate(socks):
            s.setblocking(True)
            s.settimeout(DEADLINE)
            s.sendall(f"u{i}\n".encode())
        partner_of = {}
        for i, s in enumerate(socks):
            data = b""
            while data.count(b"\n") < 2:
                chunk = s.recv(4096)
                assert chunk, "connection refused or closed"
                data += chunk
            second = data.split(b"\n")[1]
            assert second.startswith((b"WAIT ", b"PAIRED ")), second
            if second.startswith(b"PAIRED "):
                partner_of[f"u{i}"] = second.split()[1].decode()
        # Every one of them is counted, and exactly 20 rooms hold 40 of them.
        assert report(srv) == (1000, 20, 960, 0)
        for name, partner in partner_of.items():  # a pair is a pair both ways
            assert partner_of.get(partner, name) == name
        assert "BYE full" not in srv.out.text()
        # The server's own shutdown, waited for: it reaps every room it forked, those
        # it forks while the clients close included (a stop by the test would list the
        # rooms first, and miss one forked just after).
        srv.signal(signal.SIGTERM)
        for s in socks:
            s.close()
        assert srv.wait_exit(timeout=30) == 0
    finally:
        for s in socks:
            s.close()
        srv.stop()


def test_soak_leaves_nothing_behind_and_delivers_every_message_once_in_order(server):
    """A few hundred short rooms, some clients misbehaving; then compare with the start."""
    rng = random.Random(7)
    expect_room_works(server.address, "warm1", "warm2")
    parent = psutil.Process(server.pid)
    # Reaped by the server, not only gone: a report reaps first, so the room's pidfd
    # and channel are closed by the time it says 0 rooms.
    wait_until(lambda: report(server)[1] == 0, what="warm-up room reaped by the server")
    fds_before, rss_before = parent.num_fds(), parent.memory_info().rss
    for i in range(300):
        a, b = pair(server.address, f"a{i}", f"b{i}")
        kind = rng.choice(["chat", "chat", "chat", "vanish", "reset", "flood", "garbage"])
        if kind == "chat":
            for n in range(4):
                writer, reader = (a, b) if n % 2 == 0 else (b, a)
                writer.send(f"m{i}.{n}")
                writer.expect("TURN READ")
                assert reader.line() == f"MSG m{i}.{n}"
                reader.expect("TURN WRITE")
            a.send("exit")
            a.expect("BYE exit")
            b.expect("BYE partner-exit")
        elif kind == "vanish":
            a.close()
            b.expect("BYE partner-lost")
        elif kind == "reset":
            b.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            b.close()
            a.expect("BYE partner-lost")
        elif kind == "flood":
            b.send(b"off turn\n" * 50)
            a.send("exit")
            a.expect("BYE exit")
        else:
            a.send(bytes(rng.randrange(256) for _ in range(500)) + b"\n")
            b.send("exit")
            b.expect("BYE exit")
        a.close()
        b.close()
    wait_until(lambda: not server.children(), timeout=30, what="every room gone")
    wait_until(lambda: report(server)[1] == 0, what="every room reaped by the server")
    assert not [c for c in parent.children() if c.status() == psutil.STATUS_ZOMBIE]
    assert parent.num_fds() == fds_before
    assert parent.memory_info().rss - rss_before < 4 * 1024 * 1024


# -- found in review ------------------------------------------------------------------------


def frozen(server: ServerProc):
    """Context: the server is stopped (SIGSTOP) inside, so events pile up for one batch."""

    class Frozen:
        def __enter__(self):
            server.signal(signal.SIGSTOP)
            wait_until(
                lambda: psutil.Process(server.pid).status() == psutil.STATUS_STOPPED,
                what="server stopped",
            )

        def __exit__(self, *exc):
            server.signal(signal.SIGCONT)

    return Frozen()


def test_max_waiting_of_one_still_pairs():
    srv = ServerProc("--no-color", "--max-waiting", "1")
    try:
        a, b = pair(srv.address)  # the second completes the pair: it never waits
        c = Peer(srv.address, "carol")
        c.expect("WAIT ")
        d = Peer(srv.address, "dave")
        d.expect("PAIRED carol")
        a.send("hi")
        b.expect("MSG hi")
    finally:
        srv.stop()


def test_waiting_client_gone_in_the_same_batch_is_not_paired(server):
    a = Peer(server.address, "alice")
    a.expect("WAIT ")
    b = Peer(server.address)
    with frozen(server):
        b.send("bob")  # ready first: the name is handled before alice's close is read
        a.close()
    b.expect("WAIT ")
    c = Peer(server.address, "carol")
    c.expect("PAIRED bob", "TURN READ")


def has_exited(proc: psutil.Process) -> bool:
    """Whether ``proc`` has exited (a zombie, or already reaped)."""
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_report_is_right_while_a_dead_worker_is_not_yet_reaped(server):
    a, b = pair(server.address)
    x, y = pair(server.address, "x", "y")
    worker = server.children()[0]
    with frozen(server):
        worker.kill()
        # A zombie: its parent, the server, is frozen and cannot reap it yet.
        wait_until(lambda: has_exited(worker), what="worker dead")
        server.signal(signal.SIGUSR2)  # the report and the sentinel in one batch
    server.out.wait_for(r"NUMBER OF CLIENTS : \*\* 2 \*\*")
    server.out.wait_for(r"killed by SIGKILL")
    a.expect_closed()
    b.expect_closed()
    x.send("server alive")
    y.expect("MSG server alive")


def test_sigusr2_to_a_room_worker_does_not_end_the_room(server):
    a, b = pair(server.address)
    worker = server.children()[0]
    worker.send_signal(signal.SIGUSR2)  # e.g. kill -USR2 -- -PGID
    a.send("still here")
    b.expect("MSG still here")
    assert worker.is_running() and worker.status() != psutil.STATUS_ZOMBIE


def test_sighup_shuts_down_cleanly():
    srv = ServerProc("--no-color")
    try:
        a, b = pair(srv.address)
        srv.signal(signal.SIGHUP)
        a.expect("BYE shutdown SERVER WILL CLOSE NOW")
        b.expect("BYE shutdown SERVER WILL CLOSE NOW")
        assert srv.wait_exit() == 0
    finally:
        srv.stop()


def test_server_with_stdout_closed_runs_without_a_traceback(tmp_path):
    pidfile = tmp_path / "pid"
    proc = subprocess.Popen(
        [sys.executable, str(BIN / "server"), "--port", "0", "--pidfile", str(pidfile)],
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=child_env(),
        start_new_session=True,
        preexec_fn=lambda: os.close(1),
    )
    try:
        # No listen line to read: the pidfile is written once the server listens, and
        # the kernel says on which port (no port picked by bind-and-release here).
        wait_until(pidfile.exists, what="pidfile written")
        (listener,) = [c for c in tcp_sockets(proc.pid) if c.status == psutil.CONN_LISTEN]
        a, b = pair(("127.0.0.1", listener.laddr.port))
        a.send("no stdout")
        b.expect("MSG no stdout")
        close_all((a, b))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(DEADLINE) == 0
        assert proc.stderr.read() == b""
    finally:
        reap_tree(proc)
