"""The measured phases of time: pairing (sequential and a burst), the round trip, and
messages per second with the server's CPU per message, the last two run rep by rep on
forkchat and, with --ref, on the reference relay, interleaved, then reduced to medians
and ratios."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .drivers import Drivers, Progress, round_trip_job, sequential_job
from .procstats import ROOM_ESTIMATE, check_room_for, memory_floor, tree_cpu_ns
from .report import plural
from .servers import ServerHandle, check_server, wait_rooms_closed
from .settings import BenchError, Settings
from .swarm import swarm_job

WARMUP_MESSAGES = 2  # untimed messages per room (one each way) before messages/s is timed
STEP_SLACK = 5.0  # seconds a driver's step may take beyond its own deadline


@dataclass
class Bench:
    """What every phase needs: the settings, the servers, where progress goes."""

    settings: Settings
    servers: dict[str, ServerHandle]
    progress: Progress
    results: dict = field(default_factory=dict)

    @property
    def forkchat(self) -> ServerHandle:
        return self.servers["forkchat"]

    def drivers(self, target: ServerHandle, job: Callable, jobs: Sequence[tuple]) -> Drivers:
        check_server(target)
        return Drivers(job, jobs, self.progress)

    def swarm(self, target: ServerHandle) -> Drivers:
        """``--drivers`` swarm drivers for ``target``, waiting for commands."""
        job = (target.address, self.settings.timeout)
        return self.drivers(target, swarm_job, [job] * self.settings.drivers)

    def settle(self, target: ServerHandle) -> None:
        """Between phases: every room of the last phase is closed."""
        wait_rooms_closed(target, self.settings.timeout)

    @property
    def step_timeout(self) -> float:
        return self.settings.timeout + STEP_SLACK


# -- pure figures -------------------------------------------------------------------------


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


def shares(total: int, parts: int) -> list[int]:
    """``split_evenly`` padded with zeros to exactly ``parts`` shares, one per driver."""
    split = split_evenly(total, parts)
    return split + [0] * (parts - len(split))


def span_seconds(reports: list[dict], start: str, end: str) -> float:
    """Seconds from the earliest ``start`` to the latest ``end`` across drivers."""
    return (max(r[end] for r in reports) - min(r[start] for r in reports)) / 1e9


def driver_busy(reports: list[dict], seconds: float) -> float:
    """The busiest driver's CPU time over the step's wall time (1.0: it was the limit)."""
    return max(r["cpu_seconds"] for r in reports) / seconds


def all_latencies(reports: list[dict]) -> list[int]:
    return [ns for r in reports for ns in r["latencies_ns"]]


def ratio(ours: float, theirs: float) -> float | None:
    """ours / theirs, or None when the reference figure is zero or missing."""
    return ours / theirs if theirs else None


# -- swarm steps, from the bench's side ---------------------------------------------------


def reported_errors(reports: list[dict]) -> str:
    errors = "; ".join(e for r in reports for e in r["errors"][:2])
    return f": {errors}" if errors else ""


def check_paired(step: str, reports: list[dict], clients: int) -> None:
    """Raise BenchError unless every client got PAIRED."""
    paired = sum(r["paired"] for r in reports)
    if paired != clients:
        refused = sum(r["refused"] for r in reports)
        failed = sum(r["failed"] for r in reports)
        raise BenchError(
            f"{step}: {paired} of {clients} clients paired, {refused} refused (BYE full), "
            f"{failed} failed" + reported_errors(reports)
        )


def check_delivered(step: str, reports: list[dict], expected: int) -> int:
    """Raise BenchError unless every message arrived, in order, to the right reader."""
    delivered = sum(r["delivered"] for r in reports)
    wrong = sum(r["wrong"] for r in reports)
    if delivered != expected or wrong:
        raise BenchError(
            f"{step}: {delivered} of {expected} messages delivered, {wrong} wrong"
            + reported_errors(reports)
        )
    return delivered


def connect_clients(
    bench: Bench, d: Drivers, clients: int, total: int, step: str, watch: Callable | None = None
) -> list[dict]:
    """Connect ``clients`` more clients at once over the drivers; check that all
    ``total`` clients so far are paired. Returns the drivers' pairing reports."""
    d.command_each([("connect", n) for n in shares(clients, len(d.links))])
    reports = d.gather("paired", bench.step_timeout, watch)
    check_paired(step, reports, total)
    return reports


def exchange(bench: Bench, d: Drivers, count: int, rooms: int, step: str) -> list[dict]:
    """Every open room trades ``count`` messages; check all ``rooms * count`` arrived."""
    d.command("exchange", count)
    reports = d.gather("exchanged", bench.step_timeout)
    check_delivered(step, reports, rooms * count)
    return reports


def leave(bench: Bench, d: Drivers) -> None:
    """Every client says exit; the drivers end."""
    d.command("leave")
    d.gather("result", bench.step_timeout)


# -- the phases -----------------------------------------------------------------------------


def phase_sequential(bench: Bench) -> dict:
    """Pairs one after the other: the second arrival's connect -> PAIRED."""
    s, target = bench.settings, bench.forkchat
    bench.progress.phase(f"pairing, {s.pairs} sequential pairs")
    with bench.drivers(target, sequential_job, [(target.address, s.pairs, s.timeout)]) as d:
        (report,) = d.gather("result", s.timeout * max(1, s.pairs / 100))
    bench.settle(target)
    return {"pairs": s.pairs, "ms": summarize(report["latencies_ns"], 1e6)}


def phase_burst(bench: Bench, target: ServerHandle) -> dict:
    """``--burst`` clients connect at once; each one's connect -> PAIRED; rooms per second.

    The reference relay sends PAIRED before it forks, forkchat's room after: the
    reference's latencies leave its fork out, its rooms per second do not."""
    s = bench.settings
    bench.progress.phase(f"pairing, burst of {s.burst} clients at once ({target.name})")
    check_room_for(s.burst // 2, ROOM_ESTIMATE, memory_floor(), "burst")
    with bench.swarm(target) as d:
        reports = connect_clients(bench, d, s.burst, s.burst, "burst")
        leave(bench, d)
    bench.settle(target)
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


def phase_round_trip(bench: Bench, target: ServerHandle) -> dict:
    """Round trips in one room, driven by one process holding both clients."""
    s = bench.settings
    with bench.drivers(target, round_trip_job, [(target.address, s.round_trips, s.timeout)]) as d:
        (report,) = d.gather("result", s.timeout * max(1, s.round_trips / 10_000))
    bench.settle(target)
    return {"round_trips": s.round_trips, "ms": summarize(report["latencies_ns"], 1e6)}


def phase_throughput(bench: Bench, target: ServerHandle, rooms: int) -> dict:
    """``rooms`` rooms trade ``--messages`` each at once, after a warm-up: messages per
    second, and the CPU the server (all its processes) spent per message."""
    s, step = bench.settings, f"{target.name}, {rooms} rooms"
    with bench.swarm(target) as d:
        connect_clients(bench, d, 2 * rooms, 2 * rooms, step)
        exchange(bench, d, WARMUP_MESSAGES, rooms, step)
        cpu_before = tree_cpu_ns(target.pid)
        reports = exchange(bench, d, s.messages, rooms, step)
        cpu_ns = tree_cpu_ns(target.pid) - cpu_before
        leave(bench, d)
    bench.settle(target)
    seconds = span_seconds(reports, "start_ns", "end_ns")
    delivered = rooms * s.messages
    return {
        "rooms": rooms,
        "messages": delivered,
        "delivered": delivered,
        "seconds": seconds,
        "per_second": delivered / seconds,
        "driver_busy": driver_busy(reports, seconds),
        "cpu_us_per_message": cpu_ns / 1000 / delivered,
        "server_busy": cpu_ns / 1e9 / seconds,
    }


def measure_rep(bench: Bench, target: ServerHandle) -> dict:
    """One rep on one server: the round trip, then messages/s at each --rooms count."""
    return {
        "round_trip": phase_round_trip(bench, target),
        "throughput": [phase_throughput(bench, target, n) for n in bench.settings.rooms],
    }


def phase_reps(bench: Bench) -> None:
    """--reps reps, interleaved (forkchat rep 1, reference rep 1, forkchat rep 2, ...),
    reduced to medians; with --ref, the ratios forkchat / reference."""
    s, r = bench.settings, bench.results
    runs: dict[str, list[dict]] = {name: [] for name in s.targets}
    rooms = (
        plural(s.rooms[0], "room") if len(s.rooms) == 1 else f"{','.join(map(str, s.rooms))} rooms"
    )
    for rep in range(1, s.reps + 1):
        for name in s.targets:
            bench.progress.phase(
                f"rep {rep} of {s.reps}, {name}: {s.round_trips} round trips, "
                f"{s.messages} messages per room in {rooms}"
            )
            runs[name].append(measure_rep(bench, bench.servers[name]))
    r["round_trip"] = median_round_trip(runs["forkchat"])
    r["throughput"] = median_throughput(runs["forkchat"])
    if s.ref:
        ref = r.setdefault("reference", {})
        ref["round_trip"] = median_round_trip(runs["reference"])
        ref["throughput"] = median_throughput(runs["reference"])
        r["ratios"] = ratios(r, ref)


def median_round_trip(reps: list[dict]) -> dict:
    """The reps' round trips: median p50 and p99, the largest max, each rep's p50."""
    summaries = [rep["round_trip"]["ms"] for rep in reps]
    return {
        "round_trips": reps[0]["round_trip"]["round_trips"],
        "reps": len(reps),
        "ms": {
            "count": summaries[0]["count"],
            "p50": statistics.median(x["p50"] for x in summaries),
            "p99": statistics.median(x["p99"] for x in summaries),
            "max": max(x["max"] for x in summaries),
        },
        "p50_ms_reps": [x["p50"] for x in summaries],
    }


MEDIAN_FIGURES = ("seconds", "per_second", "driver_busy", "cpu_us_per_message", "server_busy")


def median_throughput(reps: list[dict]) -> list[dict]:
    """Per room count: the median of each figure over the reps, and each rep's value of
    messages/s and CPU per message."""
    runs = []
    for i, first in enumerate(reps[0]["throughput"]):
        values = [rep["throughput"][i] for rep in reps]
        run = {key: first[key] for key in ("rooms", "messages", "delivered")}
        run |= {key: statistics.median(v[key] for v in values) for key in MEDIAN_FIGURES}
        run["reps"] = len(values)
        run["per_second_reps"] = [v["per_second"] for v in values]
        run["cpu_us_per_message_reps"] = [v["cpu_us_per_message"] for v in values]
        runs.append(run)
    return runs


def ratios(ours: dict, ref: dict) -> dict:
    """forkchat / reference for each figure measured on both (medians over the reps)."""
    mine, theirs = ours["round_trip"]["ms"], ref["round_trip"]["ms"]
    return {
        "round_trip_p50": ratio(mine["p50"], theirs["p50"]),
        "round_trip_p99": ratio(mine["p99"], theirs["p99"]),
        "throughput": [
            {
                "rooms": a["rooms"],
                "messages_per_second": ratio(a["per_second"], b["per_second"]),
                "cpu_per_message": ratio(a["cpu_us_per_message"], b["cpu_us_per_message"]),
            }
            for a, b in zip(ours["throughput"], ref["throughput"], strict=True)
        ],
    }
