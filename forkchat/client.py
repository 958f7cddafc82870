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

On a terminal you type at a prompt that says whose turn it is ("NAME> " on yours),
with a status bar below it; messages and server notices appear above it at once,
even while you type. Lines go out on your turn; a line typed off your turn is held
and goes out when your turn comes, and held lines are dropped when your partner goes.
Commands: /next (or the line "next") leaves your partner for a new one and you stay
connected; /quit or /exit (or the line "exit") leaves; /help lists the commands and
keys; //text sends /text. The usual editing keys work, Up/Down recall what you typed.
Leave with /quit, Ctrl-D, Ctrl-C, SIGTERM, SIGUSR1 or SIGHUP: the client sends
"exit", waits up to 2 s for the server's goodbye, says why it left and exits 0.
SIGUSR2 prints a [STATUS] line and changes nothing.

With piped input nothing is prompted: each line is sent on its turn (blank lines
skipped), across partners; a "next" or "exit" line goes as soon as the lines before
it have gone, turn or not; at end of input, once the lines before it have gone,
"exit" is sent at once. A closed standard input is an empty one.

Exit status: 0 after leaving or a BYE exit, partner-exit, partner-lost, shutdown,
timeout or closed; 1 after BYE bad-name, full or error, a lost connection, a failed TLS
handshake, a closed standard output, or when the server cannot be reached; 2 for a
bad command line. Text that came off the network is printed with terminal control
sequences removed.
"""

from __future__ import annotations

import asyncio
import os
import selectors
import signal
import ssl
import sys
from collections.abc import Callable
from dataclasses import dataclass

from forkchat import __version__, protocol
from forkchat.args import UsageError, parse_port, parse_usage
from forkchat.chatview import (
    EXIT_FAILURE,
    EXIT_OK,
    HINT_TEXT,
    connect_error_text,
    format_address,
    tls_text,
)
from forkchat.link import Link, TlsFailed, open_link
from forkchat.piped import PipedFront
from forkchat.session import ChatSession, Front
from forkchat.tlsconf import TlsError, client_context

PROG = "forkchat client"
DEFAULT_NAME = "client"
EXIT_USAGE = 2
LEAVE_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP)
STATUS_SIGNAL = signal.SIGUSR2  # bin/pids --signal USR2 --all: a status line, not death
# The terminal's own: suspend, resume, resize. The client survives them (prompt_toolkit
# redraws; a piped client stops and goes on), so bin/pids --all may send them.
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
    """Parse the command line: UsageError for a bad one (-h and --version exit)."""
    args = parse_usage(__doc__, argv, f"forkchat {__version__}")
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
        return client_context(cafile)
    except TlsError as exc:
        raise UsageError(f"--cafile {cafile}: cannot load CA certificates ({exc})") from None


def print_error(message: str) -> None:
    """One line on stderr, prefixed with the program name (nowhere if stderr is closed)."""
    if sys.stderr is not None:
        print(f"{PROG}: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- signals


def signal_name(signum: int) -> str:
    """``SIGTERM`` for 15; the number itself for an unknown signal."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)


class Signals:
    """The client's signals, handled in the event loop (asyncio's wakeup fd, no work in
    a handler): a leave signal calls ``on_leave`` with its number, SIGUSR2 calls
    ``on_status``. The owner points both at whatever is running now."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.on_leave: Callable[[int], None] = lambda signum: None
        self.on_status: Callable[[], None] = lambda: None
        for signum in LEAVE_SIGNALS:
            loop.add_signal_handler(signum, self.handle_leave, signum)
        loop.add_signal_handler(STATUS_SIGNAL, self.handle_status)

    def handle_leave(self, signum: int) -> None:
        self.on_leave(signum)

    def handle_status(self) -> None:
        self.on_status()


class Interrupted(Exception):
    """A leave signal arrived before the session started."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


# ---------------------------------------------------------------- connecting


async def open_link_or_leave(
    options: Options, context: ssl.SSLContext | None, signals: Signals
) -> Link:
    """:func:`open_link`, unless a leave signal comes first: then :class:`Interrupted`."""
    loop = asyncio.get_running_loop()
    left: asyncio.Future[int] = loop.create_future()
    signals.on_leave = lambda signum: left.done() or left.set_result(signum)
    connecting = asyncio.ensure_future(
        open_link(options.host, options.port, context, options.cafile)
    )
    await asyncio.wait({connecting, left}, return_when=asyncio.FIRST_COMPLETED)
    if not left.done():
        return connecting.result()
    connecting.cancel()
    await asyncio.wait({connecting})
    if not connecting.cancelled() and connecting.exception() is None:
        connecting.result().close()  # connected just before the signal was handled
    raise Interrupted(left.result())


# ---------------------------------------------------------------- the chat


def is_interactive() -> bool:
    """True when a person is there: standard input and output are terminals."""
    return os.isatty(0) and os.isatty(1)


def make_front(interactive: bool, name: str, where: str) -> Front:
    """The terminal front for a person (prompt_toolkit is imported only then), the
    piped one for a script."""
    if not interactive:
        return PipedFront()
    from forkchat.terminal import TerminalFront

    return TerminalFront(name, where)


async def chat(link: Link, options: Options, signals: Signals) -> int:
    """Say where we are connected, then run the session; return its exit status."""
    peer = link.peer()
    where = format_address(*peer) if peer else f"{options.host}:{options.port}"
    interactive = is_interactive()
    tls = link.tls_version
    front = make_front(interactive, options.name, where + (" TLS" if tls else ""))
    front.show(f"connected to {where} as {options.name}")
    if tls:
        front.show(tls_text(tls, options.host, options.cafile))
    if interactive:
        front.show(HINT_TEXT)
    session = ChatSession(link, options.name, front, interactive, plain=tls is None)
    signals.on_leave = lambda signum: session.leave(f"received {signal_name(signum)}")
    signals.on_status = session.report_status
    return await front.run(session)


async def run_client(options: Options, context: ssl.SSLContext | None, signals: Signals) -> int:
    """Connect, chat, and return the exit status; every failure is one line."""
    try:
        link = await open_link_or_leave(options, context, signals)
    except Interrupted as exc:
        print(f"leaving: received {signal_name(exc.signum)}", flush=True)
        return EXIT_OK
    except TlsFailed as exc:
        print_error(str(exc))
        return EXIT_FAILURE
    except OSError as exc:
        print_error(connect_error_text(options.host, options.port, exc))
        return EXIT_FAILURE
    return await chat(link, options, signals)


def new_event_loop() -> asyncio.AbstractEventLoop:
    """An event loop on poll(2): unlike epoll it takes any standard input, a regular
    file or /dev/null included."""
    return asyncio.SelectorEventLoop(selectors.PollSelector())


def run_loop(options: Options, context: ssl.SSLContext | None) -> int:
    """Run the client in its event loop, signals caught from before the connect."""
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        signals = Signals(runner.get_loop())
        return runner.run(run_client(options, context, signals))


# ---------------------------------------------------------------- main


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
        context = make_tls_context(options.cafile) if options.tls else None
    except UsageError as exc:
        print_error(str(exc))
        return EXIT_USAGE
    problem = check_std_streams()
    if problem:
        print_error(problem)
        return EXIT_FAILURE
    configure_streams()
    return run_loop(options, context)


if __name__ == "__main__":
    sys.exit(main())
