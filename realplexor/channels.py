"""Channel state: what the WAIT and IN lines see of channels.

:class:`ChannelState` is the one interface the servers use. It joins a
store (queues, cursors, presence, event log: :mod:`realplexor.store`)
and this process's fan-out of waiting listeners
(:mod:`realplexor.fanout`). :class:`MemoryChannels` keeps the store in
this process; a shared store (several processes or hosts) fits the same
interface and passes the same tests (``tests/test_channels.py`` runs
against every implementation given to its fixture).

No sockets and no gevent here: time comes from injected clocks, and the
server calls :meth:`ChannelState.expire` periodically.
"""
from __future__ import annotations

import abc
import time
from decimal import Decimal
from typing import Callable, Iterator, NamedTuple, Sequence

from .cursors import CursorClock
from .fanout import FanOut, Listener
from .protocol import render_wait_body
from .store import FIRST_POSITION, MemoryStore, Settings, event_log_len

__all__ = ["ANSWERS_KEPT", "FIRST_POSITION", "ChannelState", "Listener", "MemoryChannels", "Settings",
           "StateCounts", "event_log_len"]

class StateCounts(NamedTuple):
    """What the state holds now, and what it has done since it started.

    Gauges first (channels with listeners in this process, online
    channels, listeners, channels with a queue, distinct messages queued
    and their bytes), then totals that only grow: publishes, answers
    delivered to polls (woken or answered at once from the queues) and
    the body bytes of those answers, and queues dropped over MAX_QUEUE_MB.
    """

    channels: int = 0
    online: int = 0
    listeners: int = 0
    queued_channels: int = 0
    queued_messages: int = 0
    queued_bytes: int = 0
    publishes: int = 0
    deliveries: int = 0
    delivered_bytes: int = 0
    queues_dropped: int = 0


# How many rendered answers to keep for identical polls (each at most WAIT_MAX_ANSWER).
ANSWERS_KEPT = 8


class ChannelState(abc.ABC):
    """What the WAIT and IN lines need of the channel state."""

    #: Whether publish, online, watch, position and stats may block (wait
    #: for a shared store): then the IN line calls them from a greenlet.
    blocking = False

    def start(self) -> None:
        """Begin (a shared store is reached here: StoreDown if it cannot be)."""

    def stop(self) -> None:
        """End: this process's listeners stop counting."""

    def ready(self) -> str | None:
        """None when the state can take work, else why not (one line)."""
        return None

    @abc.abstractmethod
    def listen(self, listener: Listener) -> bytes | None:
        """Register ``listener`` on its channels, or answer it at once.

        If a visible message newer than a listened cursor is queued, return
        the rendered body and leave the listener unregistered. Otherwise
        register it (O(1) per channel in the number of other listeners) and
        return None; it will be told through ``listener.deliver``.
        """

    @abc.abstractmethod
    def unlisten(self, listener: Listener) -> None:
        """Remove ``listener`` from its channels (idempotent, O(1) per channel)."""

    @abc.abstractmethod
    def cuts(self, cursors: dict[str, Decimal | None]) -> list[tuple[str, str]]:
        """Channels on which messages after the given cursor were dropped unsent.

        Each with the cursor text of the newest dropped message: a client
        that listened from an older cursor missed messages up to it. May
        block on a shared store (see :attr:`blocking`).
        """

    @abc.abstractmethod
    def publish(self, targets: Sequence[tuple[str, Decimal | None, str | None]],
                data: bytes, limiters: frozenset[str] = frozenset()) -> list[tuple[str, str]]:
        """Queue ``data`` on each target channel and wake its listeners.

        ``targets`` are ``(id, cursor, cursor text)``; a None cursor takes
        one fresh server cursor shared by the whole publish. Queueing and
        waking are atomic per channel: a listener either gets this message
        now or finds it queued when it registers. Returns the ids with the
        cursors used.
        """

    @abc.abstractmethod
    def online(self, prefixes: Sequence[str] = ()) -> list[tuple[str, int]]:
        """Online channels (optionally with an id prefix) and their listener counts, by id."""

    def online_steps(self, prefixes: Sequence[str] = ()) -> Iterator[list[tuple[str, int]]]:
        """:meth:`online` in parts, each the work of a bounded step (consume between loop turns)."""
        yield self.online(prefixes)

    def stats_steps(self) -> Iterator[str]:
        """:meth:`stats` in pieces of text, each the work of a bounded step ("" while working)."""
        yield self.stats()

    @abc.abstractmethod
    def watch(self, after: int, prefixes: Sequence[str] = ()) -> list[tuple[str, int, str]]:
        """Online/offline transitions after position ``after``, oldest first.

        Each id appears once, with its latest transition: ``(event, pos, id)``.
        """

    @abc.abstractmethod
    def position(self) -> int:
        """The position of the newest online/offline transition (FIRST_POSITION before any)."""

    @abc.abstractmethod
    def expire(self) -> None:
        """Run due timeouts: offline countdowns and cleaning of idle queues."""

    @abc.abstractmethod
    def reconfigure(self, settings: Settings) -> None:
        """Take on new tunables; queued messages and listeners stay."""

    @abc.abstractmethod
    def stats(self) -> str:
        """A human-readable dump of the state, for debugging."""

    @abc.abstractmethod
    def listener_count(self) -> int:
        """How many listeners are registered now."""

    @abc.abstractmethod
    def counts(self) -> StateCounts:
        """The state's figures now, in O(1): read at every metrics scrape."""


class MemoryChannels(ChannelState):
    """The channel state of one process: a memory store and this process's fan-out."""

    def __init__(self, settings: Settings = Settings(),
                 clock: Callable[[], float] = time.monotonic,
                 cursor_clock: CursorClock | None = None):
        self._fanout = FanOut(self._occupied, self._vacated)
        self._store = MemoryStore(settings, self._fanout.count, clock, cursor_clock)
        # Answers rendered from the queues as they are (store version), by
        # the cursors asked with: identical polls at the same moment share one body.
        self._answers: dict[tuple, bytes] = {}
        self._answers_version = -1

    @property
    def settings(self) -> Settings:
        return self._store.settings

    def _occupied(self, channel_id: str) -> None:
        self._store.occupied(channel_id)

    def _vacated(self, channel_id: str) -> None:
        self._store.vacated(channel_id)

    # -- listening ---------------------------------------------------------

    def listen(self, listener: Listener) -> bytes | None:
        cursors = listener.cursors
        now = None
        for channel_id, cursor in cursors.items():
            if cursor is None:
                if now is None:
                    now = self._store.now()
                cursors[channel_id] = now
        body = self._answer_from_queues(cursors)
        if body is not None:
            self._fanout.counted(body)
            return body
        self._fanout.register(listener)
        return None

    def unlisten(self, listener: Listener) -> None:
        self._fanout.unregister(listener)

    def _answer_from_queues(self, cursors: dict[str, Decimal]) -> bytes | None:
        store = self._store
        parts = store.queued_parts(cursors)
        if parts is None:
            return None
        if self._answers_version != store.version:
            self._answers.clear()
            self._answers_version = store.version
        key = tuple(cursors.items())
        body = self._answers.get(key)
        if body is None:
            body = render_wait_body(parts)
            if len(self._answers) >= ANSWERS_KEPT:
                del self._answers[next(iter(self._answers))]
            self._answers[key] = body
        return body

    def cuts(self, cursors: dict[str, Decimal | None]) -> list[tuple[str, str]]:
        return self._store.dropped_after(cursors)

    # -- publishing --------------------------------------------------------

    def publish(self, targets: Sequence[tuple[str, Decimal | None, str | None]],
                data: bytes, limiters: frozenset[str] = frozenset()) -> list[tuple[str, str]]:
        message, placed = self._store.publish_message(targets, data, limiters)
        self._fanout.wake(placed, message)
        return [(channel_id, text) for channel_id, _, text in placed]

    # -- online and events -------------------------------------------------

    def online(self, prefixes: Sequence[str] = ()) -> list[tuple[str, int]]:
        return [item for part in self._store.online_steps(prefixes) for item in part]

    def online_steps(self, prefixes: Sequence[str] = ()) -> Iterator[list[tuple[str, int]]]:
        return self._store.online_steps(prefixes)

    def watch(self, after: int, prefixes: Sequence[str] = ()) -> list[tuple[str, int, str]]:
        return self._store.watch(after, prefixes)

    def position(self) -> int:
        return self._store.position()

    # -- housekeeping ------------------------------------------------------

    def expire(self) -> None:
        self._store.expire()

    def reconfigure(self, settings: Settings) -> None:
        self._store.reconfigure(settings)

    # -- introspection -----------------------------------------------------

    def listener_count(self) -> int:
        return self._fanout.listeners

    def counts(self) -> StateCounts:
        fanout, store = self._fanout, self._store
        return StateCounts(
            channels=fanout.channel_count(), online=store.online_count(), listeners=fanout.listeners,
            queued_channels=store.queued_channels(), queued_messages=store.queued_messages,
            queued_bytes=store.queued_bytes, publishes=store.publishes, deliveries=fanout.deliveries,
            delivered_bytes=fanout.delivered_bytes, queues_dropped=store.queues_dropped)

    def stats(self) -> str:
        return "".join(self.stats_steps())

    def stats_steps(self) -> Iterator[str]:
        return self._store.stats_steps(self._fanout.listeners, self._fanout.channels())
