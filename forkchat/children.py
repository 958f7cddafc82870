"""Process plumbing: forking a child and watching it through a pidfd, and the signal sets
and exit codes the server and its room workers share.

A pidfd is a file descriptor the kernel makes readable when that one process exits: the
sentinel a selector waits on. Signals go through it (``pidfd_send_signal``: never to
another process that reused the PID) and the parent reaps its child through it
(``waitid(P_PIDFD)``), never with ``waitpid(-1)``, which would steal other children's
exit statuses. This module knows nothing of rooms: it forks a function.
"""

from __future__ import annotations

import gc
import os
import select
import signal
from collections.abc import Callable

EXIT_OK = 0
EXIT_CRASH = 70  # EX_SOFTWARE: a bug in a child; logged in one line

# Signals that end the server. SIGHUP: its terminal closed (unless nohup ignored it).
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# The upgrade trigger: SIGUSR2 is the original's report, SIGHUP a closing terminal, and
# no terminal, shell or kernel sends a real-time signal on its own.
UPGRADE_SIGNAL = signal.SIGRTMIN
PARENT_SIGNALS = (*STOP_SIGNALS, signal.SIGUSR2, UPGRADE_SIGNAL)
# Signals that end a room: SIGUSR1 is the server's shutdown, passed on by the parent;
# SIGTERM stops this room alone (an operator's ``kill``), or is part of a shutdown.
ROOM_STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
# Ignored in a room: the terminal sends SIGINT (Ctrl-C) and SIGHUP to the whole process
# group, parent included, and the parent's shutdown reaches the room as SIGUSR1; SIGUSR2
# asks the parent for a report and the upgrade signal is the parent's: one sent to the
# whole group must not end rooms.
ROOM_IGNORED_SIGNALS = (signal.SIGINT, signal.SIGHUP, signal.SIGUSR2, UPGRADE_SIGNAL)


class ForkError(Exception):
    """A child cannot be started now (out of fds, processes or memory)."""


class Child:
    """A forked child as its parent sees it: PID, sentinel (a pidfd), exit code."""

    __slots__ = ("exitcode", "pid", "sentinel")

    def __init__(self, pid: int, sentinel: int) -> None:
        self.pid = pid
        self.sentinel = sentinel  # readable once the child has exited
        self.exitcode: int | None = None  # as multiprocessing: -N for signal N

    def poll(self) -> int | None:
        """Reap the child if it has exited (never blocks); its exit code or None.

        Once this returns a code the child is gone: it is signalled only while None."""
        if self.exitcode is None:
            result = os.waitid(os.P_PIDFD, self.sentinel, os.WEXITED | os.WNOHANG)
            if result is not None:
                self.exitcode = exit_code(result)
        return self.exitcode

    def join(self, timeout: float | None = None) -> int | None:
        """Wait up to ``timeout`` seconds (None: for ever) for the exit, then reap."""
        if self.exitcode is None:
            is_readable(self.sentinel, timeout)
        return self.poll()

    def signal(self, signum: int) -> None:
        """Send ``signum`` through the pidfd, if the child has not exited."""
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


def fork_children(
    jobs: list[tuple[Callable[..., int], tuple]], what: str
) -> list[Child | ForkError]:
    """Fork one child per job, back to back: a child runs ``target(*args)`` and exits
    with its return value. Returns, for each job in order, its :class:`Child`, or the
    :class:`ForkError` that says why it could not be started (``what`` names it); a
    child forked but not watchable (out of fds) is killed and reaped.

    The parent does as little as it can between two forks: every page it writes after a
    fork is copied (a fault for the parent), and the old copy stays with the child
    forked just before, as its own memory. The parent's signals are blocked across the
    forks, so none lands in a half-made child (it unblocks them once its handlers are
    set), and the heap is frozen, so no child's garbage collector walks (and copies)
    the parent's objects.
    """
    forked: list[int | ForkError] = []
    old = signal.pthread_sigmask(signal.SIG_BLOCK, PARENT_SIGNALS)
    gc.freeze()
    try:
        for target, args in jobs:
            try:
                pid = os.fork()
            except OSError as exc:
                forked.append(ForkError(f"cannot fork {what}: {exc.strerror or exc}"))
                continue
            if pid == 0:
                run_child(target, args)  # never returns
            forked.append(pid)
    finally:
        gc.unfreeze()
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    return [watch_child(pid, what) if isinstance(pid, int) else pid for pid in forked]


def watch_child(pid: int, what: str) -> Child | ForkError:
    """The Child for ``pid``, a child just forked; or, if no pidfd can be had (out of
    fds), the child killed and reaped, and the ForkError saying so."""
    try:
        return Child(pid, os.pidfd_open(pid))
    except OSError as exc:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        return ForkError(f"cannot watch {what}: {exc.strerror or exc}")


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
    """``exited with status 3`` or ``killed by SIGKILL`` for a Child.exitcode."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with status {code}"
