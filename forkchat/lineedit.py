"""The client's terminal side: cbreak mode, a small line editor and the input area.

On a terminal the client turns off canonical mode and echo (keeping ISIG, so Ctrl-C
still raises SIGINT) and edits the line itself. That is what lets a notice from the
server appear at once while the user is typing: erase the input area, print the
notice, draw the prompt and the partial line again.

- :class:`LineEditor` is pure: bytes from the keyboard in, editing events out.
- :class:`TtyScreen` draws the input area (prompt + partial line, wrapped lines
  included) and prints notices above it.
- :class:`RawTerminal` switches the tty to cbreak mode and always back.

Keys: printable characters insert, Backspace deletes a character, Ctrl-W a word,
Ctrl-U the whole line, Enter submits, Ctrl-D on an empty line ends the input.
Other control keys and escape sequences (arrows, function keys) are ignored.
"""

from __future__ import annotations

import codecs
import os
import termios
import unicodedata
from dataclasses import dataclass
from typing import TextIO

ESC = "\x1b"
ERASE_BELOW = "\x1b[J"
KEY_ENTER = frozenset("\r\n")
KEY_BACKSPACE = frozenset("\x7f\x08")
KEY_KILL_LINE = "\x15"  # Ctrl-U
KEY_KILL_WORD = "\x17"  # Ctrl-W
KEY_EOF = "\x04"  # Ctrl-D


@dataclass(frozen=True)
class Submit:
    """The user pressed Enter on this line."""

    text: str


@dataclass(frozen=True)
class EndOfInput:
    """The user pressed Ctrl-D on an empty line."""


@dataclass(frozen=True)
class Edited:
    """The partial line changed and must be drawn again."""


Event = Submit | EndOfInput | Edited


class LineEditor:
    """Turn keyboard bytes into editing events; keeps the partial line in ``text``.

    UTF-8 sequences and escape sequences may be split across ``feed`` calls. A lone
    ESC at the end of a chunk is taken as the Escape key and dropped.
    """

    def __init__(self) -> None:
        self.text = ""
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._escape = ""  # the unfinished escape sequence being skipped

    def feed(self, data: bytes) -> list[Event]:
        """Take one chunk of keyboard input; return the events it causes, in order."""
        chars = self._decoder.decode(data)
        events: list[Event] = []
        for ch in chars:
            event = self._take_char(ch)
            if event is None or (isinstance(event, Edited) and events[-1:] == [event]):
                continue  # one redraw for a run of edits
            events.append(event)
        if self._escape == ESC:
            self._escape = ""
        return events

    def _take_char(self, ch: str) -> Event | None:
        """Apply one character to the line."""
        if self._escape or ch == ESC:
            self._skip_escape(ch)
            return None
        if ch in KEY_ENTER:
            line, self.text = self.text, ""
            return Submit(line)
        if ch == KEY_EOF:
            return EndOfInput() if not self.text else None
        return self._edit(ch)

    def _edit(self, ch: str) -> Event | None:
        """Insert or delete; return Edited if the line changed."""
        before = self.text
        if ch in KEY_BACKSPACE:
            self.text = self.text[:-1]
        elif ch == KEY_KILL_LINE:
            self.text = ""
        elif ch == KEY_KILL_WORD:
            self.text = self.text.rstrip(" ").rpartition(" ")[0]
            self.text += " " if self.text else ""
        elif ch.isprintable():
            self.text += ch
        return Edited() if self.text != before else None

    def _skip_escape(self, ch: str) -> None:
        """Swallow ESC [ ... final, ESC O x and ESC x (arrows, keypad, Alt+key)."""
        seq = self._escape + ch
        done = (
            len(seq) >= 2
            and not (seq[1] in "[O" and len(seq) == 2)
            and (seq[1] != "[" or "\x40" <= ch <= "\x7e")
        )
        self._escape = "" if done else seq


def char_width(ch: str) -> int:
    """Columns a character takes on a terminal: 0 for combining, 2 for wide, else 1."""
    if unicodedata.combining(ch) or unicodedata.category(ch) in ("Mn", "Me", "Cf"):
        return 0
    return 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1


def display_width(text: str) -> int:
    """Columns ``text`` takes on a terminal (no control characters expected)."""
    return sum(char_width(ch) for ch in text)


def cursor_row(width: int, columns: int) -> int:
    """Row (from 0) of the cursor after writing ``width`` columns from column 0.

    A line that exactly fills the last row leaves the cursor there (pending wrap),
    not on the next row.
    """
    if width <= 0 or columns <= 0:
        return 0
    return (width - 1) // columns if width % columns == 0 else width // columns


def cbreak_attrs(attrs: list) -> list:
    """Terminal attributes for cbreak mode: no canonical mode, no echo, ISIG kept."""
    new = [*attrs[:6], list(attrs[6])]
    new[3] &= ~(termios.ECHO | termios.ICANON | termios.IEXTEN)
    new[3] |= termios.ISIG
    new[6][termios.VMIN] = 1
    new[6][termios.VTIME] = 0
    return new


class RawTerminal:
    """Cbreak mode on a tty. ``restore`` puts back the saved settings; call it in finally."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.saved: list | None = None

    def enter(self) -> None:
        """Save the settings (the first time) and switch to cbreak mode."""
        if self.saved is None:
            self.saved = termios.tcgetattr(self.fd)
        termios.tcsetattr(self.fd, termios.TCSANOW, cbreak_attrs(self.saved))

    def restore(self) -> None:
        """Put back the saved settings; harmless if never entered or the tty is gone."""
        if self.saved is None:
            return
        try:
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self.saved)
        except (termios.error, OSError):
            pass

    def __enter__(self) -> RawTerminal:
        self.enter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()


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


class TtyScreen:
    """The bottom of a terminal: notices scroll above an input area (prompt + line).

    Everything written is flushed at once. Write errors (a closed terminal) are
    swallowed: the session goes on and ends as it would have.
    """

    def __init__(self, stream: TextIO, fd: int | None = None) -> None:
        self.stream = stream
        self.fd = stream.fileno() if fd is None else fd
        self.prompt = ""
        self.text = ""
        self._drawn = 0  # columns of the input area now on screen
        self.broken = False

    def notice(self, line: str) -> None:
        """Print one line above the input area, then draw the input area again."""
        self._write(self._erase() + line + "\n" + self._draw())

    def update(self, prompt: str, text: str) -> None:
        """Show this prompt and partial line in the input area."""
        self.prompt, self.text = prompt, text
        self._write(self._erase() + self._draw())

    def commit(self) -> None:
        """Leave the input area on screen as a finished line; start an empty one."""
        self.prompt = self.text = ""
        self._drawn = 0
        self._write("\n")

    def close(self) -> None:
        """Erase the input area, leaving the cursor at the start of a line."""
        self.prompt = self.text = ""
        self._write(self._erase())

    def _erase(self) -> str:
        """Escape sequence that moves to the start of the input area and clears below."""
        if not self._drawn:
            return ""
        row = cursor_row(self._drawn, self._columns())
        self._drawn = 0
        return "\r" + (f"\x1b[{row}A" if row else "") + ERASE_BELOW

    def _draw(self) -> str:
        """The input area's text; records how wide it is."""
        area = self.prompt + self.text
        self._drawn = display_width(area)
        return area

    def _columns(self) -> int:
        try:
            return os.get_terminal_size(self.fd).columns or 80
        except OSError:
            return 80

    def _write(self, data: str) -> None:
        if self.broken or not data:
            return
        try:
            self.stream.write(data)
            self.stream.flush()
        except OSError:
            self.broken = True
            silence(self.stream)
