"""What bin/client shows, kept pure: the chat's state as the server's lines move it,
and every text the client prints, network text made safe for a terminal.

The session (``session.py``) and its fronts (``piped.py``, ``terminal.py``) do the I/O
and call these; they are unit-tested on their own.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from forkchat import protocol
from forkchat.args import make_run

EXIT_OK = 0
EXIT_FAILURE = 1
OK_REASONS = frozenset(
    {
        protocol.BYE_EXIT,
        protocol.BYE_PARTNER_EXIT,
        protocol.BYE_PARTNER_LOST,
        protocol.BYE_SHUTDOWN,
        protocol.BYE_TIMEOUT,
        protocol.BYE_CLOSED,
    }
)

# Terminal control sequences: CSI (ESC [ or C1 CSI) with its parameters and final
# byte; string sequences (OSC, DCS, SOS, PM, APC) up to BEL or ST, or to the end
# when unterminated; any other ESC sequence.
_ESCAPE_SEQ_RE = re.compile(
    r"(?:\x1b\[|\x9b)[\x30-\x3f]*[\x20-\x2f]*[\x40-\x7e]?"
    r"|(?:\x1b[\]PX^_]|[\x90\x98\x9d\x9e\x9f]).*?(?:\x07|\x1b\\|\x9c|\Z)"
    r"|\x1b[\x20-\x2f]*[\x30-\x7e]",
    re.DOTALL,
)
_CONTROL_RE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")
_BIDI_RE = re.compile("[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


# ---------------------------------------------------------------- pure helpers


def sanitize(text: str) -> str:
    """Make network text safe to print on a terminal.

    Escape sequences (CSI, OSC, DCS, ... in ESC or C1 form) are removed; bidi
    embeddings, overrides and isolates are dropped; every other C0 control but TAB,
    DEL and C1 control is shown visibly (``^A``, ``^?``, ``\\x85``). The result holds
    no ESC, no CR, no LF.
    """
    text = _ESCAPE_SEQ_RE.sub("", text)
    text = _BIDI_RE.sub("", text)
    return _CONTROL_RE.sub(_show_control, text)


def _show_control(match: re.Match[str]) -> str:
    """Caret notation for C0 and DEL, ``\\xNN`` for C1."""
    code = ord(match.group())
    if code < 0x20:
        return "^" + chr(code + 0x40)
    if code == 0x7F:
        return "^?"
    return f"\\x{code:02x}"


def format_address(host: str, port: int) -> str:
    """``host:port``, with brackets around an IPv6 address."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def connect_error_text(host: str, port: int, exc: OSError) -> str:
    """The one line printed when the server cannot be reached; the ``make run`` it
    suggests serves the port that was tried."""
    reason = os.strerror(exc.errno) if exc.errno else str(exc) or "timed out"
    return (
        f"cannot connect to {format_address(host, port)} ({reason}); "
        f"is the server running? Start one with '{make_run(port)}'."
    )


def no_greeting_text() -> str:
    """The hint printed when a plain connection gets no greeting: a TLS server waits for
    a TLS handshake, and drops a client that sends plain text."""
    return "no greeting from the server: is it serving TLS? try --tls or --cafile FILE"


def tls_text(version: str, host: str, cafile: str | None) -> str:
    """The line printed once a TLS session is up: the protocol version, the name the
    certificate was verified for and what it was checked against."""
    against = cafile if cafile else "the system's CAs"
    return f"[TLS] {version}, certificate verified for {host} against {against}"


def prompt_for(name: str) -> str:
    """The prompt of your turn, and the start of each line you sent in the transcript."""
    return f"{name}> "


def turn_text(write: bool, partner: str) -> str:
    """The status line for ``TURN WRITE`` / ``TURN READ``."""
    return "[WRITE] your turn to write" if write else f"[READ] waiting for {partner}"


def message_text(partner: str, text: str) -> str:
    """The partner's message as printed: under the partner's name, sanitised."""
    return f"{partner}: {sanitize(text)}"


def bye_text(reason: str, text: str) -> str:
    """The line printed for ``BYE <reason> <text>``, sanitised."""
    reason, text = sanitize(reason), sanitize(text)
    return f"[BYE] {text} ({reason})" if text else f"[BYE] ({reason})"


def exit_status_for(reason: str) -> int:
    """Exit status after ``BYE <reason>`` when we did not ask to leave."""
    return EXIT_OK if reason in OK_REASONS else EXIT_FAILURE


def split_input(buffer: bytes, eof: bool) -> tuple[list[bytes], bytes]:
    """Split piped input into the lines to send and the unfinished rest.

    LF ends a line, a CR before it is dropped, blank lines are skipped (the server
    would ignore them and the turn would not move). At end of input the rest is a
    last line.
    """
    *complete, rest = buffer.split(b"\n")
    if eof:
        complete.append(rest)
        rest = b""
    lines = [line.removesuffix(b"\r") for line in complete]
    return [line for line in lines if not protocol.is_blank(line)], rest


def verify_error_text(host: str, port: int, reason: str, cafile: str | None = None) -> str:
    """The one line printed when the server's certificate cannot be verified: the way
    out is --cafile, or, when it was given, the file it named."""
    where = f"cannot verify the server's certificate at {format_address(host, port)}: {reason}"
    if "mismatch" in reason:
        return f"{where}; the certificate is for another name: give --host one it names"
    if cafile:
        return f"{where}; it is not signed by a CA in {cafile}"
    return f"{where}; use --cafile FILE for a private CA or self-signed certificate"


def handshake_error_text(host: str, port: int, reason: str) -> str:
    """The one line printed when the TLS handshake fails for another reason."""
    return (
        f"TLS handshake with {format_address(host, port)} failed ({reason}); "
        "is the server running with TLS on that port?"
    )


# ---------------------------------------------------------------- the session's state

CONNECTING = "connecting"  # the name is sent, no answer yet
WAITING = "waiting"  # no partner: WAIT came (first, after next, or a partner left)
PAIRED = "paired"  # in a room: PAIRED came
ASKED_NEXT = "next"  # we sent next: lines of the old room may still come, until WAIT


@dataclass
class ChatState:
    """Where the session stands: whom we chat with, whose turn it is.

    Pure: it changes only with the server's lines (``take_*``) and what we send, so
    the rules can be tested without sockets. A ``next`` leaves the room at once for
    us: the old room's TURN lines still in flight are stale and ignored until WAIT.
    """

    phase: str = CONNECTING
    partner: str = "partner"
    my_turn: bool = False
    sent: bool = False  # a message went out this turn; TURN READ comes next
    leaving: bool = False

    def take_wait(self) -> bool:
        """WAIT: no partner now, no turn. True when it ends a room: whatever its text
        says, a WAIT that comes while paired means the partner is gone."""
        gone = self.phase == PAIRED
        self.phase, self.my_turn, self.sent = WAITING, False, False
        return gone

    def take_paired(self, partner: str) -> None:
        """PAIRED: a new room; TURN says who writes first."""
        self.phase, self.partner, self.my_turn, self.sent = PAIRED, partner, False, False

    def take_turn(self, write: bool) -> bool:
        """TURN WRITE / TURN READ. False (and no change) when stale: after our next."""
        if self.phase == ASKED_NEXT:
            return False
        self.my_turn, self.sent = write, False
        return True

    def take_err(self) -> bool:
        """ERR: our last line was dropped. True if that gives us the turn back."""
        if not self.my_turn or self.phase == ASKED_NEXT:
            return False
        self.sent = False
        return True

    def send_message(self) -> None:
        """A chat line went out: the turn passes when TURN READ comes."""
        self.sent = True

    def ask_next(self) -> None:
        """We sent ``next``: no partner, no turn, until WAIT and PAIRED."""
        self.phase, self.my_turn, self.sent = ASKED_NEXT, False, False

    def can_write(self) -> bool:
        """True on our turn while no message of ours is on its way."""
        return self.my_turn and not self.sent and not self.leaving


def status_text(state: ChatState) -> str:
    """What the session is doing, in a few words (the SIGUSR2 line)."""
    if state.leaving:
        return "leaving"
    if state.phase == CONNECTING:
        return "name sent, waiting for the server's answer"
    if state.phase == WAITING:
        return "waiting for a partner"
    if state.phase == ASKED_NEXT:
        return f"left {state.partner}, asking for a new partner"
    if state.can_write():
        return f"chatting with {state.partner}, your turn to write"
    if state.my_turn:
        return f"chatting with {state.partner}, your message is on its way"
    return f"chatting with {state.partner}, {state.partner} is writing"


# ---------------------------------------------------------------- the interactive client

HINT_TEXT = "Commands: /next for a new partner, /quit to leave, /help for more."
HELP_LINES = (
    "[HELP] /next          leave your partner for a new one (the line next does the same)",
    "[HELP] /quit, /exit   leave the chat (so do the line exit, Ctrl-D and Ctrl-C)",
    "[HELP] /help          this list",
    "[HELP] //text         send /text (a line that starts with / is a command)",
    "[HELP] A line typed off your turn is held and goes out when your turn comes;",
    "[HELP] held lines are dropped when your partner goes.",
    "[HELP] Keys: Left/Right, Home/End, Alt-B/Alt-F (word), Ctrl-W/Alt-D (delete a word),",
    "[HELP] Ctrl-U (delete to start), Up/Down (lines you typed), Ctrl-Z (suspend).",
)


def unknown_command_text(word: str) -> str:
    """The local answer to a ``/word`` that is no command (nothing is sent)."""
    return f"[?] unknown command {word}: /help lists the commands; //text sends /text"


def held_text(line: str) -> str:
    """The transcript line for a line typed off turn."""
    return f"[HELD] {line} (goes out when your turn comes)"


def dropped_text(count: int, partner: str | None) -> str:
    """The transcript line for held lines dropped because their partner is gone."""
    lines = "line" if count == 1 else "lines"
    why = f": {partner} is gone" if partner else ""
    return f"[HELD] {count} unsent {lines} dropped{why}"


def input_prompt(name: str, state: ChatState) -> str:
    """The interactive prompt: ``NAME> `` on your turn; otherwise whose turn it is, and
    what you type is held."""
    if state.can_write():
        return prompt_for(name)
    if state.leaving:
        return "(leaving) "
    if state.phase == PAIRED:
        return f"({state.partner} writes) "
    return "(no partner yet) "


def toolbar_text(name: str, where: str, state: ChatState, held: int, wait_text: str) -> str:
    """The status bar: who and where you are, the chat's state, held lines, /help."""
    status = status_text(state)
    if state.phase == WAITING and wait_text and not state.leaving:
        status = f"waiting: {wait_text}"
    held_note = f" | {held} held" if held else ""
    return f" {name} @ {where} | {status}{held_note} | /help "
