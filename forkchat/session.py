"""The client's side of one chat: the server's lines, turns, held lines, next, leaving.

A :class:`ChatSession` runs on asyncio over one connection (``link.py``, plain or
TLS). It knows nothing of terminals: a front shows its lines and hands it what the
user sends (``piped.py`` for scripts, ``terminal.py`` for people).

- A line to send waits in ``held`` for our turn and goes out one per turn, in order.
  ``exit`` and ``next`` at the head of ``held`` go at once, turn or not (the protocol
  allows both at any time).
- When the lines are typed by a person, held lines belong to the partner they were
  typed for: they are dropped after ``next`` and after any ``WAIT`` that comes while
  paired (the partner is gone, whatever the WAIT says). A script's lines are one
  sequence and go out across partners.
- At the end of the input, once the lines before it have gone out, ``exit`` is sent
  at once; leaving waits at most ``LEAVE_TIMEOUT`` seconds for the server's ``BYE``.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Protocol

from forkchat import protocol
from forkchat.chatview import (
    EXIT_FAILURE,
    EXIT_OK,
    PAIRED,
    ChatState,
    bye_text,
    dropped_text,
    exit_status_for,
    format_address,
    held_text,
    message_text,
    no_greeting_text,
    prompt_for,
    sanitize,
    status_text,
    turn_text,
)
from forkchat.link import Link

LEAVE_TIMEOUT = 2.0  # seconds to wait for the server's BYE after sending exit
GREETING_TIMEOUT = 3.0  # seconds without a greeting before the hint about TLS
NEXT_AGAIN_TEXT = "[NEXT] asking for a new partner"
MAX_LINE_LIMIT = 1 << 20  # the largest --max-line a server accepts
# The server's --max-line is unknown here: take its largest, plus the "MSG " before it.
SERVER_LINE_MAX = MAX_LINE_LIMIT + len(protocol.msg_line(b"")) - 1


class Front(Protocol):
    """Where a session's lines go, and who must know that its state changed."""

    def show(self, line: str) -> None:
        """Print one transcript line at once (on stdout)."""

    def alert(self, line: str) -> None:
        """Print one line on stderr: a failure, or a hint about one."""

    def refresh(self) -> None:
        """The session's state changed (turn, partner, held lines, leaving)."""


class ChatSession:
    """One chat over a connected link; :meth:`run` returns the exit status.

    ``typed``: the lines come from a person (held lines are dropped with their partner,
    and each line is echoed behind the prompt when it goes out). ``plain``: the
    connection is not TLS, so a missing greeting may mean the server speaks TLS.
    """

    def __init__(
        self,
        link: Link,
        name: str,
        front: Front,
        typed: bool = False,
        plain: bool = True,
    ) -> None:
        self.link = link
        self.name = name
        self.front = front
        self.typed = typed
        self.plain = plain
        self.state = ChatState()
        self.held: deque[bytes] = deque()  # lines waiting for our turn, in order
        self.wait_text = ""  # the last WAIT's text, sanitised
        self.greeted = False
        self.hinted = False
        self.input_ended = False
        self.done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.timers: list[asyncio.TimerHandle] = []
        self.line_handlers: dict[str, Callable[[protocol.ServerLine], None]] = {
            protocol.HELLO: self.on_hello,
            protocol.WAIT: self.on_wait,
            protocol.PAIRED: self.on_paired,
            protocol.TURN: self.on_turn,
            protocol.MSG: self.on_msg,
            protocol.ERR: self.on_err,
            protocol.BYE: self.on_bye,
        }

    # -- the session's life

    async def run(self) -> int:
        """Send the name, serve the server's lines until the session ends; the status."""
        self.send_raw(self.name.encode("ascii") + b"\n")
        if self.plain:
            self.call_later(GREETING_TIMEOUT, self.hint_no_greeting)
        reading = asyncio.ensure_future(self.read_server())
        try:
            return await self.done
        finally:
            reading.cancel()
            await asyncio.wait({reading})  # it stops watching the socket before the close
            for timer in self.timers:
                timer.cancel()
            self.link.close()

    @property
    def finished(self) -> bool:
        return self.done.done()

    def finish(self, status: int) -> None:
        """End the session with this exit status (the first one given counts)."""
        if not self.done.done():
            self.done.set_result(status)
            self.front.refresh()

    def call_later(self, delay: float, callback: Callable[[], None]) -> None:
        """Run ``callback`` in ``delay`` seconds unless the session has ended by then."""
        self.timers.append(asyncio.get_running_loop().call_later(delay, callback))

    def show(self, line: str) -> None:
        self.front.show(line)

    def where(self) -> str:
        """The server's address as ``host:port`` (``the server`` if unknown)."""
        peer = self.link.peer()
        return format_address(*peer) if peer else "the server"

    # -- the server's lines

    async def read_server(self) -> None:
        """Read the server's lines and handle each, in order, until it closes."""
        lines = protocol.LineReader(SERVER_LINE_MAX)
        while not self.finished:
            data = await self.link.recv()
            if not data:
                self.on_server_closed()
                return
            for raw in lines.feed(data):
                self.take_server_line(raw)
                if self.finished:
                    return

    def take_server_line(self, raw: bytes | protocol.TooLong) -> None:
        """Dispatch one server line to its ``on_<keyword>`` handler."""
        self.greeted = True
        if isinstance(raw, protocol.TooLong):
            self.show("[skipped a line from the server too long to show]")
            return
        line = protocol.parse_server_line(raw)
        handler = self.line_handlers.get(line.keyword)
        if handler is None:
            self.show(f"[?] {sanitize(raw.decode('utf-8', 'replace'))}")
        else:
            handler(line)
        self.front.refresh()

    def on_server_closed(self) -> None:
        """The server closed without BYE: lost, unless we were leaving anyway."""
        if self.state.leaving:
            self.finish(EXIT_OK)
            return
        if not self.greeted:
            self.hint_no_greeting()
        self.show("connection lost")
        self.finish(EXIT_FAILURE)

    def hint_no_greeting(self) -> None:
        """No greeting yet on a plain connection: say, once, that TLS may be the cause."""
        if self.plain and not self.greeted and not self.hinted and not self.finished:
            self.hinted = True
            self.front.alert(no_greeting_text())

    def on_hello(self, line: protocol.ServerLine) -> None:
        """The greeting: the name already went out with the connection."""

    def on_wait(self, line: protocol.ServerLine) -> None:
        """No partner (yet, again after next, or because the partner left): the session
        goes on. Lines a person typed for a partner who is gone are dropped."""
        partner = self.state.partner
        gone = self.state.take_wait()
        self.wait_text = sanitize(line.text)
        self.show(f"[WAIT] {self.wait_text}")
        if gone and self.typed:
            self.drop_held(partner)
        self.send_held()

    def on_paired(self, line: protocol.ServerLine) -> None:
        self.state.take_paired(sanitize(line.arg) or "partner")
        self.show(f"[PAIRED] you are chatting with {self.state.partner}")

    def on_turn(self, line: protocol.ServerLine) -> None:
        """TURN WRITE: our turn (a held line goes out); TURN READ: the partner's.
        A TURN from the room we left with next is stale and ignored."""
        if line.arg not in ("WRITE", "READ"):
            self.show(f"[?] TURN {sanitize(line.text)}")
            return
        if not self.state.take_turn(line.arg == "WRITE") or self.state.leaving:
            return  # stale, or exit is on its way: the turn no longer matters
        self.show(turn_text(self.state.my_turn, self.state.partner))
        self.send_held()

    def on_msg(self, line: protocol.ServerLine) -> None:
        self.show(message_text(self.state.partner, line.arg))

    def on_err(self, line: protocol.ServerLine) -> None:
        """The server dropped our last line; on our turn we may write again."""
        self.show(f"[ERR] {sanitize(line.arg)}: {sanitize(line.rest)}")
        if self.state.take_err():
            self.send_held()

    def on_bye(self, line: protocol.ServerLine) -> None:
        """The server's last line: print why, end with the status its reason gives (a
        refusal such as ``full`` fails even when we were leaving anyway)."""
        self.show(bye_text(line.arg, line.rest))
        self.finish(exit_status_for(line.arg))

    # -- what the user sends

    def submit(self, line: bytes) -> None:
        """A line to send: at once on our turn, else held for it (a person is told)."""
        if self.state.leaving or self.finished:
            return
        self.held.append(line)
        self.send_held()
        if self.typed and self.held:  # first in, first out: this line is still held
            self.show(held_text(line.decode("utf-8", "replace")))
        self.front.refresh()

    def end_input(self) -> None:
        """No more lines will come: leave once the held ones have gone out."""
        self.input_ended = True
        self.send_held()
        self.front.refresh()

    def send_held(self) -> None:
        """Send what the held lines allow now: ``exit`` and ``next`` at their head at
        once, a message on our turn; then leave if the input ended and none is left."""
        while self.held and not self.state.leaving:
            head = self.held[0]
            if protocol.is_exit(head):
                self.held.popleft()
                self.leave(None)
                return
            if protocol.is_next(head):
                self.held.popleft()
                self.send_next()
                continue
            if not self.state.can_write():
                return
            self.send_message(self.held.popleft())
        if self.input_ended and not self.held and not self.state.leaving:
            self.leave("end of input")

    def send_message(self, line: bytes) -> None:
        """Send one chat line (echoed for a person); the turn passes with TURN READ."""
        if self.typed:
            self.show(prompt_for(self.name) + line.decode("utf-8", "replace"))
        self.send_raw(line + b"\n")
        self.state.send_message()

    def ask_next(self) -> None:
        """A person asked for a new partner: the lines held for this one are dropped,
        and ``next`` goes at once."""
        if self.state.leaving or self.finished:
            return
        self.drop_held(self.state.partner if self.state.phase == PAIRED else None)
        self.send_next()
        self.front.refresh()

    def send_next(self) -> None:
        """Send ``next``: leave the partner for a new one and stay connected."""
        was = self.state.partner if self.state.phase == PAIRED else None
        self.send_raw(b"next\n")
        self.state.ask_next()
        self.show(f"[NEXT] leaving {was} for a new partner" if was else NEXT_AGAIN_TEXT)

    def drop_held(self, partner: str | None) -> None:
        """Forget the lines held for a partner who is gone, saying how many."""
        if self.held:
            self.show(dropped_text(len(self.held), partner))
            self.held.clear()

    def leave(self, why: str | None) -> None:
        """Send ``exit`` and wait (bounded) for BYE; a second request ends at once."""
        if self.finished:
            return
        if self.state.leaving:
            self.finish(EXIT_OK)
            return
        if why:
            self.show(f"leaving: {why}")
        self.state.leaving = True
        self.send_raw(b"exit\n")
        self.call_later(LEAVE_TIMEOUT, self.give_up_leaving)
        self.front.refresh()

    def give_up_leaving(self) -> None:
        if not self.finished:
            self.show("no goodbye from the server in time")
            self.finish(EXIT_OK)

    def send_raw(self, data: bytes) -> None:
        """Queue bytes for the server (a failed write shows as the server's close)."""
        self.link.send(data)

    def report_status(self) -> None:
        """SIGUSR2 (``bin/pids --signal USR2 --all``): say where the session stands."""
        held = f"; {len(self.held)} line(s) held" if self.held else ""
        self.show(f"[STATUS] {self.name} at {self.where()}: {status_text(self.state)}{held}")
