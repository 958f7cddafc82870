"""The client's front for people: a prompt_toolkit prompt on the terminal.

The line editor is prompt_toolkit's (Emacs keys: cursor and word moves, Home/End,
word deletes, Up/Down through the lines typed, wide characters, resize, Ctrl-Z). The
prompt says whose turn it is, and a bottom toolbar always shows where the session
stands. Transcript lines are printed above the prompt, which is then drawn again with
the half-typed line as it was. A typed line is read as a command or a message
(``commands.py``); the prompt erases it once accepted, and the session prints each
line in the transcript when it goes out.

At the prompt Ctrl-C and Ctrl-D (on an empty line) are keys, not signals: both leave,
Ctrl-C as SIGINT does.
"""

from __future__ import annotations

import asyncio
import sys
from typing import TextIO

from prompt_toolkit import PromptSession
from prompt_toolkit.history import InMemoryHistory
from prompt_toolkit.styles import Style

from forkchat import commands
from forkchat.chatview import (
    HELP_LINES,
    input_prompt,
    toolbar_text,
    unknown_command_text,
)
from forkchat.piped import write_line
from forkchat.session import ChatSession

STYLE = Style.from_dict({"bottom-toolbar": "reverse"})


class TerminalFront:
    """Feeds a session the lines a person types; prints its lines above the prompt."""

    def __init__(self, name: str, where: str) -> None:
        self.name = name
        self.where = where  # the server's address, and TLS, for the toolbar
        self.session: ChatSession | None = None
        self.prompt: PromptSession[str] = PromptSession(
            message=self.prompt_text,
            bottom_toolbar=self.toolbar,
            history=InMemoryHistory(),
            erase_when_done=True,
            enable_suspend=True,
            style=STYLE,
        )

    async def run(self, session: ChatSession) -> int:
        """Run the session with the prompt; return its exit status."""
        self.session = session
        chatting = asyncio.ensure_future(session.run())
        reading = asyncio.ensure_future(self.read_lines())
        try:
            return await chatting
        finally:
            self.stop_prompt()
            await reading

    async def read_lines(self) -> None:
        """Prompt for lines until the session leaves or ends; act on each."""
        session = self.session
        while not (session.finished or session.state.leaving):
            try:
                text = await self.prompt.prompt_async(
                    handle_sigint=False, set_exception_handler=False
                )
            except KeyboardInterrupt:  # Ctrl-C at the prompt; between prompts it is SIGINT
                session.leave("received SIGINT")
            except EOFError:
                session.leave("end of input (Ctrl-D)")
            else:
                if text is not None:  # None: the prompt was stopped
                    self.take_typed(text)

    def take_typed(self, text: str) -> None:
        """One accepted line: a command, or a message for the session."""
        session = self.session
        typed = commands.read_typed(text)
        if typed.action == commands.SEND:
            session.submit(typed.text.encode("utf-8", "surrogateescape"))
        elif typed.action == commands.LEAVE:
            session.leave(None)
        elif typed.action == commands.NEXT:
            session.ask_next()
        elif typed.action == commands.HELP:
            for line in HELP_LINES:
                self.show(line)
        elif typed.action == commands.UNKNOWN:
            self.show(unknown_command_text(typed.text))

    def stop_prompt(self) -> None:
        """End the prompt that is running, if one is (its line is erased)."""
        app = self.prompt.app
        if app.is_running and app.future is not None and not app.future.done():
            app.exit()

    # -- what the session calls

    def show(self, line: str) -> None:
        self.print_above(line, sys.stdout)

    def alert(self, line: str) -> None:
        self.print_above(f"forkchat client: {line}", sys.stderr)

    def refresh(self) -> None:
        """Draw the prompt and the toolbar again; stop prompting once leaving."""
        session = self.session
        if session is not None and (session.finished or session.state.leaving):
            self.stop_prompt()
        self.prompt.app.invalidate()

    # -- drawing

    def print_above(self, line: str, stream: TextIO) -> None:
        """Print a line above the prompt and draw the prompt again below it.

        The terminal stays in raw mode throughout. prompt_toolkit's ``run_in_terminal``
        would switch it to cooked mode for the print, and keys typed meanwhile would be
        edited by the terminal (a Backspace eating half an arrow key), not the prompt.
        """
        app = self.prompt.app
        if not app.is_running:
            write_line(stream, line)
            return
        app.renderer.erase()  # the prompt and the status bar; the cursor where they began
        write_line(stream, line)
        app.renderer.request_absolute_cursor_position()  # the status bar needs the row
        app.invalidate()

    def prompt_text(self) -> str:
        return input_prompt(self.name, self.session.state)

    def toolbar(self) -> str:
        session = self.session
        state, held = session.state, len(session.held)
        return toolbar_text(self.name, self.where, state, held, session.wait_text)
