"""What a person types at the interactive client, read as an action (pure).

A line that begins with ``/`` is a command, answered by the client itself: ``/quit`` and
``/exit`` leave, ``/next`` asks for a new partner, ``/help`` lists the commands, and any
other ``/word`` is unknown and never sent. ``//text`` sends ``/text``. The protocol's
own lines keep working as typed: ``exit`` leaves and ``next`` asks for a new partner.
Everything else is a message. Piped input is never read as commands: a script sends
its lines as they are.
"""

from __future__ import annotations

from typing import NamedTuple

from forkchat import protocol

SEND = "send"
LEAVE = "leave"
NEXT = "next"
HELP = "help"
UNKNOWN = "unknown"
IGNORE = "ignore"

COMMANDS = {"/quit": LEAVE, "/exit": LEAVE, "/next": NEXT, "/help": HELP}


class Typed(NamedTuple):
    """One typed line read as an action; ``text`` is the message to send (SEND) or the
    unknown command word (UNKNOWN)."""

    action: str
    text: str = ""


def read_typed(text: str) -> Typed:
    """The action a typed line asks for. Words after a command are ignored."""
    line = text.encode("utf-8", "surrogateescape")
    if protocol.is_blank(line):
        return Typed(IGNORE)
    if protocol.is_exit(line):
        return Typed(LEAVE)
    if protocol.is_next(line):
        return Typed(NEXT)
    if text.startswith("//"):
        return Typed(SEND, text[1:])
    if text.startswith("/"):
        word = text.split(maxsplit=1)[0]
        action = COMMANDS.get(word)
        return Typed(action) if action else Typed(UNKNOWN, word)
    return Typed(SEND, text)
