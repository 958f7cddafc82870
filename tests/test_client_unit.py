"""Unit tests of the client's pure parts: sanitising, formatting, arguments, commands."""

from __future__ import annotations

import pytest

from forkchat import __version__, client, commands
from forkchat.chatview import (
    ChatState,
    bye_text,
    connect_error_text,
    dropped_text,
    exit_status_for,
    format_address,
    input_prompt,
    message_text,
    prompt_for,
    sanitize,
    split_input,
    tls_text,
    toolbar_text,
    turn_text,
)
from forkchat.client import (
    Options,
    UsageError,
    parse_args,
    parse_port,
    parse_username,
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


def test_connect_error_text_names_the_port_for_make_run():
    text = connect_error_text("127.0.0.1", 4000, ConnectionRefusedError(111, "Connect call failed"))
    assert text.endswith("Start one with 'make run PORT=4000'.")
    assert "(Connection refused)" in text  # the errno's text, not asyncio's wording
    assert "(timed out)" in connect_error_text("h", 1, TimeoutError())


def test_status_and_message_lines():
    assert turn_text(True, "bob") == "[WRITE] your turn to write"
    assert turn_text(False, "bob") == "[READ] waiting for bob"
    assert message_text("bob", "hi \x1b[2Jthere") == "bob: hi there"
    assert prompt_for("alice") == "alice> "


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
    with pytest.raises(UsageError, match="unexpected argument --nope"):
        parse_args(["--nope"])


def test_main_usage_errors_are_one_line(capsys):
    assert client.main(["--port", "abc"]) == 2
    err = capsys.readouterr().err
    assert err == "forkchat client: --port must be a number, not 'abc'\n"
    assert client.main(["bad name!"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_main_unmatched_arguments_are_one_line(capsys):
    assert client.main(["alice", "--bogus"]) == 2
    assert capsys.readouterr().err == "forkchat client: unexpected argument --bogus\n"
    assert client.main(["two", "words"]) == 2
    assert capsys.readouterr().err == "forkchat client: unexpected argument words\n"
    assert client.main(["-x"]) == 2
    assert capsys.readouterr().err == "forkchat client: unexpected argument -x\n"


# ---------------------------------------------------------------- typed lines


@pytest.mark.parametrize(
    ("text", "action", "rest"),
    [
        ("hello", commands.SEND, "hello"),
        ("  hello there ", commands.SEND, "  hello there "),
        ("exit", commands.LEAVE, ""),
        ("  exit ", commands.LEAVE, ""),
        ("next", commands.NEXT, ""),
        ("/quit", commands.LEAVE, ""),
        ("/exit", commands.LEAVE, ""),
        ("/next", commands.NEXT, ""),
        ("/help", commands.HELP, ""),
        ("/help me", commands.HELP, ""),
        ("/nick bob", commands.UNKNOWN, "/nick"),
        ("/", commands.UNKNOWN, "/"),
        ("//etc/passwd", commands.SEND, "/etc/passwd"),
        ("//quit", commands.SEND, "/quit"),
        ("a /quit", commands.SEND, "a /quit"),
        ("", commands.IGNORE, ""),
        (" \t ", commands.IGNORE, ""),
    ],
)
def test_read_typed(text, action, rest):
    assert commands.read_typed(text) == (action, rest)


# ---------------------------------------------------------------- interactive texts


def test_the_prompt_says_whose_turn_it_is():
    state = ChatState()
    assert input_prompt("bob", state) == "(no partner yet) "
    state.take_wait()
    state.take_paired("alice")
    state.take_turn(write=False)
    assert input_prompt("bob", state) == "(alice writes) "
    state.take_turn(write=True)
    assert input_prompt("bob", state) == "bob> "
    state.send_message()
    assert input_prompt("bob", state) == "(alice writes) "
    state.leaving = True
    assert input_prompt("bob", state) == "(leaving) "


def test_the_toolbar_shows_where_and_the_state():
    state = ChatState()
    state.take_wait()
    text = toolbar_text("bob", "127.0.0.1:1 TLS", state, 0, "2 others are waiting")
    assert text == " bob @ 127.0.0.1:1 TLS | waiting: 2 others are waiting | /help "
    state.take_paired("alice")
    state.take_turn(write=False)
    text = toolbar_text("bob", "h:1", state, 2, "")
    assert text == " bob @ h:1 | chatting with alice, alice is writing | 2 held | /help "


def test_tls_and_dropped_texts():
    assert tls_text("TLSv1.3", "localhost", None) == (
        "[TLS] TLSv1.3, certificate verified for localhost against the system's CAs"
    )
    assert tls_text("TLSv1.2", "h", "ca.pem").endswith("verified for h against ca.pem")
    assert dropped_text(1, "alice") == "[HELD] 1 unsent line dropped: alice is gone"
    assert dropped_text(3, None) == "[HELD] 3 unsent lines dropped"
