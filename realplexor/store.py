"""The store: channel queues, cursors and presence, with no listeners and no bytes.

A store keeps what every process serving the same channels must agree
on: each channel's queue of messages with their cursors and limiters
(capped at MAX_DATA_FOR_ID, emptied after CLEAN_ID_AFTER, all together
under MAX_QUEUE_MB), which channels are online, and the online/offline
event log with its positions. It answers with values (parts to send,
cursors used, events); rendering them is the fan-out's business.

:class:`MemoryStore` keeps all of it in this process. Listener counts
come from the process's fan-out (the ``counts`` callable), which tells
the store when a channel gets its first listener here and when its last
one leaves (:meth:`MemoryStore.occupied`, :meth:`MemoryStore.vacated`).

No sockets and no gevent here: time comes from injected clocks.
"""
from __future__ import annotations

import heapq
import logging
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from decimal import Decimal
from itertools import islice
from typing import Callable, Iterable, Iterator, Sequence

from sortedcontainers import SortedList

from .cursors import CursorClock
from .deadlines import Deadlines

log = logging.getLogger("realplexor.channels")

# The position of a fresh event log, before any event. The old server's
# positions started here, so a watcher that passes a small number such
# as 1 still sees every event.
FIRST_POSITION = 10
# A publisher cursor this many seconds ahead of the server's clock is logged.
FAR_AHEAD = 86400
# How many channels STATS lists.
STATS_CHANNELS = 20
# Channels one step of ONLINE or STATS reads: a few milliseconds of work.
STEP_ITEMS = 5000

#: A channel reached by a publish: (channel id, cursor, cursor text).
Placed = tuple[str, Decimal, str]
#: One part of an answer: the listened channels it reached with their cursor texts, and the data.
Part = tuple[list[tuple[str, str]], bytes]


class StoreDown(Exception):
    """A shared store cannot be reached; the message says why, in one line."""


@dataclass(frozen=True)
class Settings:
    """The tunables of the channel state (from the configuration)."""

    max_data_for_id: int = 30
    clean_id_after: float = 3600
    offline_timeout: float = 30
    event_log_len: int = 3003
    max_answer: int = 1 << 20
    max_queue_bytes: int = 256 << 20
    process_timeout: float = 10


def event_log_len(event_chain_len: int) -> int:
    """How many online/offline events to keep for ``EVENT_CHAIN_LEN``.

    The old server kept up to three chains of ``EVENT_CHAIN_LEN + 1``
    events; keeping as many means no old watcher misses one.
    """
    return 3 * (event_chain_len + 1)


class Message:
    """One publish; shared by every channel queue it went to.

    ``order`` counts publishes: queues drop in publish order, whatever the
    cursors. ``queued`` is how many queues hold it; its bytes count
    towards MAX_QUEUE_MB while one does.
    """

    __slots__ = ("data", "limiters", "order", "queued")

    def __init__(self, data: bytes, limiters: frozenset[str], order: int):
        self.data = data
        self.limiters = limiters
        self.order = order
        self.queued = 0

    def visible_to(self, listened: dict[str, Decimal]) -> bool:
        """Whether a listener of these channels may see it (its limiters allow)."""
        return not self.limiters or any(limiter in listened for limiter in self.limiters)


class MemoryStore:
    """Queues, cursors and presence of one process, kept in dicts."""

    def __init__(self, settings: Settings, counts: Callable[[str], int],
                 clock: Callable[[], float] = time.monotonic,
                 cursor_clock: CursorClock | None = None):
        self.settings = settings
        self._count = counts
        self._clock = clock
        self._cursors = cursor_clock or CursorClock()
        # channel id -> [(cursor, cursor text, Message), ...] sorted by cursor
        self._queues: dict[str, list[tuple[Decimal, str, Message]]] = {}
        # channel id -> when its queue is emptied (CLEAN_ID_AFTER after its last publish)
        self._cleaning: Deadlines[str] = Deadlines()
        # channel id -> when it goes offline (OFFLINE_TIMEOUT after its last listener left)
        self._going_offline: Deadlines[str] = Deadlines()
        # Online channel ids, sorted: ONLINE reads a prefix's range, not every channel.
        self._online_ids = SortedList()
        # (pos, event, channel id), oldest first
        self._events: deque[tuple[int, str, str]] = deque(maxlen=settings.event_log_len)
        self._position = FIRST_POSITION
        self._published = 0
        # Queued bytes (each message once) and the channels with a queue,
        # least recently published to first: MAX_QUEUE_MB drops from the front.
        self._queued_bytes = 0
        self._by_publish: OrderedDict[str, None] = OrderedDict()
        self._queue_guard = QueueGuard()
        #: Distinct messages queued (one publish to several channels counts once).
        self.queued_messages = 0
        # channel id -> (cursor, cursor text) of the newest message dropped from its
        # queue (MAX_DATA_FOR_ID, CLEAN_ID_AFTER, MAX_QUEUE_MB): a client behind it missed some
        self._dropped: dict[str, tuple[Decimal, str]] = {}
        # channel id -> when its drop mark is forgotten (CLEAN_ID_AFTER after its queue emptied)
        self._forget_dropped: Deadlines[str] = Deadlines()
        #: Grows whenever a queue changes: answers rendered before are stale.
        self.version = 0

    # -- cursors -------------------------------------------------------------

    def now(self) -> Decimal:
        """The cursor of "now": after every cursor handed out so far."""
        return self._cursors.now()

    # -- queues ----------------------------------------------------------------

    def publish(self, targets: Sequence[tuple[str, Decimal | None, str | None]],
                data: bytes, limiters: frozenset[str]) -> list[Placed]:
        """Queue ``data`` on each target (a repeated id once); where it went, with the cursors.

        A None cursor takes one fresh server cursor shared by the whole publish.
        """
        return self.publish_message(targets, data, limiters)[1]

    def publish_message(self, targets: Sequence[tuple[str, Decimal | None, str | None]],
                        data: bytes, limiters: frozenset[str]) -> tuple[Message, list[Placed]]:
        """:meth:`publish`, also handing back the message (for this process's fan-out)."""
        self._published += 1
        message = Message(data, limiters, self._published)
        fresh = None
        placed: list[Placed] = []
        clean_at = self._clock() + self.settings.clean_id_after
        seen: set[str] = set()
        for channel_id, cursor, text in targets:
            if channel_id in seen:
                continue     # "d,d,d" is one channel, as it is for a listener
            seen.add(channel_id)
            if cursor is None:
                if fresh is None:
                    fresh = self._cursors.next()
                cursor, text = fresh
            elif cursor > self._cursors.now() + FAR_AHEAD:
                log.warning("a publish to %s has cursor %s, more than a day ahead of the server's clock",
                            channel_id, text)
            self._enqueue(channel_id, cursor, text, message)
            self._cleaning.set(channel_id, clean_at)
            placed.append((channel_id, cursor, text))
        if self._queued_bytes > self.settings.max_queue_bytes:
            self._drop_least_recent(seen)
        return message, placed

    def history(self, cursors: dict[str, Decimal | None]) -> tuple[list[Part] | None, dict[str, Decimal]]:
        """What a listener of ``cursors`` has not seen, within WAIT_MAX_ANSWER, and each channel's newest cursor.

        A None cursor means "from now": nothing of that channel is replayed.
        """
        self._clean_if_idle(cursors)
        newest = {channel_id: max((entry[0] for entry in self._queues.get(channel_id, ())), default=Decimal(0))
                  for channel_id in cursors}
        asked = {channel_id: newest[channel_id] if cursor is None else cursor
                 for channel_id, cursor in cursors.items()}
        return self.queued_parts(asked), newest

    def queued_parts(self, cursors: dict[str, Decimal]) -> list[Part] | None:
        """What a listener of ``cursors`` has not seen yet, oldest first, within WAIT_MAX_ANSWER.

        None when nothing visible is queued after its cursors.
        """
        self._clean_if_idle(cursors)
        # { id(Message): [first cursor, data, [(channel id, cursor, cursor text), ...]] }
        parts: dict[int, list] = {}
        queues = self._queues
        for channel_id, listened_from in cursors.items():
            queue = queues.get(channel_id)
            if queue is None or queue[-1][0] <= listened_from:
                continue     # nothing newer than the cursor: the usual case for a re-poll
            for cursor, text, message in reversed(queue):
                if cursor <= listened_from:
                    break
                if not message.visible_to(cursors):
                    continue
                part = parts.get(id(message))
                if part is None:
                    parts[id(message)] = [cursor, message.data, [(channel_id, cursor, text)]]
                else:
                    part[2].append((channel_id, cursor, text))
                    if cursor < part[0]:
                        part[0] = cursor
        if not parts:
            return None
        ordered = sorted(parts.values(), key=lambda part: (part[0], part[1]))
        ordered = _within_cap(ordered, self.settings.max_answer)
        return [([(c, t) for c, _, t in ids], data) for _, data, ids in ordered]

    def dropped_after(self, cursors: dict[str, Decimal | None]) -> list[tuple[str, str]]:
        """The channels on which a message newer than the given cursor was dropped unsent.

        Each comes with the cursor text of the newest message dropped
        there: a client that listened from an older cursor missed
        messages up to it. A None cursor ("from now") misses nothing.
        """
        self._clean_if_idle(cursors)
        cut = []
        for channel_id, cursor in cursors.items():
            mark = self._dropped.get(channel_id)
            if mark is not None and cursor is not None and mark[0] > cursor:
                cut.append((channel_id, mark[1]))
        return cut

    def _mark_dropped(self, channel_id: str, cursor: Decimal, text: str) -> None:
        mark = self._dropped.get(channel_id)
        if mark is None or cursor > mark[0]:
            self._dropped[channel_id] = (cursor, text)

    def _enqueue(self, channel_id: str, cursor: Decimal, text: str, message: Message) -> None:
        self.version += 1
        queue = self._queues.get(channel_id)
        if queue is None:
            queue = self._queues[channel_id] = []
            if channel_id in self._dropped:
                self._forget_dropped.cancel(channel_id)     # kept while the queue lives
        entry = (cursor, text, message)
        if not queue or queue[-1][0] <= cursor:
            queue.append(entry)
        else:
            index = len(queue)
            while index and queue[index - 1][0] > cursor:
                index -= 1
            queue.insert(index, entry)
        self._hold(message)
        self._by_publish[channel_id] = None
        self._by_publish.move_to_end(channel_id)
        if len(queue) > self.settings.max_data_for_id:
            # The first published goes, not the lowest cursor: a publisher's
            # cursor far ahead must not pin a channel's queue.
            first = min(range(len(queue)), key=lambda index: queue[index][2].order)
            cursor, text, message = queue.pop(first)
            self._mark_dropped(channel_id, cursor, text)
            self._release(message)

    def _hold(self, message: Message) -> None:
        if not message.queued:
            self._queued_bytes += len(message.data)
            self.queued_messages += 1
        message.queued += 1

    def _release(self, message: Message) -> None:
        message.queued -= 1
        if not message.queued:
            self._queued_bytes -= len(message.data)
            self.queued_messages -= 1

    # -- figures (O(1), for the metrics) ------------------------------------------

    @property
    def publishes(self) -> int:
        """Publishes carried out since start."""
        return self._published

    @property
    def queued_bytes(self) -> int:
        """Bytes of queued message data, each message once."""
        return self._queued_bytes

    @property
    def queues_dropped(self) -> int:
        """Queues emptied over MAX_QUEUE_MB since start."""
        return self._queue_guard.total

    def queued_channels(self) -> int:
        """How many channels have a queue."""
        return len(self._queues)

    def online_count(self) -> int:
        """How many channels are online."""
        return len(self._online_ids)

    def _empty_queue(self, channel_id: str) -> None:
        queue = self._queues.pop(channel_id, None)
        if queue is not None:
            for _, _, message in queue:
                self._release(message)
            if queue:
                self._mark_dropped(channel_id, queue[-1][0], queue[-1][1])
                self._forget_dropped.set(channel_id, self._clock() + self.settings.clean_id_after)
            self.version += 1
        self._by_publish.pop(channel_id, None)

    def _drop_least_recent(self, keep: set[str]) -> None:
        """Empty the queues least recently published to until under MAX_QUEUE_MB."""
        dropped = 0
        while self._queued_bytes > self.settings.max_queue_bytes and self._by_publish:
            channel_id = next(iter(self._by_publish))
            if channel_id in keep:
                break     # only the publish being made is left: it stays, even over the limit
            self._empty_queue(channel_id)
            self._cleaning.cancel(channel_id)
            dropped += 1
        self._queue_guard.dropped(dropped, self._queued_bytes, self.settings.max_queue_bytes, self._clock())

    def _clean_if_idle(self, channel_ids: Iterable[str]) -> None:
        # Expiry is swept periodically; a listener must not see a queue
        # that is already past CLEAN_ID_AFTER just because the sweep is late.
        now = None
        cleaning = self._cleaning
        for channel_id in channel_ids:
            due = cleaning.get(channel_id)
            if due is not None:
                if now is None:
                    now = self._clock()
                if due <= now:
                    cleaning.cancel(channel_id)
                    self._empty_queue(channel_id)

    # -- presence ---------------------------------------------------------------

    def occupied(self, channel_id: str) -> None:
        """A channel got its first listener: online now, or its offline countdown ends."""
        if not self._going_offline.cancel(channel_id) and channel_id not in self._online_ids:
            self._online_ids.add(channel_id)
            self._log("online", channel_id)

    def vacated(self, channel_id: str) -> None:
        """A channel's last listener left: it goes offline after OFFLINE_TIMEOUT."""
        self._going_offline.set(channel_id, self._clock() + self.settings.offline_timeout)

    def online_steps(self, prefixes: Sequence[str] = ()) -> Iterator[list[tuple[str, int]]]:
        """Online channels under ``prefixes`` (all without) with their listener counts, in steps.

        Each step reads at most STEP_ITEMS ids, going on after the last
        one given: channels that come and go between steps cannot make it
        skip or repeat one that stays.
        """
        ranges = [("", "\x7f")] if not prefixes else [(prefix, prefix + "\x7f") for prefix in _widest(prefixes)]
        count, online_ids = self._count, self._online_ids
        for low, high in ranges:
            after = None
            while True:
                ids = list(islice(online_ids.irange(after or low, high, inclusive=(after is None, False)),
                                  STEP_ITEMS))
                if ids:
                    yield [(channel_id, count(channel_id)) for channel_id in ids]
                if len(ids) < STEP_ITEMS:
                    break
                after = ids[-1]

    def watch(self, after: int, prefixes: Sequence[str] = ()) -> list[tuple[str, int, str]]:
        """Online/offline transitions after position ``after``: each id once, its latest, oldest first."""
        latest: dict[str, tuple[str, int]] = {}
        for pos, event, channel_id in self._events:
            if pos > after and _has_prefix(channel_id, prefixes):
                latest.pop(channel_id, None)
                latest[channel_id] = (event, pos)
        return [(event, pos, channel_id) for channel_id, (event, pos) in latest.items()]

    def position(self) -> int:
        """The position of the newest transition (FIRST_POSITION before any)."""
        return self._position

    def _log(self, event: str, channel_id: str) -> None:
        self._position += 1
        self._events.append((self._position, event, channel_id))

    # -- housekeeping -----------------------------------------------------------

    def expire(self) -> None:
        """Run due timeouts: offline countdowns and cleaning of idle queues."""
        now = self._clock()
        for channel_id in self._going_offline.pop_due(now):
            if channel_id in self._online_ids:
                self._online_ids.remove(channel_id)
                self._log("offline", channel_id)
        for channel_id in self._cleaning.pop_due(now):
            self._empty_queue(channel_id)
        for channel_id in self._forget_dropped.pop_due(now):
            self._dropped.pop(channel_id, None)

    def reconfigure(self, settings: Settings) -> None:
        """Take on new tunables; queues and presence stay."""
        self.settings = settings
        self.version += 1
        if self._events.maxlen != settings.event_log_len:
            self._events = deque(self._events, maxlen=settings.event_log_len)

    # -- introspection ---------------------------------------------------------

    def stats_steps(self, listeners: int, listened: Iterable[str]) -> Iterator[str]:
        """STATS in pieces of text, each the work of a bounded step ("" while working).

        ``listeners`` is how many listeners wait here, ``listened`` the
        channels they listen to.
        """
        known = set(self._queues)
        known.update(listened)
        known.update(self._online_ids)
        yield "\n".join([
            f"channels: {len(known)}",
            f"listeners: {listeners}",
            f"online: {len(self._online_ids)}",
            f"going offline: {len(self._going_offline)}",
            f"event position: {self._position}",
            f"queued bytes: {self._queued_bytes} (MAX_QUEUE_MB {self.settings.max_queue_bytes / (1 << 20):g})",
            f"queues dropped over MAX_QUEUE_MB: {self._queue_guard.total}"]) + "\n\n"
        # The largest channels: a scan of every channel, STEP_ITEMS at a time.
        ids = list(known)
        largest: list[tuple[int, int, str]] = []
        for start in range(0, len(ids), STEP_ITEMS):
            for channel_id in ids[start:start + STEP_ITEMS]:
                entry = (self._count(channel_id), len(self._queues.get(channel_id, ())), channel_id)
                if len(largest) < STATS_CHANNELS:
                    heapq.heappush(largest, entry)
                elif entry > largest[0]:
                    heapq.heapreplace(largest, entry)
            yield ""
        lines = [f"largest channels (at most {STATS_CHANNELS}, by listeners, then queued):"]
        for _, _, channel_id in sorted(largest, reverse=True):
            queue = self._queues.get(channel_id)
            lines.append(f"[{channel_id}] online={'yes' if channel_id in self._online_ids else 'no'} "
                         f"listeners={self._count(channel_id)} queued={len(queue or ())} "
                         f"newest={queue[-1][1] if queue else '-'}")
        yield "\n".join(lines) + "\n"


class QueueGuard:
    """Counts queues dropped over MAX_QUEUE_MB and logs one line per episode.

    An episode ends when no queue has been dropped for EPISODE_GAP seconds.
    """

    EPISODE_GAP = 60.0

    def __init__(self) -> None:
        self.total = 0
        self._last: float | None = None

    def dropped(self, count: int, queued: int, limit: int, now: float) -> None:
        """Note ``count`` queues dropped at ``now``, leaving ``queued`` bytes."""
        if not count:
            return
        self.total += count
        if self._last is None or now - self._last > self.EPISODE_GAP:
            log.warning("queued messages passed MAX_QUEUE_MB (%g MB): dropping the queues of the "
                        "channels least recently published to (%d now, %d bytes left); "
                        "STATS counts them", limit / (1 << 20), count, queued)
        self._last = now


def _within_cap(ordered: list[list], cap: int) -> list[list]:
    """The oldest parts whose data fit in ``cap`` bytes (at least one), as a poll may take them.

    The client asks next time, per channel, from the newest cursor it
    got, so what is left out must lie, on every channel, after all that
    is sent: a part whose cursor on some channel is at or beyond a
    left-out part's cursor there is left out too. With server cursors
    (one clock for every channel) that never happens; publishers' own
    cursors can make it so, and if nothing is left, everything is sent.
    """
    size = 0
    count = 0
    for part in ordered:
        size += len(part[1])
        if count and size > cap:
            break
        count += 1
    if count == len(ordered):
        return ordered
    kept, left = ordered[:count], ordered[count:]
    while True:
        first_left: dict[str, Decimal] = {}
        for part in left:
            for channel_id, cursor, _ in part[2]:
                if channel_id not in first_left or cursor < first_left[channel_id]:
                    first_left[channel_id] = cursor
        behind = [part for part in kept
                  if any(channel_id in first_left and cursor >= first_left[channel_id]
                         for channel_id, cursor, _ in part[2])]
        if not behind:
            return kept or ordered
        dropped = {id(part) for part in behind}
        kept = [part for part in kept if id(part) not in dropped]
        left += behind


def _widest(prefixes: Sequence[str]) -> list[str]:
    """The prefixes, sorted, without those inside a shorter one."""
    kept: list[str] = []
    for prefix in sorted(set(prefixes)):
        if not kept or not prefix.startswith(kept[-1]):
            kept.append(prefix)
    return kept


def _has_prefix(channel_id: str, prefixes: Sequence[str]) -> bool:
    return not prefixes or channel_id.startswith(tuple(prefixes))
