"""A child process, forked and watched through a pidfd: the one way forkchat starts
and watches its processes (room workers, and the room forker's own).

A pidfd is a file descriptor the kernel makes readable when that one process exits:
the sentinel a selector waits on. Signals go through it (``pidfd_send_signal``: never
to another process that reused the PID), and a parent reaps its own child through it
(``waitid(P_PIDFD)``). This module imports nothing heavy: the room forker
(``forker.py``) uses it too, and whatever a module imports, each room forked after it
pays for (its at-fork hooks run in every child, and its objects are paged in).
"""

from __future__ import annotations

# signal's C half. signal.pthread_sigmask() and signal.signal() wrap these functions to
# turn their answers into enums; in the forker, on every fork, and in every new worker,
# that enum machinery would write to (and copy) some thirty pages of inherited memory.
# Where the answer is an int or unused, forkchat calls the C functions directly.
import _signal
import gc
import os
import select
import signal
from collections.abc import Callable

from .room import EXIT_CRASH, PARENT_SIGNALS


class WorkerError(Exception):
    """A room worker cannot be started now (out of fds, processes or memory)."""


class Worker:
    """A room worker as the server sees it: PID, sentinel (a pidfd), exit code.

    The server's own child is reaped through its pidfd and gets its exit code. A worker
    the room forker forked is reaped, and its ending logged, by the forker: the server
    learns only that it exited (its pidfd is readable), and records exit code 0. Should
    the forker die first, the worker becomes the server's child (the server is a
    subreaper): reaped here through its pidfd if still watched, else by the server's
    ``reap_strays``.
    """

    __slots__ = ("exitcode", "pid", "sentinel")

    def __init__(self, pid: int, sentinel: int) -> None:
        self.pid = pid
        self.sentinel = sentinel  # readable once the worker has exited
        self.exitcode: int | None = None  # as multiprocessing: -N for signal N

    def poll(self) -> int | None:
        """Reap the worker if it has exited (never blocks); its exit code or None.

        Once this returns a code the worker is gone: signal it only while it is None."""
        if self.exitcode is None:
            try:
                result = os.waitid(os.P_PIDFD, self.sentinel, os.WEXITED | os.WNOHANG)
            except ChildProcessError:  # the forker's child: it reaps, and logs how it ended
                if is_readable(self.sentinel):
                    self.exitcode = 0
            else:
                if result is not None:
                    self.exitcode = exit_code(result)
        return self.exitcode

    def join(self, timeout: float | None = None) -> int | None:
        """Wait up to ``timeout`` seconds (None: for ever) for the exit, then reap."""
        if self.exitcode is None:
            is_readable(self.sentinel, timeout)
        return self.poll()

    def signal(self, signum: int) -> None:
        """Send ``signum`` through the pidfd, if the worker has not exited."""
        if self.poll() is None:
            try:
                signal.pidfd_send_signal(self.sentinel, signum)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        """SIGKILL, if not exited yet."""
        self.signal(signal.SIGKILL)

    def close(self) -> None:
        """Release the sentinel (after the reap)."""
        os.close(self.sentinel)


def own_children() -> list[int]:
    """This process's children, by PID, from /proc (its main thread's list)."""
    pid = os.getpid()
    try:
        with open(f"/proc/{pid}/task/{pid}/children", "rb") as f:
            return [int(word) for word in f.read().split()]
    except OSError:
        return []


def is_readable(fd: int, timeout: float | None = 0) -> bool:
    """Whether ``fd`` is readable within ``timeout`` seconds (None: wait for ever).
    (poll(2), not select(2): the fd's number may be past 1023.)"""
    waiter = select.poll()
    waiter.register(fd, select.POLLIN)
    return bool(waiter.poll(None if timeout is None else max(0, int(timeout * 1000))))


def exit_code(result: os.waitid_result) -> int:
    """A waitid result as an exit code: the status, or -N for a signal N."""
    if result.si_code == os.CLD_EXITED:
        return result.si_status
    return -result.si_status


def fork_child(target: Callable[..., int], args: tuple) -> tuple[int, int]:
    """Fork a child that runs ``target(*args)`` and exits with its return value.
    Returns (pid, pidfd). Raises WorkerError if it cannot be done now; a child that was
    forked but cannot be watched (out of fds) is killed and reaped.

    Signals are blocked around the fork so none lands in a half-made child, and the
    heap is frozen so the child's gc never touches (and copies) the parent's objects.
    """
    old = _signal.pthread_sigmask(signal.SIG_BLOCK, PARENT_SIGNALS)  # see the import
    gc.freeze()
    try:
        pid = os.fork()
        if pid == 0:
            run_child(target, args)  # never returns
    except OSError as exc:
        raise WorkerError(f"cannot fork a room worker: {exc.strerror or exc}") from None
    finally:
        gc.unfreeze()
        _signal.pthread_sigmask(signal.SIG_SETMASK, old)
    return pid, open_pidfd(pid, "fork a room worker")


def open_pidfd(pid: int, what: str) -> int:
    """A pidfd for ``pid``, a child just made. If none can be had (out of fds), the
    child is killed and reaped, and WorkerError says it could not ``what``."""
    try:
        return os.pidfd_open(pid)
    except OSError as exc:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise WorkerError(f"cannot {what}: {exc.strerror or exc}") from None


def run_child(target: Callable[..., int], args: tuple) -> None:
    """The child's side of the fork. This must never return, hence os._exit(): the
    parent's stack above us is not ours to unwind."""
    code = EXIT_CRASH
    try:
        code = target(*args)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else EXIT_CRASH
    finally:
        os._exit(code)


def describe_exit(code: int) -> str:
    """``exited with status 3`` or ``killed by SIGKILL`` for a Worker.exitcode."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with status {code}"
