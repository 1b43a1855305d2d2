"""Deadlines that come due in the order they were set.

Every timeout here is one fixed length per kind (OFFLINE_TIMEOUT,
CLEAN_ID_AFTER, WAIT_TIMEOUT...), so setting order is deadline order and
an ordered dict is a priority queue with O(1) set, cancel and pop.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Generic, Hashable, Iterator, TypeVar

K = TypeVar("K", bound=Hashable)


class Deadlines(Generic[K]):
    """``{key: deadline}``, soonest first, for one fixed timeout."""

    __slots__ = ("_due",)

    def __init__(self) -> None:
        self._due: OrderedDict[K, float] = OrderedDict()

    def set(self, key: K, deadline: float) -> None:
        """Set (or move) ``key``'s deadline; it must not be sooner than the others'."""
        self._due[key] = deadline
        self._due.move_to_end(key)

    def cancel(self, key: K) -> bool:
        """Drop ``key``'s deadline; whether it had one."""
        return self._due.pop(key, None) is not None

    def get(self, key: K) -> float | None:
        """``key``'s deadline, or None."""
        return self._due.get(key)

    def pop_due(self, now: float) -> Iterator[K]:
        """Remove and yield each key whose deadline is ``now`` or before, soonest first.

        Should the timeout change (a reload), the order is only roughly by
        deadline: a key may then wait for an older, longer one ahead of it.
        """
        due = self._due
        while due:
            key, deadline = next(iter(due.items()))
            if deadline > now:
                return
            del due[key]
            yield key

    def __contains__(self, key: object) -> bool:
        return key in self._due

    def __len__(self) -> int:
        return len(self._due)

    def __iter__(self) -> Iterator[K]:
        return iter(self._due)

    def clear(self) -> None:
        """Forget every deadline."""
        self._due.clear()
