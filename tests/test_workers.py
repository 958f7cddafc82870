"""workers.py's pure parts and its forking, in one process: counts, exit codes."""

from __future__ import annotations

import ctypes
import mmap
import os
import signal

import pytest

from forkchat.children import Worker, exit_code, fork_child
from forkchat.forker import SharedCount
from forkchat.workers import MP, Counts


def test_room_counts_are_values_another_mapping_of_their_arena_can_write():
    counts = Counts(100)
    # The room forker's side: its own mapping of the arena, made from the fd before
    # any room's Value existed, and a SharedCount per room at the Value's offset.
    offsets_r, offsets_w = os.pipe()

    def forker() -> int:
        os.close(offsets_w)
        arena = mmap.mmap(counts.arena.fd, counts.arena.size)
        data = b""
        while chunk := os.read(offsets_r, 4096):
            data += chunk
        for offset in data.split():
            count = SharedCount(arena, int(offset))
            count.value = count.value - 1  # a worker's write: one client left
        return 0

    pid, pidfd = fork_child(forker, ())
    values = [counts.new() for _ in range(100)]
    assert all(value.value == 2 for value in values)
    offsets = [counts.offset_of(value) for value in values]
    assert None not in offsets  # every room's count lies in the arena the forker maps
    assert len(set(offsets)) == 100
    os.write(offsets_w, b" ".join(b"%d" % offset for offset in offsets))
    os.close(offsets_w)
    worker = Worker(pid, pidfd)
    assert worker.join(10) == 0
    worker.close()
    assert [value.value for value in values] == [1] * 100  # seen by the server
    os.close(offsets_r)


def test_a_value_from_elsewhere_is_out_of_reach():
    counts = Counts(10)
    elsewhere = MP.RawArray(ctypes.c_char, 1 << 20)  # too big for the reserved block
    assert counts.offset_of(elsewhere) is None
    assert counts.offset_of(counts.new()) is not None


def test_a_worker_reaped_through_its_pidfd_gives_its_code_and_is_never_signalled_again():
    pid, pidfd = fork_child(lambda: signal.pause() or 0, ())
    worker = Worker(pid, pidfd)
    assert worker.poll() is None
    worker.kill()
    assert worker.join(10) == -signal.SIGKILL
    worker.signal(signal.SIGTERM)  # reaped: a no-op, whoever has the PID now
    worker.close()
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


@pytest.mark.parametrize(("code", "status"), [(0, 0), (3, 3)])
def test_exit_code_of_a_normal_exit(code, status):
    _, pidfd = fork_child(lambda: code, ())
    result = os.waitid(os.P_PIDFD, pidfd, os.WEXITED)
    os.close(pidfd)
    assert exit_code(result) == status
