"""bin/client and "next partner" (issue 10, protocol 1.1).

First against a scripted server (a loopback listener the test drives line by line), so
the client's side is tested whatever the server does; then against the real server,
piped and on a pseudo-terminal. Every process is reaped by PID; every wait has a deadline.
"""

from __future__ import annotations

import re
import socket

import pytest
from test_client import (
    BYE_RE,
    ClientProc,
    accept_named,
    finish_tty,
    tty_client,
    waiting_peer,
)

from support import DEADLINE, Peer, ServerProc

__all__ = ["tty_client"]  # a fixture used here


@pytest.fixture
def fake_server():
    """A listening loopback socket the test drives by hand, as the server would talk."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(DEADLINE)
    yield listener
    listener.close()


class Scripted:
    """The server's end of one client connection, driven line by line."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self.buf = b""

    def say(self, *lines: str) -> None:
        self.conn.sendall("".join(line + "\n" for line in lines).encode())

    def hear(self) -> str:
        """The client's next line (the socket's timeout is the deadline)."""
        while b"\n" not in self.buf:
            chunk = self.conn.recv(4096)
            assert chunk, f"client closed; had {self.buf!r}"
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode()


def start_paired(listener: socket.socket, piped, turn: str) -> tuple[Scripted, ClientProc]:
    """A piped client bob, in a room with alice, told ``TURN <turn>``."""
    client = piped(listener.getsockname()[1], "bob")
    server = Scripted(accept_named(listener))
    server.say("WAIT waiting for a partner", "PAIRED alice", f"TURN {turn}")
    client.out.wait_for(rf"^\[{turn}\] ")
    return server, client


# ---------------------------------------------------------------- against a scripted server


def test_piped_next_goes_at_once_and_the_chat_goes_on(fake_server, piped):
    server, client = start_paired(fake_server, piped, "READ")
    client.type("next\nhello carol\n")
    assert server.hear() == "next"  # at once: alice's turn, not ours
    server.say("MSG late words", "TURN WRITE")  # the old room's, sent before it saw next
    server.say("WAIT looking for a new partner", "PAIRED carol", "TURN WRITE")
    assert server.hear() == "hello carol"  # on the new partner's turn, not the stale one
    server.say("TURN READ", "BYE partner-exit carol left the chat")
    assert client.wait() == 0  # its input still open: the BYE ends it
    assert client.out.lines[4:] == [
        "[NEXT] leaving alice for a new partner",
        "alice: late words",
        "[WAIT] looking for a new partner",
        "[PAIRED] you are chatting with carol",
        "[WRITE] your turn to write",
        "[READ] waiting for carol",
        "[BYE] carol left the chat (partner-exit)",
    ]
    assert client.err.lines == []


def test_piped_next_waits_behind_a_line_for_the_old_partner(fake_server, piped):
    server, client = start_paired(fake_server, piped, "READ")
    client.type("for alice\nnext\n")
    server.say("MSG your turn, bob", "TURN WRITE")
    assert server.hear() == "for alice"
    server.say("TURN READ")
    assert server.hear() == "next"
    server.say("WAIT looking for a new partner")
    client.out.wait_for(r"^\[WAIT\] looking for a new partner$")
    client.end_input()  # exit goes at once; this server answers with a shutdown
    assert server.hear() == "exit"
    server.say("BYE shutdown SERVER WILL CLOSE NOW")
    assert client.wait() == 0


def test_wait_in_a_room_keeps_the_session_going(fake_server, piped):
    """The partner left and the server runs with --requeue: WAIT instead of BYE."""
    server, client = start_paired(fake_server, piped, "WRITE")
    server.say("WAIT alice left, waiting for a new partner")
    client.out.wait_for(r"^\[WAIT\] alice left, waiting for a new partner$")
    client.type("hi dave\n")  # no turn now: held until the next room gives one
    server.say("PAIRED dave", "TURN WRITE")
    assert server.hear() == "hi dave"
    server.say("TURN READ", "MSG hello bob", "TURN WRITE")
    client.out.wait_for(r"^dave: hello bob$")
    client.end_input()
    assert server.hear() == "exit"
    server.say("BYE exit goodbye")
    assert client.wait() == 0
    assert "[PAIRED] you are chatting with dave" in client.out.lines


def test_next_while_waiting_is_sent_and_answered_with_wait(fake_server, piped):
    client = piped(fake_server.getsockname()[1], "bob")
    server = Scripted(accept_named(fake_server))
    server.say("WAIT waiting for a partner")
    client.out.wait_for(r"^\[WAIT\] ")
    client.type("next\n")
    assert server.hear() == "next"
    server.say("WAIT still waiting for a partner")
    client.out.wait_for(r"^\[WAIT\] still waiting for a partner$")
    assert "[NEXT] asking for a new partner" in client.out.lines
    server.say("BYE shutdown SERVER WILL CLOSE NOW")
    assert client.wait() == 0


# ---------------------------------------------------------------- against the real server


def test_next_with_the_real_server_pairs_someone_else(server, piped):
    alice = waiting_peer(server)
    client = piped(server.port, "bob")
    alice.expect("PAIRED bob", "TURN WRITE")
    client.out.wait_for(r"^\[READ\] waiting for alice$")
    carol = Peer(server.address, "carol")
    carol.expect("WAIT ")
    client.type("next\n")
    alice.expect("BYE partner-exit")
    client.out.wait_for(r"^\[WAIT\] ")
    carol.expect("PAIRED bob", "TURN WRITE")  # carol waited first: she writes first
    client.out.wait_for(r"^\[PAIRED\] you are chatting with carol$")
    carol.send("hi bob")
    carol.expect("TURN READ")
    client.out.wait_for(r"^carol: hi bob$")
    client.out.wait_for(r"^\[WRITE\] your turn to write$")
    client.end_input()
    carol.expect("BYE partner-exit")
    assert client.wait() == 0
    assert client.err.lines == []
    for peer in (alice, carol):
        peer.close()


@pytest.fixture
def requeue_server():
    srv = ServerProc("--no-color", "--requeue")
    yield srv
    srv.stop()


def test_partner_next_under_requeue_keeps_the_client(requeue_server, piped):
    alice = waiting_peer(requeue_server)
    client = piped(requeue_server.port, "bob")
    alice.expect("PAIRED bob", "TURN WRITE")
    client.out.wait_for(r"^\[READ\] waiting for alice$")
    alice.send("next")
    alice.expect("WAIT ")
    client.out.wait_for(r"^\[WAIT\] .*alice")
    carol = Peer(requeue_server.address, "carol")  # bob is not paired with alice again
    carol.expect("PAIRED bob")
    client.out.wait_for(r"^\[PAIRED\] you are chatting with carol$")
    client.end_input()
    assert client.wait() == 0
    for peer in (alice, carol):
        peer.close()


def test_interactive_next_typed_off_turn(server, tty_client):
    alice = waiting_peer(server)
    child = tty_client(server.port, "bob")
    alice.expect("PAIRED bob", "TURN WRITE")
    child.expect_exact("[READ] waiting for alice")
    carol = Peer(server.address, "carol")
    carol.expect("WAIT ")
    child.send("next\r")
    child.expect_exact("[NEXT] leaving alice for a new partner")
    alice.expect("BYE partner-exit")
    child.expect(r"\[WAIT\] ")
    carol.expect("PAIRED bob", "TURN WRITE")
    child.expect_exact("[PAIRED] you are chatting with carol")
    carol.send("welcome")
    carol.expect("TURN READ")
    child.expect_exact("carol: welcome")
    child.expect_exact("bob>")
    child.send("exit\r")
    child.expect(BYE_RE)
    assert child.match.group("reason") == "exit"
    carol.expect("BYE partner-exit")
    assert finish_tty(child) == 0
    for peer in (alice, carol):
        peer.close()


def test_transcript_lines_are_plain(fake_server, piped):
    """The status lines for next carry no terminal control sequences."""
    server, client = start_paired(fake_server, piped, "WRITE")
    client.type("next\n")
    assert server.hear() == "next"
    server.say("WAIT \x1b[2Jcleared")
    client.out.wait_for(r"^\[WAIT\] cleared$")
    server.say("BYE shutdown SERVER WILL CLOSE NOW")
    assert client.wait() == 0
    assert not any(re.search("\x1b", line) for line in client.out.lines)


def test_interactive_next_drops_held_lines_and_prompts_for_the_new_partner(fake_server, tty_client):
    child = tty_client(fake_server.getsockname()[1], "bob")
    server = Scripted(accept_named(fake_server))
    server.say("WAIT waiting for a partner", "PAIRED alice", "TURN READ")
    child.expect_exact("[READ] waiting for alice")
    child.send("meant for alice\r")
    child.expect_exact("[HELD]")
    child.send("next\r")
    child.expect_exact("[HELD] 1 unsent line dropped: alice is gone")
    child.expect_exact("[NEXT] leaving alice for a new partner")
    assert server.hear() == "next"  # at once, off turn; the held line never goes
    server.say("WAIT looking for a new partner")
    child.expect_exact("[WAIT] looking for a new partner")
    assert "bob>" not in child.before
    server.say("PAIRED carol", "TURN WRITE")
    child.expect_exact("[PAIRED] you are chatting with carol")
    child.expect_exact("bob>")
    child.send("hi carol\r")
    assert server.hear() == "hi carol"
    server.say("TURN READ", "BYE partner-exit carol left the chat")
    child.expect(BYE_RE)
    assert child.match.group("reason") == "partner-exit"
    assert finish_tty(child) == 0
