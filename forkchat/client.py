"""forkchat client: chat with one partner through a forkchat server, taking turns.

Usage:
  client [USERNAME] [--host HOST] [--port PORT]
  client (-h | --help)
  client --version

Options:
  --host HOST  Server address [default: 127.0.0.1].
  --port PORT  Server TCP port [default: 33016].
  -h --help    Show this help.
  --version    Show the version.

USERNAME (default "client") is 1 to 32 letters, digits, "_", "-" or ".".

On a terminal the client shows [WRITE] and a "NAME> " prompt on your turn only,
[READ] while your partner writes, and server notices at once, even while you type.
A line typed off your turn is held, not sent: held lines go out one per turn, in
order, when your turn comes. "exit" is sent at once, turn or not.
Leave with "exit", Ctrl-D on an empty line, Ctrl-C, SIGTERM, SIGUSR1 or SIGHUP:
the client sends "exit", waits up to 2 s for the server's goodbye, says why it
left and exits 0.

With piped input nothing is prompted: one line is read and sent per turn (blank
lines skipped) and "exit" is sent at end of input.

Exit status: 0 after leaving or a BYE exit, partner-exit, partner-lost, shutdown
or timeout; 1 after BYE bad-name, full or error, a lost connection, or when the
server cannot be reached; 2 for a bad command line. Text that came off the network
is printed with terminal control sequences removed.
"""

from __future__ import annotations

import errno
import os
import re
import selectors
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TextIO

from docopt import DocoptExit, docopt

from forkchat import __version__, protocol
from forkchat.args import UsageError, parse_port
from forkchat.lineedit import EndOfInput, LineEditor, RawTerminal, Submit, TtyScreen, silence

PROG = "forkchat client"
DEFAULT_NAME = "client"
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
LEAVE_TIMEOUT = 2.0  # seconds to wait for the server's BYE after sending exit
CONNECT_TIMEOUT = 10.0
SERVER_LINE_MAX = 1 << 20  # the server's --max-line is unknown here; stay generous
READ_SIZE = 65536
OK_REASONS = frozenset(
    {
        protocol.BYE_EXIT,
        protocol.BYE_PARTNER_EXIT,
        protocol.BYE_PARTNER_LOST,
        protocol.BYE_SHUTDOWN,
        protocol.BYE_TIMEOUT,
    }
)
LEAVE_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP)
TTY_SIGNALS = (signal.SIGTSTP, signal.SIGCONT, signal.SIGWINCH)

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
    """The one line printed when the server cannot be reached."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    return (
        f"cannot connect to {format_address(host, port)} ({reason}); "
        "is the server running? Start one with 'make run'."
    )


def prompt_for(name: str) -> str:
    """The prompt shown on your turn."""
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


# ---------------------------------------------------------------- command line


@dataclass(frozen=True)
class Options:
    """The client's command line, checked and converted."""

    name: str
    host: str
    port: int


def parse_username(text: str) -> str:
    """A user name that the server will accept, or UsageError."""
    name = protocol.parse_name(text.encode("utf-8", "surrogateescape"))
    if name is None:
        raise UsageError(f"bad user name {text!r}: {protocol.NAME_RULE}")
    return name


def parse_args(argv: list[str] | None = None) -> Options:
    """Parse the command line (docopt exits on -h, --version and bad usage)."""
    args = docopt(__doc__, argv=argv, version=f"forkchat {__version__}")
    return Options(
        name=parse_username(args["USERNAME"] or DEFAULT_NAME),
        host=args["--host"],
        port=parse_port(args["--port"]),
    )


def print_error(message: str) -> None:
    """One line on stderr, prefixed with the program name."""
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- signals


def _wake_only(signum: int, frame: object) -> None:
    """Signal handler: nothing. The wakeup fd already told the loop."""


class SignalWakeup:
    """Signals as bytes on a socket a selector can watch (``signal.set_wakeup_fd``).

    Handlers do nothing; the loop reads signal numbers with :meth:`read` and acts.
    :meth:`close` puts back the previous handlers and wakeup fd.
    """

    def __init__(self) -> None:
        self.rsock, self.wsock = socket.socketpair()
        self.rsock.setblocking(False)
        self.wsock.setblocking(False)
        self._old_fd = signal.set_wakeup_fd(self.wsock.fileno(), warn_on_full_buffer=False)
        self._old_handlers: dict[int, Any] = {}

    def catch(self, *signums: int) -> None:
        """Route these signals to the wakeup socket."""
        for signum in signums:
            if signum not in self._old_handlers:
                self._old_handlers[signum] = signal.signal(signum, _wake_only)

    def fileno(self) -> int:
        return self.rsock.fileno()

    def read(self) -> list[int]:
        """The signal numbers received since the last read, in order."""
        data = b""
        try:
            while chunk := self.rsock.recv(4096):
                data += chunk
        except BlockingIOError:
            pass
        return list(data)

    def close(self) -> None:
        for signum, handler in self._old_handlers.items():
            signal.signal(signum, handler)
        signal.set_wakeup_fd(self._old_fd)
        self.rsock.close()
        self.wsock.close()


class Interrupted(Exception):
    """A leave signal arrived before the session started."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def signal_name(signum: int) -> str:
    """``SIGTERM`` for 15; the number itself for an unknown signal."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)


# ---------------------------------------------------------------- connecting


def connect_server(
    host: str, port: int, wakeup: SignalWakeup, timeout: float = CONNECT_TIMEOUT
) -> socket.socket:
    """Connect to the server (every address ``host`` resolves to, in turn).

    Returns a non-blocking socket with TCP_NODELAY. Raises OSError (the last
    address's error) or :class:`Interrupted` when a leave signal arrives meanwhile.
    """
    deadline = time.monotonic() + timeout
    error: OSError = TimeoutError(errno.ETIMEDOUT, "timed out")
    for family, kind, proto, _, address in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        sock = socket.socket(family, kind, proto)
        try:
            connect_socket(sock, address, wakeup, deadline)
        except OSError as exc:
            sock.close()
            error = exc
            continue
        except BaseException:
            sock.close()
            raise
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    raise error


def connect_socket(
    sock: socket.socket, address: Any, wakeup: SignalWakeup, deadline: float
) -> None:
    """Non-blocking connect that a signal can interrupt; raises OSError on failure."""
    sock.setblocking(False)
    err = sock.connect_ex(address)
    if err == 0:
        return
    if err != errno.EINPROGRESS:
        raise OSError(err, os.strerror(err))
    with selectors.PollSelector() as selector:
        selector.register(sock, selectors.EVENT_WRITE)
        selector.register(wakeup.fileno(), selectors.EVENT_READ)
        while not wait_connected(selector, sock, wakeup, deadline):
            pass
    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise OSError(err, os.strerror(err))


def wait_connected(
    selector: selectors.BaseSelector, sock: socket.socket, wakeup: SignalWakeup, deadline: float
) -> bool:
    """One wait for the connect to finish: True when it has (well or not)."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError(errno.ETIMEDOUT, "timed out")
    ready = {key.fd for key, _ in selector.select(left)}
    if wakeup.fileno() in ready:
        signums = wakeup.read()
        if signums:
            raise Interrupted(signums[0])
    return sock.fileno() in ready


# ---------------------------------------------------------------- the session


class Screen(Protocol):
    """Where the session's lines go: a terminal with an input area, or a plain stream."""

    def notice(self, line: str) -> None: ...
    def update(self, prompt: str, text: str) -> None: ...
    def commit(self) -> None: ...
    def close(self) -> None: ...


class PlainScreen:
    """Piped mode: each notice is one flushed line; there is no input area."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.broken = False

    def notice(self, line: str) -> None:
        if self.broken:
            return
        try:
            self.stream.write(line + "\n")
            self.stream.flush()
        except OSError:
            self.broken = True  # stdout closed (e.g. piped into head): carry on silently
            silence(self.stream)

    def update(self, prompt: str, text: str) -> None:
        pass

    def commit(self) -> None:
        pass

    def close(self) -> None:
        pass


class ChatSession:
    """One chat over a connected socket: a selector loop over the socket, stdin and
    the signal wakeup socket, and the client's side of the protocol.

    With an ``editor`` (interactive mode) stdin is a terminal in cbreak mode and is
    always watched; without one stdin is read only when a line is needed to send.
    :meth:`run` returns the exit status.
    """

    def __init__(
        self,
        sock: socket.socket,
        name: str,
        wakeup: SignalWakeup,
        screen: Screen,
        stdin_fd: int = 0,
        editor: LineEditor | None = None,
        terminal: RawTerminal | None = None,
    ) -> None:
        self.sock = sock
        self.name = name
        self.wakeup = wakeup
        self.screen = screen
        self.stdin_fd = stdin_fd
        self.editor = editor
        self.terminal = terminal
        self.reader = protocol.LineReader(SERVER_LINE_MAX)
        self.outbuf = bytearray()
        self.selector = selectors.PollSelector()
        self.partner = "partner"
        self.my_turn = False
        self.sent = False  # a message went out this turn; TURN READ comes next
        self.held: deque[bytes] = deque()  # lines waiting for our turn, in order
        self.stdin_rest = b""
        self.stdin_eof = False
        self.stdin_watched = False
        self.leaving = False
        self.leave_deadline = 0.0
        self.status: int | None = None
        self.line_handlers: dict[str, Callable[[protocol.ServerLine], None]] = {
            protocol.HELLO: self.on_hello,
            protocol.WAIT: self.on_wait,
            protocol.PAIRED: self.on_paired,
            protocol.TURN: self.on_turn,
            protocol.MSG: self.on_msg,
            protocol.ERR: self.on_err,
            protocol.BYE: self.on_bye,
        }
        self.signal_handlers: dict[int, Callable[[int], None]] = {
            signal.SIGTSTP: self.handle_tstp,
            signal.SIGCONT: self.handle_cont,
            signal.SIGWINCH: self.handle_winch,
        }

    # -- the loop

    def run(self) -> int:
        """Send the name, then serve events until the session ends; return the status."""
        try:
            self.start()
            while self.status is None:
                self.serve_events()
            return self.status
        finally:
            self.screen.close()
            self.selector.close()

    def start(self) -> None:
        """Register the socket and the wakeup socket, greet, send the name."""
        self.selector.register(self.sock, selectors.EVENT_READ, self.on_socket)
        self.selector.register(self.wakeup.fileno(), selectors.EVENT_READ, self.on_wakeup)
        self.notice(f"connected to {self.describe_peer()} as {self.name}")
        self.send_raw(self.name.encode("ascii") + b"\n")
        self.watch_stdin()
        self.redraw()

    def describe_peer(self) -> str:
        """The server's address as ``host:port`` (``the server`` if already gone)."""
        try:
            host, port = self.sock.getpeername()[:2]
        except OSError:
            return "the server"
        return format_address(host, port)

    def serve_events(self) -> None:
        """Wait for one batch of events (bounded while leaving) and dispatch it."""
        for key, mask in self.selector.select(self.time_left()):
            if self.status is None:
                key.data(mask)
        if self.leaving and self.status is None and self.time_left() == 0:
            self.notice("no goodbye from the server in time")
            self.finish(EXIT_OK)

    def time_left(self) -> float | None:
        """Seconds until the leave deadline; None (no limit) when not leaving."""
        if not self.leaving:
            return None
        return max(0.0, self.leave_deadline - time.monotonic())

    def finish(self, status: int) -> None:
        """End the session with this exit status."""
        self.status = status

    # -- output

    def notice(self, line: str) -> None:
        """Print a line at once, above whatever the user is typing."""
        self.screen.notice(line)

    def prompt(self) -> str:
        """The prompt to show now: only on our turn, before we have written."""
        return prompt_for(self.name) if self.can_write() else ""

    def redraw(self) -> None:
        """Draw the input area again (interactive mode only)."""
        if self.editor is not None:
            self.screen.update(self.prompt(), "" if self.leaving else self.editor.text)

    # -- the socket

    def on_socket(self, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            self.flush_output()
        if mask & selectors.EVENT_READ and self.status is None:
            self.read_server()

    def send_raw(self, data: bytes) -> None:
        """Queue bytes for the server and send what the socket takes now."""
        self.outbuf += data
        self.flush_output()

    def flush_output(self) -> None:
        """Send queued bytes; watch for writability while some are left."""
        try:
            sent = self.sock.send(self.outbuf)
            del self.outbuf[:sent]
        except BlockingIOError:
            pass
        except OSError:
            self.outbuf.clear()  # the read side sees the close and ends the session
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if self.outbuf else 0)
        self.selector.modify(self.sock, events, self.on_socket)

    def read_server(self) -> None:
        """Read what the server sent and handle each complete line, in order."""
        try:
            data = self.sock.recv(READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.on_server_closed()
            return
        for raw in self.reader.feed(data):
            self.take_server_line(raw)
            if self.status is not None:
                return

    def take_server_line(self, raw: bytes | protocol.TooLong) -> None:
        """Dispatch one server line to its ``on_<keyword>`` handler."""
        if isinstance(raw, protocol.TooLong):
            self.notice("[skipped a line from the server too long to show]")
            return
        line = protocol.parse_server_line(raw)
        handler = self.line_handlers.get(line.keyword)
        if handler is None:
            self.notice(f"[?] {sanitize(raw.decode('utf-8', 'replace'))}")
        else:
            handler(line)

    def on_server_closed(self) -> None:
        """The server closed without BYE: lost, unless we were leaving anyway."""
        if self.leaving:
            self.finish(EXIT_OK)
            return
        self.notice("connection lost")
        self.finish(EXIT_FAILURE)

    # -- server lines

    def on_hello(self, line: protocol.ServerLine) -> None:
        """The greeting: the name already went out with the connection."""

    def on_wait(self, line: protocol.ServerLine) -> None:
        self.notice(f"[WAIT] {sanitize(line.text)}")

    def on_paired(self, line: protocol.ServerLine) -> None:
        self.partner = sanitize(line.arg) or "partner"
        self.notice(f"[PAIRED] you are chatting with {self.partner}")

    def on_turn(self, line: protocol.ServerLine) -> None:
        """TURN WRITE: our turn (send a held line if any); TURN READ: the partner's."""
        if line.arg not in ("WRITE", "READ"):
            self.notice(f"[?] TURN {sanitize(line.text)}")
            return
        self.my_turn = line.arg == "WRITE"
        self.sent = False
        if self.leaving:
            return  # exit is on its way: the turn no longer matters
        self.notice(turn_text(self.my_turn, self.partner))
        self.send_held()
        self.watch_stdin()
        self.redraw()

    def on_msg(self, line: protocol.ServerLine) -> None:
        self.notice(message_text(self.partner, line.arg))

    def on_err(self, line: protocol.ServerLine) -> None:
        """The server dropped our last line; on our turn we may write again."""
        self.notice(f"[ERR] {sanitize(line.arg)}: {sanitize(line.rest)}")
        if self.my_turn:
            self.sent = False
            self.send_held()
            self.watch_stdin()
            self.redraw()

    def on_bye(self, line: protocol.ServerLine) -> None:
        """The server's last line: print why, end with the matching status."""
        self.notice(bye_text(line.arg, line.rest))
        self.finish(EXIT_OK if self.leaving else exit_status_for(line.arg))

    # -- sending and leaving

    def can_write(self) -> bool:
        """True on our turn while no message of ours is on its way."""
        return self.my_turn and not self.sent and not self.leaving

    def send_message(self, line: bytes) -> None:
        """Send one chat line; the turn passes when the server says TURN READ."""
        self.send_raw(line + b"\n")
        self.sent = True

    def send_held(self) -> None:
        """On our turn, send the oldest held line (or leave at the end of piped input)."""
        if not self.can_write():
            return
        if self.held:
            line = self.held.popleft()
            if protocol.is_exit(line):
                self.leave(None)
                return
            if self.editor is not None:
                self.notice(prompt_for(self.name) + line.decode("utf-8", "replace"))
            self.send_message(line)
        elif self.stdin_eof:
            self.leave("end of input")

    def leave(self, why: str | None) -> None:
        """Send ``exit`` and wait (bounded) for BYE; a second request ends at once."""
        if self.leaving:
            self.finish(EXIT_OK)
            return
        if why:
            self.notice(f"leaving: {why}")
        self.leaving = True
        self.leave_deadline = time.monotonic() + LEAVE_TIMEOUT
        self.send_raw(b"exit\n")
        self.watch_stdin()
        self.redraw()

    # -- stdin

    def wants_stdin(self) -> bool:
        """Interactive: always. Piped: only when a line is needed to send now."""
        if self.leaving or self.status is not None:
            return False
        if self.editor is not None:
            return True
        return self.can_write() and not self.held and not self.stdin_eof

    def watch_stdin(self) -> None:
        """Register or unregister stdin to match :meth:`wants_stdin`."""
        want = self.wants_stdin()
        if want == self.stdin_watched:
            return
        if want:
            self.selector.register(self.stdin_fd, selectors.EVENT_READ, self.on_stdin)
        else:
            self.selector.unregister(self.stdin_fd)
        self.stdin_watched = want

    def on_stdin(self, mask: int) -> None:
        if not self.wants_stdin():
            return
        try:
            data = os.read(self.stdin_fd, READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""  # stdin closed or the terminal hung up: end of input
        if self.editor is not None:
            self.take_keys(data)
        else:
            self.take_piped(data)

    def take_piped(self, data: bytes) -> None:
        """Piped input: collect complete lines, send one if it is our turn."""
        self.stdin_eof = not data
        lines, self.stdin_rest = split_input(self.stdin_rest + data, self.stdin_eof)
        self.held.extend(lines)
        self.send_held()
        self.watch_stdin()

    def take_keys(self, data: bytes) -> None:
        """Interactive input: apply keystrokes, act on Enter and Ctrl-D."""
        if not data:
            self.leave("end of input")
            return
        for event in self.editor.feed(data):
            if self.leaving or self.status is not None:
                return
            if isinstance(event, Submit):
                self.submit_typed(event.text)
            elif isinstance(event, EndOfInput):
                self.leave("end of input (Ctrl-D)")
        self.redraw()

    def submit_typed(self, text: str) -> None:
        """Enter: ``exit`` leaves at once; a line is sent on our turn, else held."""
        line = text.encode("utf-8")
        if protocol.is_blank(line):
            return
        self.screen.update(self.prompt(), text)
        self.screen.commit()
        if protocol.is_exit(line):
            self.leave(None)
        elif self.can_write() and not self.held:
            self.send_message(line)
        else:
            self.held.append(line)
            self.notice("[HELD] not your turn: this line goes out when your turn comes")

    # -- signals

    def on_wakeup(self, mask: int) -> None:
        for signum in self.wakeup.read():
            if self.status is not None:
                return
            self.handle_signal(signum)

    def handle_signal(self, signum: int) -> None:
        """Leave signals leave; the terminal ones suspend, resume or redraw."""
        if signum in LEAVE_SIGNALS:
            self.leave(f"received {signal_name(signum)}")
        elif signum in self.signal_handlers:
            self.signal_handlers[signum](signum)

    def handle_tstp(self, signum: int) -> None:
        """Ctrl-Z: give the terminal back as it was, stop, and take it again on resume."""
        if self.terminal is None:
            return
        self.screen.close()
        self.terminal.restore()
        signal.signal(signal.SIGTSTP, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTSTP)  # stops here until SIGCONT
        signal.signal(signal.SIGTSTP, _wake_only)
        self.handle_cont(signal.SIGCONT)

    def handle_cont(self, signum: int) -> None:
        """Resumed: cbreak mode again (the shell may have reset it), redraw."""
        if self.terminal is not None:
            self.terminal.enter()
        self.redraw()

    def handle_winch(self, signum: int) -> None:
        self.redraw()


# ---------------------------------------------------------------- main


def run_chat(sock: socket.socket, name: str, wakeup: SignalWakeup) -> int:
    """Chat over a connected socket; interactive when stdin and stdout are terminals."""
    stdin_fd = 0
    if not (os.isatty(stdin_fd) and os.isatty(sys.stdout.fileno())):
        return ChatSession(sock, name, wakeup, PlainScreen(sys.stdout), stdin_fd).run()
    terminal = RawTerminal(stdin_fd)
    wakeup.catch(*TTY_SIGNALS)
    try:
        terminal.enter()
        screen = TtyScreen(sys.stdout)
        session = ChatSession(sock, name, wakeup, screen, stdin_fd, LineEditor(), terminal)
        return session.run()
    finally:
        terminal.restore()


def run_client(options: Options) -> int:
    """Connect, chat, and return the exit status; the terminal is always restored."""
    wakeup = SignalWakeup()
    try:
        wakeup.catch(*LEAVE_SIGNALS)
        try:
            sock = connect_server(options.host, options.port, wakeup)
        except Interrupted as exc:
            print(f"leaving: received {signal_name(exc.signum)}", flush=True)
            return EXIT_OK
        except OSError as exc:
            print_error(connect_error_text(options.host, options.port, exc))
            return EXIT_FAILURE
        with sock:
            return run_chat(sock, options.name, wakeup)
    finally:
        wakeup.close()


def configure_streams() -> None:
    """Never fail on printing a character the locale cannot encode."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")


def main(argv: list[str] | None = None) -> int:
    """Run the client with this command line (default ``sys.argv[1:]``); return its status."""
    try:
        options = parse_args(argv)
    except DocoptExit as exc:
        print(exc, file=sys.stderr)
        return EXIT_USAGE
    except UsageError as exc:
        print_error(str(exc))
        return EXIT_USAGE
    configure_streams()
    return run_client(options)


if __name__ == "__main__":
    sys.exit(main())
