"""Unit tests of the pure protocol parts: framing, validation, the lines."""

import pytest

from forkchat import protocol as p


def test_lines_split_on_lf_and_drop_one_cr():
    r = p.LineReader(100)
    assert r.feed(b"a\nb\r\nc") == [b"a", b"b"]
    assert r.feed(b"\r") == []
    assert r.feed(b"\n") == [b"c"]
    assert r.feed(b"x\r\r\n") == [b"x\r"]  # only the CR right before LF goes


def test_line_split_across_reads_is_whole():
    r = p.LineReader(100)
    assert r.feed(b"hel") == []
    assert r.feed(b"lo wor") == []
    assert r.feed(b"ld\n") == [b"hello world"]


def test_multibyte_character_split_across_reads():
    r = p.LineReader(100)
    data = "héllo €\n".encode()
    out = []
    for i in range(len(data)):
        out += r.feed(data[i : i + 1])
    assert out == ["héllo €".encode()]
    assert p.check_message(out[0]) is None


def test_line_at_the_limit_passes_one_over_is_refused():
    r = p.LineReader(8)
    assert r.feed(b"12345678\n") == [b"12345678"]
    assert r.feed(b"12345678\r\n") == [b"12345678"]
    assert r.feed(b"123456789\n") == [p.TOO_LONG]


def test_too_long_line_is_reported_once_and_never_buffered():
    r = p.LineReader(16)
    out = []
    for _ in range(1000):  # 1 MB with no LF
        out += r.feed(b"x" * 1000)
        assert len(r.pending) <= 17
    assert out == [p.TOO_LONG]
    assert r.feed(b"tail\nnext\n") == [b"next"]


def test_blank_and_exit():
    assert p.is_blank(b"") and p.is_blank(b"  \t ")
    assert not p.is_blank(b" a ")
    assert p.is_exit(b"exit") and p.is_exit(b"  exit\t")
    assert not p.is_exit(b"exit now") and not p.is_exit(b"EXIT")


@pytest.mark.parametrize(
    ("line", "code"),
    [
        (b"hello", None),
        (b"tab\there", None),
        ("ünïcødé ✓".encode(), None),
        (b"\xff\xfe", p.ERR_BAD_ENCODING),
        (b"\xc3", p.ERR_BAD_ENCODING),
        (b"bell\x07", p.ERR_BAD_CHAR),
        (b"esc\x1b[2J", p.ERR_BAD_CHAR),
        (b"del\x7f", p.ERR_BAD_CHAR),
        (b"nul\x00", p.ERR_BAD_CHAR),
        (b"cr\rinside", p.ERR_BAD_CHAR),
    ],
)
def test_check_message(line, code):
    assert p.check_message(line) == code


@pytest.mark.parametrize(
    ("line", "name"),
    [
        (b"alice", "alice"),
        (b"  bob_2.x-y ", "bob_2.x-y"),
        (b"a" * 32, "a" * 32),
        (b"a" * 33, None),
        (b"", None),
        (b"al ice", None),
        ("é".encode(), None),
        (b"bob\x1b", None),
        (b"\xff", None),
    ],
)
def test_parse_name(line, name):
    assert p.parse_name(line) == name


def test_server_lines():
    assert p.paired_line("bob") == b"PAIRED bob\n"
    assert p.turn_line(True) == b"TURN WRITE\n"
    assert p.turn_line(False) == b"TURN READ\n"
    assert p.msg_line(b"hi \xe2\x82\xac") == b"MSG hi \xe2\x82\xac\n"
    assert p.err_line(p.ERR_NOT_YOUR_TURN).startswith(b"ERR not-your-turn ")
    assert p.err_line(p.ERR_TOO_LONG, 99).startswith(b"ERR too-long line longer than 99")
    assert p.bye_line(p.BYE_SHUTDOWN, p.SHUTDOWN_TEXT) == b"BYE shutdown SERVER WILL CLOSE NOW\n"
    assert p.hello_line().startswith(b"HELLO ")
    with pytest.raises(ValueError):
        p.bye_line("nope", "x")


def test_parse_server_line():
    line = p.parse_server_line(b"BYE partner-exit bob left the chat")
    assert (line.keyword, line.arg, line.rest) == ("BYE", "partner-exit", "bob left the chat")
    msg = p.parse_server_line(b"MSG  two  spaces ")
    assert (msg.keyword, msg.arg) == ("MSG", " two  spaces ")
    assert p.parse_server_line(b"\xff\xfe").keyword == "\ufffd\ufffd"


@pytest.mark.parametrize(
    ("line", "my_turn", "verdict"),
    [
        (p.TOO_LONG, True, p.ERR_TOO_LONG),
        (b" exit ", False, p.LEAVE),
        (b" exit ", True, p.LEAVE),
        (b"  ", False, p.IGNORE),
        (b"\xff", True, p.ERR_BAD_ENCODING),
        (b"a\x1bb", False, p.ERR_BAD_CHAR),
        (b"hello", False, p.ERR_NOT_YOUR_TURN),
        (b"hello", True, p.RELAY),
    ],
)
def test_judge_line_applies_the_rules_in_order(line, my_turn, verdict):
    assert p.judge_line(line, my_turn) == verdict


def test_graceful_close_keeps_unsent_output_after_the_peer_half_closes():
    """A client that shut down its sending side still gets its BYE."""
    import selectors
    import socket

    from forkchat.conn import Conn

    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    conn = Conn(ours, "test")
    big = b"x" * (4 << 20)  # more than the socket buffers hold
    conn.out += big + b"BYE exit goodbye\n"
    assert not conn.close_step(0)  # output left
    theirs.shutdown(socket.SHUT_WR)  # the peer says it will send no more
    assert not conn.close_step(selectors.EVENT_READ)  # its EOF alone must not end it
    assert conn.eof and conn.closing_events() == selectors.EVENT_WRITE
    received = bytearray()
    theirs.settimeout(5)
    while not conn.close_step(selectors.EVENT_WRITE):
        received += theirs.recv(1 << 20)
    while chunk := theirs.recv(1 << 20):
        received += chunk
    assert received.endswith(b"BYE exit goodbye\n") and len(received) == len(big) + 17
    ours.close()
    theirs.close()
