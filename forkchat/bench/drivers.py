"""The driver processes that play the clients, and the blocking peers of the one-room
phases.

The bench forks a few drivers (never one process per client) and talks to each over a
pipe: it sends commands, a driver sends ``(kind, data)`` tuples back (``progress``, a
step's report, ``result`` or ``error``). A driver runs one job: a blocking pair of
:class:`LineClient` for the sequential pairing and round trip phases, or a selectors
loop over many clients (:mod:`forkchat.bench.swarm`) for the others.
"""

from __future__ import annotations

import gc
import multiprocessing
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from multiprocessing.connection import wait as wait_ready
from typing import Any

from .settings import BenchError

# The start method is pinned once, here: drivers are forked (Python 3.14 changes the default).
MP = multiprocessing.get_context("fork")

WARMUP_MAX = 100  # round trips run before timing starts (at most a tenth of them)
PROGRESS_EVERY = 0.25  # seconds between a driver's progress reports and the bench's checks
PROGRESS_LOG_EVERY = 10.0  # seconds between progress lines when stderr is not a terminal
RECV_SIZE = 65536


# -- the bench's side -------------------------------------------------------------------


class Progress:
    """Progress on stderr: a line per phase, then counts: on a terminal one live line,
    elsewhere a line every PROGRESS_LOG_EVERY seconds of a long step."""

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.live = self.stream.isatty()
        self.shown = False
        self.next_line = 0.0

    def phase(self, text: str) -> None:
        self.clear()
        self.stream.write(f"bench: {text}\n")
        self.stream.flush()
        self.next_line = time.monotonic() + PROGRESS_LOG_EVERY

    def update(self, text: str) -> None:
        if self.live:
            self.stream.write(f"\r\033[K  {text}")
            self.shown = True
        elif time.monotonic() >= self.next_line:
            self.stream.write(f"bench:   {text}\n")
            self.next_line = time.monotonic() + PROGRESS_LOG_EVERY
        self.stream.flush()

    def clear(self) -> None:
        if self.shown:
            self.stream.write("\r\033[K")
            self.shown = False


class Drivers:
    """Driver processes running one job each, as a context manager that stops them."""

    def __init__(self, job: Callable, jobs: Sequence[tuple], progress: Progress) -> None:
        self.job = job
        self.jobs = jobs
        self.progress = progress
        self.links: list[Any] = []
        self.procs: list[Any] = []
        self.counts: dict[int, tuple[str, int, int]] = {}

    def __enter__(self) -> Drivers:
        for index, args in enumerate(self.jobs):
            mine, theirs = MP.Pipe()
            proc = MP.Process(
                target=run_driver,
                args=(theirs, self.job, index, args),
                name=f"forkchat-bench-driver-{index}",
                daemon=True,
            )
            proc.start()
            theirs.close()
            self.links.append(mine)
            self.procs.append(proc)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def command(self, *message: Any) -> None:
        """Send the same command to every driver."""
        for link in self.links:
            link.send(message)

    def command_each(self, messages: Sequence[tuple]) -> None:
        """Send driver i its own command ``messages[i]``."""
        for link, message in zip(self.links, messages, strict=True):
            link.send(message)

    def gather(self, kind: str, timeout: float, watch: Callable | None = None) -> list[Any]:
        """Wait for every driver's ``kind`` report and return them in driver order.
        ``watch()`` runs every PROGRESS_EVERY seconds meanwhile and may raise to stop.
        Raises BenchError on a driver's error, death or a passed deadline."""
        deadline = time.monotonic() + timeout
        found: dict[int, Any] = {}
        while len(found) < len(self.links):
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"drivers gave no {kind!r} within {timeout:g} s")
            waiting = [i for i in range(len(self.links)) if i not in found]
            ready = wait_ready([self.links[i] for i in waiting], min(left, PROGRESS_EVERY))
            for i in waiting:
                if self.links[i] in ready:
                    self.take(i, kind, found)
            self.show_counts()
            if watch is not None:
                watch()
        self.progress.clear()
        return [found[i] for i in range(len(self.links))]

    def take(self, index: int, kind: str, found: dict[int, Any]) -> None:
        """Read one report from driver ``index`` into ``found`` or the progress counts."""
        try:
            what, data = self.links[index].recv()
        except (EOFError, OSError):
            self.procs[index].join(1.0)
            code = self.procs[index].exitcode
            raise BenchError(f"driver {index} died (exit code {code})") from None
        if what == "error":
            raise BenchError(f"driver {index}: {data}")
        if what == "progress":
            self.counts[index] = data
        elif what == kind:
            found[index] = data
        else:
            raise BenchError(f"driver {index} sent {what!r} where {kind!r} was due")

    def show_counts(self) -> None:
        """One live line: the drivers' current step and how far they are, summed."""
        if self.counts:
            steps = {step for step, _, _ in self.counts.values()}
            done = sum(n for _, n, _ in self.counts.values())
            total = sum(t for _, _, t in self.counts.values())
            self.progress.update(f"{'/'.join(sorted(steps))}: {done} of {total}")

    def stop(self) -> None:
        """Terminate the drivers still running (SIGTERM, then SIGKILL) and reap them all."""
        for proc in self.procs:
            if proc.is_alive():
                proc.terminate()
        for proc in self.procs:
            proc.join(5.0)
            if proc.is_alive():
                proc.kill()
                proc.join(5.0)
        for link in self.links:
            link.close()
        self.progress.clear()


# -- the driver's side ------------------------------------------------------------------


def run_driver(link: Any, job: Callable, index: int, args: tuple) -> None:
    """Body of a driver process: run ``job(link, index, *args)``, send its result or error.

    Ctrl-C is the bench's to handle (it stops the drivers); the cycle collector is off
    so that it does not add pauses to the figures.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    gc.freeze()
    gc.disable()
    try:
        link.send(("result", job(link, index, *args)))
    except Exception as exc:
        link.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        link.close()


def await_command(link: Any, timeout: float) -> tuple:
    """The bench's next command tuple. Raises TimeoutError past ``timeout``."""
    if not link.poll(timeout):
        raise TimeoutError(f"no command from the bench within {timeout:g} s")
    return link.recv()


class ProtocolError(Exception):
    """The server said something the bench did not expect."""


class LineClient:
    """A blocking client socket read line by line; every read is bounded by ``timeout``."""

    def __init__(self, address: tuple[str, int], timeout: float) -> None:
        self.timeout = timeout
        self.sock = socket.create_connection(address, timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.lines: deque[bytes] = deque()
        self.tail = b""

    def read_line(self) -> bytes:
        """The next line without its LF. Raises ProtocolError at end of stream."""
        while not self.lines:
            try:
                data = self.sock.recv(RECV_SIZE)
            except TimeoutError:
                raise TimeoutError(f"no line from the server in {self.timeout:g} s") from None
            if not data:
                raise ProtocolError("the server closed the connection")
            *lines, self.tail = (self.tail + data).split(b"\n")
            self.lines.extend(lines)
        return self.lines.popleft()

    def expect(self, prefix: bytes) -> bytes:
        """Read a line and check it starts with ``prefix``; return it."""
        line = self.read_line()
        if not line.startswith(prefix):
            raise ProtocolError(f"expected {prefix!r}, got {line!r}")
        return line

    def expect_exactly(self, want: bytes) -> None:
        line = self.read_line()
        if line != want:
            raise ProtocolError(f"expected {want!r}, got {line!r}")

    def expect_end(self) -> None:
        """Wait for the server to close the connection, with nothing more said."""
        try:
            line = self.read_line()
        except ProtocolError:
            return
        raise ProtocolError(f"expected the connection to close, got {line!r}")

    def send_line(self, line: bytes) -> None:
        self.sock.sendall(line + b"\n")

    def close(self) -> None:
        self.sock.close()


def join_pair(address: tuple[str, int], timeout: float, tag: str) -> tuple[Any, Any, int]:
    """Open a room: A connects and waits, then B. Returns (A, B, B's connect->PAIRED ns)."""
    a_name, b_name = f"{tag}a".encode(), f"{tag}b".encode()
    a = LineClient(address, timeout)
    a.expect(b"HELLO ")
    a.send_line(a_name)
    a.expect(b"WAIT ")
    start = time.perf_counter_ns()
    b = LineClient(address, timeout)
    b.expect(b"HELLO ")
    b.send_line(b_name)
    b.expect_exactly(b"PAIRED " + a_name)
    latency = time.perf_counter_ns() - start
    b.expect_exactly(b"TURN READ")
    a.expect_exactly(b"PAIRED " + b_name)
    a.expect_exactly(b"TURN WRITE")
    return a, b, latency


def leave_pair(a: LineClient, b: LineClient) -> None:
    """A sends ``exit``; both get their BYE and see the server close; both close."""
    a.send_line(b"exit")
    a.expect(b"BYE exit")
    b.expect(b"BYE partner-exit")
    a.expect_end()
    b.expect_end()
    a.close()
    b.close()


def sequential_job(link: Any, index: int, address: tuple, pairs: int, timeout: float) -> dict:
    """Open and close ``pairs`` rooms one after the other; the second arrival's latency."""
    latencies = []
    next_report = 0.0
    for i in range(pairs):
        a, b, latency = join_pair(address, timeout, f"seq{i}")
        latencies.append(latency)
        leave_pair(a, b)
        if time.monotonic() >= next_report:
            link.send(("progress", ("pairs", i + 1, pairs)))
            next_report = time.monotonic() + PROGRESS_EVERY
    return {"latencies_ns": latencies}


def round_trip_job(link: Any, index: int, address: tuple, count: int, timeout: float) -> dict:
    """In one room, ``count`` timed round trips (after a short warm-up): A writes, B reads
    the MSG and answers on its turn, A reads the answer."""
    a, b, _ = join_pair(address, timeout, "rtt")
    warmup = min(WARMUP_MAX, count // 10)
    latencies = []
    for i in range(warmup + count):
        ping, pong = b"ping %d" % i, b"pong %d" % i
        start = time.perf_counter_ns()
        a.send_line(ping)
        b.expect_exactly(b"MSG " + ping)
        b.expect_exactly(b"TURN WRITE")
        b.send_line(pong)
        a.expect_exactly(b"TURN READ")
        a.expect_exactly(b"MSG " + pong)
        end = time.perf_counter_ns()
        a.expect_exactly(b"TURN WRITE")
        b.expect_exactly(b"TURN READ")
        if i >= warmup:
            latencies.append(end - start)
    leave_pair(a, b)
    return {"latencies_ns": latencies}
