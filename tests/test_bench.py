"""The benchmark: its pure parts (percentiles, shares, formatting, options) and one
smoke run of ``bin/bench --quick`` against a real server."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import psutil
import pytest

from forkchat import __version__
from forkchat import bench as b
from forkchat.bench import drivers, memory, phases, procstats, report, servers, settings, swarm
from support import BIN, child_env, run_bin

SMOKE_TIMEOUT = 60.0


# -- percentiles and summaries ----------------------------------------------------------


def test_percentile_is_nearest_rank():
    values = list(range(100, 0, -1))  # 1..100, unsorted
    assert phases.percentile(values, 50) == 50
    assert phases.percentile(values, 99) == 99
    assert phases.percentile(values, 100) == 100
    assert phases.percentile(values, 1) == 1


def test_percentile_of_few_values_is_one_of_them():
    assert phases.percentile([7], 50) == 7
    assert phases.percentile([7], 99) == 7
    assert phases.percentile([3, 1, 2], 50) == 2
    assert phases.percentile([1, 2, 3, 4], 50) == 2  # nearest rank: ceil(0.5 * 4) = 2nd
    assert phases.percentile([1, 2, 3, 4], 99) == 4


@pytest.mark.parametrize("q", [0, -1, 100.5])
def test_percentile_refuses_a_rank_out_of_range(q):
    with pytest.raises(ValueError):
        phases.percentile([1, 2, 3], q)


def test_percentile_refuses_no_values():
    with pytest.raises(ValueError):
        phases.percentile([], 50)


def test_summarize_scales_every_figure():
    summary = phases.summarize([1_000_000, 2_000_000, 3_000_000], 1e6)
    assert summary == {"count": 3, "p50": 2.0, "p99": 3.0, "max": 3.0}


def test_split_evenly_shares_differ_by_one_and_drop_empty_shares():
    assert phases.split_evenly(1000, 2) == [500, 500]
    assert phases.split_evenly(7, 3) == [3, 2, 2]
    assert phases.split_evenly(2, 4) == [1, 1]
    assert sum(phases.split_evenly(4001, 2)) == 4001


# -- formatting ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ms", "text"),
    [
        (0.0891, "89.1 µs"),
        (0.036, "36.0 µs"),
        (0.5, "500 µs"),
        (1.234, "1.23 ms"),
        (45.67, "45.7 ms"),
        (1999, "2.00 s"),
    ],
)
def test_format_ms_picks_the_unit(ms, text):
    assert report.format_ms(ms) == text


def test_plural():
    assert report.plural(1, "room") == "1 room"
    assert report.plural(100, "room") == "100 rooms"


def test_format_table_aligns_columns_under_a_rule():
    text = report.format_table(("a", "bb"), [("xxx", "y"), ("z", "wwww")])
    assert text.splitlines() == ["a    bb", "---  ----", "xxx  y", "z    wwww"]


def test_format_table_refuses_a_short_row():
    with pytest.raises(ValueError):
        report.format_table(("a", "b"), [("only one",)])


def sample_results() -> dict:
    spread = {"count": 10, "p50": 1.5, "p99": 2.5, "max": 3.0}
    return {
        "pairing_sequential": {"pairs": 10, "ms": spread},
        "pairing_burst": {
            "clients": 100,
            "paired": 100,
            "refused": 0,
            "ms": spread,
            "seconds": 0.25,
            "rooms_per_second": 200.0,
            "driver_busy": 0.1,
        },
        "round_trip": {"round_trips": 100, "ms": {**spread, "p50": 0.089, "p99": 0.12}},
        "throughput": [
            {
                "rooms": r,
                "messages": 100 * r,
                "delivered": 100 * r,
                "seconds": 0.5,
                "per_second": 200.0 * r,
                "driver_busy": 0.4,
            }
            for r in (1, 10)
        ],
        "memory": {"workers": 10, "after_messages": 100, "uss_p50_mib": 1.5, "uss_max_mib": 1.75},
        "rooms_held": {"requested": 50, "peak": 50, "delivered": 50, "seconds": 0.3},
    }


def test_table_rows_name_every_figure():
    rows = report.table_rows(sample_results())
    figures = [row[0] for row in rows]
    assert figures == [
        "pairing, sequential",
        "pairing, burst of 100",
        "rooms opened per second",
        "round trip, one room",
        "messages/s, 1 room",
        "messages/s, 10 rooms",
        "USS per room worker",
        "rooms held at once",
    ]
    values = dict((row[0], row[1]) for row in rows)
    assert values["round trip, one room"] == "p50 89.0 µs  p99 120 µs"
    assert values["messages/s, 10 rooms"] == "2,000"
    assert values["USS per room worker"] == "p50 1.50 MiB  max 1.75 MiB"
    assert all(len(row) == 3 for row in rows)


def test_table_rows_of_a_partial_run_show_what_ran():
    results = {"pairing_sequential": sample_results()["pairing_sequential"]}
    assert [row[0] for row in report.table_rows(results)] == ["pairing, sequential"]


def test_format_report_has_the_machine_line():
    full = {
        "version": "9.9",
        "quick": True,
        "pinned_cpu": 0,
        "machine": {"cpu": "Some CPU", "cores": 2, "python": "3.11.7", "kernel": "Linux 6.1"},
        "results": sample_results(),
    }
    text = report.format_report(full)
    assert "machine: Some CPU, 2 cores, Python 3.11.7, Linux 6.1; pinned to CPU 0" in text
    assert "rooms held at once" in text


def test_describe_machine_names_cpu_cores_python_kernel():
    machine = report.describe_machine()
    assert machine["cpu"] and machine["cores"] >= 1
    assert machine["python"] == ".".join(map(str, sys.version_info[:3]))
    assert machine["kernel"]


# -- message shares ---------------------------------------------------------------------


def paired_clients() -> tuple[swarm.Client, swarm.Client]:
    first, second = swarm.Client(b"a"), swarm.Client(b"b")
    first.first, second.first = True, False
    return first, second


@pytest.mark.parametrize("count", [1, 2, 5, 1000])
def test_shares_of_an_exchange_add_up_and_mirror(count):
    clients = swarm.Swarm(("127.0.0.1", 1), 0, timeout=1)
    first, second = paired_clients()
    for client in (first, second):
        clients.add_quota(client, count)
    assert first.quota_out + second.quota_out == count
    assert (first.quota_out, first.quota_in) == (second.quota_in, second.quota_out)
    assert first.quota_out - second.quota_out in (0, 1)  # the first writer starts


def test_after_an_odd_exchange_the_other_side_writes_next():
    clients = swarm.Swarm(("127.0.0.1", 1), 0, timeout=1)
    first, second = paired_clients()
    first.sent = second.received = 1  # one message went from first to second
    for client in (first, second):
        clients.add_quota(client, 3)
    assert (second.quota_out, second.quota_in) == (2, 1)
    assert (first.quota_out, first.quota_in) == (1, 2)


# -- the command line -------------------------------------------------------------------


def test_quick_sizes_and_explicit_sizes_win():
    quick = b.parse_settings(["--quick"])
    assert (quick.pairs, quick.burst, quick.hold, quick.uss_rooms) == (20, 100, 100, 50)
    assert quick.rooms == (1, 10, 100) and quick.reps == 5 and not quick.ref
    mixed = b.parse_settings(["--quick", "--hold", "7", "--rooms", "2,3", "--reps", "2"])
    assert (mixed.hold, mixed.rooms, mixed.pairs, mixed.reps) == (7, (2, 3), 20, 2)
    full = b.parse_settings(["--ref"])
    assert (full.burst, full.hold, full.messages, full.uss_rooms) == (1000, 2000, 1000, 300)
    assert full.targets == ("forkchat", "reference") and full.reps == 5


def test_server_limits_cover_the_largest_phase():
    rooms, waiting = servers.server_limits(b.parse_settings(["--hold", "5000"]))
    assert rooms >= 5000 and waiting >= 2 * 5000


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--burst", "3"], "--burst must be even"),
        (["--pairs", "0"], "--pairs must be between"),
        (["--messages", "many"], "--messages must be a number"),
        (["--rooms", "1,x"], "--rooms must be numbers"),
        (["--rooms", "0"], "--rooms counts"),
        (["--reps", "0"], "--reps must be between"),
        (["--hold", "100000"], "--hold must be between"),
        (["--timeout", "nan"], "--timeout must be between"),
        (["--port", "4000", "--pin"], "--pin needs"),
        (["--bogus"], ""),
    ],
)
def test_bad_values_give_one_line_and_status_2(argv, words, capsys):
    assert b.main(argv) == b.EXIT_USAGE
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("forkchat bench: ")
    assert words in err


def test_version_and_help():
    with pytest.raises(SystemExit) as exc:
        b.parse_settings(["--version"])
    assert exc.value.code is None or exc.value.code == 0
    run = subprocess.run(
        [sys.executable, str(BIN / "bench"), "--version"],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=30,
        start_new_session=True,
    )
    assert run.returncode == 0 and run.stdout.strip() == f"forkchat {__version__}"


# -- reps, ratios, memory steps ------------------------------------------------------------


def test_shares_give_every_driver_a_count():
    assert phases.shares(2, 2) == [1, 1]
    assert phases.shares(1, 3) == [1, 0, 0]
    assert sum(phases.shares(4001, 4)) == 4001


def rep(p50: float, per_second: float, cpu: float) -> dict:
    throughput = {"rooms": 10, "messages": 100, "delivered": 100, "seconds": 100 / per_second}
    throughput |= {"per_second": per_second, "driver_busy": 0.5, "cpu_us_per_message": cpu}
    throughput["server_busy"] = 0.9
    spread = {"count": 10, "p50": p50, "p99": 2 * p50, "max": 3 * p50}
    return {"round_trip": {"round_trips": 10, "ms": spread}, "throughput": [throughput]}


def test_reps_reduce_to_medians_and_ratios_divide_them():
    ours = [rep(0.1, 1000, 30), rep(0.3, 3000, 10), rep(0.2, 2000, 20)]
    theirs = [rep(0.1, 4000, 10)] * 3
    mine = {"round_trip": phases.median_round_trip(ours)}
    mine["throughput"] = phases.median_throughput(ours)
    assert mine["round_trip"]["ms"] == pytest.approx(
        {"count": 10, "p50": 0.2, "p99": 0.4, "max": 0.9}
    )
    assert mine["round_trip"]["p50_ms_reps"] == [0.1, 0.3, 0.2]
    (run,) = mine["throughput"]
    assert (run["per_second"], run["cpu_us_per_message"], run["reps"]) == (2000, 20, 3)
    ref = {"round_trip": phases.median_round_trip(theirs)}
    ref["throughput"] = phases.median_throughput(theirs)
    ratios = phases.ratios(mine, ref)
    assert ratios["round_trip_p50"] == pytest.approx(2.0)
    assert ratios["throughput"] == [
        {"rooms": 10, "messages_per_second": 0.5, "cpu_per_message": 2.0}
    ]
    rows = report.comparison_rows({**mine, "reference": ref, "ratios": ratios})
    assert rows[0] == ("round trip p50", "200 µs", "100 µs", "2.00")
    assert rows[2] == ("messages/s, 10 rooms", "2,000", "4,000", "0.50")
    assert rows[3] == ("server CPU per message, 10 rooms", "20.0 µs", "10.0 µs", "2.00")


def test_a_ratio_to_nothing_is_none():
    assert phases.ratio(1.0, 0.0) is None
    assert report.format_ratio(None) == "-"


@pytest.mark.parametrize(
    ("rooms", "steps"),
    [
        (100, [(45, False), (50, True), (90, False), (100, True)]),
        (
            2000,
            [(360, False), (400, True), (900, False), (1000, True), (1800, False), (2000, True)],
        ),
        (5, [(4, False), (5, True)]),
        (1, [(1, True)]),
    ],
)
def test_hold_steps_read_memory_after_a_last_tenth(rooms, steps):
    assert memory.hold_steps(rooms) == steps


def test_hold_to_5000_reads_at_400_1000_2000_4000_and_5000():
    points = [n for n, point in memory.hold_steps(5000) if point]
    assert points == [400, 1000, 2000, 4000, 5000]


def test_rooms_that_do_not_fit_in_memory_are_refused_with_the_figures():
    with pytest.raises(settings.BenchError, match=r"stopped short: 1000000 more rooms need"):
        procstats.check_room_for(
            1_000_000, procstats.ROOM_ESTIMATE, procstats.memory_floor(), "hold"
        )
    procstats.check_room_for(1, procstats.ROOM_ESTIMATE, 0, "hold")  # one room always fits


def test_procstats_read_this_process():
    me = os.getpid()
    assert procstats.cpu_ns(me) > 0
    assert procstats.tree_cpu_ns(me) >= procstats.cpu_ns(me)
    mem = procstats.memory_of(me)
    assert 0 < mem.uss <= mem.pss <= mem.rss
    assert procstats.memory_of(2**22 + 1) == procstats.Memory()  # no such process
    assert 0 < procstats.mem_available() < procstats.meminfo()["MemTotal"]


# -- the reference relay ----------------------------------------------------------------


def test_reference_relay_speaks_forkchats_framing():
    """Pairing, the relay lines and leaving, exactly as the drivers expect of forkchat."""
    ref = servers.start_server(
        "reference", servers.reference_command(settings.Settings()), "127.0.0.1"
    )
    try:
        a, b_, _ = drivers.join_pair(ref.address, 10.0, "r")
        a.send_line(b"hello there")
        b_.expect_exactly(b"MSG hello there")
        b_.expect_exactly(b"TURN WRITE")
        a.expect_exactly(b"TURN READ")
        b_.send_line(b"hi")
        a.expect_exactly(b"MSG hi")
        a.expect_exactly(b"TURN WRITE")
        b_.expect_exactly(b"TURN READ")
        drivers.leave_pair(a, b_)
        servers.wait_rooms_closed(ref, 10.0)
    finally:
        servers.stop_server(ref)


# -- smoke ------------------------------------------------------------------------------


def run_bench(*args: str) -> subprocess.CompletedProcess:
    """Run bin/bench in its own session; kill it and all it started if it overruns."""
    return run_bin("bench", *args, timeout=SMOKE_TIMEOUT)


def assert_spread(summary: dict, count: int) -> None:
    assert summary["count"] == count
    assert 0 < summary["p50"] <= summary["p99"] <= summary["max"]


def assert_ratio(value: float) -> None:
    assert isinstance(value, float) and math.isfinite(value) and 0.1 <= value <= 10, value


def test_quick_run_against_the_reference_measures_every_figure_and_ratio(tmp_path):
    out = tmp_path / "bench.json"
    run = run_bench("--quick", "--ref", "--json", str(out))
    assert run.returncode == 0, run.stderr
    report = json.loads(out.read_text())
    assert report["ok"] and report["error"] is None and report["quick"]
    assert all(report["machine"][key] for key in ("cpu", "cores", "python", "kernel"))
    s, r = report["settings"], report["results"]

    assert_spread(r["pairing_sequential"]["ms"], s["pairs"])
    burst = r["pairing_burst"]
    assert (burst["paired"], burst["refused"]) == (s["burst"], 0)
    assert_spread(burst["ms"], s["burst"])
    assert burst["rooms_per_second"] > 0

    for figures in (r, r["reference"]):
        assert_spread(figures["round_trip"]["ms"], s["round_trips"])
        assert figures["round_trip"]["reps"] == s["reps"]
        assert [run["rooms"] for run in figures["throughput"]] == s["rooms"]
        for tp in figures["throughput"]:
            assert tp["delivered"] == tp["messages"] == tp["rooms"] * s["messages"]
            assert tp["per_second"] > 0 and tp["driver_busy"] > 0
            assert 0 < tp["cpu_us_per_message"] < 10_000
            assert len(tp["per_second_reps"]) == s["reps"]
        mem = figures["memory"]
        assert mem["workers"] == s["uss_rooms"]
        assert 0 < mem["uss_p50_mib"] <= mem["uss_max_mib"] < 64
        burst = figures["pairing_burst"]
        assert (burst["paired"], burst["refused"]) == (s["burst"], 0)
        assert burst["rooms_per_second"] > 0

    ratios = r["ratios"]
    assert_ratio(ratios["burst_rooms_per_second"])
    assert_ratio(ratios["round_trip_p50"])
    assert_ratio(ratios["round_trip_p99"])
    assert_ratio(ratios["uss_p50"])
    assert [x["rooms"] for x in ratios["throughput"]] == s["rooms"]
    for x in ratios["throughput"]:
        assert_ratio(x["messages_per_second"])
        assert_ratio(x["cpu_per_message"])

    held = r["rooms_held"]
    assert held["peak"] == held["requested"] == held["delivered"] == s["hold"]
    assert_spread(held["pairing_ms"], 2 * s["hold"])
    assert [step["rooms"] for step in held["steps"]] == [45, 50, 90, 100]
    assert held["server"]["processes"] == s["hold"] + 1  # the server and its rooms
    assert 0 < held["server"]["total_uss_mib"] <= held["server"]["total_pss_mib"]
    assert "stopped_short" not in held

    for figure in ("pairing, sequential", "round trip, one room", "rooms held at once"):
        assert figure in run.stdout
    assert "machine: " in run.stdout and "forkchat against the same-framing" in run.stdout
    for key in ("server", "reference_server"):
        assert not psutil.pid_exists(report[key]["pid"]), f"the bench left its {key} running"
