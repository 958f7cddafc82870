"""Unit tests of the waiting queue and its pairing policy (``forkchat/waitlist.py``).

Pure: no sockets, no processes. A waiter is anything with an ``id`` and an ``avoid``
(the id of its last partner): here a small dataclass.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from forkchat.waitlist import WaitList, may_pair


def pop_pair(wl: WaitList):
    """The next pair, taken out of the queue (as the lobby does when it opens a room)."""
    pair = wl.next_pair()
    for client in pair or ():
        wl.remove(client)
    return pair


@dataclass(eq=False)
class W:
    id: int
    avoid: int | None = None

    def __repr__(self) -> str:
        return f"W{self.id}" + (f"~{self.avoid}" if self.avoid is not None else "")


def queue_of(*waiters: W) -> WaitList[W]:
    wl: WaitList[W] = WaitList()
    for w in waiters:
        wl.add(w)
    return wl


def split(a: W, b: W) -> None:
    """``a`` and ``b`` just left each other."""
    a.avoid, b.avoid = b.id, a.id


def drain(wl: WaitList[W]) -> list[tuple[int, int]]:
    """Every pair the queue gives, in order, as ids."""
    pairs = []
    while (pair := pop_pair(wl)) is not None:
        pairs.append((pair[0].id, pair[1].id))
    return pairs


def test_pairs_form_in_arrival_order():
    wl = queue_of(*(W(i) for i in range(1, 6)))
    assert drain(wl) == [(1, 2), (3, 4)]
    assert [w.id for w in wl] == [5]


def test_the_first_of_a_pair_is_the_one_who_arrived_earlier():
    """Ids are not arrival order: the queue is. A late id that arrived first writes first."""
    late, early = W(9), W(2)
    wl = queue_of(late, early)
    first, second = pop_pair(wl)
    assert (first, second) == (late, early)


def test_next_pair_takes_nothing_out():
    a, b = W(1), W(2)
    wl = queue_of(a, b)
    assert wl.next_pair() == (a, b)
    assert len(wl) == 2 and a in wl and b in wl
    assert pop_pair(wl) == (a, b)
    assert len(wl) == 0 and a not in wl and pop_pair(wl) is None


def test_a_client_queued_again_goes_to_the_end():
    a, b, c = W(1), W(2), W(3)
    wl = queue_of(a, b, c)
    wl.remove(a)
    wl.add(a)
    assert [w.id for w in wl] == [2, 3, 1]
    assert pop_pair(wl) == (b, c)


def test_two_who_just_split_alone_in_the_queue_both_wait():
    a, b = W(1), W(2)
    split(a, b)
    wl = queue_of(a, b)
    assert not may_pair(a, b) and not may_pair(b, a)
    assert wl.next_pair() is None
    assert wl.partner_in_line(a) is None and wl.partner_in_line(b) is None
    assert len(wl) == 2


def test_two_who_split_are_each_paired_with_a_third_arrival_in_queue_order():
    a, b = W(1), W(2)
    split(a, b)
    wl = queue_of(b, a)  # b was left behind: queued ahead of a, who said next
    c = W(3)
    wl.add(c)
    assert pop_pair(wl) == (b, c)  # the third pairs with the first in queue order
    assert wl.next_pair() is None  # a alone
    d = W(4)
    wl.add(d)
    assert pop_pair(wl) == (a, d)
    assert len(wl) == 0


def test_one_who_split_is_skipped_for_a_later_one_it_may_meet():
    a, b, c = W(1), W(2), W(3)
    split(a, b)
    wl = queue_of(a, b, c)
    assert pop_pair(wl) == (a, c)  # a skips b; b waits
    assert [w.id for w in wl] == [2]


def test_avoid_is_mutual_one_side_is_enough():
    a, b = W(1, avoid=2), W(2, avoid=None)
    assert not may_pair(a, b) and not may_pair(b, a)
    b2 = W(2, avoid=7)  # b has had another partner since; a has not
    assert not may_pair(a, b2)
    assert queue_of(a, b2).next_pair() is None


def test_avoid_lifts_once_each_had_another_partner():
    a, b = W(1), W(2)
    split(a, b)
    a.avoid, b.avoid = 3, 4  # each left someone else since
    assert may_pair(a, b)
    assert pop_pair(queue_of(a, b)) == (a, b)


def test_a_client_never_avoids_an_unrelated_one():
    assert may_pair(W(1), W(2))
    assert may_pair(W(1, avoid=5), W(2, avoid=6))


def test_remove_contains_len():
    a, b, c = W(1), W(2), W(3)
    wl = queue_of(a, b)
    assert len(wl) == 2 and a in wl and c not in wl
    assert "not a waiter" not in wl  # anything without an id is simply not in it
    assert wl.remove(a) is True
    assert wl.remove(a) is False
    assert wl.remove(c) is False
    assert len(wl) == 1 and a not in wl and b in wl
    assert [w.id for w in wl] == [2]


def test_iterating_is_a_snapshot_safe_to_change_the_queue_under():
    a, b, c = W(1), W(2), W(3)
    wl = queue_of(a, b, c)
    for w in wl:
        wl.remove(w)
    assert len(wl) == 0


def test_partner_in_line_in_a_plain_queue():
    a, b, c = W(1), W(2), W(3)
    wl = queue_of(a, b, c)
    assert wl.partner_in_line(a) is b
    assert wl.partner_in_line(b) is a
    assert wl.partner_in_line(c) is None


def random_queue(rng: random.Random, size: int) -> list[W]:
    """A queue of ``size`` waiters with random ids and random last partners, some of
    them mutual (a pair that just split), some pointing at clients not in the queue."""
    ids = rng.sample(range(1, 10 * size + 10), size)
    waiters = [W(i) for i in ids]
    for w in waiters:
        roll = rng.random()
        if roll < 0.4:
            w.avoid = rng.choice(ids)
        elif roll < 0.6:
            w.avoid = 10_000 + rng.randrange(5)  # someone gone
    for _ in range(rng.randrange(size // 2 + 1)):
        a, b = rng.sample(waiters, 2)
        split(a, b)
    return waiters


def test_partner_in_line_agrees_with_repeated_pop_pair_on_random_queues():
    rng = random.Random(20261129)
    checked = 0
    for _ in range(600):
        waiters = random_queue(rng, rng.randrange(2, 12))
        popped = queue_of(*waiters)
        partner_of: dict[int, int | None] = {w.id: None for w in waiters}
        while (pair := pop_pair(popped)) is not None:
            assert may_pair(*pair)
            partner_of[pair[0].id], partner_of[pair[1].id] = pair[1].id, pair[0].id
        # Nobody left over could have been paired with anyone else left over.
        leftover = list(popped)
        assert all(not may_pair(x, y) for i, x in enumerate(leftover) for y in leftover[i + 1 :])
        wl = queue_of(*waiters)
        for w in waiters:
            got = wl.partner_in_line(w)
            assert (got.id if got else None) == partner_of[w.id], (waiters, w)
            checked += 1
        assert len(wl) == len(waiters)  # partner_in_line takes nothing out
    assert checked > 3000
