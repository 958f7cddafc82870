"""The waiting queue and the pairing policy: pure, no sockets, no clocks.

Who waits, in which order, and who may be paired with whom:

- Clients are queued in arrival order: a newly named client at the end. A client
  handed back by its room (it said ``next``, or its partner left under ``--requeue``) is
  queued again as a new arrival, at the end too; when a room hands back both, the one
  who was left goes in first, ahead of the one who said ``next``.
- Pairs form in queue order: the first waiting client with the earliest one after it
  that it may be paired with. The first of a pair writes first.
- Two clients that just left each other are not paired together again until each of
  them has had another partner since: every client remembers its last partner
  (``avoid``), and a pair is refused while either one avoids the other. Two such
  clients alone in the queue both wait for someone else.

How many rooms may be open at once is the server's business: it asks for the next pair
only when it has a room for it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, Protocol, TypeVar


class Waiter(Protocol):
    """What the policy needs of a waiting client."""

    id: int  # unique for the server's lifetime
    avoid: int | None  # the id of its last partner, or None


W = TypeVar("W", bound=Waiter)


def may_pair(a: Waiter, b: Waiter) -> bool:
    """True unless one of the two is the other's last partner."""
    return a.avoid != b.id and b.avoid != a.id


class WaitList(Generic[W]):
    """Clients waiting for a partner, in queue order."""

    def __init__(self) -> None:
        self._queue: dict[int, W] = {}  # id -> client; dicts keep insertion order

    def __len__(self) -> int:
        return len(self._queue)

    def __iter__(self) -> Iterator[W]:
        return iter(list(self._queue.values()))

    def __contains__(self, client: object) -> bool:
        return getattr(client, "id", None) in self._queue

    def add(self, client: W) -> None:
        """Queue ``client`` at the end."""
        self._queue[client.id] = client

    def remove(self, client: W) -> bool:
        """Take ``client`` out of the queue; False if it was not in it."""
        return self._queue.pop(client.id, None) is not None

    def next_pair(self) -> tuple[W, W] | None:
        """The pair to open a room for now, in queue order, or None; nothing is removed."""
        queue = list(self._queue.values())
        for i, first in enumerate(queue):
            for second in queue[i + 1 :]:
                if may_pair(first, second):
                    return first, second
        return None

    def partner_in_line(self, client: W) -> W | None:
        """Who ``client`` would be paired with if rooms were free now, or None if it
        would wait. One pass in queue order: each client takes the earliest one before
        it still unpaired that it may be paired with (the pairs :meth:`next_pair` gives one by one,
        in linear time for the usual queue)."""
        unpaired: list[W] = []
        for waiter in self._queue.values():
            match = next((u for u in unpaired if may_pair(u, waiter)), None)
            if match is None:
                unpaired.append(waiter)
                continue
            unpaired.remove(match)
            if client is waiter or client is match:
                return match if client is waiter else waiter
        return None
