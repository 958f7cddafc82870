"""forkchat client: chat with one partner through a forkchat server, taking turns.

Usage:
  client [USERNAME] [--host HOST] [--port PORT] [--tls] [--cafile FILE]
  client (-h | --help)
  client --version

Options:
  --host HOST    Server address [default: 127.0.0.1].
  --port PORT    Server TCP port [default: 33016].
  --tls          Talk TLS (1.2 or later), checking the server's certificate against
                 the system's CAs and its name against HOST.
  --cafile FILE  Check the certificate against the CA certificates in FILE (PEM)
                 instead: a private CA, or a self-signed certificate. Implies --tls.
  -h --help      Show this help.
  --version      Show the version.

USERNAME (default "client") is 1 to 32 letters, digits, "_", "-" or ".".

On a terminal the client shows [WRITE] and a "NAME> " prompt on your turn only,
[READ] while your partner writes, and server notices at once, even while you type.
A line typed off your turn is held, not sent: held lines go out one per turn, in
order, when your turn comes. "exit" is sent at once, turn or not.
"next" is sent at once too: it leaves your partner for a new one and you stay
connected ([WAIT], then [PAIRED] with someone else); lines held for the old partner
are dropped. A [WAIT] after your partner left (a server run with --requeue) also
keeps you connected, waiting for a new partner.
Leave with "exit", Ctrl-D on an empty line, Ctrl-C, SIGTERM, SIGUSR1 or SIGHUP:
the client sends "exit", waits up to 2 s for the server's goodbye, says why it
left and exits 0. SIGUSR2 prints a [STATUS] line and changes nothing.

With piped input nothing is prompted: each line is sent on its turn (blank lines
skipped), across partners; a "next" line is sent as soon as the lines before it
have gone, turn or not; "exit" is sent at end of input. A closed standard input is
an empty one.

Exit status: 0 after leaving or a BYE exit, partner-exit, partner-lost, shutdown,
timeout or closed; 1 after BYE bad-name, full or error, a lost connection, a failed TLS
handshake, a closed standard output, or when the server cannot be reached; 2 for a
bad command line. Text that came off the network is printed with terminal control
sequences removed.
"""

from __future__ import annotations

import errno
import os
import selectors
import signal
import socket
import ssl
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TextIO

from docopt import DocoptExit, docopt

from forkchat import __version__, protocol
from forkchat.args import UsageError, parse_port
from forkchat.chatview import (
    EXIT_FAILURE,
    EXIT_OK,
    PAIRED,
    ChatState,
    bye_text,
    connect_error_text,
    exit_status_for,
    format_address,
    handshake_error_text,
    is_next,
    message_text,
    prompt_for,
    sanitize,
    split_input,
    status_text,
    turn_text,
    verify_error_text,
)
from forkchat.lineedit import EndOfInput, LineEditor, RawTerminal, Submit, TtyScreen, silence

PROG = "forkchat client"
DEFAULT_NAME = "client"
EXIT_USAGE = 2
LEAVE_TIMEOUT = 2.0  # seconds to wait for the server's BYE after sending exit
CONNECT_TIMEOUT = 10.0
MAX_LINE_LIMIT = 1 << 20  # the largest --max-line a server accepts
# The server's --max-line is unknown here: take its largest, plus the "MSG " before it.
SERVER_LINE_MAX = MAX_LINE_LIMIT + len(protocol.msg_line(b"")) - 1
READ_SIZE = 65536
LEAVE_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP)
STATUS_SIGNAL = signal.SIGUSR2  # bin/pids --signal USR2 --all: a status line, not death
TLS_MINIMUM = ssl.TLSVersion.TLSv1_2
WOULD_BLOCK = (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError)
TTY_SIGNALS = (signal.SIGTSTP, signal.SIGCONT, signal.SIGWINCH)

# ---------------------------------------------------------------- command line


@dataclass(frozen=True)
class Options:
    """The client's command line, checked and converted."""

    name: str
    host: str
    port: int
    tls: bool = False
    cafile: str | None = None


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
        tls=args["--tls"] or args["--cafile"] is not None,
        cafile=args["--cafile"],
    )


def make_tls_context(cafile: str | None) -> ssl.SSLContext:
    """A client context: TLS 1.2 or later, the certificate checked against the system's
    CAs (or only those in ``cafile``), the host name checked. UsageError if ``cafile``
    cannot be read."""
    try:
        context = ssl.create_default_context(cafile=cafile)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or str(exc)
        raise UsageError(f"--cafile {cafile}: cannot load CA certificates ({reason})") from None
    context.minimum_version = max(context.minimum_version, TLS_MINIMUM)
    return context


def print_error(message: str) -> None:
    """One line on stderr, prefixed with the program name (nowhere if stderr is closed)."""
    if sys.stderr is not None:
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
    """One wait for the socket to be ready (connected, or ready for the handshake's next
    step): True when it is. Raises TimeoutError at the deadline, :class:`Interrupted`
    for a leave signal; other signals (SIGUSR2) change nothing here."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError(errno.ETIMEDOUT, "timed out")
    ready = {key.fd for key, _ in selector.select(left)}
    if wakeup.fileno() in ready:
        leave = [signum for signum in wakeup.read() if signum in LEAVE_SIGNALS]
        if leave:
            raise Interrupted(leave[0])
    return sock.fileno() in ready


class TlsFailed(Exception):
    """The TLS handshake failed: the message is the one line to print."""


def start_tls(
    sock: socket.socket,
    context: ssl.SSLContext,
    server: tuple[str, int],
    wakeup: SignalWakeup,
    timeout: float = CONNECT_TIMEOUT,
    cafile: str | None = None,
) -> ssl.SSLSocket:
    """TLS over a connected non-blocking socket, the handshake done without blocking (a
    leave signal interrupts it). The certificate is checked for ``server``'s host.

    Returns the non-blocking SSL socket, which now owns the connection (``sock`` is
    detached). Raises :class:`TlsFailed` or :class:`Interrupted`; the socket is then
    closed.
    """
    host, port = server
    tls = context.wrap_socket(sock, server_hostname=host, do_handshake_on_connect=False)
    try:
        shake_hands(tls, wakeup, time.monotonic() + timeout)
    except ssl.SSLCertVerificationError as exc:
        tls.close()
        reason = exc.verify_message or str(exc)
        raise TlsFailed(verify_error_text(host, port, reason, cafile)) from None
    except OSError as exc:
        tls.close()
        reason = getattr(exc, "reason", None) or exc.strerror or str(exc) or type(exc).__name__
        raise TlsFailed(handshake_error_text(host, port, reason)) from None
    except BaseException:
        tls.close()
        raise
    return tls


def shake_hands(tls: ssl.SSLSocket, wakeup: SignalWakeup, deadline: float) -> None:
    """Drive a non-blocking handshake to its end, waiting for whatever it asks for."""
    with selectors.PollSelector() as selector:
        selector.register(tls, selectors.EVENT_READ)
        selector.register(wakeup.fileno(), selectors.EVENT_READ)
        while True:
            try:
                tls.do_handshake()
                return
            except ssl.SSLWantReadError:
                selector.modify(tls, selectors.EVENT_READ)
            except ssl.SSLWantWriteError:
                selector.modify(tls, selectors.EVENT_WRITE)
            wait_connected(selector, tls, wakeup, deadline)


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
    always watched; without one stdin is read a chunk ahead, whenever no line is held.
    ``sock`` may be an SSL socket. :meth:`run` returns the exit status.
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
        self.state = ChatState()
        self.held: deque[bytes] = deque()  # lines waiting for our turn, in order
        self.stdin_rest = b""
        self.stdin_eof = False
        self.stdin_watched = False
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
            STATUS_SIGNAL: self.handle_usr2,
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
        if self.state.leaving and self.status is None and self.time_left() == 0:
            self.notice("no goodbye from the server in time")
            self.finish(EXIT_OK)

    def time_left(self) -> float | None:
        """Seconds until the leave deadline; None (no limit) when not leaving."""
        if not self.state.leaving:
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
        return prompt_for(self.name) if self.state.can_write() else ""

    def redraw(self) -> None:
        """Draw the input area again (interactive mode only)."""
        if self.editor is not None:
            self.screen.update(self.prompt(), "" if self.state.leaving else self.editor.text)

    # -- the socket

    def on_socket(self, mask: int) -> None:
        if mask & selectors.EVENT_WRITE or self.outbuf:  # TLS may write once it has read
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
        except WOULD_BLOCK:
            pass
        except OSError:
            self.outbuf.clear()  # the read side sees the close and ends the session
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if self.outbuf else 0)
        self.selector.modify(self.sock, events, self.on_socket)

    def read_server(self) -> None:
        """Read what the server sent and handle each complete line, in order.

        Over TLS, bytes OpenSSL has already decrypted (``pending()``) are invisible to
        the selector: they are read now, before waiting again.
        """
        while self.status is None:
            data = self.receive()
            if data is None:
                return
            if not data:
                self.on_server_closed()
                return
            for raw in self.reader.feed(data):
                self.take_server_line(raw)
                if self.status is not None:
                    return
            if not (isinstance(self.sock, ssl.SSLSocket) and self.sock.pending()):
                return

    def receive(self) -> bytes | None:
        """One read from the server: bytes, b"" when it closed (or failed), None when
        there is nothing to read after all."""
        try:
            return self.sock.recv(READ_SIZE)
        except WOULD_BLOCK:
            return None
        except OSError:
            return b""

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
        if self.state.leaving:
            self.finish(EXIT_OK)
            return
        self.notice("connection lost")
        self.finish(EXIT_FAILURE)

    # -- server lines

    def on_hello(self, line: protocol.ServerLine) -> None:
        """The greeting: the name already went out with the connection."""

    def on_wait(self, line: protocol.ServerLine) -> None:
        """No partner (yet, or again after next or a partner who left): the session goes on."""
        self.state.take_wait()
        self.notice(f"[WAIT] {sanitize(line.text)}")
        self.redraw()  # the prompt goes if the partner left on our turn

    def on_paired(self, line: protocol.ServerLine) -> None:
        self.state.take_paired(sanitize(line.arg) or "partner")
        self.notice(f"[PAIRED] you are chatting with {self.state.partner}")

    def on_turn(self, line: protocol.ServerLine) -> None:
        """TURN WRITE: our turn (send a held line if any); TURN READ: the partner's.
        A TURN from the room we left with next is stale and ignored."""
        if line.arg not in ("WRITE", "READ"):
            self.notice(f"[?] TURN {sanitize(line.text)}")
            return
        if not self.state.take_turn(line.arg == "WRITE") or self.state.leaving:
            return  # stale, or exit is on its way: the turn no longer matters
        self.notice(turn_text(self.state.my_turn, self.state.partner))
        self.send_held()
        self.watch_stdin()
        self.redraw()

    def on_msg(self, line: protocol.ServerLine) -> None:
        self.notice(message_text(self.state.partner, line.arg))

    def on_err(self, line: protocol.ServerLine) -> None:
        """The server dropped our last line; on our turn we may write again."""
        self.notice(f"[ERR] {sanitize(line.arg)}: {sanitize(line.rest)}")
        if self.state.take_err():
            self.send_held()
            self.watch_stdin()
            self.redraw()

    def on_bye(self, line: protocol.ServerLine) -> None:
        """The server's last line: print why, end with the matching status."""
        self.notice(bye_text(line.arg, line.rest))
        self.finish(EXIT_OK if self.state.leaving else exit_status_for(line.arg))

    # -- sending and leaving

    def send_message(self, line: bytes) -> None:
        """Send one chat line; the turn passes when the server says TURN READ."""
        self.send_raw(line + b"\n")
        self.state.send_message()

    def send_held(self) -> None:
        """Send what the held lines allow now: a ``next`` at their head at once, then on
        our turn the oldest line (or leave at the end of piped input)."""
        while self.held and is_next(self.held[0]) and not self.state.leaving:
            self.held.popleft()
            self.ask_next()
        if not self.state.can_write():
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

    def ask_next(self) -> None:
        """Send ``next``: leave the partner for a new one and stay connected."""
        was = self.state.partner if self.state.phase == PAIRED else None
        self.send_raw(b"next\n")
        self.state.ask_next()
        again = "[NEXT] asking for a new partner"
        self.notice(f"[NEXT] leaving {was} for a new partner" if was else again)
        self.watch_stdin()
        self.redraw()

    def leave(self, why: str | None) -> None:
        """Send ``exit`` and wait (bounded) for BYE; a second request ends at once."""
        if self.state.leaving:
            self.finish(EXIT_OK)
            return
        if why:
            self.notice(f"leaving: {why}")
        self.state.leaving = True
        self.leave_deadline = time.monotonic() + LEAVE_TIMEOUT
        self.send_raw(b"exit\n")
        self.watch_stdin()
        self.redraw()

    # -- stdin

    def wants_stdin(self) -> bool:
        """Interactive: always. Piped: while no line is held (one chunk of read-ahead,
        so a ``next`` goes out without waiting for a turn)."""
        if self.state.leaving or self.status is not None:
            return False
        if self.editor is not None:
            return True
        return not self.held and not self.stdin_eof

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
            if self.state.leaving or self.status is not None:
                return
            if isinstance(event, Submit):
                self.submit_typed(event.text)
            elif isinstance(event, EndOfInput):
                self.leave("end of input (Ctrl-D)")
        self.redraw()

    def submit_typed(self, text: str) -> None:
        """Enter: ``exit`` leaves and ``next`` asks for a new partner at once (dropping the
        lines held for the old one); a line is sent on our turn, else held."""
        line = text.encode("utf-8")
        if protocol.is_blank(line):
            return
        self.screen.update(self.prompt(), text)
        self.screen.commit()
        if protocol.is_exit(line):
            self.leave(None)
        elif is_next(line):
            self.drop_held()
            self.ask_next()
        elif self.state.can_write() and not self.held:
            self.send_message(line)
        else:
            self.held.append(line)
            self.notice("[HELD] not your turn: this line goes out when your turn comes")

    def drop_held(self) -> None:
        """Forget the lines held for a partner we are leaving, saying how many."""
        if self.held:
            self.notice(f"[HELD] {len(self.held)} unsent line(s) dropped")
            self.held.clear()

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

    def handle_usr2(self, signum: int) -> None:
        """SIGUSR2 (``bin/pids --signal USR2 --all``): say where the session stands."""
        held = f"; {len(self.held)} line(s) held" if self.held else ""
        where = f"{self.name} at {self.describe_peer()}"
        self.notice(f"[STATUS] {where}: {status_text(self.state)}{held}")


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
    """Connect (and shake hands with --tls), chat, and return the exit status; the
    terminal is always restored."""
    try:
        context = make_tls_context(options.cafile) if options.tls else None
    except UsageError as exc:
        print_error(str(exc))
        return EXIT_USAGE
    wakeup = SignalWakeup()
    try:
        wakeup.catch(*LEAVE_SIGNALS, STATUS_SIGNAL)
        try:
            sock = open_connection(options, context, wakeup)
        except Interrupted as exc:
            print(f"leaving: received {signal_name(exc.signum)}", flush=True)
            return EXIT_OK
        except TlsFailed as exc:
            print_error(str(exc))
            return EXIT_FAILURE
        except OSError as exc:
            print_error(connect_error_text(options.host, options.port, exc))
            return EXIT_FAILURE
        with sock:
            return run_chat(sock, options.name, wakeup)
    finally:
        wakeup.close()


def open_connection(
    options: Options, context: ssl.SSLContext | None, wakeup: SignalWakeup
) -> socket.socket:
    """The connected socket, wrapped in TLS when there is a ``context``. Raises OSError,
    :class:`TlsFailed` or :class:`Interrupted`."""
    sock = connect_server(options.host, options.port, wakeup)
    if context is None:
        return sock
    return start_tls(sock, context, (options.host, options.port), wakeup, cafile=options.cafile)


def check_std_streams() -> str | None:
    """Make a closed stdin an empty one (``/dev/null`` on fd 0, before anything else takes
    that fd); return the error to report if stdout is closed, else None."""
    for fd, mode in ((0, os.O_RDONLY), (1, os.O_WRONLY)):
        try:
            os.fstat(fd)
        except OSError:
            if os.open(os.devnull, mode) != fd:  # the lowest free fd: this one
                return "cannot take over a closed standard stream"
            if fd == 1:
                return "standard output is closed; nothing could be shown"
    if sys.stdout is None:
        return "standard output is closed; nothing could be shown"
    return None


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
    problem = check_std_streams()
    if problem:
        print_error(problem)
        return EXIT_FAILURE
    configure_streams()
    return run_client(options)


if __name__ == "__main__":
    sys.exit(main())
