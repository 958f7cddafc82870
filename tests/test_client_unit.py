"""Unit tests of the client's pure parts: sanitising, formatting, arguments, line editing."""

from __future__ import annotations

import os
import pty
import termios

import pytest
from docopt import DocoptExit

from forkchat import __version__, client
from forkchat.chatview import (
    bye_text,
    connect_error_text,
    exit_status_for,
    format_address,
    message_text,
    sanitize,
    split_input,
    turn_text,
)
from forkchat.client import (
    Options,
    UsageError,
    parse_args,
    parse_port,
    parse_username,
)
from forkchat.lineedit import (
    Edited,
    EndOfInput,
    LineEditor,
    RawTerminal,
    Submit,
    cbreak_attrs,
    cursor_row,
    display_width,
)

# ---------------------------------------------------------------- sanitize


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("hello", "hello"),
        ("tab\there", "tab\there"),
        ("\x1b[2J", ""),
        ("\x1b[31mred\x1b[0m", "red"),
        ("\x1b[1;31;42mx", "x"),
        ("\x1b[?1049h", ""),
        ("\x1b]0;title\x07after", "after"),
        ("\x1b]0;title\x1b\\after", "after"),
        ("\x1b]8;;http://evil/\x1b\\link\x1b]8;;\x1b\\", "link"),
        ("\x1b]0;never terminated", ""),
        ("\x1bP1$r\x1b\\x", "x"),
        ("\x1b_apc\x1b\\x", "x"),
        ("\x1bc", ""),
        ("\x1b(0", ""),
        ("\x9b2J", ""),
        ("\x9b31mred", "red"),
        ("\x9d0;t\x9cok", "ok"),
        ("over\rwrite", "over^Mwrite"),
        ("bell\x07", "bell^G"),
        ("nul\x00", "nul^@"),
        ("back\x08space", "back^Hspace"),
        ("del\x7f", "del^?"),
        ("nel\x85x", "nel\\x85x"),
        ("lone\x1b", "lone^["),
        ("a\u202eevil\u202cb", "aevilb"),
        ("\u2066iso\u2069\u200f", "iso"),
        ("caf\u00e9 \u4e2d\u6587 \U0001f600", "caf\u00e9 \u4e2d\u6587 \U0001f600"),
        ("bad \ufffd byte", "bad \ufffd byte"),
    ],
)
def test_sanitize(raw, shown):
    assert sanitize(raw) == shown


def test_sanitize_never_leaves_a_control_character():
    every = "".join(chr(c) for c in range(0x00, 0xA0)) + "text"
    out = sanitize(every)
    assert not any((ord(ch) < 0x20 and ch != "\t") or 0x7F <= ord(ch) <= 0x9F for ch in out)


def test_sanitize_combined_injection():
    out = sanitize("\x1b]0;pwned\x07\x1b[2J\x1b[H\x9b6n\rgotcha")
    assert "\x1b" not in out and "\r" not in out and "\x9b" not in out
    assert out == "^Mgotcha"


# ---------------------------------------------------------------- formatting


def test_format_address():
    assert format_address("127.0.0.1", 33016) == "127.0.0.1:33016"
    assert format_address("::1", 80) == "[::1]:80"


def test_connect_error_text_is_one_line_naming_address_and_make_run():
    text = connect_error_text("127.0.0.1", 33016, ConnectionRefusedError(111, "Connection refused"))
    assert text == (
        "cannot connect to 127.0.0.1:33016 (Connection refused); "
        "is the server running? Start one with 'make run'."
    )
    assert "\n" not in connect_error_text("h", 1, OSError("x"))


def test_status_and_message_lines():
    assert turn_text(True, "bob") == "[WRITE] your turn to write"
    assert turn_text(False, "bob") == "[READ] waiting for bob"
    assert message_text("bob", "hi \x1b[2Jthere") == "bob: hi there"
    assert client.prompt_for("alice") == "alice> "


def test_bye_text_and_exit_status():
    assert bye_text("shutdown", "SERVER WILL CLOSE NOW") == "[BYE] SERVER WILL CLOSE NOW (shutdown)"
    assert bye_text("exit", "") == "[BYE] (exit)"
    assert "\x1b" not in bye_text("error", "\x1b[2Jboom")
    for reason in ("exit", "partner-exit", "partner-lost", "shutdown", "timeout"):
        assert exit_status_for(reason) == 0
    for reason in ("bad-name", "full", "error", "something-new"):
        assert exit_status_for(reason) == 1


@pytest.mark.parametrize(
    ("buffer", "eof", "lines", "rest"),
    [
        (b"hello\n", False, [b"hello"], b""),
        (b"a\r\nb\npart", False, [b"a", b"b"], b"part"),
        (b"a\n\n  \n\t\nb\n", False, [b"a", b"b"], b""),
        (b"part", True, [b"part"], b""),
        (b"", True, [], b""),
        (b"x\n  ", True, [b"x"], b""),
        (b"caf\xc3\xa9\n", False, [b"caf\xc3\xa9"], b""),
    ],
)
def test_split_input(buffer, eof, lines, rest):
    assert split_input(buffer, eof) == (lines, rest)


# ---------------------------------------------------------------- arguments


def test_parse_args_defaults():
    assert parse_args([]) == Options(name="client", host="127.0.0.1", port=33016)


def test_parse_args_all():
    got = parse_args(["bob", "--host", "::1", "--port", "4000"])
    assert got == Options(name="bob", host="::1", port=4000)


@pytest.mark.parametrize("text", ["abc", "70000", "0", "-1", "", "1.5"])
def test_bad_port(text):
    with pytest.raises(UsageError, match="--port must be"):
        parse_port(text)


@pytest.mark.parametrize("text", ["a b", "", "x" * 33, "caf\u00e9", "a;b", "\udcff"])
def test_bad_name(text):
    with pytest.raises(UsageError, match="bad user name"):
        parse_username(text)


def test_good_names():
    assert parse_username("a") == "a"
    assert parse_username("Bob_2.x-y") == "Bob_2.x-y"
    assert parse_username("x" * 32) == "x" * 32


def test_version_and_usage_errors(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--version"])
    assert __version__ in capsys.readouterr().out
    with pytest.raises(DocoptExit):
        parse_args(["--nope"])


def test_main_usage_errors_are_one_line(capsys):
    assert client.main(["--port", "abc"]) == 2
    err = capsys.readouterr().err
    assert err == "forkchat client: --port must be a number, not 'abc'\n"
    assert client.main(["bad name!"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


# ---------------------------------------------------------------- line editor


def test_editor_typing_and_enter():
    ed = LineEditor()
    assert ed.feed(b"hel") == [Edited()]
    assert ed.text == "hel"
    assert ed.feed(b"lo\r") == [Edited(), Submit("hello")]
    assert ed.text == ""
    assert ed.feed(b"a\nb\n") == [Edited(), Submit("a"), Edited(), Submit("b")]


def test_editor_backspace_kill_line_kill_word():
    ed = LineEditor()
    ed.feed(b"hello world")
    ed.feed(b"\x7f")
    assert ed.text == "hello worl"
    ed.feed(b"\x08")
    assert ed.text == "hello wor"
    ed.feed(b"\x17")
    assert ed.text == "hello "
    ed.feed(b"\x15")
    assert ed.text == ""
    assert ed.feed(b"\x7f") == []  # nothing to delete, nothing to redraw


def test_editor_ctrl_d_only_on_empty_line():
    ed = LineEditor()
    assert ed.feed(b"\x04") == [EndOfInput()]
    ed.feed(b"x")
    assert ed.feed(b"\x04") == []
    assert ed.text == "x"


def test_editor_utf8_split_across_chunks():
    ed = LineEditor()
    data = "caf\u00e9 \u4e2d".encode()
    for i in range(len(data)):
        ed.feed(data[i : i + 1])
    assert ed.text == "caf\u00e9 \u4e2d"
    ed.feed(b"\x7f")
    assert ed.text == "caf\u00e9 "


def test_editor_ignores_escape_sequences_and_controls():
    ed = LineEditor()
    ed.feed(b"a\x1b[Ab\x1b[1;5Cc\x1bOPd\x1bxe\x01\x02\tf")
    assert ed.text == "abcdef"
    ed.feed(b"\x1b[")  # split arrow key
    ed.feed(b"Dg")
    assert ed.text == "abcdefg"
    ed.feed(b"\x1b")  # the Escape key alone
    ed.feed(b"h")
    assert ed.text == "abcdefgh"


def test_display_width_and_cursor_row():
    assert display_width("abc") == 3
    assert display_width("\u4e2d\u6587") == 4
    assert display_width("e\u0301") == 1
    assert cursor_row(0, 80) == 0
    assert cursor_row(79, 80) == 0
    assert cursor_row(80, 80) == 0  # pending wrap: still on the first row
    assert cursor_row(81, 80) == 1
    assert cursor_row(160, 80) == 1
    assert cursor_row(161, 80) == 2


def test_cbreak_attrs_keep_isig_and_drop_echo():
    attrs = [0, 0, 0, termios.ECHO | termios.ICANON | termios.IEXTEN, 0, 0, [b"\0"] * 32]
    new = cbreak_attrs(attrs)
    assert new[3] & termios.ISIG
    assert not new[3] & (termios.ECHO | termios.ICANON | termios.IEXTEN)
    assert new[6][termios.VMIN] == 1 and new[6][termios.VTIME] == 0
    assert attrs[3] == termios.ECHO | termios.ICANON | termios.IEXTEN  # input untouched


def test_raw_terminal_restores_settings():
    leader, follower = pty.openpty()
    try:
        before = termios.tcgetattr(follower)
        with RawTerminal(follower):
            during = termios.tcgetattr(follower)
            assert not during[3] & termios.ECHO
            assert during[3] & termios.ISIG
        assert termios.tcgetattr(follower) == before
    finally:
        os.close(leader)
        os.close(follower)
