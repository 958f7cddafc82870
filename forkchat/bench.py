"""forkchat bench: measure a forkchat server through real sockets.

Usage:
  bench [options]
  bench -h | --help
  bench --version

Starts a server on a free port (or benches the one already listening on --port),
drives synthetic clients from separate driver processes, prints a table and writes
the same figures as JSON with --json FILE. Progress goes to stderr.

Phases, in order:
  pairing     --pairs pairs one after the other (connect of the second client to
              its PAIRED), then --burst clients connecting at once (each client's
              connect to its PAIRED; rooms opened per second)
  round trip  --round-trips in one room: A writes, B answers on its turn, A reads
  messages/s  --messages messages in each of N rooms at once, N from --rooms,
              timed after one warm-up message each way; the room workers' USS
              memory is read after the largest of these, rooms still open
  rooms held  --rooms-held rooms open at once, one message in each, all delivered

Options:
  --host HOST        Server address [default: 127.0.0.1].
  --port PORT        Bench the server already listening on PORT instead of starting
                     one; it must allow the phases' rooms and waiting clients.
  --pairs N          Sequential pairs (default 200, 20 with --quick).
  --burst N          Clients connecting at once, even (default 1000, 100 with --quick).
  --round-trips N    Round trips in one room (default 2000, 200 with --quick).
  --rooms LIST       Room counts for messages per second [default: 1,10,100].
  --messages N       Messages per room in those phases (default 1000, 100 with --quick).
  --rooms-held N     Rooms open at once (default 2000, 100 with --quick).
  --drivers N        Driver processes for the burst, messages/s and rooms held
                     [default: 2].
  --pin              Pin the server, its room workers and the drivers to one CPU.
  --quick            Small phases that finish in seconds (the test suite's smoke run).
  --timeout SEC      Deadline for each step of a phase [default: 300].
  --json FILE        Also write the figures as JSON to FILE.
  -h --help          Show this help.
  --version          Show the version.

Exit status: 0 when every phase ran and every client was served, 1 on a failure
(refused or lost clients, undelivered messages, a deadline passed), 2 for a bad
command line, 130 when interrupted. The server it started is always stopped.
"""

from __future__ import annotations

import errno
import gc
import json
import math
import multiprocessing
import os
import platform
import re
import resource
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from multiprocessing.connection import wait as wait_ready
from pathlib import Path
from typing import Any

import psutil

from . import __version__
from .args import UsageError, parse_usage, to_number

# The start method is pinned once, here: drivers are forked (Python 3.14 changes the default).
MP = multiprocessing.get_context("fork")

PROG = "forkchat bench"
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
FULL = {"pairs": 200, "burst": 1000, "round_trips": 2000, "messages": 1000, "rooms_held": 2000}
QUICK = {"pairs": 20, "burst": 100, "round_trips": 200, "messages": 100, "rooms_held": 100}
WARMUP_MAX = 100  # round trips run before timing starts (at most a tenth of them)
WARMUP_MESSAGES = 2  # untimed messages per room (one each way) before messages/s is timed
START_TIMEOUT = 10.0  # seconds for the server to print its listen line
STOP_TIMEOUT = 10.0  # seconds for the server to shut down after SIGTERM before SIGKILL
PROGRESS_EVERY = 0.5  # seconds between a driver's progress reports
PROGRESS_LOG_EVERY = 10.0  # seconds between progress lines when stderr is not a terminal
RECV_SIZE = 65536
MIB = 1 << 20
LISTEN_RE = re.compile(rb"forkchat server listening on (\S+):(\d+) pid (\d+)")
SERVER_SHIM = Path(__file__).resolve().parent.parent / "bin" / "server"


class BenchError(Exception):
    """A phase failed (refused or lost clients, lost messages, a deadline): exit status 1."""


# -- settings ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """What to measure, checked; sizes come from the command line, else FULL or QUICK."""

    host: str = "127.0.0.1"
    port: int | None = None
    pairs: int = FULL["pairs"]
    burst: int = FULL["burst"]
    round_trips: int = FULL["round_trips"]
    rooms: tuple[int, ...] = (1, 10, 100)
    messages: int = FULL["messages"]
    rooms_held: int = FULL["rooms_held"]
    drivers: int = 2
    pin: bool = False
    quick: bool = False
    timeout: float = 300.0
    json_path: str | None = None


def parse_rooms(raw: str) -> tuple[int, ...]:
    """``1,10,100`` -> (1, 10, 100). Raises UsageError unless each is 1..50000."""
    try:
        counts = tuple(int(part) for part in raw.split(","))
    except ValueError:
        raise UsageError(f"--rooms must be numbers separated by commas, not {raw!r}") from None
    if not all(1 <= n <= 50_000 for n in counts):
        raise UsageError(f"--rooms counts must be between 1 and 50000, not {raw!r}")
    return counts


def parse_settings(argv: list[str] | None = None) -> Settings:
    """Parse and check the command line. Raises UsageError, or exits for -h/--version."""
    args = parse_usage(__doc__, argv, f"forkchat {__version__}")
    sizes = dict(QUICK if args["--quick"] else FULL)
    limits = {"pairs": 100_000, "burst": 100_000, "round_trips": 10_000_000}
    limits |= {"messages": 10_000_000, "rooms_held": 50_000}
    for key, high in limits.items():
        option = "--" + key.replace("_", "-")
        if args[option] is not None:
            sizes[key] = to_number(args, option, int, 1, high)
    if sizes["burst"] % 2:
        raise UsageError(f"--burst must be even (clients come in pairs), not {sizes['burst']}")
    port = None if args["--port"] is None else to_number(args, "--port", int, 1, 65535)
    if port is not None and args["--pin"]:
        raise UsageError("--pin needs the bench's own server; drop --port")
    return Settings(
        host=args["--host"],
        port=port,
        rooms=parse_rooms(args["--rooms"]),
        drivers=to_number(args, "--drivers", int, 1, 64),
        pin=args["--pin"],
        quick=args["--quick"],
        timeout=to_number(args, "--timeout", float, 1, 86400),
        json_path=args["--json"],
        **sizes,
    )


# -- pure figures -----------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0 < q <= 100) by the nearest-rank method: the smallest value
    that at least q % of the values are less than or equal to. Raises ValueError on no
    values or q out of range."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 < q <= 100:
        raise ValueError(f"percentile must be in (0, 100], not {q}")
    ordered = sorted(values)
    rank = math.ceil(q * len(ordered) / 100)
    return ordered[rank - 1]


def summarize(values: Sequence[float], scale: float = 1.0) -> dict[str, float]:
    """count, p50, p99 and max of ``values``, each divided by ``scale`` (ns -> ms: 1e6)."""
    return {
        "count": len(values),
        "p50": percentile(values, 50) / scale,
        "p99": percentile(values, 99) / scale,
        "max": max(values) / scale,
    }


def split_evenly(total: int, parts: int) -> list[int]:
    """Split ``total`` into at most ``parts`` positive shares differing by one at most."""
    base, extra = divmod(total, parts)
    shares = [base + (1 if i < extra else 0) for i in range(parts)]
    return [share for share in shares if share]


def plural(count: int, noun: str) -> str:
    """``1 room``, ``10 rooms``."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def three_digits(value: float) -> str:
    """About three significant digits, never in exponent form: 1.23, 12.3, 123, 1234."""
    if value < 10:
        return f"{value:.2f}"
    if value < 100:
        return f"{value:.1f}"
    return f"{value:.0f}"


def format_ms(ms: float) -> str:
    """A duration given in milliseconds, in µs, ms or s, whichever reads best."""
    if ms < 1:
        return f"{three_digits(ms * 1000)} µs"
    if ms < 1000:
        return f"{three_digits(ms)} ms"
    return f"{three_digits(ms / 1000)} s"


def format_spread(summary: dict[str, float]) -> str:
    """``p50 1.23 ms  p99 4.56 ms`` from a summary in milliseconds."""
    return f"p50 {format_ms(summary['p50'])}  p99 {format_ms(summary['p99'])}"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns separated by two spaces, a dashed rule under the headers."""
    widths = [len(str(cell)) for cell in headers]
    for row in rows:
        if len(row) != len(widths):
            raise ValueError(f"row {row!r} has {len(row)} cells, not {len(widths)}")
        widths = [max(width, len(str(cell))) for width, cell in zip(widths, row, strict=True)]
    lines = [headers, ["-" * width for width in widths], *rows]
    return "\n".join(
        "  ".join(str(cell).ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def sequential_rows(seq: dict) -> list[tuple[str, str, str]]:
    detail = f"{seq['pairs']} pairs one by one, 2nd client's connect -> PAIRED"
    return [("pairing, sequential", format_spread(seq["ms"]), detail)]


def burst_rows(burst: dict) -> list[tuple[str, str, str]]:
    paired = f"{burst['paired']} paired, {burst['refused']} refused, connect -> PAIRED"
    rooms = f"{plural(burst['paired'] // 2, 'room')} in {format_ms(burst['seconds'] * 1000)}"
    return [
        (f"pairing, burst of {burst['clients']}", format_spread(burst["ms"]), paired),
        ("rooms opened per second", f"{burst['rooms_per_second']:,.0f}", rooms),
    ]


def round_trip_rows(rtt: dict) -> list[tuple[str, str, str]]:
    detail = f"{rtt['round_trips']} round trips: A writes, B answers, A reads"
    return [("round trip, one room", format_spread(rtt["ms"]), detail)]


def throughput_rows(runs: list[dict]) -> list[tuple[str, str, str]]:
    rows = []
    for run in runs:
        detail = f"{run['delivered']} of {run['messages']} in {format_ms(run['seconds'] * 1000)}"
        detail += f", drivers {run['driver_busy']:.0%} busy"
        rows.append(
            (f"messages/s, {plural(run['rooms'], 'room')}", f"{run['per_second']:,.0f}", detail)
        )
    return rows


def memory_rows(mem: dict) -> list[tuple[str, str, str]]:
    value = f"p50 {mem['uss_p50_mib']:.2f} MiB  max {mem['uss_max_mib']:.2f} MiB"
    detail = f"{mem['workers']} workers after {mem['after_messages']} messages each"
    return [("USS per room worker", value, detail)]


def held_rows(held: dict) -> list[tuple[str, str, str]]:
    detail = (
        f"{held['requested']} asked, {held['delivered']} messages delivered, "
        f"opened in {held['seconds']:.2f} s"
    )
    return [("rooms held at once", str(held["peak"]), detail)]


ROW_MAKERS = {
    "pairing_sequential": sequential_rows,
    "pairing_burst": burst_rows,
    "round_trip": round_trip_rows,
    "throughput": throughput_rows,
    "memory": memory_rows,
    "rooms_held": held_rows,
}


def table_rows(results: dict) -> list[tuple[str, str, str]]:
    """The table's rows (figure, value, detail) for the phases present in ``results``."""
    rows = []
    for key, make_rows in ROW_MAKERS.items():
        if results.get(key):
            rows += make_rows(results[key])
    return rows


def format_report(report: dict) -> str:
    """The whole printed report: a title with the machine line, then the table."""
    machine = report["machine"]
    pinned = f"pinned to CPU {report['pinned_cpu']}" if report["pinned_cpu"] is not None else ""
    title = f"forkchat bench {report['version']}  ({'quick' if report['quick'] else 'full'} run)"
    lines = [title, f"machine: {machine_line(machine)}" + (f"; {pinned}" if pinned else "")]
    lines += ["", format_table(("figure", "value", "detail"), table_rows(report["results"]))]
    return "\n".join(lines)


def machine_line(machine: dict) -> str:
    """``AMD EPYC, 2 cores, Python 3.11.7, Linux 6.1.0``."""
    return (
        f"{machine['cpu']}, {machine['cores']} cores, "
        f"Python {machine['python']}, {machine['kernel']}"
    )


# -- the machine ------------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo, else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def describe_machine() -> dict[str, Any]:
    """CPU model, logical cores, Python version and kernel, for the report."""
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "kernel": f"{platform.system()} {platform.release()}",
    }


def raise_fd_limit(needed: int) -> None:
    """Raise our soft RLIMIT_NOFILE to the hard limit (the server and drivers inherit it).
    Raises BenchError when even the hard limit is below ``needed``."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise BenchError(f"needs {needed} file descriptors, the hard limit is {hard}")
    if soft != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def pin_to_one_cpu() -> int:
    """Pin this process (and so everything it starts) to its first allowed CPU."""
    cpu = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})
    return cpu


# -- the server -------------------------------------------------------------------------


@dataclass
class ServerHandle:
    """The server under test: ours (``proc`` set) or one found on ``--port``."""

    host: str
    port: int
    pid: int
    proc: subprocess.Popen | None = None
    log: Any = None  # the temporary file holding our server's output

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)


def server_limits(settings: Settings) -> tuple[int, int]:
    """(--max-rooms, --max-waiting) large enough for every phase's clients at once."""
    rooms = max(settings.rooms_held, settings.burst // 2, *settings.rooms) + 16
    return rooms, 2 * rooms + 64


def server_command(settings: Settings) -> list[str]:
    """The command that starts our server: no idle timeout, roomy limits, no colour."""
    rooms, waiting = server_limits(settings)
    return [
        *(sys.executable, str(SERVER_SHIM)),
        *("--host", settings.host, "--port", "0", "--max-rooms", str(rooms)),
        *("--max-waiting", str(waiting), "--idle-timeout", "0", "--name-timeout", "600"),
        "--no-color",
    ]


def start_server(settings: Settings) -> ServerHandle:
    """Start a server on a free port and return once it printed its listen line."""
    if not SERVER_SHIM.exists():
        raise BenchError(f"{SERVER_SHIM} is missing: the bench runs from a source checkout")
    log = tempfile.TemporaryFile(prefix="forkchat-bench-")  # noqa: SIM115 (closed in stop_server)
    env = dict(os.environ, NO_COLOR="1")
    env.pop("PYTHONUNBUFFERED", None)
    proc = subprocess.Popen(
        server_command(settings),
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    handle = ServerHandle(settings.host, 0, proc.pid, proc, log)
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
            raise BenchError(f"the server exited at start: {server_tail(handle)}")
        time.sleep(0.02)
    raise BenchError(f"no listen line from the server within {START_TIMEOUT:g} s")


def server_tail(handle: ServerHandle, lines: int = 5) -> str:
    """The last lines of our server's output, for an error message."""
    if handle.log is None:
        return "(not our server: no log)"
    size = os.fstat(handle.log.fileno()).st_size
    data = os.pread(handle.log.fileno(), 8192, max(0, size - 8192))
    return " | ".join(data.decode("utf-8", "replace").splitlines()[-lines:]) or "(no output)"


def attach_server(settings: Settings) -> ServerHandle:
    """The server already listening on ``--port``, found by its listening socket."""
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == settings.port and conn.pid:
            return ServerHandle(settings.host, settings.port, conn.pid)
    raise BenchError(f"no process of ours listens on port {settings.port}")


def check_server(handle: ServerHandle) -> None:
    """Raise BenchError if our server has exited."""
    if handle.proc is not None and (code := handle.proc.poll()) is not None:
        raise BenchError(f"the server exited with status {code}: {server_tail(handle)}")


def room_workers(handle: ServerHandle) -> list[psutil.Process]:
    """The server's children: its room workers."""
    try:
        return psutil.Process(handle.pid).children()
    except psutil.NoSuchProcess:
        return []


def wait_rooms_closed(handle: ServerHandle, baseline: int, timeout: float) -> None:
    """Wait until the server is back to ``baseline`` room workers (process state poll)."""
    deadline = time.monotonic() + timeout
    while len(room_workers(handle)) > baseline:
        check_server(handle)
        if time.monotonic() > deadline:
            raise BenchError(f"room workers still running {timeout:g} s after their rooms closed")
        time.sleep(0.05)


def measure_uss(procs: Sequence[psutil.Process]) -> list[int]:
    """USS in bytes of each process still there (psutil memory_full_info)."""
    sizes = []
    for proc in procs:
        try:
            sizes.append(proc.memory_full_info().uss)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return sizes


def stop_server(handle: ServerHandle) -> None:
    """SIGTERM our server, SIGKILL it past STOP_TIMEOUT, then kill and reap what is left
    of its room workers. A server we did not start is left alone."""
    if handle.proc is None:
        return
    workers = room_workers(handle)
    if handle.proc.poll() is None:
        handle.proc.send_signal(signal.SIGTERM)
    try:
        handle.proc.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        handle.proc.kill()
        handle.proc.wait(STOP_TIMEOUT)
    for proc in workers:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(workers, timeout=STOP_TIMEOUT)
    handle.log.close()


# -- the drivers: main side -------------------------------------------------------------


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
    """Driver processes running one job each; the bench talks to them over pipes.

    A driver sends ``(kind, data)`` tuples: ``progress``, its step reports, ``result``
    or ``error``; the bench sends command words (``go``, ``release``) at barriers.
    """

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

    def command(self, word: str) -> None:
        """Send a command word to every driver."""
        for link in self.links:
            link.send(word)

    def gather(self, kind: str, timeout: float) -> list[Any]:
        """Wait for every driver's ``kind`` report and return them in driver order.
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


# -- the drivers: driver side ------------------------------------------------------------


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


def await_command(link: Any, word: str, timeout: float) -> None:
    """Block until the bench sends ``word``. Raises TimeoutError past ``timeout``."""
    if not link.poll(timeout):
        raise TimeoutError(f"no {word!r} from the bench within {timeout:g} s")
    got = link.recv()
    if got != word:
        raise RuntimeError(f"bench sent {got!r} where {word!r} was due")


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


class Client:
    """One synthetic client of a Swarm: its socket, where it is, what it sent and got."""

    __slots__ = (
        "connected_ns",
        "done",
        "first",
        "may_write",
        "name",
        "open",
        "partner",
        "quota_in",
        "quota_out",
        "received",
        "sent",
        "sock",
        "tail",
    )

    def __init__(self, name: bytes) -> None:
        self.name = name
        self.sock: socket.socket | None = None
        self.tail = b""
        self.connected_ns = 0
        self.partner = b""
        self.first: bool | None = None
        self.may_write = False
        self.sent = self.received = self.quota_out = self.quota_in = 0
        self.done = False
        self.open = False


class Swarm:
    """Many non-blocking clients of one driver in one selector loop.

    Each client connects, sends its name on HELLO and waits for PAIRED and its first
    TURN. ``exchange(n)`` has every room trade ``n`` more lines, turn by turn. Each line
    is ``<sender> <n>`` and the reader checks it came from its partner, in order.
    ``leave`` sends ``exit`` and waits for the server to close each connection.
    """

    def __init__(self, address: tuple, names: list[bytes], timeout: float) -> None:
        self.address = address
        self.clients = [Client(name) for name in names]
        self.timeout = timeout
        self.sel = selectors.DefaultSelector()
        self.exchanging = False
        self.paired = self.refused = self.failed = self.finished = self.delivered = 0
        self.wrong = 0
        self.closing = False
        self.latencies: list[int] = []
        self.errors: list[str] = []
        self.first_ns = self.last_paired_ns = self.start_ns = self.end_ns = 0
        self.cpu_start = 0.0  # this process's CPU time when the current step began

    # -- steps --------------------------------------------------------------------------

    def connect_all(self) -> None:
        """Start every connection at once (non-blocking connect)."""
        self.first_ns = time.perf_counter_ns()
        self.cpu_start = time.process_time()
        for client in self.clients:
            sock = socket.socket(socket.AF_INET6 if ":" in self.address[0] else socket.AF_INET)
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            client.connected_ns = time.perf_counter_ns()
            code = sock.connect_ex(self.address)
            client.sock, client.open = sock, True
            if code not in (0, errno.EINPROGRESS):
                self.fail(client, f"connect: {os.strerror(code)}")
                continue
            self.sel.register(sock, selectors.EVENT_READ, client)

    def exchange(self, count: int) -> None:
        """Every room trades ``count`` more messages; whoever holds the turn starts."""
        self.exchanging = True
        self.finished = self.delivered = 0
        self.start_ns = time.perf_counter_ns()
        self.cpu_start = time.process_time()
        for client in self.clients:
            if client.open:
                self.add_quota(client, count)
        for client in self.clients:
            if client.open and client.may_write:
                self.write_next(client)

    def add_quota(self, client: Client, count: int) -> None:
        """Give ``client`` its share of ``count`` messages: the side that writes next
        (the first writer after an even number of messages) sends the odd ones."""
        writes_next = client.first == ((client.sent + client.received) % 2 == 0)
        mine, theirs = (count + 1) // 2, count // 2
        client.quota_out += mine if writes_next else theirs
        client.quota_in += theirs if writes_next else mine
        client.done = False

    def leave(self) -> None:
        """Every open client sends ``exit``; the server closes each connection."""
        self.closing = True
        for client in self.clients:
            if client.open:
                self.send(client, b"exit\n")

    def settled(self, step: str) -> int:
        """How many clients are done with ``step`` (pairing, messages, leaving)."""
        if step == "pairing":
            return self.paired + self.refused + self.failed
        if step in ("messages", "warm-up"):
            return self.finished + self.failed
        return sum(1 for client in self.clients if not client.open)

    def run(self, step: str, link: Any) -> None:
        """Serve events until every client is done with ``step``. Raises TimeoutError."""
        deadline = time.monotonic() + self.timeout
        total, next_report = len(self.clients), 0.0
        while (done := self.settled(step)) < total:
            now = time.monotonic()
            if now >= deadline:
                raise TimeoutError(f"{step}: {done} of {total} clients done in {self.timeout:g} s")
            if now >= next_report:
                link.send(("progress", (step, done, total)))
                next_report = now + PROGRESS_EVERY
            for key, _mask in self.sel.select(min(PROGRESS_EVERY, deadline - now)):
                self.read(key.data)

    # -- events -------------------------------------------------------------------------

    def read(self, client: Client) -> None:
        """Read what arrived for ``client`` and handle each complete line."""
        try:
            data = client.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.fail(client, f"connection lost: {exc.strerror or exc}")
            return
        if not data:
            self.on_end(client)
            return
        *lines, client.tail = (client.tail + data).split(b"\n")
        for line in lines:
            self.on_line(client, line)

    def on_line(self, client: Client, line: bytes) -> None:
        """React to one server line, as a client would."""
        if line.startswith(b"MSG "):
            self.on_message(client, line[4:])
        elif line == b"TURN WRITE":
            self.on_turn(client, write=True)
        elif line == b"TURN READ":
            self.on_turn(client, write=False)
        elif line.startswith(b"HELLO "):
            self.send(client, client.name + b"\n")
        elif line.startswith(b"PAIRED "):
            self.on_paired(client, line[7:])
        elif line.startswith(b"BYE "):
            self.on_bye(client, line)
        elif not line.startswith(b"WAIT "):
            self.note(f"{client.name.decode()} got {line[:80]!r}")

    def on_paired(self, client: Client, partner: bytes) -> None:
        now = time.perf_counter_ns()
        client.partner = partner
        self.latencies.append(now - client.connected_ns)
        self.last_paired_ns = max(self.last_paired_ns, now)

    def on_turn(self, client: Client, write: bool) -> None:
        """The first TURN completes the pairing and says who writes first."""
        if client.first is None:
            client.first = write
            self.paired += 1
        client.may_write = write
        if write and self.exchanging:
            self.write_next(client)

    def on_message(self, client: Client, text: bytes) -> None:
        if text != client.partner + b" %d" % client.received:
            self.wrong += 1
            self.note(f"{client.name.decode()} got MSG {text[:80]!r}")
        client.received += 1
        self.delivered += 1
        self.check_done(client)

    def on_bye(self, client: Client, line: bytes) -> None:
        """A BYE before leaving is a refusal (``full``) or a failure."""
        if self.closing:
            return
        if line.startswith(b"BYE full"):
            self.refused += 1
            self.close(client)
        else:
            self.fail(client, f"got {line[:80]!r}")

    def on_end(self, client: Client) -> None:
        if self.closing:
            self.close(client)
        elif client.open:
            self.fail(client, "the server closed the connection")

    # -- actions ------------------------------------------------------------------------

    def write_next(self, client: Client) -> None:
        """Send the client's next message if it has any left."""
        if client.sent < client.quota_out:
            client.may_write = False
            self.send(client, client.name + b" %d\n" % client.sent)
            client.sent += 1
        self.check_done(client)

    def check_done(self, client: Client) -> None:
        """Count the client as finished once it sent and received its share."""
        if client.done or client.first is None:
            return
        if client.sent == client.quota_out and client.received == client.quota_in:
            client.done = True
            self.finished += 1
            self.end_ns = time.perf_counter_ns()

    def send(self, client: Client, data: bytes) -> None:
        """Send a short line at once; lines are small and turns keep buffers nearly empty."""
        try:
            sent = client.sock.send(data)
        except OSError as exc:
            if not self.closing:
                self.fail(client, f"send failed: {exc.strerror or exc}")
            return
        if sent != len(data):
            self.fail(client, "send buffer full")

    def fail(self, client: Client, why: str) -> None:
        if client.open:
            self.failed += 1
            self.note(f"{client.name.decode()}: {why}")
            self.close(client)

    def close(self, client: Client) -> None:
        if client.open:
            client.open = False
            try:
                self.sel.unregister(client.sock)
            except (KeyError, ValueError):
                pass
            client.sock.close()

    def note(self, text: str) -> None:
        """Keep the first few error descriptions for the report."""
        if len(self.errors) < 5:
            self.errors.append(text)

    def close_all(self) -> None:
        for client in self.clients:
            self.close(client)
        self.sel.close()


def swarm_job(
    link: Any, index: int, address: tuple, count: int, warmup: int, messages: int, timeout: float
) -> dict:
    """Drive ``count`` clients through pairing (and ``warmup`` untimed messages per
    room), ``messages`` timed messages per room, and leaving; report after each step
    and wait for the bench's word between them."""
    names = [b"d%dc%d" % (index, i) for i in range(count)]
    swarm = Swarm(address, names, timeout)
    try:
        await_command(link, "go", timeout)
        swarm.connect_all()
        swarm.run("pairing", link)
        if warmup:
            swarm.exchange(warmup)
            swarm.run("warm-up", link)
        link.send(("paired", pairing_report(swarm)))
        if messages:
            await_command(link, "go", timeout)
            swarm.exchange(messages)
            swarm.run("messages", link)
            link.send(("exchanged", exchange_report(swarm)))
        await_command(link, "release", timeout)
        swarm.leave()
        swarm.run("leaving", link)
        return {"errors": swarm.errors}
    finally:
        swarm.close_all()


def pairing_report(swarm: Swarm) -> dict:
    return {
        "clients": len(swarm.clients),
        "paired": swarm.paired,
        "refused": swarm.refused,
        "failed": swarm.failed,
        "latencies_ns": swarm.latencies,
        "first_ns": swarm.first_ns,
        "last_paired_ns": swarm.last_paired_ns,
        "cpu_seconds": time.process_time() - swarm.cpu_start,
        "errors": list(swarm.errors),
    }


def exchange_report(swarm: Swarm) -> dict:
    return {
        "delivered": swarm.delivered,
        "wrong": swarm.wrong,
        "failed": swarm.failed,
        "start_ns": swarm.start_ns,
        "end_ns": swarm.end_ns,
        "cpu_seconds": time.process_time() - swarm.cpu_start,
        "errors": list(swarm.errors),
    }


# -- phases -----------------------------------------------------------------------------


@dataclass
class Bench:
    """What every phase needs: the settings, the server, where progress goes."""

    settings: Settings
    server: ServerHandle
    progress: Progress
    baseline: int = 0  # room workers the server had before we started (external server)
    results: dict = field(default_factory=dict)

    def drivers(self, job: Callable, jobs: Sequence[tuple]) -> Drivers:
        check_server(self.server)
        return Drivers(job, jobs, self.progress)

    def swarm(self, clients: int, messages: int, warmup: int = 0) -> Drivers:
        """Drivers sharing ``clients`` clients, ``messages`` timed messages per room."""
        shares = split_evenly(clients, self.settings.drivers)
        address, timeout = self.server.address, self.settings.timeout
        jobs = [(address, n, warmup, messages, timeout) for n in shares]
        return self.drivers(swarm_job, jobs)

    def settle(self) -> None:
        """Between phases: every room of the last phase is closed."""
        wait_rooms_closed(self.server, self.baseline, self.settings.timeout)

    def rooms_open(self) -> int:
        """Room workers running now, beyond those the server had before the bench."""
        return len(room_workers(self.server)) - self.baseline


def check_paired(step: str, reports: list[dict], clients: int) -> None:
    """Raise BenchError unless every client got PAIRED."""
    paired = sum(r["paired"] for r in reports)
    if paired != clients:
        refused = sum(r["refused"] for r in reports)
        failed = sum(r["failed"] for r in reports)
        errors = "; ".join(e for r in reports for e in r["errors"][:2])
        raise BenchError(
            f"{step}: {paired} of {clients} clients paired, {refused} refused (BYE full), "
            f"{failed} failed" + (f": {errors}" if errors else "")
        )


def check_delivered(step: str, reports: list[dict], expected: int) -> int:
    """Raise BenchError unless every message arrived, in order, to the right reader."""
    delivered = sum(r["delivered"] for r in reports)
    wrong = sum(r["wrong"] for r in reports)
    if delivered != expected or wrong:
        errors = "; ".join(e for r in reports for e in r["errors"][:2])
        raise BenchError(
            f"{step}: {delivered} of {expected} messages delivered, {wrong} wrong"
            + (f": {errors}" if errors else "")
        )
    return delivered


def span_seconds(reports: list[dict], start: str, end: str) -> float:
    """Seconds from the earliest ``start`` to the latest ``end`` across drivers."""
    return (max(r[end] for r in reports) - min(r[start] for r in reports)) / 1e9


def driver_busy(reports: list[dict], seconds: float) -> float:
    """The busiest driver's CPU time over the step's wall time (1.0: it was the limit)."""
    return max(r["cpu_seconds"] for r in reports) / seconds


def all_latencies(reports: list[dict]) -> list[int]:
    return [ns for r in reports for ns in r["latencies_ns"]]


def phase_sequential(bench: Bench) -> dict:
    """Pairs one after the other: the second arrival's connect -> PAIRED."""
    s = bench.settings
    bench.progress.phase(f"pairing, {s.pairs} sequential pairs")
    with bench.drivers(sequential_job, [(bench.server.address, s.pairs, s.timeout)]) as d:
        (report,) = d.gather("result", s.timeout * max(1, s.pairs / 100))
    bench.settle()
    return {"pairs": s.pairs, "ms": summarize(report["latencies_ns"], 1e6)}


def phase_burst(bench: Bench) -> dict:
    """``--burst`` clients connect at once; each one's connect -> PAIRED; rooms per second."""
    s = bench.settings
    bench.progress.phase(f"pairing, burst of {s.burst} clients at once")
    with bench.swarm(s.burst, 0) as d:
        d.command("go")
        reports = d.gather("paired", s.timeout + 5)
        check_paired("burst", reports, s.burst)
        d.command("release")
        d.gather("result", s.timeout + 5)
    bench.settle()
    seconds = span_seconds(reports, "first_ns", "last_paired_ns")
    return {
        "clients": s.burst,
        "paired": sum(r["paired"] for r in reports),
        "refused": sum(r["refused"] for r in reports),
        "ms": summarize(all_latencies(reports), 1e6),
        "seconds": seconds,
        "rooms_per_second": s.burst / 2 / seconds,
        "driver_busy": driver_busy(reports, seconds),
    }


def phase_round_trip(bench: Bench) -> dict:
    """Round trips in one room, driven by one process holding both clients."""
    s = bench.settings
    bench.progress.phase(f"round trip, {s.round_trips} in one room")
    with bench.drivers(round_trip_job, [(bench.server.address, s.round_trips, s.timeout)]) as d:
        (report,) = d.gather("result", s.timeout * max(1, s.round_trips / 10_000))
    bench.settle()
    return {"round_trips": s.round_trips, "ms": summarize(report["latencies_ns"], 1e6)}


def phase_throughput(bench: Bench, rooms: int, measure: bool) -> tuple[dict, dict | None]:
    """``rooms`` rooms trade ``--messages`` each at once: messages per second. With
    ``measure``, the room workers' USS is read after the traffic, rooms still open."""
    s = bench.settings
    bench.progress.phase(f"messages/s, {plural(rooms, 'room')} x {s.messages} messages")
    memory = None
    with bench.swarm(2 * rooms, s.messages, WARMUP_MESSAGES) as d:
        d.command("go")
        check_paired(f"{rooms} rooms", d.gather("paired", s.timeout + 5), 2 * rooms)
        d.command("go")
        reports = d.gather("exchanged", s.timeout + 5)
        delivered = check_delivered(f"{rooms} rooms", reports, rooms * s.messages)
        if measure:
            memory = memory_figures(room_workers(bench.server), s.messages)
        d.command("release")
        d.gather("result", s.timeout + 5)
    bench.settle()
    seconds = span_seconds(reports, "start_ns", "end_ns")
    run = {
        "rooms": rooms,
        "messages": rooms * s.messages,
        "delivered": delivered,
        "seconds": seconds,
        "per_second": delivered / seconds,
        "driver_busy": driver_busy(reports, seconds),
    }
    return run, memory


def memory_figures(workers: list[psutil.Process], messages: int) -> dict:
    """USS p50 and max over the room workers, in MiB."""
    sizes = measure_uss(workers)
    if not sizes:
        raise BenchError("could not read the memory of any room worker")
    return {
        "workers": len(sizes),
        "after_messages": messages,
        "uss_p50_mib": percentile(sizes, 50) / MIB,
        "uss_max_mib": max(sizes) / MIB,
    }


def phase_rooms_held(bench: Bench) -> dict:
    """``--rooms-held`` rooms open at once, one message in each; count the workers."""
    s, rooms = bench.settings, bench.settings.rooms_held
    bench.progress.phase(f"rooms held, {rooms} rooms ({2 * rooms} clients) at once")
    with bench.swarm(2 * rooms, 1) as d:
        d.command("go")
        paired = d.gather("paired", s.timeout + 5)
        check_paired("rooms held", paired, 2 * rooms)
        d.command("go")
        delivered = check_delivered("rooms held", d.gather("exchanged", s.timeout + 5), rooms)
        peak = bench.rooms_open()
        d.command("release")
        d.gather("result", s.timeout + 5)
    bench.settle()
    seconds = span_seconds(paired, "first_ns", "last_paired_ns")
    return {
        "requested": rooms,
        "peak": peak,
        "delivered": delivered,
        "seconds": seconds,
        "rooms_per_second": rooms / seconds,
        "pairing_ms": summarize(all_latencies(paired), 1e6),
    }


def run_phases(bench: Bench) -> None:
    """Every phase in order; each result lands in ``bench.results`` as soon as it is in."""
    r = bench.results
    r["pairing_sequential"] = phase_sequential(bench)
    r["pairing_burst"] = phase_burst(bench)
    r["round_trip"] = phase_round_trip(bench)
    r["throughput"] = []
    largest = max(bench.settings.rooms)
    for rooms in bench.settings.rooms:
        run, memory = phase_throughput(bench, rooms, measure=rooms == largest and "memory" not in r)
        r["throughput"].append(run)
        if memory:
            r["memory"] = memory
    r["rooms_held"] = phase_rooms_held(bench)


# -- the command ------------------------------------------------------------------------


def build_report(bench: Bench, cpu: int | None, elapsed: float, error: str | None) -> dict:
    """Everything the JSON file holds; the printed table is made from it."""
    settings = asdict(replace(bench.settings, json_path=None))
    return {
        "version": __version__,
        "ok": error is None,
        "error": error,
        "quick": bench.settings.quick,
        "pinned_cpu": cpu,
        "machine": describe_machine(),
        "settings": settings,
        "server": {
            "pid": bench.server.pid,
            "address": f"{bench.server.host}:{bench.server.port}",
            "started_by_bench": bench.server.proc is not None,
        },
        "elapsed_seconds": elapsed,
        "results": bench.results,
    }


def write_json(path: str, report: dict) -> None:
    """Write ``report`` to ``path`` (atomically: a reader never sees half a file)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def on_sigterm(signum: int, frame: Any) -> None:
    """SIGTERM stops the bench like Ctrl-C does: the cleanup paths run."""
    raise KeyboardInterrupt


@contextmanager
def server_for(settings: Settings) -> Iterator[ServerHandle]:
    """Our own server for the run (stopped and reaped after), or the one on --port."""
    handle = attach_server(settings) if settings.port else start_server(settings)
    try:
        yield handle
    finally:
        stop_server(handle)


def run_bench(settings: Settings, progress: Progress) -> tuple[dict, int]:
    """Run every phase; return the report and the exit status."""
    cpu = pin_to_one_cpu() if settings.pin else None
    raise_fd_limit(2 * max(settings.rooms_held, settings.burst // 2, *settings.rooms) + 256)
    started = time.monotonic()
    error = None
    with server_for(settings) as server:
        bench = Bench(settings, server, progress, baseline=len(room_workers(server)))
        progress.phase(f"server pid {server.pid} on {server.host}:{server.port}")
        try:
            run_phases(bench)
        except BenchError as exc:
            error = str(exc)
    report = build_report(bench, cpu, time.monotonic() - started, error)
    return report, EXIT_OK if error is None else EXIT_FAILURE


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``bin/bench``. Returns the exit status."""
    try:
        settings = parse_settings(argv)
    except UsageError as exc:
        print(f"{PROG}: {exc} (see --help)", file=sys.stderr)
        return EXIT_USAGE
    signal.signal(signal.SIGTERM, on_sigterm)
    progress = Progress()
    try:
        report, status = run_bench(settings, progress)
    except KeyboardInterrupt:
        progress.clear()
        print(f"{PROG}: interrupted; server and drivers stopped", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BenchError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    print(format_report(report), flush=True)
    if settings.json_path:
        write_json(settings.json_path, report)
    if report["error"]:
        print(f"{PROG}: FAILED: {report['error']}", file=sys.stderr)
    return status
