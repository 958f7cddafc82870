"""The log's promises on a real pipe: a line is never cut in two writes, a text too long
is cut to one pipe-atomic write that ends in a newline, and lines dropped while the pipe
was full are counted once, before the next line that gets through."""

from __future__ import annotations

import os
import re

import pytest

from forkchat.log import PIPE_BUF, Log, detach_stdout

STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}"


@pytest.fixture
def pipe():
    """(read end, a non-blocking write end as the server makes stdout, its file)."""
    r, w = os.pipe()
    os.set_blocking(w, False)
    stream = os.fdopen(w, "w")
    yield r, w, stream
    os.close(r)
    stream.close()


def read_all(fd: int) -> bytes:
    os.set_blocking(fd, False)
    data = b""
    while True:
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            return data
        if not chunk:
            return data
        data += chunk


def fill(fd: int) -> None:
    """Fill the pipe until a write would block."""
    while True:
        try:
            os.write(fd, b"x" * 4096)
        except BlockingIOError:
            return


def test_a_text_over_pipe_buf_is_one_write_ending_in_a_newline(pipe):
    """A room crashing with a long exception: its line is cut, never split in two
    writes that another process's line could come between."""
    r, _, stream = pipe
    log = Log("room 3 pid 42", stream=stream)
    log.error("room 3 crashed: RuntimeError: " + "x" * 10_000)
    log.event("info", "next line")
    data = read_all(r)
    first, second = data.split(b"\n")[:2]
    assert len(first) + 1 == PIPE_BUF
    assert re.match(rb"^" + STAMP.encode() + rb" \[room 3 pid 42\] room 3 crashed: ", first)
    assert re.match(STAMP.encode() + rb" \[room 3 pid 42\] next line$", second)
    assert data.count(b"\n") == 2


def test_lines_dropped_while_blocked_are_counted_once_before_the_next_line(pipe):
    r, w, stream = pipe
    log = Log("server", stream=stream)
    fill(w)
    for i in range(3):
        log.event("info", f"dropped {i}")
    assert log.dropped == 3
    read_all(r)  # the reader catches up
    log.event("info", "first after")
    log.event("info", "second after")
    lines = read_all(r).decode().splitlines()
    assert len(lines) == 3, lines
    assert re.fullmatch(STAMP + r" \[server\] log output was blocked: 3 lines dropped", lines[0])
    assert lines[1].endswith("] first after")
    assert lines[2].endswith("] second after")
    assert log.dropped == 0


def test_the_dropped_note_and_a_long_line_still_make_one_write(pipe):
    r, w, stream = pipe
    log = Log("server", stream=stream)
    fill(w)
    log.event("info", "lost")
    read_all(r)
    log.event("info", "y" * 8000)
    data = read_all(r)
    assert len(data) == PIPE_BUF and data.endswith(b"\n")
    assert b"log output was blocked: 1 lines dropped\n" in data


def test_detach_stdout_gives_the_server_its_own_non_blocking_pipe_end():
    r, w = os.pipe()
    saved = os.dup(1)
    try:
        os.dup2(w, 1)
        assert detach_stdout() == "reopened"
        assert not os.get_blocking(1)
        assert os.get_blocking(w)  # the shell's end, shared before, is left as it was
    finally:
        os.dup2(saved, 1)
        for fd in (saved, r, w):
            os.close(fd)
