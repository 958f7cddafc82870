"""bin/client on a terminal (prompt_toolkit), driven as a person drives it: keys into a
pseudo-terminal (pexpect), lines out to a scripted server or a real one.

What the keys do is checked by what the server receives, not by the drawing.
Every process is reaped by PID; every wait has a deadline.
"""

from __future__ import annotations

import os
import signal
import socket
import termios
import time

import psutil
import pytest
from test_client import BYE_RE, accept_named, finish_tty, tty_client
from test_client_next import Scripted

from support import DEADLINE, ServerProc, wait_until

__all__ = ["tty_client"]  # a fixture used here

LEFT, RIGHT, UP, DOWN = "\x1b[D", "\x1b[C", "\x1b[A", "\x1b[B"
HOME, END = "\x1b[H", "\x1b[F"
ALT_B, ALT_F, ALT_D = "\x1bb", "\x1bf", "\x1bd"
CTRL_A, CTRL_E, CTRL_U, CTRL_W = "\x01", "\x05", "\x15", "\x17"


@pytest.fixture
def fake_server():
    """A listening loopback socket the test drives by hand, as the server would talk."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(DEADLINE)
    yield listener
    listener.close()


@pytest.fixture
def chat(fake_server, tty_client):
    """bob on a terminal, in a room with alice (a scripted server): (child, server),
    once bob's prompt says it is his turn."""
    child = tty_client(fake_server.getsockname()[1], "bob")
    server = Scripted(accept_named(fake_server))
    server.say("WAIT waiting for a partner", "PAIRED alice", "TURN WRITE")
    child.expect_exact("[WRITE] your turn to write")
    child.expect_exact("bob>")
    return child, server


def send_keys(child, server: Scripted, keys: str) -> str:
    """Type ``keys`` and Enter on our turn; return the line the server got, and give
    the turn back (alice answers)."""
    child.send(keys + "\r")
    heard = server.hear()
    server.say("TURN READ", "MSG ok", "TURN WRITE")
    child.expect_exact("alice: ok")
    child.expect_exact("[WRITE] your turn to write")
    return heard


def quit_chat(child, server: Scripted) -> int:
    """/quit: the client sends exit, gets its BYE, and ends; its exit status."""
    child.send("/quit\r")
    assert server.hear() == "exit"
    server.say("BYE exit goodbye")
    child.expect(BYE_RE)
    return finish_tty(child)


# ---------------------------------------------------------------- the line editor


def test_editing_keys_change_the_line_that_is_sent(chat):
    child, server = chat
    cases = [
        ("abc" + LEFT + LEFT + "X", "aXbc"),
        ("bc" + HOME + "a" + END + "d", "abcd"),
        ("bc" + CTRL_A + "a" + CTRL_E + "d", "abcd"),
        ("abc" + LEFT + LEFT + RIGHT + "X", "abXc"),
        ("one two three" + CTRL_W + "four", "one two four"),
        ("one two" + ALT_B + "X", "one Xtwo"),
        ("one two" + HOME + ALT_F + "X", "oneX two"),
        ("one two" + HOME + ALT_D + "zero", "zero two"),
        ("drop this" + CTRL_U + "kept", "kept"),
        ("abcd\x7f\x7fX", "abX"),
    ]
    for keys, sent in cases:
        assert send_keys(child, server, keys) == sent, repr(keys)
    assert quit_chat(child, server) == 0


def test_up_and_down_walk_the_lines_typed(chat):
    child, server = chat
    assert send_keys(child, server, "first line") == "first line"
    assert send_keys(child, server, "second line") == "second line"
    assert send_keys(child, server, UP) == "second line"
    assert send_keys(child, server, UP + UP + UP + " again") == "first line again"
    assert send_keys(child, server, UP + UP + DOWN + "!") == "first line again!"
    assert quit_chat(child, server) == 0


def test_wide_characters_are_edited_as_characters(chat):
    child, server = chat
    assert send_keys(child, server, "中文" + LEFT + "X") == "中X文"
    assert send_keys(child, server, "日本語" + LEFT + LEFT + "\x7f" + END + "!") == "本語!"
    server.say("TURN READ", "MSG 你好 wide", "TURN WRITE")
    child.expect_exact("alice: 你好 wide")
    assert quit_chat(child, server) == 0


def test_a_message_mid_typing_leaves_the_half_typed_line_intact(chat):
    child, server = chat
    child.send("my turn\r")
    assert server.hear() == "my turn"
    server.say("TURN READ")
    child.expect_exact("(alice writes)")  # the prompt says whose turn it is
    child.send("half " + LEFT + "-")  # typed while alice writes: held in the editor
    child.expect_exact("half-")
    server.say("MSG a message while you type", "TURN WRITE")
    child.expect_exact("alice: a message while you type")
    child.expect_exact("bob>")
    child.send(END + "typed\r")
    assert server.hear() == "half- typed"
    server.say("TURN READ")
    assert quit_chat(child, server) == 0


def test_a_resize_keeps_the_line(chat):
    child, server = chat
    long_text = "a long line that wraps once the terminal is narrow " * 2
    child.send(long_text)
    child.setwinsize(12, 30)
    child.send("end")
    child.setwinsize(30, 100)
    child.send("\r")
    assert server.hear() == long_text + "end"
    server.say("TURN READ")
    assert quit_chat(child, server) == 0


def test_ctrl_z_suspends_and_gives_the_terminal_back(chat):
    child, server = chat
    client = child.client()
    assert not termios_lflag(child) & termios.ECHO  # the prompt runs the terminal raw
    child.send("half")
    child.expect_exact("half")
    child.send("\x1a")  # Ctrl-Z: the whole foreground group stops, as in a shell
    wait_until(lambda: client.status() == psutil.STATUS_STOPPED, what="client stopped")
    assert termios_lflag(child) & termios.ECHO  # the terminal was given back as it was
    os.killpg(client.pid, signal.SIGCONT)  # fg: the client leads its process group
    wait_until(lambda: not termios_lflag(child) & termios.ECHO, what="prompt back in raw mode")
    child.send(" done\r")
    assert server.hear() == "half done"
    server.say("TURN READ")
    assert quit_chat(child, server) == 0


def termios_lflag(child) -> int:
    """The local mode flags of the child's terminal (read through the pty's master)."""
    return termios.tcgetattr(child.child_fd)[3]


# ---------------------------------------------------------------- what a person sees


def test_the_hint_and_the_status_bar_say_where_you_are(fake_server, tty_client):
    port = fake_server.getsockname()[1]
    child = tty_client(port, "bob")
    server = Scripted(accept_named(fake_server))
    child.expect_exact("/next for a new partner, /quit to leave, /help for more.")
    # After each notice the prompt is drawn again, then the status bar below it.
    server.say("WAIT 2 others are waiting")
    child.expect_exact("[WAIT] 2 others are waiting\r\n")
    child.expect_exact("(no partner yet)")
    child.expect_exact(f"bob @ 127.0.0.1:{port} | waiting: 2 others are waiting | /help")
    server.say("PAIRED alice", "TURN READ")
    child.expect_exact("[READ] waiting for alice\r\n")
    child.expect_exact("(alice writes)")
    child.expect_exact("| chatting with alice, alice is writing |")
    server.say("MSG hi", "TURN WRITE")
    child.expect_exact("[WRITE] your turn to write\r\n")
    child.expect_exact("bob>")
    child.expect_exact("| chatting with alice, your turn to write |")
    assert quit_chat(child, server) == 0


def test_help_and_unknown_commands_are_answered_and_never_sent(chat):
    child, server = chat
    child.send("/help\r")
    child.expect_exact("[HELP] /next")
    child.expect_exact("[HELP] /quit, /exit")
    child.send("/nick bobby\r")
    child.expect_exact("[?] unknown command /nick: /help lists the commands")
    assert send_keys(child, server, "a real line") == "a real line"  # the first one sent
    assert send_keys(child, server, "//etc/passwd") == "/etc/passwd"
    assert quit_chat(child, server) == 0


def test_slash_next_asks_for_a_new_partner(chat):
    child, server = chat
    child.send("/next\r")
    assert server.hear() == "next"
    child.expect_exact("[NEXT] leaving alice for a new partner")
    server.say("WAIT looking for a new partner", "PAIRED carol", "TURN WRITE")
    child.expect_exact("[PAIRED] you are chatting with carol")
    child.send("hi carol\r")
    assert server.hear() == "hi carol"
    server.say("TURN READ")
    assert quit_chat(child, server) == 0


@pytest.mark.parametrize("command", ["/quit", "/exit"])
def test_slash_quit_and_exit_leave(chat, command):
    child, server = chat
    child.send(command + "\r")
    assert server.hear() == "exit"
    server.say("BYE exit goodbye")
    child.expect_exact("[BYE] goodbye (exit)")
    assert finish_tty(child) == 0


def test_lines_held_for_a_partner_are_dropped_by_any_wait_while_paired(chat):
    child, server = chat
    child.send("to alice\r")
    assert server.hear() == "to alice"
    server.say("TURN READ")
    child.send("held for alice\r")
    child.expect_exact("[HELD] held for alice (goes out when your turn comes)")
    server.say("WAIT a text the client does not parse")
    child.expect_exact("[HELD] 1 unsent line dropped: alice is gone")
    server.say("PAIRED carol", "TURN WRITE")
    child.expect_exact("[PAIRED] you are chatting with carol")
    child.send("hi carol\r")
    assert server.hear() == "hi carol"  # not the line held for alice
    server.say("TURN READ")
    assert quit_chat(child, server) == 0


def test_an_unknown_turn_reaches_the_terminal_without_its_escapes(chat):
    child, server = chat
    server.conn.sendall(b"TURN \x1b]0;pwned\x07\x1b[2JWRITE\x1b[5n\n")
    child.expect_exact("[?] TURN WRITE\r\n")
    for injected in ("\x1b]0;pwned", "\x1b[2J", "\x1b[5n"):
        assert injected not in child.before
    assert quit_chat(child, server) == 0


def test_signals_on_a_terminal(chat):
    child, server = chat
    client = child.client()
    child.send("half typed")
    client.send_signal(signal.SIGUSR2)
    child.expect_exact("[STATUS] bob at 127.0.0.1:")
    child.expect_exact("chatting with alice, your turn to write")
    client.send_signal(signal.SIGTERM)
    child.expect_exact("leaving: received SIGTERM")
    assert server.hear() == "exit"  # the half-typed line is not sent
    server.say("BYE exit goodbye")
    child.expect(BYE_RE)
    assert finish_tty(child) == 0


# ---------------------------------------------------------------- TLS


@pytest.fixture
def tls_server(tls_pair):
    srv = ServerProc("--no-color", "--tls-cert", tls_pair[0], "--tls-key", tls_pair[1])
    yield srv
    srv.stop()


def test_the_tls_line_names_the_version_and_the_verified_name(tls_server, tls_pair, tty_client):
    child = tty_client(tls_server.port, "bob", "--cafile", tls_pair[0])
    child.expect_exact(f"connected to 127.0.0.1:{tls_server.port} as bob")
    child.expect(r"\[TLS\] TLSv1\.[23], certificate verified for 127\.0\.0\.1 against (\S+)\r\n")
    assert child.match.group(1) == tls_pair[0]
    child.expect_exact(f"bob @ 127.0.0.1:{tls_server.port} TLS |")
    child.send("/quit\r")
    child.expect(BYE_RE)
    assert finish_tty(child) == 0


def test_a_plain_client_meeting_a_tls_server_gets_the_hint_in_time(tls_server, tty_client):
    started = time.monotonic()
    child = tty_client(tls_server.port, "bob")
    child.expect_exact("forkchat client: no greeting from the server: is it serving TLS?")
    assert time.monotonic() - started < 5
    child.expect_exact("try --tls or --cafile FILE")
    child.client().send_signal(signal.SIGTERM)  # if the server has not dropped it already
    assert finish_tty(child) in (0, 1)  # 1 if the server dropped it first
