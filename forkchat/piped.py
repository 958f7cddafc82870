"""The client's front for scripts: lines from a pipe or a file, the transcript on stdout.

Nothing is prompted and no terminal is touched. Standard input is read ahead, up to
READ_AHEAD lines held: a ``next`` or an ``exit`` in the input goes out as soon as the
lines before it have gone, turn or not, and the end of the input is seen as soon as
it comes, so the session leaves as soon as the last lines are out. Each transcript
line is written and flushed at once.
"""

from __future__ import annotations

import asyncio
import os
import sys
from typing import TextIO

from forkchat.chatview import split_input
from forkchat.link import READ_SIZE
from forkchat.session import ChatSession

READ_AHEAD = 100  # lines held at most before standard input is left unread a while


def silence(stream: TextIO) -> None:
    """Point a stream that failed (closed pipe, hung-up terminal) at /dev/null.

    Later writes, and the interpreter's final flush, then succeed quietly instead of
    printing "Exception ignored ... BrokenPipeError" at exit.
    """
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def write_line(stream: TextIO, line: str) -> bool:
    """Write one line and flush it; False (and the stream silenced) if it failed."""
    try:
        stream.write(line + "\n")
        stream.flush()
        return True
    except OSError:
        silence(stream)
        return False


class PipedFront:
    """Feeds a session the lines of standard input; prints its lines on stdout."""

    def __init__(self, stdin_fd: int = 0, stdout: TextIO | None = None) -> None:
        self.stdin_fd = stdin_fd
        self.stdout = stdout or sys.stdout
        self.stdout_broken = False  # stdout closed (e.g. piped into head): carry on silently
        self.session: ChatSession | None = None
        self.rest = b""  # the unfinished last line read
        self.reading = False

    async def run(self, session: ChatSession) -> int:
        """Run the session with this front; return its exit status."""
        self.session = session
        self.refresh()
        try:
            return await session.run()
        finally:
            self.watch_stdin(False)

    def show(self, line: str) -> None:
        if not self.stdout_broken:
            self.stdout_broken = not write_line(self.stdout, line)

    def alert(self, line: str) -> None:
        write_line(sys.stderr, f"forkchat client: {line}")

    def refresh(self) -> None:
        """Read ahead while few lines are held and the session still takes lines."""
        session = self.session
        if session is None:
            return
        done = session.input_ended or session.state.leaving or session.finished
        self.watch_stdin(not done and len(session.held) < READ_AHEAD)

    def watch_stdin(self, want: bool) -> None:
        if want == self.reading:
            return
        loop = asyncio.get_running_loop()
        if want:
            loop.add_reader(self.stdin_fd, self.read_stdin)
        else:
            loop.remove_reader(self.stdin_fd)
        self.reading = want

    def read_stdin(self) -> None:
        """Take one chunk of input: its complete lines go to the session, in order."""
        try:
            data = os.read(self.stdin_fd, READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""  # stdin closed or the terminal hung up: end of input
        lines, self.rest = split_input(self.rest + data, eof=not data)
        for line in lines:
            self.session.submit(line)
        if not data:
            self.session.end_input()
        self.refresh()
