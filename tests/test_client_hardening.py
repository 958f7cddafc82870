"""bin/client against an adversarial review (issue 12): closed standard streams (item 9),
SIGUSR2 from ``bin/pids --signal USR2 --all`` (item 10), the largest --max-line (item 11).

Real server, real client processes; every process is reaped by PID, every wait has a
deadline.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys

import pytest
from test_client import CLIENT, paired_client, stuck_connecting

from support import DEADLINE, ServerProc, child_env, reap_tree, run_bin

LARGEST = 1 << 20  # the server's largest --max-line


def run_with_closed(redirect: str, port: int, name: str) -> subprocess.Popen:
    """Start bin/client with a standard stream really closed (``<&-`` or ``>&-``): the
    shell closes it and execs the client, so the client's PID is the Popen's."""
    script = f'exec "$0" "$@" {redirect}'
    return subprocess.Popen(
        ["/bin/sh", "-c", script, sys.executable, CLIENT, name, "--port", str(port)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=child_env(),
        start_new_session=True,
    )


# ---------------------------------------------------------------- item 9: closed streams


def test_closed_stdin_is_end_of_input(server):
    proc = run_with_closed("<&-", server.port, "bob")
    try:
        out, err = proc.communicate(timeout=DEADLINE)  # no partner: bob leaves by himself
    finally:
        reap_tree(proc)
    assert proc.returncode == 0, err
    assert err == b""
    lines = out.decode().splitlines()
    assert "leaving: end of input" in lines  # before or after the WAIT, as they come
    assert re.fullmatch(r"\[BYE\] .*\(exit\)", lines[-1])


def test_closed_stdout_is_one_line_on_stderr_and_exit_1(server):
    proc = run_with_closed(">&-", server.port, "bob")
    try:
        out, err = proc.communicate(timeout=DEADLINE)
    finally:
        reap_tree(proc)
    assert proc.returncode == 1
    assert out == b""
    assert err == b"forkchat client: standard output is closed; nothing could be shown\n"


# ---------------------------------------------------------------- item 10: SIGUSR2


def test_sigusr2_prints_the_status_and_the_chat_goes_on(server, piped):
    peer, client = paired_client(server, piped)
    client.signal(signal.SIGUSR2)
    client.out.wait_for(
        rf"^\[STATUS\] bob at 127\.0\.0\.1:{server.port}: chatting with alice, alice is writing$"
    )
    peer.send("still there?")
    peer.expect("TURN READ")
    client.out.wait_for(r"^alice: still there\?$")
    client.end_input()
    peer.expect("BYE partner-exit")  # bob left by itself: not partner-lost
    assert client.wait() == 0
    assert client.err.lines == []
    peer.close()


def test_pids_signal_usr2_all_leaves_clients_alive(server, piped):
    first = piped(server.port, "alice")
    first.out.wait_for(r"^\[WAIT\] ")
    second = piped(server.port, "bob")
    first.out.wait_for(r"^\[WRITE\] ")
    second.out.wait_for(r"^\[READ\] ")
    mark = server.out.mark()
    done = run_bin("pids", "--port", str(server.port), "--signal", "USR2", "--all")
    assert done.returncode == 0, done.stderr
    assert len(re.findall(r"^sent SIGUSR2 to client pid", done.stdout, re.M)) == 2
    server.out.wait_for(r"^NUMBER OF CLIENTS : \*\* 2 \*\*$", start=mark)
    first.out.wait_for(r"^\[STATUS\] alice at .*: chatting with bob, your turn to write$")
    second.out.wait_for(r"^\[STATUS\] bob at .*: chatting with alice, alice is writing$")
    first.type("after the signal\n")
    second.out.wait_for(r"^alice: after the signal$")
    first.end_input()
    second.end_input()
    assert first.wait() == 0 and second.wait() == 0
    assert not any("partner-lost" in line for line in first.out.lines + second.out.lines)


def test_sigusr2_while_connecting_changes_nothing(piped):
    """The signal arrives before the session: the client neither dies nor leaves."""
    with stuck_connecting(piped) as client:
        client.signal(signal.SIGUSR2)
        client.signal(signal.SIGTERM)  # handled after SIGUSR2: one wakeup, in order
        assert client.wait() == 0
    assert client.out.lines == ["leaving: received SIGTERM"]
    assert client.err.lines == []


# ---------------------------------------------------------------- item 11: the largest line


@pytest.fixture
def big_server():
    srv = ServerProc("--no-color", "--max-line", str(LARGEST))
    yield srv
    srv.stop()


def test_a_message_of_the_largest_max_line_is_shown_and_sent(big_server, piped):
    peer, client = paired_client(big_server, piped)
    peer.send("a" * LARGEST)
    peer.expect("TURN READ")
    client.out.wait_for(r"^\[WRITE\] your turn to write$")
    assert client.out.lines[-2] == "alice: " + "a" * LARGEST
    client.type("b" * LARGEST + "\n")
    assert peer.raw_line() == b"MSG " + b"b" * LARGEST
    peer.expect("TURN WRITE")
    client.end_input()
    peer.expect("BYE partner-exit")
    assert client.wait() == 0
    assert not any("too long" in line for line in client.out.lines)
    peer.close()
