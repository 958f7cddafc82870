"""The bench's output: the printed tables (forkchat's figures, then forkchat against the
reference relay) and the JSON file, both made from one report dict."""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Sequence
from typing import Any

Row = tuple[str, ...]


# -- formatting -----------------------------------------------------------------------------


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


def format_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


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


# -- forkchat's table -------------------------------------------------------------------------


def sequential_rows(seq: dict) -> list[Row]:
    detail = f"{plural(seq['pairs'], 'pair')} one by one, 2nd client's connect -> PAIRED"
    return [("pairing, sequential", format_spread(seq["ms"]), detail)]


def burst_rows(burst: dict) -> list[Row]:
    paired = f"{burst['paired']} paired, {burst['refused']} refused, connect -> PAIRED"
    rooms = f"{plural(burst['paired'] // 2, 'room')} in {format_ms(burst['seconds'] * 1000)}"
    return [
        (f"pairing, burst of {burst['clients']}", format_spread(burst["ms"]), paired),
        ("rooms opened per second", f"{burst['rooms_per_second']:,.0f}", rooms),
    ]


def reps_note(figure: dict) -> str:
    reps = figure.get("reps", 1)
    return f", median of {reps} reps" if reps > 1 else ""


def round_trip_rows(rtt: dict) -> list[Row]:
    detail = f"{rtt['round_trips']} round trips: A writes, B answers, A reads{reps_note(rtt)}"
    return [("round trip, one room", format_spread(rtt["ms"]), detail)]


def throughput_rows(runs: list[dict]) -> list[Row]:
    rows = []
    for run in runs:
        rooms = plural(run["rooms"], "room")
        detail = f"{run['delivered']} of {run['messages']} in {format_ms(run['seconds'] * 1000)}"
        detail += f", drivers {run['driver_busy']:.0%} busy{reps_note(run)}"
        rows.append((f"messages/s, {rooms}", f"{run['per_second']:,.0f}", detail))
        if "cpu_us_per_message" in run:
            cpu = f"{run['cpu_us_per_message']:.1f} µs"
            busy = f"all server processes, {run['server_busy']:.0%} of a CPU"
            rows.append((f"server CPU per message, {rooms}", cpu, busy))
    return rows


def memory_rows(mem: dict) -> list[Row]:
    value = f"p50 {mem['uss_p50_mib']:.2f} MiB  max {mem['uss_max_mib']:.2f} MiB"
    detail = f"{plural(mem['workers'], 'worker')} after {mem['after_messages']} messages each"
    rows = [("USS per room worker", value, detail)]
    if "oldest_p50_mib" in mem:
        value = f"{mem['oldest_p50_mib']:.2f} / {mem['newest_p50_mib']:.2f} MiB"
        detail = f"p50 of the oldest and newest tenth, ratio {mem['oldest_vs_newest']:.2f}"
        rows.append(("USS, oldest / newest workers", value, detail))
    return rows


def held_rows(held: dict) -> list[Row]:
    opened = f"opened in {held['seconds']:.2f} s" if "seconds" in held else "none opened"
    detail = f"{held['requested']} asked, {held['delivered']} messages delivered, {opened}"
    rows = [("rooms held at once", str(held["peak"]), detail)]
    for step in held.get("steps", []):
        if step["point"]:
            rows.append(memory_point_row(step))
    if "server" in held:
        server = held["server"]
        value = f"USS {server['total_uss_mib']:,.0f} MiB  PSS {server['total_pss_mib']:,.0f} MiB"
        detail = f"{server['processes']} processes at {server['rooms']} rooms"
        rows.append(("server memory, all processes", value, detail))
    if "marginal_growth" in held:
        rows.append(
            ("room cost, last point / first", f"{held['marginal_growth']:.2f}", "1.00 is flat")
        )
    if "stopped_short" in held:
        rows.append(("rooms held: stopped short", "", held["stopped_short"]))
    return rows


def memory_point_row(step: dict) -> Row:
    value = f"{step['per_room_mib']:.2f} MiB"
    detail = f"marginal {step['marginal_mib']:.2f} MiB (last tenth)"
    if "total_pss_mib" in step:
        detail += f", server PSS {step['total_pss_mib'] / step['rooms']:.2f} MiB/room"
    if step.get("newest_uss_mib") is not None:
        detail += (
            f", USS oldest {step['oldest_uss_mib']:.2f} newest {step['newest_uss_mib']:.2f} MiB"
        )
    return (f"machine memory per room, {step['rooms']}", value, detail)


ROW_MAKERS = {
    "pairing_sequential": sequential_rows,
    "pairing_burst": burst_rows,
    "round_trip": round_trip_rows,
    "throughput": throughput_rows,
    "memory": memory_rows,
    "rooms_held": held_rows,
}


def table_rows(results: dict) -> list[Row]:
    """The table's rows (figure, value, detail) for the phases present in ``results``."""
    rows = []
    for key, make_rows in ROW_MAKERS.items():
        if results.get(key):
            rows += make_rows(results[key])
    return rows


# -- forkchat against the reference -------------------------------------------------------


def comparison_rows(results: dict) -> list[Row]:
    """(figure, forkchat, reference, ratio) for what was measured on both."""
    ours, ref, ratios = results, results.get("reference", {}), results.get("ratios", {})
    rows: list[Row] = []
    if "round_trip" in ref:
        for q in ("p50", "p99"):
            mine, theirs = ours["round_trip"]["ms"][q], ref["round_trip"]["ms"][q]
            ratio = format_ratio(ratios.get(f"round_trip_{q}"))
            rows.append((f"round trip {q}", format_ms(mine), format_ms(theirs), ratio))
    for a, b, r in zip(
        ours.get("throughput", []),
        ref.get("throughput", []),
        ratios.get("throughput", []),
        strict=False,
    ):
        rooms = plural(a["rooms"], "room")
        rows.append(
            (
                f"messages/s, {rooms}",
                f"{a['per_second']:,.0f}",
                f"{b['per_second']:,.0f}",
                format_ratio(r["messages_per_second"]),
            )
        )
        rows.append(
            (
                f"server CPU per message, {rooms}",
                f"{a['cpu_us_per_message']:.1f} µs",
                f"{b['cpu_us_per_message']:.1f} µs",
                format_ratio(r["cpu_per_message"]),
            )
        )
    if "pairing_burst" in ref:
        mine, theirs = ours["pairing_burst"], ref["pairing_burst"]
        rows.append(
            (
                f"burst of {mine['clients']}: rooms opened per second",
                f"{mine['rooms_per_second']:,.0f}",
                f"{theirs['rooms_per_second']:,.0f}",
                format_ratio(ratios.get("burst_rooms_per_second")),
            )
        )
    if "memory" in ref and "memory" in ours:
        mine, theirs = ours["memory"]["uss_p50_mib"], ref["memory"]["uss_p50_mib"]
        rows.append(
            (
                "USS per room worker p50",
                f"{mine:.2f} MiB",
                f"{theirs:.2f} MiB",
                format_ratio(ratios.get("uss_p50")),
            )
        )
    return rows


def format_report(report: dict) -> str:
    """The whole printed report: a title with the machine line, forkchat's table, then
    forkchat against the reference relay when it ran."""
    machine = report["machine"]
    pinned = f"pinned to CPU {report['pinned_cpu']}" if report["pinned_cpu"] is not None else ""
    title = f"forkchat bench {report['version']}  ({'quick' if report['quick'] else 'full'} run)"
    lines = [title, f"machine: {machine_line(machine)}" + (f"; {pinned}" if pinned else "")]
    lines += ["", format_table(("figure", "value", "detail"), table_rows(report["results"]))]
    rows = comparison_rows(report["results"])
    if rows:
        lines += ["", "forkchat against the same-framing reference relay (medians over reps):"]
        lines += [format_table(("figure", "forkchat", "reference", "ratio"), rows)]
    return "\n".join(lines)


def machine_line(machine: dict) -> str:
    """``AMD EPYC, 2 cores, Python 3.11.7, Linux 6.1.0``."""
    return (
        f"{machine['cpu']}, {machine['cores']} cores, "
        f"Python {machine['python']}, {machine['kernel']}"
    )


# -- the machine and the JSON file ----------------------------------------------------------


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


def write_json(path: str, report: dict) -> None:
    """Write ``report`` to ``path`` (atomically: a reader never sees half a file)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)
