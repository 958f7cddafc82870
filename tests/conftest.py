"""Shared fixtures: a fresh server per test, a check that no process is left behind, and
self-signed TLS certificates made with the openssl CLI."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from support import ServerProc, reap_tree

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


def write_cert(directory: Path, name: str = "server") -> tuple[str, str]:
    """Write a self-signed certificate for localhost and 127.0.0.1; return (cert, key)."""
    cert, key = directory / f"{name}-cert.pem", directory / f"{name}-key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2"),
            *("-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost"),
            *("-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return str(cert), str(key)


@pytest.fixture(scope="session")
def make_cert(tmp_path_factory) -> Callable[[str], tuple[str, str]]:
    """Factory of self-signed pairs (cert, key) by name, made once per session; skips
    the test when the openssl CLI is missing (``make sysdeps`` installs it)."""
    if not shutil.which("openssl"):
        pytest.skip("needs the openssl CLI (make sysdeps installs it)")
    directory = tmp_path_factory.mktemp("certs")
    made: dict[str, tuple[str, str]] = {}

    def make(name: str = "server") -> tuple[str, str]:
        if name not in made:
            made[name] = write_cert(directory, name)
        return made[name]

    return make


@pytest.fixture(scope="session")
def tls_pair(make_cert) -> tuple[str, str]:
    """A self-signed (cert, key) pair for localhost and 127.0.0.1."""
    return make_cert("server")


@pytest.fixture
def piped():
    """Factory of piped ``bin/client`` processes (test_client.ClientProc); every one is
    reaped (by PID, with children) at teardown."""
    from test_client import ClientProc  # the client tests' driver, shared here

    started: list = []

    def start(port: int, *args: str):
        started.append(ClientProc(port, *args))
        return started[-1]

    yield start
    for client in started:
        reap_tree(client.proc)
