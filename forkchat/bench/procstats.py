"""What the kernel says about the processes under test and the machine.

CPU time comes from ``/proc/PID/schedstat`` (nanoseconds on the CPU) for the server and
each of its live descendants, plus each one's ``cutime + cstime`` from
``/proc/PID/stat`` for the children it has reaped, so a room worker that exits during a
phase still counts.
A forkchat server's room workers are its children named ``forkchat-room``; the
reference relay's are its children.
Memory comes from ``/proc/PID/smaps_rollup`` (USS: private pages; PSS: private pages
plus a share of the shared ones) and ``/proc/meminfo`` (``MemAvailable``).
A process that vanishes while it is read counts as nothing, never as an error.
``check_room_for`` is the check before opening many rooms: an estimate against
``MemAvailable``, so the bench stops short rather than let the OOM killer choose.
"""

from __future__ import annotations

import ctypes
import os
import resource
from dataclasses import dataclass

import psutil

from .settings import BenchError

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
KIB = 1024
MIB = 1 << 20
GONE = (FileNotFoundError, ProcessLookupError, PermissionError)
ROOM_ESTIMATE = int(3.5 * MIB)  # a room's memory, for the check before opening rooms
FLOOR_MIN = 2048 * MIB  # MemAvailable the bench leaves the machine, at least
SERVER_COMM = "forkchat-server"  # the comms forkchat gives its processes (proctitle.py)
ROOM_COMM = "forkchat-room"


def read_stat_fields(pid: int) -> list[str]:
    """``/proc/PID/stat`` split after the command name: index 0 is field 3 (state)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    return data[data.rindex(b")") + 2 :].decode().split()


def cpu_ns(pid: int) -> int:
    """Nanoseconds ``pid`` has run on a CPU (schedstat; utime + stime if it is missing)."""
    try:
        with open(f"/proc/{pid}/schedstat", "rb") as f:
            return int(f.read().split()[0])
    except GONE:
        return 0
    except (OSError, ValueError, IndexError):
        fields = read_stat_fields(pid)
        return (int(fields[11]) + int(fields[12])) * 1_000_000_000 // CLOCK_TICKS


def reaped_children_ns(pid: int) -> int:
    """CPU time of the children ``pid`` has waited for (cutime + cstime), in ns."""
    try:
        fields = read_stat_fields(pid)
    except GONE:
        return 0
    return (int(fields[13]) + int(fields[14])) * 1_000_000_000 // CLOCK_TICKS


def start_ticks(pid: int) -> int:
    """When ``pid`` started, in clock ticks since boot (orders processes by age)."""
    try:
        return int(read_stat_fields(pid)[19])
    except GONE:
        return 0


def comm_of(pid: int) -> str:
    """``/proc/PID/comm``, the process's short name; empty if it is gone."""
    try:
        with open(f"/proc/{pid}/comm", "rb") as f:
            return f.read().decode(errors="replace").rstrip("\n")
    except GONE:
        return ""


def children_of(pid: int, recursive: bool = False) -> list[int]:
    """PIDs of the live children of ``pid`` (with ``recursive``, of its descendants)."""
    try:
        return [child.pid for child in psutil.Process(pid).children(recursive=recursive)]
    except psutil.NoSuchProcess:
        return []


def room_workers_of(pid: int) -> list[int]:
    """PIDs of the live room workers of the server ``pid``: for a forkchat server (comm
    ``forkchat-server``) its children named ``forkchat-room``; for any other (the
    reference relay, whose rooms are multiprocessing children named as the interpreter
    is) its children."""
    if comm_of(pid) != SERVER_COMM:
        return children_of(pid)
    return [child for child in children_of(pid) if comm_of(child) == ROOM_COMM]


def tree_cpu_ns(pid: int) -> int:
    """CPU time of ``pid`` and its live descendants, and of the children each of them
    reaped, in ns: a room worker reaped by the server counts.
    The difference of two readings is what the server did in between."""
    family = [pid, *children_of(pid, recursive=True)]
    return sum(cpu_ns(member) + reaped_children_ns(member) for member in family)


@dataclass(frozen=True)
class Memory:
    """One process's memory from smaps_rollup, in bytes."""

    rss: int = 0
    pss: int = 0
    uss: int = 0


def memory_of(pid: int) -> Memory:
    """RSS, PSS and USS of ``pid`` (all zero if it is gone)."""
    fields: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if rest.endswith("kB\n"):
                    fields[key] = int(rest.split()[0]) * KIB
    except GONE:
        return Memory()
    private = sum(fields.get(k, 0) for k in ("Private_Clean", "Private_Dirty", "Private_Hugetlb"))
    return Memory(rss=fields.get("Rss", 0), pss=fields.get("Pss", 0), uss=private)


def workers_by_age(pid: int) -> list[int]:
    """The room workers of the server ``pid`` (``room_workers_of``), oldest first."""
    return sorted(room_workers_of(pid), key=lambda child: (start_ticks(child), child))


def meminfo() -> dict[str, int]:
    """``/proc/meminfo`` in bytes."""
    info = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, rest = line.partition(":")
            words = rest.split()
            info[key] = int(words[0]) * (KIB if words[1:] == ["kB"] else 1)
    return info


def mem_available() -> int:
    """The kernel's estimate of memory available without swapping, in bytes."""
    return meminfo()["MemAvailable"]


def memory_floor() -> int:
    """MemAvailable the bench never goes below: 2 GiB or a tenth of the memory."""
    return max(FLOOR_MIN, meminfo()["MemTotal"] // 10)


def mib(size: float) -> float:
    return size / MIB


def check_room_for(rooms: int, estimate: int, floor: int, where: str) -> None:
    """Raise BenchError, saying how much is missing, unless ``rooms`` more rooms at
    ``estimate`` bytes each fit in MemAvailable above ``floor``."""
    available = mem_available()
    if available - rooms * estimate < floor:
        raise BenchError(
            f"{where}: stopped short: {rooms} more rooms need about "
            f"{mib(rooms * estimate):,.0f} MiB ({mib(estimate):.1f} MiB each) and "
            f"{mib(floor):,.0f} MiB must stay free, but MemAvailable is "
            f"{mib(available):,.0f} MiB"
        )


def raise_fd_limit(needed: int) -> int:
    """Raise our soft RLIMIT_NOFILE to the hard limit (what we start inherits it) and
    return it. Raises OSError when even the hard limit is below ``needed``."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise OSError(f"needs {needed} file descriptors, the hard limit is {hard}")
    if soft != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def pin_to_one_cpu() -> int:
    """Pin this process (and so everything it starts) to its first allowed CPU (CPU 0
    when all are allowed) and return that CPU."""
    cpu = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})
    return cpu


PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> None:
    """Adopt our descendants' orphans: a room worker left by a server that died comes
    back to us, so stopping the servers can reap it (best effort)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass
