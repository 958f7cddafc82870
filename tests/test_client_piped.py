"""bin/client with piped input, and its command line: leaving at the end of the input,
held lines across partners, what the server sends made safe, the plain-vs-TLS hint,
one-line failures. Real processes over loopback sockets; every process is reaped by
PID, every wait has a deadline.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
import time

import pytest
from test_client import CLIENT, ClientProc, accept_named, run_against, waiting_peer
from test_client_next import Scripted

from support import (
    DEADLINE,
    ROOT,
    Peer,
    ServerProc,
    child_env,
    close_all,
    pair,
    reap_tree,
    run_bin,
)

HINT = "forkchat client: no greeting from the server: is it serving TLS? try --tls or --cafile FILE"


@pytest.fixture
def fake_server():
    """A listening loopback socket the test drives by hand, as the server would talk."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(DEADLINE)
    yield listener
    listener.close()


# ---------------------------------------------------------------- the end of the input


def test_no_input_leaves_right_after_the_greeting(server):
    done = run_bin("client", "eve", "--port", str(server.port), input="")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"connected to 127.0.0.1:{server.port} as eve"
    assert "leaving: end of input" in lines
    assert re.fullmatch(r"\[BYE\] .*\(exit\)", lines[-1]), lines
    assert done.stderr == ""


def test_a_piped_line_leaves_once_it_went_out_without_a_reply(server, piped):
    alice = piped(server.port, "alice")  # first: alice writes first
    alice.type("hello\n")
    alice.end_input()
    alice.out.wait_for(r"^\[WAIT\] ")
    bob = Peer(server.address, "bob")
    bob.expect("PAIRED alice", "TURN READ", "MSG hello", "TURN WRITE")
    bob.expect("BYE partner-exit")  # bob never had to answer
    assert alice.wait() == 0
    assert alice.out.lines[-3:-1] == ["[WRITE] your turn to write", "leaving: end of input"]
    bob.close()


def test_lines_held_for_later_turns_go_first_then_exit_at_once(server, piped):
    peer = waiting_peer(server)  # alice writes first
    bob = piped(server.port, "bob")
    bob.type("one\ntwo\n")
    bob.end_input()
    peer.expect("PAIRED bob", "TURN WRITE")
    peer.send("hi")
    peer.expect("TURN READ", "MSG one", "TURN WRITE")
    peer.send("and?")
    peer.expect("TURN READ", "MSG two", "TURN WRITE", "BYE partner-exit")
    assert bob.wait() == 0
    peer.close()


def test_a_refusal_fails_even_when_the_client_was_leaving():
    srv = ServerProc("--no-color", "--max-rooms", "1", "--max-waiting", "1")
    try:
        in_room = pair(srv.address)
        carol = waiting_peer(srv, "carol")  # the only place in the queue
        done = run_bin("client", "eve", "--port", str(srv.port), input="")
        assert done.returncode == 1, done.stdout
        assert re.fullmatch(r"\[BYE\] .*\(full\)", done.stdout.splitlines()[-1])
        close_all([*in_room, carol])
    finally:
        srv.stop()


# ---------------------------------------------------------------- held lines


def test_a_script_s_held_lines_go_on_across_partners(fake_server, piped):
    """A script's lines are one sequence: a partner leaving (WAIT, under --requeue)
    does not drop the ones read ahead, as it does for lines a person typed."""
    client = piped(fake_server.getsockname()[1], "bob")
    server = Scripted(accept_named(fake_server))
    server.say("WAIT waiting for a partner", "PAIRED alice", "TURN READ")
    client.type("still going\n")
    client.out.wait_for(r"^\[READ\] waiting for alice$")
    server.say("WAIT alice left, waiting for a new partner", "PAIRED dave", "TURN WRITE")
    assert server.hear() == "still going"
    server.say("TURN READ", "BYE shutdown SERVER WILL CLOSE NOW")
    assert client.wait() == 0
    assert not any("dropped" in line for line in client.out.lines)


# ---------------------------------------------------------------- what comes off the network


def test_an_unknown_turn_is_shown_without_its_escape_sequences(fake_server):
    turn = b"TURN \x1b]0;pwned\x07\x1b[2JWRITE\xc2\x9b5n\x1b[31m\n"  # OSC, CSI, C1 CSI
    result = run_against(fake_server, turn + b"BYE timeout idle\n")
    assert b"\x1b" not in result.stdout and b"\xc2\x9b" not in result.stdout
    assert result.stdout.decode().splitlines()[1:] == ["[?] TURN WRITE", "[BYE] idle (timeout)"]


def test_piped_mode_never_imports_prompt_toolkit(fake_server):
    """A script's client starts without the terminal front's library (its start is
    cheaper); -X importtime names every module imported, on stderr."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-X",
            "importtime",
            CLIENT,
            "bob",
            "--port",
            str(fake_server.getsockname()[1]),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=child_env(),
        start_new_session=True,
    )
    try:
        with accept_named(fake_server) as conn:
            conn.sendall(b"BYE shutdown SERVER WILL CLOSE NOW\n")
            out, err = proc.communicate(timeout=DEADLINE)
    finally:
        reap_tree(proc)
    assert proc.returncode == 0 and b"(shutdown)" in out
    assert b" forkchat.session\n" in err  # the import list is there
    assert b"prompt_toolkit" not in err


# ---------------------------------------------------------------- no greeting: TLS?


def test_no_greeting_gives_the_tls_hint_within_five_seconds(fake_server):
    client = ClientProc(fake_server.getsockname()[1], "bob")
    try:
        started = time.monotonic()
        conn, _ = fake_server.accept()  # and says nothing, as a TLS server does
        with conn:
            client.err.wait_for(re.escape(HINT), timeout=5)
            assert time.monotonic() - started < 5
        assert client.wait() == 1  # then the server gave up: connection lost
        assert client.err.lines == [HINT]  # said once
        assert client.out.lines[-1] == "connection lost"
    finally:
        client.proc.kill()
        client.proc.wait(DEADLINE)


def test_a_close_before_any_greeting_gives_the_hint_at_once(fake_server):
    client = ClientProc(fake_server.getsockname()[1], "bob")
    try:
        conn, _ = fake_server.accept()
        conn.recv(64)  # the name, as plain text: a TLS server drops the connection
        conn.close()
        assert client.wait() == 1
        assert client.err.lines == [HINT]
        assert client.out.lines == [
            f"connected to 127.0.0.1:{fake_server.getsockname()[1]} as bob",
            "connection lost",
        ]
    finally:
        client.proc.kill()
        client.proc.wait(DEADLINE)


# ---------------------------------------------------------------- command line


def test_make_run_hint_names_the_port():
    with socket.socket() as bound:  # bound, never listening: connecting is refused
        bound.bind(("127.0.0.1", 0))
        port = bound.getsockname()[1]
        done = run_bin("client", "alice", "--port", str(port))
    assert done.returncode == 1
    assert done.stderr == (
        f"forkchat client: cannot connect to 127.0.0.1:{port} (Connection refused); "
        f"is the server running? Start one with 'make run PORT={port}'.\n"
    )


@pytest.mark.parametrize("args", [("alice", "--bogus"), ("two", "words"), ("-x",)])
def test_stray_arguments_are_one_line_and_status_2(args):
    done = run_bin("client", *args)
    assert done.returncode == 2
    assert done.stdout == ""
    assert re.fullmatch(r"forkchat client: unexpected argument \S+\n", done.stderr), done.stderr


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_client_with_two_words_is_one_client_line():
    done = subprocess.run(
        # -o: the .venv as it is, never installed again from inside a test
        ["make", "-s", "-o", ".venv/.installed", "client", "NAME=two words", "PORT=1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=DEADLINE * 6,
    )
    assert done.returncode == 2
    client_lines = [line for line in done.stderr.splitlines() if not line.startswith("make")]
    assert client_lines == ["forkchat client: unexpected argument words"], done.stderr
    assert "Warning" not in done.stderr and "Usage" not in done.stderr


@pytest.mark.parametrize("name", ["client", "server", "pids", "bench"])
def test_a_shim_before_the_first_make_says_what_to_run(tmp_path, name):
    """A copy of bin/ and forkchat/ with no .venv, run by a python that has none of the
    requirements (-S: no site-packages)."""
    for part in ("bin", "forkchat"):
        shutil.copytree(ROOT / part, tmp_path / part)
    done = subprocess.run(
        [sys.executable, "-S", "-I", str(tmp_path / "bin" / name)],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
    )
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert re.fullmatch(
        rf"bin/{name}: the Python package '\w+' is missing: run 'make run' or 'make test' "
        r"once first \(either creates \.venv with the requirements\), or install "
        r"requirements\.txt again if it changed\n",
        done.stderr,
    ), done.stderr
