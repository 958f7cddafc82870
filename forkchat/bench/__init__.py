"""forkchat bench: measure a forkchat server through real sockets, beside a yardstick.

Usage:
  bench [options]
  bench -h | --help
  bench --version

Starts bin/server on a free port (or benches the one already listening on --port),
drives synthetic clients from a few driver processes (each a selectors loop over many
sockets), prints tables and writes the same figures as JSON with --json FILE.
Progress goes to stderr.

With --ref it also starts the reference relay (forkchat/bench/reference.py: a minimal
fork-per-room relay speaking the same framing, the yardstick), measures both in the
same run, interleaved rep by rep, and gives the ratio forkchat / reference for the
round trip, messages/s and the server's CPU per message (all its processes: parent
and room workers, from /proc/PID/schedstat).

Phases, in order:
  pairing     --pairs pairs one after the other (connect of the second client to
              its PAIRED), then --burst clients connecting at once (each client's
              connect to its PAIRED; rooms opened per second)
  reps        --reps times: --round-trips in one room (A writes, B answers on its
              turn, A reads), then --messages messages in each of N rooms at once, N
              from --rooms, timed after one warm-up message each way, with the
              server's CPU per message; medians over the reps
  USS         --uss-rooms rooms trade --messages each; each room worker's USS is read
              (p50, max, the oldest tenth against the newest tenth)
  rooms held  --hold rooms open at once, opened in steps; at 400, 1000, 2000 and
              4000 rooms (those below --hold) and at --hold: the drop in MemAvailable
              per room, the marginal cost of the last tenth of the rooms, the server's
              USS and PSS sums; one message in each room at each step, all delivered.
              Steps that would bring MemAvailable near its floor (2 GiB or a tenth of
              the memory; ~3.5 MiB a room) are not taken: the phase stops short.

Options:
  --host HOST        Server address [default: 127.0.0.1].
  --port PORT        Bench the forkchat server already listening on PORT instead of
                     starting one; it must allow the phases' rooms and waiting clients.
  --ref              Also measure the reference relay, and the ratios.
  --reps N           Reps of the round trip and messages/s [default: 5].
  --pairs N          Sequential pairs (default 200, 20 with --quick).
  --burst N          Clients connecting at once, even (default 1000, 100 with --quick).
  --round-trips N    Round trips in one room (default 2000, 200 with --quick).
  --rooms LIST       Room counts for messages per second [default: 1,10,100].
  --messages N       Messages per room in those phases (default 1000, 100 with --quick).
  --uss-rooms N      Rooms whose workers' USS is read (default 300, 50 with --quick).
  --hold N           Rooms held at once (default 2000, 100 with --quick; 5000 is
                     10,000 clients and needs about 20 GiB free).
  --drivers N        Driver processes for the swarm phases [default: 2].
  --pin              Pin everything (servers, room workers, drivers) to one CPU.
  --quick            Small phases that finish in seconds (the test suite's smoke run).
  --timeout SEC      Deadline for each step of a phase [default: 300].
  --json FILE        Also write the figures as JSON to FILE.
  -h --help          Show this help.
  --version          Show the version.

Exit status: 0 when every phase ran and every client was served, 1 on a failure
(refused or lost clients, undelivered messages, a deadline passed, not enough memory
for the rooms asked), 2 for a bad command line, 130 when interrupted. The servers it
started are always stopped.
"""

from __future__ import annotations

import signal
import sys
import time
from dataclasses import asdict, replace
from typing import Any

from .. import __version__
from ..args import UsageError, parse_usage
from .drivers import Progress
from .memory import phase_hold, phase_uss
from .phases import Bench, phase_burst, phase_reps, phase_sequential, ratio
from .procstats import become_subreaper, pin_to_one_cpu, raise_fd_limit
from .report import describe_machine, format_report, write_json
from .servers import ServerHandle, check_server, servers_for
from .settings import BenchError, Settings, settings_from_args

PROG = "forkchat bench"
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def parse_settings(argv: list[str] | None = None) -> Settings:
    """Parse and check the command line. Raises UsageError, or exits for -h/--version."""
    return settings_from_args(parse_usage(__doc__, argv, f"forkchat {__version__}"))


def run_phases(bench: Bench) -> None:
    """Every phase in order; each result lands in ``bench.results`` as soon as it is in."""
    r = bench.results
    r["pairing_sequential"] = phase_sequential(bench)
    r["pairing_burst"] = phase_burst(bench, bench.forkchat)
    if bench.settings.ref:
        r["reference"] = {"pairing_burst": phase_burst(bench, bench.servers["reference"])}
    phase_reps(bench)
    if bench.settings.ref:
        r["ratios"]["burst_rooms_per_second"] = ratio(
            r["pairing_burst"]["rooms_per_second"],
            r["reference"]["pairing_burst"]["rooms_per_second"],
        )
    r["memory"] = phase_uss(bench, bench.forkchat)
    if bench.settings.ref:
        r["reference"]["memory"] = phase_uss(bench, bench.servers["reference"])
        r["ratios"]["uss_p50"] = ratio(
            r["memory"]["uss_p50_mib"], r["reference"]["memory"]["uss_p50_mib"]
        )
    phase_hold(bench)


def build_report(bench: Bench, cpu: int | None, elapsed: float, error: str | None) -> dict:
    """Everything the JSON file holds; the printed tables are made from it."""
    return {
        "version": __version__,
        "ok": error is None,
        "error": error,
        "quick": bench.settings.quick,
        "pinned_cpu": cpu,
        "machine": describe_machine(),
        "settings": asdict(replace(bench.settings, json_path=None)),
        "server": server_entry(bench, "forkchat"),
        "reference_server": server_entry(bench, "reference"),
        "elapsed_seconds": elapsed,
        "results": bench.results,
    }


def server_entry(bench: Bench, name: str) -> dict | None:
    handle = bench.servers.get(name)
    if handle is None:
        return None
    return {
        "pid": handle.pid,
        "address": f"{handle.host}:{handle.port}",
        "started_by_bench": handle.proc is not None,
    }


def needed_fds(settings: Settings) -> int:
    """File descriptors a driver or the server may hold at once, with room to spare."""
    return 2 * max(settings.hold, settings.burst // 2, settings.uss_rooms, *settings.rooms) + 256


def run_bench(settings: Settings, progress: Progress) -> tuple[dict, int]:
    """Run every phase; return the report and the exit status."""
    cpu = pin_to_one_cpu() if settings.pin else None
    try:
        raise_fd_limit(needed_fds(settings))
    except OSError as exc:
        raise BenchError(str(exc)) from None
    become_subreaper()
    started = time.monotonic()
    error = None
    with servers_for(settings) as servers:
        bench = Bench(settings, servers, progress)
        for handle in servers.values():
            progress.phase(f"{handle.name} server pid {handle.pid} on {handle.host}:{handle.port}")
        try:
            run_phases(bench)
        except BenchError as exc:
            error = str(exc) + servers_gone(servers)
    report = build_report(bench, cpu, time.monotonic() - started, error)
    return report, EXIT_OK if error is None else EXIT_FAILURE


def servers_gone(servers: dict[str, ServerHandle]) -> str:
    """Why a phase may have failed: each of our servers that has exited, with its last
    lines of output."""
    notes = []
    for handle in servers.values():
        try:
            check_server(handle)
        except BenchError as exc:
            notes.append(f"; {exc}")
    return "".join(notes)


def on_sigterm(signum: int, frame: Any) -> None:
    """SIGTERM stops the bench like Ctrl-C does: the cleanup paths run."""
    raise KeyboardInterrupt


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
        print(f"{PROG}: interrupted; servers and drivers stopped", file=sys.stderr)
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
