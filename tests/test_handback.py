"""Unit tests of the hand-back channel (``forkchat/handback.py``) over a real
``socketpair(AF_UNIX)``: records and descriptors go across, come out equal and paired
right, whatever the reads cut; the parent's reader never blocks; a message cut short
gives its descriptor back.
"""

from __future__ import annotations

import json
import os
import resource
import select
import socket
import threading

import pytest

from forkchat.conn import Conn
from forkchat.handback import (
    HEADER,
    ChannelReader,
    HandBack,
    encode,
    from_json,
    restore_conn,
    send_handback,
    snapshot,
    to_json,
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
    kw["inbox"] = tuple(kw.get("inbox", ()))
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


def test_too_long_lines_survive_the_trip(channel):
    """A line too long stands as None in the record (JSON has no marker) and comes back
    as the TOO_LONG marker itself."""
    one, other = channel
    conn = Conn(one, "127.0.0.1:1")
    conn.inbox.extend([b"first", TOO_LONG, b"", b"\xff\xfe", TOO_LONG])
    sent = snapshot(conn)
    assert sent.inbox == (b"first", None, b"", b"\xff\xfe", None)
    got = from_json(json.loads(json.dumps(to_json(sent))))
    assert got == sent
    back = Conn(other, "127.0.0.1:2")
    restore_conn(back, got)
    assert list(back.inbox) == [b"first", TOO_LONG, b"", b"\xff\xfe", TOO_LONG]
    assert back.inbox[1] is TOO_LONG and back.inbox[4] is TOO_LONG
    assert all(isinstance(x, TooLong) == (x is TOO_LONG) for x in back.inbox)


def test_a_record_from_another_version_keeps_what_both_know():
    """A newer room may add fields, an older one may lack some: the record is data."""
    data = to_json(record(3, out=b"TURN READ\n"))
    data["colour"] = "blue"  # a field this version does not know
    del data["discarding"]  # one the sender did not have
    got = from_json(json.loads(json.dumps(data)))
    assert got == record(3, out=b"TURN READ\n")


def test_too_long_lines_cross_the_channel(channel):
    worker, parent = channel
    r, w = os.pipe()
    try:
        sent = record(5, inbox=[None, b"after"])
        send_handback(worker, sent, r)
        [(got, fd)], _ = read_now(ChannelReader(parent))
        os.close(fd)
        assert got.inbox == (None, b"after")
    finally:
        os.close(r)
        os.close(w)


def lowest_free_fd() -> int:
    fd = os.open(os.devnull, os.O_RDONLY)
    os.close(fd)
    return fd


def test_a_descriptor_lost_to_the_fd_limit_is_never_matched_with_the_next_record(channel):
    """The parent at its fd limit: the first record's descriptor cannot be installed
    (MSG_CTRUNC) and is lost. That record comes out with None, and the next record,
    read once fds are free again, with its own descriptor, not the lost one's."""
    worker, parent = channel
    pipes = [os.pipe() for _ in range(2)]
    reader = ChannelReader(parent)
    try:
        send_handback(worker, record(1), pipes[0][0])
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free_fd(), hard))
        try:
            first = read_now(reader)
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        assert first == ([(record(1), None)], False)
        send_handback(worker, record(2), pipes[1][0])
        [(got, fd)], closed = read_now(reader)
        assert got == record(2) and not closed
        assert same_file(fd, pipes[1][0])
        os.close(fd)
    finally:
        for r, w in pipes:
            os.close(r)
            os.close(w)


def test_a_record_that_cannot_be_read_comes_out_as_none_with_its_fd(channel):
    worker, parent = channel
    r, w = os.pipe()
    try:
        body = b"{not json"
        socket.send_fds(worker, [HEADER.pack(len(body)) + body], [r])
        send_handback(worker, record(2), w)
        records, _ = read_now(ChannelReader(parent))
        assert [rec for rec, _ in records] == [None, record(2)]
        assert same_file(records[0][1], r) and same_file(records[1][1], w)
        for _, fd in records:
            os.close(fd)
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
