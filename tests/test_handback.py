"""Unit tests of the hand-back channel (``forkchat/handback.py``) over a real
``socketpair(AF_UNIX)``: records and descriptors go across, come out equal and paired
right, whatever the reads cut; the parent's reader never blocks; a message cut short
gives its descriptor back.
"""

from __future__ import annotations

import os
import pickle
import select
import socket
import threading

import pytest

from forkchat.handback import (
    HEADER,
    ChannelReader,
    HandBack,
    encode,
    pack_inbox,
    send_handback,
    unpack_inbox,
)
from forkchat.protocol import TOO_LONG, TooLong
from support import DEADLINE

READ_DEADLINE = 2.0  # a read that is not back by then blocked


@pytest.fixture
def channel():
    """(worker end, parent end): the parent's end non-blocking, as the server makes it."""
    worker, parent = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    parent.setblocking(False)
    yield worker, parent
    worker.close()
    parent.close()


@pytest.fixture
def tcp_pair():
    """A real loopback TCP connection: (client end, server end)."""
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname(), timeout=DEADLINE)
    server, _ = listener.accept()
    listener.close()
    server.settimeout(DEADLINE)
    yield client, server
    client.close()
    server.close()


def record(n: int = 1, **kw) -> HandBack:
    fields = {
        "id": n,
        "name": f"user{n}",
        "peer": f"127.0.0.1:{40000 + n}",
        "avoid": n + 100,
        "why": "said next",
        "text": "looking for a new partner",
    }
    return HandBack(**{**fields, **kw})


def read_now(reader: ChannelReader):
    """``reader.read()`` in a thread: fail if it does not come back promptly (it blocked)."""
    result = []
    thread = threading.Thread(target=lambda: result.append(reader.read()), daemon=True)
    thread.start()
    thread.join(READ_DEADLINE)
    assert not thread.is_alive(), "ChannelReader.read() blocked"
    return result[0]


def same_file(fd_a: int, fd_b: int) -> bool:
    a, b = os.fstat(fd_a), os.fstat(fd_b)
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def test_a_record_and_a_tcp_socket_cross_and_the_socket_is_the_same_connection(channel, tcp_pair):
    worker, parent = channel
    client, served = tcp_pair
    sent = record(
        7,
        inbox=[b"hello", None, b""],
        pending=b"unfinish",
        discarding=True,
        out=b"TURN READ\n",
        eof=True,
        why="partner bob left",
    )
    send_handback(worker, sent, served.fileno())
    served.close()  # the worker closes its copy after sending: the connection lives on
    records, closed = read_now(ChannelReader(parent))
    assert not closed
    assert len(records) == 1
    got, fd = records[0]
    assert got == sent
    with socket.socket(fileno=fd) as back:
        back.settimeout(DEADLINE)
        back.sendall(b"WAIT through the passed socket\n")
        assert client.recv(100) == b"WAIT through the passed socket\n"
        client.sendall(b"next\n")
        assert back.recv(100) == b"next\n"
        assert back.getpeername() == client.getsockname()


def test_several_records_back_to_back_come_out_in_order_each_with_its_fd(channel):
    worker, parent = channel
    pipes = [os.pipe() for _ in range(100)]  # more than MAX_FDS_PER_READ
    try:
        sent = [record(i, inbox=[b"x" * i]) for i in range(100)]
        for rec, (r, _w) in zip(sent, pipes, strict=True):
            send_handback(worker, rec, r)
        records, closed = read_now(ChannelReader(parent))
        assert not closed
        assert [rec for rec, _ in records] == sent
        for (_, fd), (r, _w) in zip(records, pipes, strict=True):
            assert fd != r and same_file(fd, r)
            os.close(fd)
    finally:
        for r, w in pipes:
            os.close(r)
            os.close(w)


def test_a_message_read_byte_by_byte_comes_out_whole_once(channel):
    worker, parent = channel
    r, w = os.pipe()
    try:
        sent = record(3, inbox=[b"a", b"b"], out=b"x" * 300)
        data = encode(sent)
        reader = ChannelReader(parent)
        socket.send_fds(worker, [data[:1]], [r])  # the fd travels with the first byte
        assert read_now(reader) == ([], False)
        for i in range(1, len(data) - 1):
            worker.sendall(data[i : i + 1])
            assert read_now(reader) == ([], False), f"a record after {i + 1} bytes"
        worker.sendall(data[-1:])
        records, closed = read_now(reader)
        assert not closed and len(records) == 1
        got, fd = records[0]
        assert got == sent and same_file(fd, r)
        os.close(fd)
        assert reader.leftover_fds() == []
    finally:
        os.close(r)
        os.close(w)


def test_a_record_larger_than_one_read_crosses_while_the_sender_blocks(channel):
    worker, parent = channel
    r, w = os.pipe()
    try:
        sent = record(4, out=os.urandom(1 << 20), inbox=[os.urandom(4096) for _ in range(16)])
        sender = threading.Thread(target=send_handback, args=(worker, sent, r), daemon=True)
        sender.start()
        reader = ChannelReader(parent)
        records = []
        while not records:
            ready, _, _ = select.select([parent], [], [], DEADLINE)
            assert ready, "the record did not arrive"
            records, closed = read_now(reader)
            assert not closed
        sender.join(DEADLINE)
        assert not sender.is_alive()
        got, fd = records[0]
        assert got == sent and same_file(fd, r)
        os.close(fd)
    finally:
        os.close(r)
        os.close(w)


def test_too_long_lines_survive_the_trip():
    inbox = [b"first", TOO_LONG, b"", b"\xff\xfe", TOO_LONG]
    packed = pack_inbox(inbox)
    assert packed == [b"first", None, b"", b"\xff\xfe", None]
    # Through pickle, as on the channel: TOO_LONG is a marker compared by identity.
    back = unpack_inbox(pickle.loads(pickle.dumps(packed)))
    assert back == inbox
    assert back[1] is TOO_LONG and back[4] is TOO_LONG
    assert all(isinstance(x, TooLong) == (x is TOO_LONG) for x in back)


def test_pack_inbox_accepts_bytearrays_and_gives_bytes():
    assert pack_inbox([bytearray(b"abc"), memoryview(b"de")]) == [b"abc", b"de"]
    assert all(type(x) is bytes for x in pack_inbox([bytearray(b"abc")]))


def test_too_long_lines_cross_the_channel(channel):
    worker, parent = channel
    r, w = os.pipe()
    try:
        sent = record(5, inbox=pack_inbox([TOO_LONG, b"after"]))
        send_handback(worker, sent, r)
        [(got, fd)], _ = read_now(ChannelReader(parent))
        os.close(fd)
        assert unpack_inbox(got.inbox) == [TOO_LONG, b"after"]
        assert unpack_inbox(got.inbox)[0] is TOO_LONG
    finally:
        os.close(r)
        os.close(w)


def test_a_partial_message_at_eof_gives_its_fd_back(channel):
    worker, parent = channel
    r, w = os.pipe()
    try:
        whole = record(6)
        data = encode(whole)
        send_handback(worker, whole, r)  # one whole message first
        socket.send_fds(worker, [data[: len(data) // 2]], [w])  # then one cut short
        worker.close()  # the worker is killed here
        reader = ChannelReader(parent)
        records, closed = read_now(reader)
        assert closed
        assert len(records) == 1 and records[0][0] == whole and same_file(records[0][1], r)
        os.close(records[0][1])
        lost = reader.leftover_fds()
        assert len(lost) == 1 and same_file(lost[0], w)
        os.close(lost[0])
        assert reader.leftover_fds() == []  # cleared
        assert read_now(reader) == ([], True)
    finally:
        os.close(r)
        os.close(w)


def test_a_header_alone_at_eof_is_no_record_and_no_fd(channel):
    worker, parent = channel
    worker.sendall(HEADER.pack(50) + b"abc")  # no descriptor came with it
    worker.close()
    reader = ChannelReader(parent)
    assert read_now(reader) == ([], True)
    assert reader.leftover_fds() == []


def test_the_reader_never_blocks_on_an_empty_or_unfinished_channel(channel):
    worker, parent = channel
    r, w = os.pipe()
    try:
        reader = ChannelReader(parent)
        assert read_now(reader) == ([], False)  # nothing there: back at once, still open
        data = encode(record(8))
        socket.send_fds(worker, [data[:-1]], [r])  # all but the last byte
        assert read_now(reader) == ([], False)
        assert read_now(reader) == ([], False)
        worker.sendall(data[-1:])
        [(got, fd)], closed = read_now(reader)
        assert got == record(8) and not closed
        os.close(fd)
    finally:
        os.close(r)
        os.close(w)


def test_sending_to_a_parent_that_is_gone_raises_and_leaves_the_fd_open(channel):
    worker, parent = channel
    parent.close()
    r, w = os.pipe()
    try:
        with pytest.raises(OSError):
            send_handback(worker, record(9), r)
        os.fstat(r)  # still the caller's, still open
    finally:
        os.close(r)
        os.close(w)
