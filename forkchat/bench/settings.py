"""What the bench measures: sizes from the command line, else FULL or QUICK, checked."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..args import UsageError, to_number

FULL = {
    "pairs": 200,
    "burst": 1000,
    "round_trips": 2000,
    "messages": 1000,
    "uss_rooms": 300,
    "hold": 2000,
}
QUICK = {
    "pairs": 20,
    "burst": 100,
    "round_trips": 200,
    "messages": 100,
    "uss_rooms": 50,
    "hold": 100,
}
LIMITS = {  # highest value of each size option (--reps has a default in the usage)
    "pairs": 100_000,
    "burst": 100_000,
    "round_trips": 10_000_000,
    "messages": 10_000_000,
    "uss_rooms": 50_000,
    "hold": 50_000,
    "reps": 1000,
}


class BenchError(Exception):
    """A phase failed (refused or lost clients, lost messages, a deadline, not enough
    memory for the rooms asked): exit status 1."""


@dataclass(frozen=True)
class Settings:
    """What to measure, checked."""

    host: str = "127.0.0.1"
    port: int | None = None
    pairs: int = FULL["pairs"]
    burst: int = FULL["burst"]
    round_trips: int = FULL["round_trips"]
    rooms: tuple[int, ...] = (1, 10, 100)
    messages: int = FULL["messages"]
    uss_rooms: int = FULL["uss_rooms"]
    hold: int = FULL["hold"]
    reps: int = 5
    drivers: int = 2
    ref: bool = False
    pin: bool = False
    quick: bool = False
    timeout: float = 300.0
    json_path: str | None = None

    @property
    def targets(self) -> tuple[str, ...]:
        """The servers measured rep by rep: forkchat, then the reference with --ref."""
        return ("forkchat", "reference") if self.ref else ("forkchat",)


def parse_rooms(raw: str) -> tuple[int, ...]:
    """``1,10,100`` -> (1, 10, 100). Raises UsageError unless each is 1..50000."""
    try:
        counts = tuple(int(part) for part in raw.split(","))
    except ValueError:
        raise UsageError(f"--rooms must be numbers separated by commas, not {raw!r}") from None
    if not all(1 <= n <= 50_000 for n in counts):
        raise UsageError(f"--rooms counts must be between 1 and 50000, not {raw!r}")
    return counts


def settings_from_args(args: dict[str, Any]) -> Settings:
    """Settings from docopt's dict. Raises UsageError naming the bad option."""
    sizes = dict(QUICK if args["--quick"] else FULL)
    for key, high in LIMITS.items():
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
        ref=args["--ref"],
        pin=args["--pin"],
        quick=args["--quick"],
        timeout=to_number(args, "--timeout", float, 1, 86400),
        json_path=args["--json"],
        **sizes,
    )
