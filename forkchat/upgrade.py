"""Upgrade in place: the running server re-executes itself, under the same PID, and the
code now on disk takes over every socket, every waiting client and every room.

This is HAProxy's master re-exec (same PID, listeners kept, old workers left to finish),
triggered by SIGRTMIN: SIGUSR2, HAProxy's and nginx's signal for it, is the original's
report here, and SIGHUP is what a closing terminal sends. No terminal, shell or kernel
sends a real-time signal on its own.

1. The check (:class:`Upgrade`): the new code runs apart, with the same command line and
   ``FORKCHAT_UPGRADE_CHECK`` set to the format of the state to hand over. It imports
   everything, parses the options, says whether it reads that format, and exits
   (``cli.check_upgrade``). The server serves on meanwhile; a failed check is one log
   line, and nothing else changes.
2. The hand-over (:func:`hand_over`): the parts' state goes, as JSON, into a memfd; the
   sockets, the rooms' pidfds and channels, and the files of their counts stay open
   across the exec; the server's signals are blocked (the mask and pending signals
   survive an exec, so none is lost or kills it half-made); then ``execve`` of the
   same command line. If the exec fails the server goes on with its old code.
3. The new code (``cli.main``) finds ``FORKCHAT_UPGRADE_STATE`` (:func:`take_state`) and
   resumes from it instead of starting afresh (``Server.resume``).

Room workers are children of the same process before and after, and run the code they
were forked with to the end; what they hand back lands in the new code's queue.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

from . import __version__
from .children import PARENT_SIGNALS, Child, describe_exit, is_readable
from .log import Log

CHECK_ENV = "FORKCHAT_UPGRADE_CHECK"
STATE_ENV = "FORKCHAT_UPGRADE_STATE"
FORMAT = 1  # the state's layout: a new code reads the formats it lists in READS
READS = (1,)
CHECK_TIMEOUT = 30.0  # seconds the new code has to pass its check
OUTPUT_LIMIT = 1 << 16  # bytes of the check's output kept, for the refusal line


class UpgradeError(Exception):
    """The upgrade cannot go on: str() is the one line for the log."""


def command_line() -> list[str]:
    """The server's own command line, to run again: the interpreter, its options, the
    script or module, the server's options."""
    return [sys.executable, *sys.orig_argv[1:]]


class Upgrade:
    """The check of a new code, while the server serves on; ``on_passed(version)`` is
    called once the new code has passed it."""

    def __init__(self, sel: selectors.BaseSelector, log: Log, on_passed: Callable[[str], None]):
        self.sel = sel
        self.log = log
        self.on_passed = on_passed
        self.check: Child | None = None
        self.output = b""
        self.pipe = -1
        self.deadline = 0.0

    def begin(self, why: str) -> None:
        """Start the check of the code now on disk (``why``: the trigger, for the log).
        One upgrade at a time."""
        if self.check is not None:
            self.log.event("info", f"{why}: an upgrade is already being checked")
            return
        self.log.event("info", f"{why}: upgrade: checking the new code")
        try:
            self.spawn_check()
        except OSError as exc:
            self.refuse(f"cannot run the new code's check: {exc.strerror or exc}")

    def spawn_check(self) -> None:
        """Run the new code in check mode, its output into a pipe; watch both."""
        read, write = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        argv = command_line()
        env = dict(os.environ, **{CHECK_ENV: str(FORMAT)})
        actions = [(os.POSIX_SPAWN_DUP2, write, 1), (os.POSIX_SPAWN_DUP2, write, 2)]
        try:
            pid = os.posix_spawn(argv[0], argv, env, file_actions=actions)
            self.check = Child(pid, os.pidfd_open(pid))
        except OSError:
            os.close(read)
            raise
        finally:
            os.close(write)
        self.pipe, self.output = read, b""
        self.deadline = time.monotonic() + CHECK_TIMEOUT
        self.sel.register(self.pipe, selectors.EVENT_READ, self.on_output)
        self.sel.register(self.check.sentinel, selectors.EVENT_READ, self.on_exit)

    def on_output(self, key: Any = None, mask: int = 0) -> None:
        """The check wrote: keep the last OUTPUT_LIMIT bytes (it never blocks on us)."""
        try:
            data = os.read(self.pipe, OUTPUT_LIMIT)
        except BlockingIOError:
            return
        self.output = (self.output + data)[-OUTPUT_LIMIT:]
        if not data:
            self.sel.unregister(self.pipe)

    def on_exit(self, key: Any = None, mask: int = 0) -> None:
        """The check is over: hand over to the new code if it passed, else refuse."""
        code = self.finish()
        last = last_line(self.output)
        if code == 0 and last.startswith("forkchat "):
            self.on_passed(last.split()[1])
        elif code == 0:
            self.refuse(f"the new code's check said {last!r}")
        else:
            detail = f": {last}" if last else ""
            self.refuse(f"the new code failed its check ({describe_exit(code)}){detail}")

    def finish(self, kill: bool = False) -> int:
        """Reap the check (killed first if ``kill``), take the rest of its output, stop
        watching it. Returns its exit code."""
        check, self.check = self.check, None
        if kill:
            check.kill()
        code = check.join(5.0)
        self.sel.unregister(check.sentinel)
        check.close()
        while self.pipe in self.sel.get_map() and is_readable(self.pipe):
            self.on_output()  # to its end, or what is there
        if self.pipe in self.sel.get_map():
            self.sel.unregister(self.pipe)
        os.close(self.pipe)
        self.pipe = -1
        return -signal.SIGKILL if code is None else code

    def next_deadline(self) -> float | None:
        return self.deadline if self.check is not None else None

    def expire(self, now: float) -> None:
        """A check past its time is killed, and the upgrade refused."""
        if self.check is not None and now >= self.deadline:
            self.finish(kill=True)
            self.refuse(f"the new code's check took more than {CHECK_TIMEOUT:g} s")

    def cancel(self) -> None:
        """The server is stopping: no upgrade (the check is killed and reaped)."""
        if self.check is not None:
            self.finish(kill=True)
            self.log.event("info", "upgrade: cancelled by the shutdown")

    def refuse(self, why: str) -> None:
        self.log.error(f"upgrade refused: {why}; forkchat {__version__} serves on")


def last_line(output: bytes) -> str:
    """The last line the check printed, for the log (at most 300 characters)."""
    lines = output.decode("utf-8", "replace").strip().splitlines()
    return lines[-1].strip()[:300] if lines else ""


def hand_over(state: dict[str, Any], fds: list[int]) -> OSError:
    """Re-execute the server with ``state`` and the fds ``fds`` kept open. Returns only
    if the exec failed (with the error), everything undone but the blocked signals,
    which the caller unblocks."""
    data = json.dumps(state, separators=(",", ":")).encode("ascii")
    try:
        memfd = os.memfd_create("forkchat-upgrade", 0)  # open across the exec
    except OSError as exc:
        return exc
    try:
        write_all(memfd, data)
        os.lseek(memfd, 0, os.SEEK_SET)
        for fd in fds:
            os.set_inheritable(fd, True)
        argv = command_line()
        os.execve(argv[0], argv, dict(os.environ, **{STATE_ENV: str(memfd)}))
    except OSError as exc:
        for fd in fds:
            os.set_inheritable(fd, False)
        os.close(memfd)
        return exc
    raise AssertionError("execve returned")  # pragma: no cover


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def block_signals() -> None:
    """The server's signals wait (pending) until the new code has its handlers."""
    signal.pthread_sigmask(signal.SIG_BLOCK, PARENT_SIGNALS)


def take_state() -> dict[str, Any] | None:
    """In the new code: the state the old one handed over, or None for a fresh start.
    Raises UpgradeError if it is there but cannot be read."""
    where = os.environ.pop(STATE_ENV, None)
    if where is None:
        return None
    try:
        fd = int(where)
        with os.fdopen(fd, "rb") as memfd:
            state = json.loads(memfd.read())
    except (OSError, ValueError) as exc:
        raise UpgradeError(f"cannot read the state handed over: {exc}") from None
    if state.get("format") not in READS:
        raise UpgradeError(f"state of format {state.get('format')!r}; this code reads {READS}")
    return state


def check_request() -> int | None:
    """In check mode (the old server asks), the format it would hand over; else None."""
    value = os.environ.get(CHECK_ENV)
    if value is None:
        return None
    return int(value) if value.isdigit() else -1
