"""workers.py's pure parts and its forking, in one process: count slots, exit codes."""

from __future__ import annotations

import os
import signal

import pytest

from forkchat.workers import CountSlots, Worker, WorkerError, exit_code, fork_child


def test_slots_start_at_two_are_shared_with_a_child_and_come_back():
    slots = CountSlots(2)
    first, second = slots.take(), slots.take()
    assert (first, second) == (0, 1)
    assert slots.array[first] == slots.array[second] == 2
    with pytest.raises(WorkerError, match="no free room slot"):
        slots.take()
    count = slots.count(second)
    pid, pidfd = fork_child(lambda: (setattr(count, "value", 1), 0)[1], ())
    worker = Worker(pid, pidfd)
    assert worker.join(10) == 0
    worker.close()
    assert slots.array[second] == 1  # the child's write, seen by the parent
    assert slots.array[first] == 2
    slots.release(second)
    assert slots.array[second] == 0
    assert slots.take() == second


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
