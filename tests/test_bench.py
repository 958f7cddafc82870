"""The benchmark: its pure parts (percentiles, shares, formatting, options) and one
smoke run of ``bin/bench --quick`` against a real server."""

from __future__ import annotations

import json
import subprocess
import sys

import psutil
import pytest

from forkchat import __version__
from forkchat import bench as b
from support import BIN, child_env, run_bin

SMOKE_TIMEOUT = 60.0


# -- percentiles and summaries ----------------------------------------------------------


def test_percentile_is_nearest_rank():
    values = list(range(100, 0, -1))  # 1..100, unsorted
    assert b.percentile(values, 50) == 50
    assert b.percentile(values, 99) == 99
    assert b.percentile(values, 100) == 100
    assert b.percentile(values, 1) == 1


def test_percentile_of_few_values_is_one_of_them():
    assert b.percentile([7], 50) == 7
    assert b.percentile([7], 99) == 7
    assert b.percentile([3, 1, 2], 50) == 2
    assert b.percentile([1, 2, 3, 4], 50) == 2  # nearest rank: ceil(0.5 * 4) = 2nd
    assert b.percentile([1, 2, 3, 4], 99) == 4


@pytest.mark.parametrize("q", [0, -1, 100.5])
def test_percentile_refuses_a_rank_out_of_range(q):
    with pytest.raises(ValueError):
        b.percentile([1, 2, 3], q)


def test_percentile_refuses_no_values():
    with pytest.raises(ValueError):
        b.percentile([], 50)


def test_summarize_scales_every_figure():
    summary = b.summarize([1_000_000, 2_000_000, 3_000_000], 1e6)
    assert summary == {"count": 3, "p50": 2.0, "p99": 3.0, "max": 3.0}


def test_split_evenly_shares_differ_by_one_and_drop_empty_shares():
    assert b.split_evenly(1000, 2) == [500, 500]
    assert b.split_evenly(7, 3) == [3, 2, 2]
    assert b.split_evenly(2, 4) == [1, 1]
    assert sum(b.split_evenly(4001, 2)) == 4001


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
    assert b.format_ms(ms) == text


def test_plural():
    assert b.plural(1, "room") == "1 room"
    assert b.plural(100, "room") == "100 rooms"


def test_format_table_aligns_columns_under_a_rule():
    text = b.format_table(("a", "bb"), [("xxx", "y"), ("z", "wwww")])
    assert text.splitlines() == ["a    bb", "---  ----", "xxx  y", "z    wwww"]


def test_format_table_refuses_a_short_row():
    with pytest.raises(ValueError):
        b.format_table(("a", "b"), [("only one",)])


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
    rows = b.table_rows(sample_results())
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
    assert [row[0] for row in b.table_rows(results)] == ["pairing, sequential"]


def test_format_report_has_the_machine_line():
    report = {
        "version": "9.9",
        "quick": True,
        "pinned_cpu": 0,
        "machine": {"cpu": "Some CPU", "cores": 2, "python": "3.11.7", "kernel": "Linux 6.1"},
        "results": sample_results(),
    }
    text = b.format_report(report)
    assert "machine: Some CPU, 2 cores, Python 3.11.7, Linux 6.1; pinned to CPU 0" in text
    assert "rooms held at once" in text


def test_describe_machine_names_cpu_cores_python_kernel():
    machine = b.describe_machine()
    assert machine["cpu"] and machine["cores"] >= 1
    assert machine["python"] == ".".join(map(str, sys.version_info[:3]))
    assert machine["kernel"]


# -- message shares ---------------------------------------------------------------------


def paired_clients() -> tuple[b.Client, b.Client]:
    first, second = b.Client(b"a"), b.Client(b"b")
    first.first, second.first = True, False
    return first, second


@pytest.mark.parametrize("count", [1, 2, 5, 1000])
def test_shares_of_an_exchange_add_up_and_mirror(count):
    swarm = b.Swarm(("127.0.0.1", 1), [], timeout=1)
    first, second = paired_clients()
    for client in (first, second):
        swarm.add_quota(client, count)
    assert first.quota_out + second.quota_out == count
    assert (first.quota_out, first.quota_in) == (second.quota_in, second.quota_out)
    assert first.quota_out - second.quota_out in (0, 1)  # the first writer starts


def test_after_an_odd_exchange_the_other_side_writes_next():
    swarm = b.Swarm(("127.0.0.1", 1), [], timeout=1)
    first, second = paired_clients()
    first.sent = second.received = 1  # one message went from first to second
    for client in (first, second):
        swarm.add_quota(client, 3)
    assert (second.quota_out, second.quota_in) == (2, 1)
    assert (first.quota_out, first.quota_in) == (1, 2)


# -- the command line -------------------------------------------------------------------


def test_quick_sizes_and_explicit_sizes_win():
    quick = b.parse_settings(["--quick"])
    assert (quick.pairs, quick.burst, quick.rooms_held) == (20, 100, 100)
    assert quick.rooms == (1, 10, 100)
    mixed = b.parse_settings(["--quick", "--rooms-held", "7", "--rooms", "2,3"])
    assert (mixed.rooms_held, mixed.rooms, mixed.pairs) == (7, (2, 3), 20)
    full = b.parse_settings([])
    assert (full.burst, full.rooms_held, full.messages) == (1000, 2000, 1000)


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--burst", "3"], "--burst must be even"),
        (["--pairs", "0"], "--pairs must be between"),
        (["--messages", "many"], "--messages must be a number"),
        (["--rooms", "1,x"], "--rooms must be numbers"),
        (["--rooms", "0"], "--rooms counts"),
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


# -- smoke ------------------------------------------------------------------------------


def run_bench(*args: str) -> subprocess.CompletedProcess:
    """Run bin/bench in its own session; kill it and all it started if it overruns."""
    return run_bin("bench", *args, timeout=SMOKE_TIMEOUT)


def assert_spread(summary: dict, count: int) -> None:
    assert summary["count"] == count
    assert 0 < summary["p50"] <= summary["p99"] <= summary["max"]


def test_quick_run_measures_every_figure(tmp_path):
    out = tmp_path / "bench.json"
    run = run_bench("--quick", "--json", str(out))
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
    assert_spread(r["round_trip"]["ms"], s["round_trips"])

    assert [run["rooms"] for run in r["throughput"]] == s["rooms"]
    for tp in r["throughput"]:
        assert tp["delivered"] == tp["messages"] == tp["rooms"] * s["messages"]
        assert tp["per_second"] > 0 and tp["driver_busy"] > 0
    mem = r["memory"]
    assert mem["workers"] == max(s["rooms"])
    assert 0 < mem["uss_p50_mib"] <= mem["uss_max_mib"] < 64

    held = r["rooms_held"]
    assert held["peak"] == held["requested"] == held["delivered"] == s["rooms_held"]
    assert_spread(held["pairing_ms"], 2 * s["rooms_held"])

    for figure in ("pairing, sequential", "round trip, one room", "rooms held at once"):
        assert figure in run.stdout
    assert "machine: " in run.stdout
    assert not psutil.pid_exists(report["server"]["pid"]), "the bench left its server running"
