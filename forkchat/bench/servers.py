"""The servers under test: forkchat (``bin/server``) and the reference relay, each started
as its own process on a free port, ready when it prints its listen line, stopped and
reaped with what it forked (its room workers) after the run. Only
their command lines, process names and the wire protocol are used, never their code."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from . import reference
from .procstats import room_workers_of
from .settings import BenchError, Settings

START_TIMEOUT = 10.0  # seconds for a server to print its listen line
STOP_TIMEOUT = 10.0  # seconds for a server to shut down after SIGTERM before SIGKILL
LISTEN_RE = re.compile(rb"listening on (\S+):(\d+) pid (\d+)")
SERVER_SHIM = Path(__file__).resolve().parent.parent.parent / "bin" / "server"
REFERENCE_SCRIPT = Path(reference.__file__).resolve()


@dataclass
class ServerHandle:
    """A server under test: ours (``proc`` set) or one found on ``--port``."""

    name: str  # "forkchat" or "reference"
    host: str
    port: int
    pid: int
    proc: subprocess.Popen | None = None
    log: Any = None  # the temporary file holding our server's output
    baseline: int = 0  # room workers it had before the bench began (a server on --port)

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)


def server_limits(settings: Settings) -> tuple[int, int]:
    """(--max-rooms, --max-waiting) large enough for every phase's clients at once."""
    rooms = max(settings.hold, settings.burst // 2, settings.uss_rooms, *settings.rooms) + 16
    return rooms, 2 * rooms + 64


def forkchat_command(settings: Settings) -> list[str]:
    """bin/server on a free port: no idle timeout, roomy limits, no colour."""
    rooms, waiting = server_limits(settings)
    return [
        *(sys.executable, str(SERVER_SHIM)),
        *("--host", settings.host, "--port", "0", "--max-rooms", str(rooms)),
        *("--max-waiting", str(waiting), "--idle-timeout", "0", "--name-timeout", "600"),
        "--no-color",
    ]


def reference_command(settings: Settings) -> list[str]:
    """The reference relay on a free port, run as a script: it imports no forkchat code."""
    return [sys.executable, str(REFERENCE_SCRIPT), "--host", settings.host, "--port", "0"]


def start_server(name: str, command: list[str], host: str) -> ServerHandle:
    """Start ``command`` in its own session; return once it printed its listen line."""
    if name == "forkchat" and not SERVER_SHIM.exists():
        raise BenchError(f"{SERVER_SHIM} is missing: the bench runs from a source checkout")
    log = tempfile.TemporaryFile(prefix=f"forkchat-bench-{name}-")  # noqa: SIM115 (stop_server)
    env = dict(os.environ, NO_COLOR="1")
    env.pop("PYTHONUNBUFFERED", None)
    proc = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    handle = ServerHandle(name, host, 0, proc.pid, proc, log)
    try:
        match = wait_listen_line(handle)
    except BaseException:
        stop_server(handle)
        raise
    handle.host, handle.port = match.group(1).decode().strip("[]"), int(match.group(2))
    return handle


def wait_listen_line(handle: ServerHandle) -> re.Match:
    """Poll the server's output for its listen line (deadline START_TIMEOUT)."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        match = LISTEN_RE.search(os.pread(handle.log.fileno(), 4096, 0))
        if match:
            return match
        if handle.proc.poll() is not None:
            raise BenchError(f"the {handle.name} server exited at start: {server_tail(handle)}")
        time.sleep(0.02)
    raise BenchError(f"no listen line from the {handle.name} server in {START_TIMEOUT:g} s")


def server_tail(handle: ServerHandle, lines: int = 5) -> str:
    """The last lines of our server's output, for an error message."""
    if handle.log is None:
        return "(not our server: no log)"
    size = os.fstat(handle.log.fileno()).st_size
    data = os.pread(handle.log.fileno(), 8192, max(0, size - 8192))
    return " | ".join(data.decode("utf-8", "replace").splitlines()[-lines:]) or "(no output)"


def attach_server(settings: Settings) -> ServerHandle:
    """The forkchat server already listening on ``--port``, found by its socket."""
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == settings.port and conn.pid:
            handle = ServerHandle("forkchat", settings.host, settings.port, conn.pid)
            handle.baseline = len(room_workers(handle))
            return handle
    raise BenchError(f"no process of ours listens on port {settings.port}")


def check_server(handle: ServerHandle) -> None:
    """Raise BenchError if our server has exited."""
    if handle.proc is not None and (code := handle.proc.poll()) is not None:
        raise BenchError(
            f"the {handle.name} server exited with status {code}: {server_tail(handle)}"
        )


def room_workers(handle: ServerHandle) -> list[int]:
    """PIDs of the server's room workers (``procstats.room_workers_of``)."""
    return room_workers_of(handle.pid)


def forked_by(handle: ServerHandle) -> list[psutil.Process]:
    """Every live descendant of the server: its room workers."""
    try:
        return psutil.Process(handle.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def rooms_open(handle: ServerHandle) -> int:
    """Room workers running now, beyond those the server had before the bench."""
    return len(room_workers(handle)) - handle.baseline


def wait_rooms_closed(handle: ServerHandle, timeout: float) -> None:
    """Wait until the server is back to its baseline of room workers (state poll)."""
    deadline = time.monotonic() + timeout
    while rooms_open(handle) > 0:
        check_server(handle)
        if time.monotonic() > deadline:
            raise BenchError(
                f"{handle.name}: room workers still running {timeout:g} s after their rooms closed"
            )
        time.sleep(0.05)


def stop_server(handle: ServerHandle) -> None:
    """SIGTERM our server, SIGKILL it past STOP_TIMEOUT, then kill and reap what is left
    of what it forked (room workers). A server we did not start is left
    alone."""
    if handle.proc is None:
        return
    forked = forked_by(handle)
    if handle.proc.poll() is None:
        handle.proc.send_signal(signal.SIGTERM)
    try:
        handle.proc.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        handle.proc.kill()
        handle.proc.wait(STOP_TIMEOUT)
    for proc in forked:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(forked, timeout=STOP_TIMEOUT)
    handle.log.close()


@contextmanager
def servers_for(settings: Settings):
    """forkchat (ours, or the one on --port) and, with --ref, the reference relay;
    yields {name: handle} and stops what it started, whatever happens."""
    handles: dict[str, ServerHandle] = {}
    try:
        if settings.port:
            handles["forkchat"] = attach_server(settings)
        else:
            handles["forkchat"] = start_server(
                "forkchat", forkchat_command(settings), settings.host
            )
        if settings.ref:
            handles["reference"] = start_server(
                "reference", reference_command(settings), settings.host
            )
        yield handles
    finally:
        for handle in handles.values():
            stop_server(handle)
