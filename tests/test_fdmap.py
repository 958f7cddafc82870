"""Unit tests of the parent's fd map: what a new worker closes, and what it keeps."""

import os

from forkchat.fdmap import FdMap


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_close_all_closes_marked_fds_in_runs_and_keeps_the_rest():
    pipes = [os.pipe() for _ in range(6)]
    fds = [fd for pair in pipes for fd in pair]
    fdmap = FdMap()
    marked, unmarked = fds[:9], fds[9:]
    for fd in marked:
        fdmap.own(fd)
    keep = [marked[2], marked[5]]
    try:
        fdmap.close_all(keep=keep)
        assert [fd for fd in marked if is_open(fd)] == keep
        assert all(is_open(fd) for fd in unmarked)
    finally:
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass


def test_disowned_fds_are_left_open_and_the_map_grows():
    fdmap = FdMap()
    fdmap.own(3000)
    fdmap.own(7)
    fdmap.disown(7)
    fdmap.disown(99999)  # never owned: no error
    assert [fd for fd, mark in enumerate(fdmap.marks) if mark] == [3000]
    fdmap = FdMap()
    r, w = os.pipe()
    try:
        fdmap.own(r)
        fdmap.disown(r)
        fdmap.close_all()
        assert is_open(r) and is_open(w)
    finally:
        os.close(r)
        os.close(w)
