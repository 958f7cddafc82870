"""The measured phases of memory: USS per room worker after traffic (oldest against
newest workers), and rooms held at once with the machine's memory per room.

The machine's memory per room is the drop in ``MemAvailable`` since the phase began
over the rooms open: it counts everything a room costs (worker pages, page tables,
kernel socket buffers, and the drivers' share, about 1 KiB per client), but also
whatever else the machine does meanwhile; the server's own USS and PSS sums are exact
and are reported beside it. A room's marginal cost at N rooms is the drop over the
last tenth of the rooms before N.

Anything that opens many rooms checks ``MemAvailable`` first (ROOM_ESTIMATE per room,
or the cost seen so far if higher, above a floor) and, while the rooms open, stops the
phase short with a message if the floor is reached, rather than let the OOM killer
choose what to kill.
"""

from __future__ import annotations

from collections.abc import Callable

from .drivers import Drivers
from .phases import (
    Bench,
    all_latencies,
    connect_clients,
    exchange,
    leave,
    percentile,
    span_seconds,
    summarize,
)
from .procstats import (
    MIB,
    ROOM_ESTIMATE,
    check_room_for,
    children_of,
    mem_available,
    memory_floor,
    memory_of,
    mib,
    workers_by_age,
)
from .report import plural
from .servers import ServerHandle
from .settings import BenchError

HOLD_POINTS = (400, 1000, 2000, 4000)  # rooms at which the hold reads memory (below --hold)


def memory_watch(floor: int, where: Callable[[], str]) -> Callable[[], None]:
    """A check to run while rooms open: BenchError once MemAvailable is under ``floor``."""

    def watch() -> None:
        available = mem_available()
        if available < floor:
            raise BenchError(
                f"{where()}: stopped short: MemAvailable fell to {mib(available):,.0f} MiB, "
                f"under the {mib(floor):,.0f} MiB the bench leaves free"
            )

    return watch


def worker_uss(target: ServerHandle) -> list[int]:
    """USS in bytes of each room worker of ``target``, oldest first."""
    sizes = [memory_of(pid).uss for pid in workers_by_age(target.pid)]
    return [size for size in sizes if size]


def uss_figures(target: ServerHandle, messages: int) -> dict:
    """USS p50 and max over the room workers, and the oldest tenth's p50 against the
    newest tenth's, in MiB."""
    sizes = worker_uss(target)
    if not sizes:
        raise BenchError(f"{target.name}: could not read the memory of any room worker")
    tenth = max(1, len(sizes) // 10)
    oldest, newest = percentile(sizes[:tenth], 50), percentile(sizes[-tenth:], 50)
    return {
        "workers": len(sizes),
        "after_messages": messages,
        "uss_p50_mib": mib(percentile(sizes, 50)),
        "uss_max_mib": mib(max(sizes)),
        "oldest_p50_mib": mib(oldest),
        "newest_p50_mib": mib(newest),
        "oldest_vs_newest": oldest / newest,
    }


def phase_uss(bench: Bench, target: ServerHandle) -> dict:
    """``--uss-rooms`` rooms trade ``--messages`` each, then each worker's USS is read,
    rooms still open."""
    s, rooms = bench.settings, bench.settings.uss_rooms
    step = f"USS, {target.name}, {plural(rooms, 'room')}"
    bench.progress.phase(f"{step} x {s.messages} messages")
    check_room_for(rooms, ROOM_ESTIMATE, memory_floor(), step)
    with bench.swarm(target) as d:
        connect_clients(bench, d, 2 * rooms, 2 * rooms, step)
        exchange(bench, d, s.messages, rooms, step)
        figures = uss_figures(target, s.messages)
        leave(bench, d)
    bench.settle(target)
    return figures


def hold_steps(rooms: int) -> list[tuple[int, bool]]:
    """(rooms open after the step, whether it is a reading point) for a hold of
    ``rooms``: each point (HOLD_POINTS below ``rooms``, then ``rooms``) comes right
    after a step to nine tenths of it, so its marginal cost is the last tenth's."""
    points = [p for p in HOLD_POINTS if p < rooms] + [rooms]
    if len(points) == 1 and rooms >= 20:
        points = [rooms // 2, rooms]
    steps: list[tuple[int, bool]] = []
    for point in points:
        before = point - max(1, point // 10)
        if before > (steps[-1][0] if steps else 0):
            steps.append((before, False))
        steps.append((point, True))
    return steps


def server_memory(target: ServerHandle) -> dict:
    """The server's processes (itself and the room workers it forked): how many, USS and
    PSS sums, the server's RSS, and the USS of the oldest and newest room worker."""
    parent = memory_of(target.pid)
    forked = {pid: memory_of(pid) for pid in children_of(target.pid, recursive=True)}
    workers = [forked[pid] for pid in workers_by_age(target.pid) if pid in forked]
    uss = [m.uss for m in workers if m.uss]
    return {
        "processes": 1 + len(forked),
        "total_uss_mib": mib(parent.uss + sum(m.uss for m in forked.values())),
        "total_pss_mib": mib(parent.pss + sum(m.pss for m in forked.values())),
        "parent_rss_mib": mib(parent.rss),
        "oldest_uss_mib": mib(uss[0]) if uss else None,
        "newest_uss_mib": mib(uss[-1]) if uss else None,
    }


class Hold:
    """The rooms-held phase, step by step; its figures land in ``bench.results``."""

    def __init__(self, bench: Bench) -> None:
        self.bench = bench
        self.target = bench.forkchat
        self.requested = bench.settings.hold
        self.floor = memory_floor()
        self.base = mem_available()
        self.open = 0
        self.latencies: list[int] = []
        self.seconds = 0.0
        self.figures = bench.results["rooms_held"] = {
            "requested": self.requested,
            "peak": 0,
            "delivered": 0,
            "memory_floor_mib": mib(self.floor),
            "steps": [],
        }

    def where(self) -> str:
        return f"rooms held, {self.open} of {self.requested} open"

    def estimate(self) -> int:
        """Bytes a new room is expected to cost: ROOM_ESTIMATE or the last marginal."""
        steps = self.figures["steps"]
        return max(ROOM_ESTIMATE, int(steps[-1]["marginal_mib"] * MIB) if steps else 0)

    def run(self) -> None:
        watch = memory_watch(self.floor, self.where)
        with self.bench.swarm(self.target) as d:
            for rooms, point in hold_steps(self.requested):
                self.open_rooms(d, rooms, watch)
                self.read_memory(rooms, point)
            leave(self.bench, d)
        self.bench.settle(self.target)

    def open_rooms(self, d: Drivers, rooms: int, watch: Callable) -> None:
        """Open rooms up to ``rooms``; every room open relays one message."""
        new = rooms - self.open
        check_room_for(new, self.estimate(), self.floor, self.where())
        reports = connect_clients(self.bench, d, 2 * new, 2 * rooms, self.where(), watch)
        self.open = rooms
        self.latencies += all_latencies(reports)
        self.seconds += span_seconds(reports, "first_ns", "last_paired_ns")
        exchange(self.bench, d, 1, rooms, self.where())
        self.figures.update(
            peak=rooms,
            delivered=rooms,
            seconds=self.seconds,
            rooms_per_second=rooms / self.seconds,
            pairing_ms=summarize(self.latencies, 1e6),
        )

    def read_memory(self, rooms: int, point: bool) -> None:
        """Record the drop in MemAvailable; at a point, the server's memory too."""
        steps = self.figures["steps"]
        drop = self.base - mem_available()
        before_rooms, before_drop = (steps[-1]["rooms"], steps[-1]["drop_mib"]) if steps else (0, 0)
        step = {
            "rooms": rooms,
            "point": point,
            "drop_mib": mib(drop),
            "per_room_mib": mib(drop) / rooms,
            "marginal_mib": (mib(drop) - before_drop) / (rooms - before_rooms),
        }
        if point:
            step |= server_memory(self.target)
            self.figures["server"] = {k: v for k, v in step.items() if k not in ("point",)}
        steps.append(step)
        points = [s for s in steps if s["point"]]
        if len(points) > 1 and points[0]["marginal_mib"] > 0:
            self.figures["marginal_growth"] = points[-1]["marginal_mib"] / points[0]["marginal_mib"]


def phase_hold(bench: Bench) -> None:
    """``--hold`` rooms open at once, opened in steps; memory read along the way."""
    s = bench.settings
    bench.progress.phase(f"rooms held, {s.hold} rooms ({2 * s.hold} clients) at once")
    hold = Hold(bench)
    try:
        hold.run()
    except BenchError as exc:
        hold.figures["stopped_short"] = str(exc)
        raise
