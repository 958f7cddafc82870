"""The server-side defects of the adversarial review (issue 12), each pinned by a test
that failed on the code before its fix: a log nobody reads, half-closed clients, nohup,
the accept queue at shutdown, a late SIGTERM, the pidfile, a room stopped on its own,
the help and range texts, and the SIGUSR2 report with a dead worker."""

from __future__ import annotations

import fcntl
import os
import resource
import signal
import socket
import subprocess
import sys
import termios
import time

import psutil
import pytest

from support import (
    BIN,
    DEADLINE,
    LISTEN_RE,
    Peer,
    ServerProc,
    child_env,
    close_all,
    copy_fd_of,
    pair,
    reap_tree,
    run_bin,
    server_side_fd,
    wait_until,
)


def report(server: ServerProc) -> tuple[int, int]:
    """SIGUSR2: (clients, rooms) from the server's report."""
    mark = server.out.mark()
    server.signal(signal.SIGUSR2)
    clients = int(server.out.wait_for(r"NUMBER OF CLIENTS : \*\* (\d+) \*\*", start=mark).group(1))
    rooms = int(server.out.wait_for(r"^rooms (\d+), waiting", start=mark).group(1))
    return clients, rooms


# -- 1. a log pipe nobody reads --------------------------------------------------------------


def pipe_backlog(fd: int) -> int:
    """Bytes waiting unread in the pipe whose read end is ``fd``."""
    return int.from_bytes(fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"), "little")


def start_unread_server(*args: str) -> tuple[subprocess.Popen, tuple[str, int]]:
    """A server whose stdout is a small pipe that the test reads only when it says so."""
    proc = subprocess.Popen(
        [sys.executable, str(BIN / "server"), "--port", "0", "--no-color", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=child_env(),
        start_new_session=True,
    )
    out = proc.stdout.fileno()
    fcntl.fcntl(out, fcntl.F_SETPIPE_SZ, 4096)
    first = b""
    deadline = time.monotonic() + DEADLINE
    while b"\n" not in first and time.monotonic() < deadline:
        first += os.read(out, 1)  # byte by byte: nothing past the listen line is taken
    m = LISTEN_RE.search(first.decode())
    assert m, f"no listen line: {first!r}"
    return proc, (m.group(1), int(m.group(2)))


def fill_log(proc: subprocess.Popen, address: tuple[str, int]) -> None:
    """Connect and leave until the server's log pipe is full (bounded)."""
    out = proc.stdout.fileno()
    for _ in range(400):
        if pipe_backlog(out) >= 4096 - 200:
            return
        Peer(address).close()
        time.sleep(0.002)  # let the server log the departure before the next check
    raise AssertionError(f"log pipe never filled: {pipe_backlog(out)} bytes")


def test_a_log_nobody_reads_never_stalls_the_server():
    proc, address = start_unread_server()
    try:
        fill_log(proc, address)
        # Parent and a new room both log now, into a full pipe: neither may block.
        a, b = pair(address)
        a.send("still serving")
        b.expect("MSG still serving", "TURN WRITE")
        close_all((a, b))
        # Once someone reads again, the log says how many lines it dropped.
        os.set_blocking(proc.stdout.fileno(), False)
        while True:
            try:
                if not os.read(proc.stdout.fileno(), 65536):
                    break
            except BlockingIOError:
                break
        os.set_blocking(proc.stdout.fileno(), True)
        proc.send_signal(signal.SIGUSR2)
        text = b""
        deadline = time.monotonic() + DEADLINE
        while b"NUMBER OF CLIENTS" not in text and time.monotonic() < deadline:
            text += os.read(proc.stdout.fileno(), 4096)
        assert b"log output was blocked: " in text and b"lines dropped" in text, text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(DEADLINE) == 0
    finally:
        reap_tree(proc)


def test_a_full_log_does_not_delay_shutdown():
    proc, address = start_unread_server()
    try:
        fill_log(proc, address)
        a, b = pair(address)
        proc.send_signal(signal.SIGTERM)
        a.expect("BYE shutdown")
        b.expect("BYE shutdown")
        assert proc.wait(DEADLINE) == 0
    finally:
        reap_tree(proc)


# -- 2. half-closed clients ------------------------------------------------------------------


def test_name_and_exit_then_fin_still_pairs_and_leaves(server):
    carol = Peer(server.address, "carol")
    carol.expect("WAIT ")
    dave = socket.create_connection(server.address, timeout=DEADLINE)
    dave.sendall(b"dave\nexit\n")
    dave.shutdown(socket.SHUT_WR)  # what `nc -N` does at the end of its input
    got = b""
    while chunk := dave.recv(4096):
        got += chunk
    dave.close()
    lines = got.decode().splitlines()
    assert lines[0].startswith("HELLO ")
    assert lines[1:] == ["PAIRED carol", "TURN READ", "BYE exit goodbye"], lines
    carol.expect("PAIRED dave", "TURN WRITE", "BYE partner-exit")
    carol.expect_closed()


def test_connect_and_half_close_at_once_still_gets_hello(server):
    sock = socket.create_connection(server.address, timeout=DEADLINE)
    sock.shutdown(socket.SHUT_WR)
    got = b""
    while chunk := sock.recv(4096):
        got += chunk
    sock.close()
    assert got.startswith(b"HELLO "), got
    server.out.wait_for(r"client disconnected 127\.0\.0\.1:\d+ \(closed before naming\)")


def test_a_writers_last_message_before_fin_reaches_the_partner(server):
    a, b = pair(server.address)
    a.sock.sendall(b"last words\n")
    a.sock.shutdown(socket.SHUT_WR)
    b.expect("MSG last words", "TURN WRITE", "BYE partner-lost")
    a.expect("TURN READ")
    a.expect_closed()
    b.expect_closed()


def test_a_waiting_client_that_half_closes_gets_its_wait_then_the_close(server):
    sock = socket.create_connection(server.address, timeout=DEADLINE)
    sock.sendall(b"erin\n")
    sock.shutdown(socket.SHUT_WR)
    got = b""
    while chunk := sock.recv(4096):
        got += chunk
    sock.close()
    assert got.decode().splitlines()[1].startswith("WAIT "), got
    server.out.wait_for(r"client disconnected erin 127\.0\.0\.1:\d+ \(closed while waiting\)")
    assert report(server)[0] == 0


# -- 4. nohup --------------------------------------------------------------------------------


def test_an_inherited_ignored_sighup_stays_ignored():
    srv = ServerProc("--no-color", preexec=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    try:
        a, b = pair(srv.address)
        worker = srv.children()[0]
        srv.signal(signal.SIGHUP)  # the terminal closed under `nohup bin/server &`
        worker.send_signal(signal.SIGHUP)
        a.send("after the hangup")
        b.expect("MSG after the hangup")
        assert srv.proc.poll() is None and worker.is_running()
        assert report(srv)[0] == 2
        assert srv.out.count("SIGHUP") == 0
    finally:
        srv.stop()


def test_sighup_to_a_room_alone_is_ignored(server):
    """The terminal's SIGHUP and SIGINT reach the whole group; the parent acts on them."""
    a, b = pair(server.address)
    worker = server.children()[0]
    worker.send_signal(signal.SIGHUP)
    worker.send_signal(signal.SIGINT)
    a.send("unmoved")
    b.expect("MSG unmoved")


# -- 5. the accept queue at shutdown ---------------------------------------------------------


def test_clients_in_the_accept_queue_at_shutdown_are_told():
    srv = ServerProc("--no-color")
    socks = []
    try:
        srv.signal(signal.SIGSTOP)
        for _ in range(300):  # completed by the kernel, more than one accept batch
            socks.append(socket.create_connection(srv.address, timeout=DEADLINE))
        srv.signal(signal.SIGTERM)
        srv.signal(signal.SIGCONT)
        for sock in socks:
            got = b""
            while chunk := sock.recv(4096):  # a reset raises here and fails the test
                got += chunk
            assert got.endswith(b"BYE shutdown SERVER WILL CLOSE NOW\n"), got
        assert srv.wait_exit() == 0
    finally:
        for sock in socks:
            sock.close()
        srv.stop()


# -- 6. a second SIGTERM at the very end ------------------------------------------------------


def test_sigterm_hammered_through_the_exit_still_exits_zero():
    srv = ServerProc("--no-color")
    try:
        peers = [p for _ in range(20) for p in pair(srv.address)]
        deadline = time.monotonic() + DEADLINE
        while srv.proc.poll() is None and time.monotonic() < deadline:
            try:
                srv.signal(signal.SIGTERM)
            except ProcessLookupError:
                break
            time.sleep(0.0005)
        assert srv.wait_exit() == 0
        close_all(peers)
    finally:
        srv.stop()


# -- 7, 8. the pidfile -----------------------------------------------------------------------


def test_pidfile_symlink_next_to_it_is_not_followed(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    pidfile = tmp_path / "forkchat.pid"

    def plant() -> None:  # in the child, before exec: the server's own PID is known
        os.symlink(victim, f"{pidfile}.{os.getpid()}.tmp")

    srv = ServerProc("--no-color", "--pidfile", str(pidfile), preexec=plant)
    try:
        assert pidfile.read_text().strip() == str(srv.pid)
        assert victim.read_text() == "precious\n"
        assert not pidfile.is_symlink()
    finally:
        srv.stop()


def test_stale_pidfile_naming_another_live_process_does_not_block_start(tmp_path):
    pidfile = tmp_path / "forkchat.pid"
    pidfile.write_text(f"{os.getpid()}\n")  # alive, but not a forkchat server
    srv = ServerProc("--no-color", "--pidfile", str(pidfile))
    try:
        assert pidfile.read_text().strip() == str(srv.pid)
    finally:
        srv.stop()
    assert not pidfile.exists()


# -- 12. a room stopped on its own -----------------------------------------------------------


def test_sigterm_to_one_room_says_so_and_the_server_goes_on(server):
    a, b = pair(server.address)
    c, d = pair(server.address, "carol", "dave")
    worker = next(p for p in server.children() if "alice+bob" in " ".join(p.cmdline()))
    worker.send_signal(signal.SIGTERM)
    a.expect("BYE closed the server's operator closed this room")
    b.expect("BYE closed the server's operator closed this room")
    server.out.wait_for(r"room 1 closed: stopped by SIGTERM")
    assert server.out.count("server shutdown") == 0
    c.send("unaffected")
    d.expect("MSG unaffected")
    psutil.wait_procs([worker], timeout=DEADLINE)
    wait_until(lambda: report(server)[:2] == (2, 1), what="count of the room left")


# -- 13, 14. help and range texts -------------------------------------------------------------


def test_help_says_max_waiting_also_caps_connections_still_naming():
    out = run_bin("server", "--help").stdout
    text = " ".join(out.split())
    assert "Connections still sending their name are capped by the same number" in text


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (("--max-line", "10"), "between 16 and 1048576, not '10'"),
        (("--name-timeout", "0.001"), "between 0.01 and 86400, not '0.001'"),
        (("--max-rooms", "0"), "between 1 and 100000, not '0'"),
    ],
)
def test_range_errors_print_their_limits_exactly(args, said):
    result = run_bin("server", *args)
    assert result.returncode == 2
    assert said in result.stderr, result.stderr


# -- 18. the report with a dead worker not yet reaped ------------------------------------------


def wakeup_write_end(pid: int) -> int:
    """The server's signal wakeup socket, the end the C handler writes to: the second of
    the first two Unix sockets it makes (``Server.__init__``), as a copy in this process."""
    unix = sorted(c.fd for c in psutil.Process(pid).net_connections(kind="unix"))
    return copy_fd_of(pid, unix[1])


def test_report_leaves_out_a_worker_that_died_before_the_loop_saw_it(server):
    """SIGUSR2 handled in the same wake-up as a dead room's sentinel, and before it. The
    server is stopped while its wakeup socket gets SIGUSR2's number (as the C handler
    writes it) and then its room dies, so that both are ready when it resumes, the
    report first. The report counts neither the room nor its two clients."""
    a, b = pair(server.address)
    (worker,) = server.children()
    c = Peer(server.address, "carol")
    c.expect("WAIT ")
    parent = psutil.Process(server.pid)
    wake_w = wakeup_write_end(server.pid)
    mark = server.out.mark()
    parent.suspend()
    try:
        os.write(wake_w, bytes([signal.SIGUSR2]))
        worker.kill()
        wait_until(lambda: worker.status() == psutil.STATUS_ZOMBIE, what="room a zombie")
    finally:
        parent.resume()
        os.close(wake_w)
    clients = server.out.wait_for(r"NUMBER OF CLIENTS : \*\* (\d+) \*\*", start=mark)
    rooms = server.out.wait_for(r"^rooms (\d+), waiting (\d+)", start=mark)
    assert (int(clients.group(1)), int(rooms.group(1)), int(rooms.group(2))) == (1, 0, 1)
    close_all((a, b, c))


# -- issue 9: the server raises its own open-file limit -----------------------------------------


def test_server_raises_its_soft_fd_limit_to_the_hard_one_and_says_so():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard < 64:
        pytest.skip(f"hard open-file limit {hard}: nothing to raise to")
    low = min(soft, hard // 2)
    srv = ServerProc(
        "--no-color", preexec=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))
    )
    try:
        srv.out.wait_for(rf"open-file limit raised from {low} to {hard}$")
        assert psutil.Process(srv.pid).rlimit(psutil.RLIMIT_NOFILE) == (hard, hard)
    finally:
        srv.stop()


# -- the second review: what a read of the day's diff found ---------------------------------------


def test_a_room_closing_with_the_parent_past_1024_fds_does_not_crash_it():
    """The parent waits on a reaped worker's pidfd; past fd 1023 select() cannot."""
    srv = ServerProc("--no-color", "--max-waiting", "5000")
    silent = []
    try:
        for _ in range(1100):  # the parent now holds fds past 1023
            silent.append(socket.create_connection(srv.address, timeout=DEADLINE))
        wait_until(lambda: psutil.Process(srv.pid).num_fds() > 1100, what="1100 accepted")
        a, b = pair(srv.address)
        a.send("exit")
        b.expect("BYE partner-exit")
        close_all((a, b))
        srv.out.wait_for(r"room 1 closed: alice left")
        c, d = pair(srv.address, "carol", "dave")  # the parent is still serving
        c.send("still here")
        d.expect("MSG still here")
        assert srv.proc.poll() is None
        close_all((c, d))
    finally:
        for sock in silent:
            sock.close()
        srv.stop()
    assert "Traceback" not in srv.err.text()


def test_a_send_that_falls_short_in_the_steady_state_is_finished():
    """The room's steady loop hands a send that fell short to the general loop, which
    must flush it (and watch for writing), not wait for input that never comes."""
    srv = ServerProc("--no-color", "--max-line", "200000", "--idle-timeout", "0")
    try:
        a = Peer(srv.address, "alice")
        a.expect("WAIT ")
        b = Peer.__new__(Peer)  # bob: a small receive window, set before connecting
        b.buf = b""
        b.sock = socket.socket()
        b.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        b.sock.settimeout(DEADLINE)
        b.sock.connect(srv.address)
        b.expect("HELLO ")
        b.send("bob")
        b.expect("PAIRED alice", "TURN READ")
        a.expect("PAIRED bob", "TURN WRITE")
        a.send("hi")
        a.expect("TURN READ")
        b.expect("MSG hi", "TURN WRITE")
        b.send("yo")  # now the room is in its steady loop
        b.expect("TURN READ")
        a.expect("MSG yo", "TURN WRITE")
        room = srv.children()[0].pid
        try:
            fd = copy_fd_of(room, server_side_fd(room, b))
        except OSError as exc:
            pytest.skip(f"cannot reach the room's socket here: {exc}")
        with socket.socket(fileno=fd) as copy:  # the room's own socket to bob
            copy.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        a.send(b"x" * 60_000 + b"\n")  # one read for the room, more than one send
        a.expect("TURN READ")
        assert b.raw_line() == b"MSG " + b"x" * 60_000
        b.expect("TURN WRITE")
        close_all((a, b))
    finally:
        srv.stop()
