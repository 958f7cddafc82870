"""Shared fixtures: a fresh server per test, and a check that no process is left behind."""

from __future__ import annotations

import psutil
import pytest

from support import ServerProc


@pytest.fixture(autouse=True)
def no_leftover_processes():
    """Every test must reap what it started: no child, no zombie after it."""
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    yield
    left = [p for p in me.children(recursive=True) if p.pid not in before]
    for p in left:  # clean up so one failure does not cascade, then fail
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(left, timeout=5)
    assert not left, (
        f"processes left behind: {[(p.pid, p.info if hasattr(p, 'info') else '') for p in left]}"
    )


@pytest.fixture
def server():
    """A server on a free loopback port, stopped and reaped after the test."""
    srv = ServerProc("--no-color")
    yield srv
    srv.stop()
