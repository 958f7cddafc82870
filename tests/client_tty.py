"""Driving bin/client on a pseudo-terminal, as a person in a shell would.

The client runs under a small wrapper that acts as the shell: it puts the client in
a process group of its own, in the foreground of the terminal (so Ctrl-Z stops it as
it would a job), and prints the terminal settings before and after, and the exit
status. :class:`Tty` reads the terminal in a thread, like a terminal emulator: it
keeps everything written, and answers cursor position requests at once (prompt_toolkit
draws its bottom toolbar only once it knows where the cursor is).
"""

from __future__ import annotations

import codecs
import contextlib
import os
import re
import sys
import threading
import time

import pexpect
import psutil
import pytest

from support import BIN, DEADLINE, child_env

CLIENT = str(BIN / "client")
PTY_TIMEOUT = 5.0
TTY_ENV = {"TERM": "xterm"}
CPR_REQUEST = "\x1b[6n"
CPR_ANSWER = b"\x1b[1;1R"  # the cursor's row and column; any real position will do

TTY_WRAPPER = """
import os, signal, subprocess, sys, termios
signal.signal(signal.SIGTTOU, signal.SIG_IGN)  # so it can take the terminal back

def foreground():
    os.setpgid(0, 0)
    os.tcsetpgrp(0, os.getpid())
    signal.signal(signal.SIGTTOU, signal.SIG_DFL)

print("TTY-BEFORE", termios.tcgetattr(0), flush=True)
child = subprocess.Popen(sys.argv[1:], preexec_fn=foreground)
status = child.wait()
os.tcsetpgrp(0, os.getpgrp())
print("TTY-AFTER", termios.tcgetattr(0), flush=True)
print("EXIT-STATUS", status, flush=True)
"""


class Tty:
    """A pexpect child whose terminal output is read by a thread. ``expect_exact`` and
    ``expect`` search from the end of the last match, with a deadline, and set
    ``before`` (and ``match``) as pexpect does."""

    def __init__(self, spawn: pexpect.spawn) -> None:
        self.spawn = spawn
        self.pid = spawn.pid
        self.child_fd = spawn.child_fd
        self.text = ""
        self.pos = 0
        self.before = ""
        self.match: re.Match | None = None
        self.ended = False
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self.pump, daemon=True)
        self.thread.start()

    def pump(self) -> None:
        """Read until the terminal closes; answer each cursor position request."""
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        scanned = 0
        while True:
            try:
                data = os.read(self.child_fd, 65536)
            except OSError:
                data = b""  # EIO: every process let go of the terminal
            with self.cond:
                self.text += decoder.decode(data, final=not data)
                while (found := self.text.find(CPR_REQUEST, scanned)) >= 0:
                    scanned = found + len(CPR_REQUEST)
                    os.write(self.child_fd, CPR_ANSWER)
                scanned = max(scanned, len(self.text) - len(CPR_REQUEST))
                self.ended = not data
                self.cond.notify_all()
            if not data:
                return

    def wait_for(self, find, what: str, timeout: float) -> None:
        """Wait until ``find(text, pos)`` returns (start, end); move past it."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while (span := find(self.text, self.pos)) is None:
                left = deadline - time.monotonic()
                if left <= 0 or self.ended:
                    raise AssertionError(f"{what} not seen; got: {self.text[self.pos :][-2000:]!r}")
                self.cond.wait(left)
            self.before = self.text[self.pos : span[0]]
            self.pos = span[1]

    def expect_exact(self, text: str, timeout: float = PTY_TIMEOUT) -> None:
        def find(all_text: str, pos: int) -> tuple[int, int] | None:
            at = all_text.find(text, pos)
            return None if at < 0 else (at, at + len(text))

        self.wait_for(find, repr(text), timeout)

    def expect(self, pattern: str, timeout: float = PTY_TIMEOUT) -> None:
        regex = re.compile(pattern)

        def find(all_text: str, pos: int) -> tuple[int, int] | None:
            self.match = regex.search(all_text, pos)
            return self.match.span() if self.match else None

        self.wait_for(find, f"/{pattern}/", timeout)

    def expect_end(self, timeout: float = PTY_TIMEOUT) -> None:
        """Wait until no process holds the terminal any more."""
        self.wait_for(
            lambda text, pos: (len(text), len(text)) if self.ended else None, "end", timeout
        )

    def send(self, text: str) -> None:
        os.write(self.child_fd, text.encode())

    def setwinsize(self, rows: int, cols: int) -> None:
        self.spawn.setwinsize(rows, cols)

    def client(self) -> psutil.Process:
        """The client process (the wrapper's only child)."""
        (client,) = psutil.Process(self.pid).children()
        return client

    def close(self) -> None:
        """Kill what is left under the wrapper (by PID), then close and reap it."""
        with contextlib.suppress(psutil.NoSuchProcess):
            left = psutil.Process(self.pid).children(recursive=True)
            for proc in left:
                with contextlib.suppress(psutil.NoSuchProcess):
                    proc.kill()
            psutil.wait_procs(left, timeout=DEADLINE)
        self.spawn.close(force=True)
        self.thread.join(DEADLINE)


@pytest.fixture
def tty_client():
    """Factory of interactive clients on a pseudo-terminal, reaped at teardown."""
    started: list[Tty] = []

    def spawn(port: int, *args: str) -> Tty:
        child = pexpect.spawn(
            sys.executable,
            ["-c", TTY_WRAPPER, sys.executable, CLIENT, *args, "--port", str(port)],
            env=child_env(**TTY_ENV),
            dimensions=(24, 80),
        )
        tty = Tty(child)
        started.append(tty)
        tty.expect(r"TTY-BEFORE (\[.*\])\r\n")
        tty.tty_before = tty.match.group(1)
        return tty

    yield spawn
    for tty in started:
        tty.close()


def finish_tty(child: Tty) -> int:
    """Wait for the wrapper's report: check the terminal was restored, return the status."""
    child.expect(r"TTY-AFTER (\[.*\])\r\n")
    assert child.match.group(1) == child.tty_before, "terminal settings not restored"
    child.expect(r"EXIT-STATUS (-?\d+)\r\n")
    status = int(child.match.group(1))
    child.expect_end()
    return status
