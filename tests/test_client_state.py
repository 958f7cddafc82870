"""Unit tests of the client's session state (protocol 1.1: next, WAIT in a room), its
status text, and the pure parts of --tls, SIGUSR2 and the line limit."""

from __future__ import annotations

import signal
import ssl

import pytest

from forkchat import client, protocol, session
from forkchat.chatview import (
    ASKED_NEXT,
    CONNECTING,
    PAIRED,
    WAITING,
    ChatState,
    handshake_error_text,
    status_text,
    verify_error_text,
)
from forkchat.client import (
    Options,
    UsageError,
    make_tls_context,
    parse_args,
)
from forkchat.protocol import is_next


def paired(write: bool = True, partner: str = "bob") -> ChatState:
    state = ChatState()
    state.take_wait()
    state.take_paired(partner)
    state.take_turn(write)
    return state


# ---------------------------------------------------------------- state transitions


def test_a_session_starts_connecting_then_waits_then_is_paired():
    state = ChatState()
    assert (state.phase, state.can_write()) == (CONNECTING, False)
    state.take_wait()
    assert (state.phase, state.can_write()) == (WAITING, False)
    state.take_paired("bob")
    assert (state.phase, state.partner, state.can_write()) == (PAIRED, "bob", False)
    assert state.take_turn(write=True) and state.can_write()


def test_a_message_passes_the_turn_and_err_gives_it_back():
    state = paired(write=True)
    state.send_message()
    assert not state.can_write() and state.my_turn
    assert state.take_err() and state.can_write()
    state.send_message()
    assert state.take_turn(write=False) and not state.can_write()
    assert not state.take_err()  # an ERR off our turn gives nothing back


def test_next_leaves_the_room_and_stale_turns_are_ignored():
    state = paired(write=False)
    state.ask_next()
    assert (state.phase, state.can_write()) == (ASKED_NEXT, False)
    assert not state.take_turn(write=True)  # the old room's TURN WRITE, still in flight
    assert not state.can_write() and not state.take_err()
    assert state.take_wait() is False  # the WAIT that answers our next: dropped already
    state.take_paired("carol")
    assert state.take_turn(write=True) and state.can_write() and state.partner == "carol"


def test_wait_in_a_room_takes_the_turn_away():
    """The partner left under --requeue: WAIT, and the session goes on."""
    state = paired(write=True)
    assert state.take_wait() is True  # the partner is gone
    assert (state.phase, state.can_write(), state.partner) == (WAITING, False, "bob")
    assert state.take_wait() is False  # waiting already: nobody left
    state.take_paired("dave")
    state.take_turn(write=False)
    assert state.phase == PAIRED and not state.can_write()


def test_leaving_blocks_writing_whatever_the_turn():
    state = paired(write=True)
    state.leaving = True
    assert not state.can_write()


@pytest.mark.parametrize(
    ("state", "text"),
    [
        (ChatState(), "name sent, waiting for the server's answer"),
        (ChatState(phase=WAITING), "waiting for a partner"),
        (paired(write=True), "chatting with bob, your turn to write"),
        (paired(write=False), "chatting with bob, bob is writing"),
        (
            ChatState(PAIRED, "bob", my_turn=True, sent=True),
            "chatting with bob, your message is on its way",
        ),
        (ChatState(ASKED_NEXT, "bob"), "left bob, asking for a new partner"),
        (ChatState(PAIRED, "bob", leaving=True), "leaving"),
    ],
)
def test_status_text(state, text):
    assert status_text(state) == text


@pytest.mark.parametrize(
    ("line", "is_it"),
    [(b"next", True), (b"  next \t", True), (b"next!", False), (b"Next", False), (b"nex", False)],
)
def test_is_next(line, is_it):
    assert is_next(line) is is_it


# ---------------------------------------------------------------- limits and signals


def test_the_client_takes_a_msg_of_the_largest_max_line():
    largest = protocol.msg_line(b"x" * session.MAX_LINE_LIMIT)
    reader = protocol.LineReader(session.SERVER_LINE_MAX)
    assert reader.feed(largest) == [largest[:-1]]


def test_sigusr2_is_caught_not_a_leave_signal():
    assert client.STATUS_SIGNAL == signal.SIGUSR2
    assert signal.SIGUSR2 not in client.LEAVE_SIGNALS


# ---------------------------------------------------------------- TLS


def test_tls_options():
    assert parse_args(["--tls"]) == Options("client", "127.0.0.1", 33016, tls=True)
    got = parse_args(["bob", "--cafile", "ca.pem"])
    assert got == Options("bob", "127.0.0.1", 33016, tls=True, cafile="ca.pem")
    assert parse_args([]).tls is False


def test_tls_context_verifies_and_refuses_old_versions():
    context = make_tls_context(None)
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2


def test_unreadable_cafile_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match=r"--cafile .*missing\.pem: cannot load CA"):
        make_tls_context(str(tmp_path / "missing.pem"))
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(UsageError, match="cannot load CA certificates"):
        make_tls_context(str(junk))


def test_tls_error_lines_name_the_address_and_the_way_out():
    text = verify_error_text("127.0.0.1", 33016, "self-signed certificate")
    assert text == (
        "cannot verify the server's certificate at 127.0.0.1:33016: self-signed certificate; "
        "use --cafile FILE for a private CA or self-signed certificate"
    )
    assert "[::1]:4000" in handshake_error_text("::1", 4000, "wrong version number")
