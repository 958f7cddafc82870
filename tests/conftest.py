"""Shared fixtures: a fresh server per test, and a check that no process is left behind."""

from __future__ import annotations

import ctypes

import psutil
import pytest

from support import ServerProc

PR_SET_CHILD_SUBREAPER = 36


@pytest.fixture(scope="session", autouse=True)
def adopt_orphans():
    """Make the test process the subreaper of everything it starts: a room worker
    orphaned by its server's death is re-parented here, so the leftover check sees it
    and the test can reap it (PID 1 of a container may not)."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


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
