"""Test support: real server processes, raw TCP peers, deadlines, reaping.

Rules kept here so every test keeps them:
- the server starts with ``--port 0`` and is ready when its listen line appears;
- every wait has a deadline (``DEADLINE`` seconds unless told);
- every process started is reaped by PID, with its children, at teardown.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Iterable
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "bin"
DEADLINE = 10.0
LISTEN_RE = re.compile(r"forkchat server listening on (\S+):(\d+) pid (\d+)")


def child_env(**extra: str) -> dict[str, str]:
    """Environment for a child: no PYTHONUNBUFFERED (it hides missing flushes), no colour."""
    env = dict(os.environ)
    env.pop("PYTHONUNBUFFERED", None)
    env["NO_COLOR"] = "1"
    env.update(extra)
    return env


class OutputTail:
    """Collects a pipe's lines in a thread so the child never blocks on a full pipe."""

    def __init__(self, stream) -> None:
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream) -> None:
        for raw in iter(stream.readline, b""):
            with self._cond:
                self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def wait_for(self, pattern: str, timeout: float = DEADLINE, start: int = 0) -> re.Match:
        """Return the first match of ``pattern`` in lines from index ``start`` on."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines[start:]:
                    m = regex.search(line)
                    if m:
                        return m
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    raise AssertionError(
                        f"no line matching {pattern!r} within {timeout}s; got:\n"
                        + "\n".join(self.lines[-40:])
                    )
                self._cond.wait(left)

    def count(self, pattern: str) -> int:
        """How many lines so far match ``pattern``."""
        regex = re.compile(pattern)
        with self._cond:
            return sum(1 for line in self.lines if regex.search(line))

    def mark(self) -> int:
        """Index of the next line to arrive, for ``wait_for(start=...)``."""
        with self._cond:
            return len(self.lines)

    def wait_closed(self, timeout: float = DEADLINE) -> None:
        """Wait until the pipe reaches end of file."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError("output did not close in time")
                self._cond.wait(left)

    def text(self) -> str:
        with self._cond:
            return "\n".join(self.lines)


class ServerProc:
    """A ``bin/server`` process started on a free loopback port."""

    def __init__(
        self,
        *args: str,
        port: int | None = 0,
        env: dict[str, str] | None = None,
        preexec=None,
        launcher: list[str] | None = None,
    ) -> None:
        """``port=None`` leaves ``--port`` out (the server's default); ``launcher``
        replaces ``python bin/server`` (a wrapper that runs ``forkchat.cli.main``)."""
        cmd = launcher or [sys.executable, str(BIN / "server")]
        cmd = [*cmd, *(["--port", str(port)] if port is not None else []), *args]
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env or child_env(),
            start_new_session=True,
            preexec_fn=preexec,
        )
        self.pid = self.proc.pid
        self.out = OutputTail(self.proc.stdout)
        self.err = OutputTail(self.proc.stderr)
        try:
            m = self.out.wait_for(LISTEN_RE.pattern)
        except AssertionError:
            self.kill()
            raise AssertionError("server did not start: " + self.err.text()) from None
        self.host, self.port = m.group(1), int(m.group(2))
        assert int(m.group(3)) == self.pid
        assert self.out.lines[0] == m.group(0), "the listen line must be the first line"

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def children(self) -> list[psutil.Process]:
        """The server's room workers: its children (every room is one)."""
        try:
            return psutil.Process(self.pid).children()
        except psutil.NoSuchProcess:
            return []

    def descendants(self) -> list[psutil.Process]:
        """Every process below the server, at any depth."""
        try:
            return psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def wait_exit(self, timeout: float = DEADLINE) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        """Close the test's clients of this server (a server at shutdown waits, bounded,
        for its clients to close), then SIGTERM, wait against a deadline, and SIGKILL
        what is left (by PID)."""
        for peer in list(_live_peers):
            if peer.address == self.address:
                peer.close()
        reap_tree(self.proc)

    kill = stop


class SocketActivated:
    """``systemd-socket-activate`` listening on a free loopback port, which starts
    ``server`` (a bin/server path) with ``args`` on the first connection, in its own
    process (the tool execs it): ``pid`` is the server's too. Reaped on exit."""

    def __init__(self, server: Path, *args: str) -> None:
        with socket.socket() as probe:  # a free port: the tool wants a number
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.address = ("127.0.0.1", self.port)
        self.proc = subprocess.Popen(
            [
                *("systemd-socket-activate", "-l", f"127.0.0.1:{self.port}", "-E", "NO_COLOR=1"),
                *(sys.executable, str(server), "--no-color", *args),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=child_env(),
            start_new_session=True,
        )
        self.pid = self.proc.pid
        self.out, self.err = OutputTail(self.proc.stdout), OutputTail(self.proc.stderr)
        self.err.wait_for(rf"Listening on 127\.0\.0\.1:{self.port}")

    def __enter__(self) -> SocketActivated:
        return self

    def __exit__(self, *exc: object) -> None:
        reap_tree(self.proc)


def reap_tree(proc: subprocess.Popen, timeout: float = 5.0) -> None:
    """Terminate ``proc`` and every descendant it has, by PID, and reap them all."""
    try:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    for p in family:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(family, timeout=timeout)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=timeout)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream:
            stream.close()


def run_bin(
    name: str,
    *args: str,
    timeout: float = DEADLINE,
    text: bool = True,
    input: str | bytes | None = None,
) -> subprocess.CompletedProcess:
    """Run ``bin/NAME ARGS`` to completion in its own session, stdin closed (or fed
    ``input``); kill and reap it, and whatever it started, if it overruns ``timeout``
    (an assertion failure)."""
    proc = subprocess.Popen(
        [sys.executable, str(BIN / name), *args],
        stdin=subprocess.DEVNULL if input is None else subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=text,
        env=child_env(),
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"bin/{name} {' '.join(args)} ran over {timeout:g} s") from None
    finally:
        reap_tree(proc)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


class Peer:
    """A raw TCP client driven the way a person drives ``nc``, with deadlines."""

    def __init__(self, address: tuple[str, int], name: str | None = None) -> None:
        self.address = address
        _live_peers.add(self)
        self.sock = socket.create_connection(address, timeout=DEADLINE)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        self.hello = self.line()
        assert self.hello.startswith("HELLO "), self.hello
        if name is not None:
            self.send(name)

    def send(self, text: str | bytes) -> None:
        """Send one line (LF added) or raw bytes."""
        data = text if isinstance(text, bytes) else text.encode() + b"\n"
        self.sock.sendall(data)

    def raw_line(self, timeout: float = DEADLINE, allow_reset: bool = False) -> bytes | None:
        """Next line as bytes without LF; None when the server closed the connection.

        A reset (RST) is not a close: the server threw away what it had not sent, or
        what we had sent it. It fails the test unless ``allow_reset`` says the test
        expects one (then it counts as closed).
        """
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no line within {timeout}s (buffer {self.buf!r})")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                if not allow_reset:
                    raise AssertionError(
                        f"connection reset by the server (buffer {self.buf!r})"
                    ) from None
                chunk = b""
            except TimeoutError:
                continue
            if not chunk:
                return None
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line

    def line(self, timeout: float = DEADLINE) -> str:
        raw = self.raw_line(timeout)
        if raw is None:
            raise AssertionError("connection closed while a line was expected")
        return raw.decode("utf-8", "replace")

    def expect(self, *lines: str, timeout: float = DEADLINE) -> None:
        """Assert the next lines start with the given prefixes, in order."""
        for want in lines:
            got = self.line(timeout)
            assert got.startswith(want), f"expected {want!r}, got {got!r}"

    def expect_closed(self, timeout: float = DEADLINE, allow_reset: bool = False) -> None:
        """Assert the server closes the connection (FIN) with nothing more to say; a
        reset fails unless ``allow_reset``."""
        raw = self.raw_line(timeout, allow_reset)
        assert raw is None, f"expected close, got {raw!r}"

    def close(self) -> None:
        self.sock.close()


_live_peers: weakref.WeakSet[Peer] = weakref.WeakSet()


def pair(address: tuple[str, int], a: str = "alice", b: str = "bob") -> tuple[Peer, Peer]:
    """Connect two peers and return them once both are in a room (a writes first)."""
    first = Peer(address, a)
    first.expect("WAIT ")
    second = Peer(address, b)
    second.expect(f"PAIRED {a}", "TURN READ")
    first.expect(f"PAIRED {b}", "TURN WRITE")
    return first, second


def close_all(peers: Iterable[Peer]) -> None:
    for p in peers:
        p.close()


def wait_until(predicate, timeout: float = DEADLINE, what: str = "condition") -> None:
    """Poll ``predicate`` until true or fail at the deadline (for process state only)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s")
        time.sleep(0.01)


def socket_fds(pid: int) -> int:
    """How many socket file descriptors process ``pid`` holds (from /proc)."""
    count = 0
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        try:
            if os.readlink(fd).startswith("socket:"):
                count += 1
        except OSError:
            pass
    return count


REPORT_RE = r"NUMBER OF CLIENTS : \*\* (\d+) \*\*"
DETAIL_RE = r"^rooms (\d+), waiting (\d+), handshaking (\d+)$"


def report(server: ServerProc) -> tuple[int, int, int, int]:
    """Send SIGUSR2 and return (clients, rooms, waiting, handshaking) from the report."""
    mark = server.out.mark()
    server.signal(signal.SIGUSR2)
    clients = int(server.out.wait_for(REPORT_RE, start=mark).group(1))
    detail = server.out.wait_for(DETAIL_RE, start=mark)
    return (clients, *(int(x) for x in detail.groups()))


def tcp_sockets(pid: int) -> list:
    """The TCP sockets process ``pid`` holds (each with its fd, addresses and state)."""
    return psutil.Process(pid).net_connections(kind="tcp")


def server_side_fd(pid: int, peer: Peer) -> int:
    """The fd number under which process ``pid`` holds the server end of ``peer``."""
    here = peer.sock.getsockname()
    for conn in tcp_sockets(pid):
        if conn.raddr and tuple(conn.raddr) == here:
            return conn.fd
    raise AssertionError(f"process {pid} holds no socket connected to {here}")


_SYS_PIDFD_GETFD = 438  # Linux >= 5.6, every architecture


def copy_fd_of(pid: int, fd: int) -> int:
    """Duplicate another process's fd into this one (pidfd_getfd): the copy shares the
    open socket, so getsockopt on it reads the very options that process set. Closing
    the copy does not close theirs. Raises OSError when the kernel or rights forbid it."""
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    try:
        copy = libc.syscall(_SYS_PIDFD_GETFD, pidfd, fd, 0)
        if copy < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"pidfd_getfd: {os.strerror(err)}")
        return copy
    finally:
        os.close(pidfd)
