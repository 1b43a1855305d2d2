"""Channel state: message queues, listeners, online tracking, event log.

The servers use the state only through :class:`ChannelState`; the
in-memory :class:`MemoryChannels` is the one implementation today, and a
shared store (several processes or hosts) must fit the same interface
and pass the same tests (``tests/test_channels.py`` runs against any
implementation given to its fixture).

No sockets and no gevent here: time comes from injected clocks, and the
server calls :meth:`ChannelState.expire` periodically.
"""
from __future__ import annotations

import abc
import heapq
import logging
import time
from collections import OrderedDict, deque
from itertools import islice
from dataclasses import dataclass
from decimal import Decimal
from typing import Callable, Iterable, Iterator, NamedTuple, Protocol, Sequence

from sortedcontainers import SortedList

from .cursors import CursorClock
from .deadlines import Deadlines
from .protocol import render_wait_body, render_wait_body_one


class Listener(Protocol):
    """A waiting WAIT request, as the channel state sees it.

    ``cursors`` maps each listened channel id to the cursor it listens
    from; the state fills in None cursors with "now" on registration.
    ``deliver`` is called exactly once, after the listener has been
    removed from all of its channels, with the rendered body; it must not
    block (it wakes a greenlet or writes to a non-blocking socket).
    """

    cursors: dict[str, Decimal]

    def deliver(self, body: bytes) -> None: ...


@dataclass(frozen=True)
class Settings:
    """The tunables of the channel state (from the configuration)."""

    max_data_for_id: int = 30
    clean_id_after: float = 3600
    offline_timeout: float = 30
    event_log_len: int = 3003
    max_answer: int = 1 << 20
    max_queue_bytes: int = 256 << 20


class StateCounts(NamedTuple):
    """What the state holds now, and what it has done since it started.

    Gauges first (channels known, online, listeners, channels with a
    queue, distinct messages queued and their bytes), then totals that
    only grow: publishes, answers delivered to polls (woken or answered
    at once from the queues) and the body bytes of those answers, and
    queues dropped over MAX_QUEUE_MB.
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


# The position of a fresh state's event log, before any event. The old
# server's positions started here, so a watcher that passes a small
# number such as 1 still sees every event.
FIRST_POSITION = 10
log = logging.getLogger("realplexor.channels")

# A publisher cursor this many seconds ahead of the server's clock is logged.
FAR_AHEAD = 86400
# How many channels STATS lists.
STATS_CHANNELS = 20
# Channels one step of ONLINE or STATS reads: a few milliseconds of work.
STEP_ITEMS = 5000
# How many rendered answers to keep for identical polls (each at most WAIT_MAX_ANSWER).
ANSWERS_KEPT = 8


def event_log_len(event_chain_len: int) -> int:
    """How many online/offline events to keep for ``EVENT_CHAIN_LEN``.

    The old server kept up to three chains of ``EVENT_CHAIN_LEN + 1``
    events; keeping as many means no old watcher misses one.
    """
    return 3 * (event_chain_len + 1)


class ChannelState(abc.ABC):
    """What the WAIT and IN lines need of the channel state."""

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

    def ready(self) -> str | None:
        """None when the state can take work now; otherwise why not, in one line.

        Called often (a load balancer asks every second or so), so it must
        be cheap and never wait: a shared store answers from what it last
        saw of its connection. The in-memory state is always ready.
        """
        return None


class _Message:
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
        return not self.limiters or any(limiter in listened for limiter in self.limiters)


class _Channel:
    """One channel id's queue and listeners, kept small: most channels only have listeners.

    queue: None, or [(cursor, cursor text, _Message), ...] sorted by cursor
    held: None, the one listener, or {listener: None} for several (O(1)
    add and remove, in arrival order)
    """

    __slots__ = ("queue", "held", "online")

    def __init__(self) -> None:
        self.queue: list[tuple[Decimal, str, _Message]] | None = None
        self.held: Listener | dict[Listener, None] | None = None
        self.online = False

    def add(self, listener: Listener) -> bool:
        """Hold ``listener``; True when it is the only one now."""
        held = self.held
        if held is None:
            self.held = listener
            return True
        if type(held) is dict:
            held[listener] = None
        elif held is not listener:
            self.held = {held: None, listener: None}
        return False

    def remove(self, listener: Listener) -> bool:
        """Let ``listener`` go; True when it was held."""
        held = self.held
        if held is listener:
            self.held = None
            return True
        if type(held) is dict and held.pop(listener, 0) is None:
            if not held:
                self.held = None
            return True
        return False

    def listeners(self) -> Iterable[Listener]:
        """The listeners held, oldest first."""
        held = self.held
        if held is None:
            return ()
        return held if type(held) is dict else (held,)

    def count(self) -> int:
        """How many listeners are held."""
        held = self.held
        return 0 if held is None else len(held) if type(held) is dict else 1


class MemoryChannels(ChannelState):
    """The channel state of one process, kept in dicts."""

    def __init__(self, settings: Settings = Settings(),
                 clock: Callable[[], float] = time.monotonic,
                 cursor_clock: CursorClock | None = None):
        self.settings = settings
        self._clock = clock
        self._cursors = cursor_clock or CursorClock()
        # { channel id: _Channel }
        self._channels: dict[str, _Channel] = {}
        # channel id -> when its queue is emptied (CLEAN_ID_AFTER after its last publish)
        self._cleaning: Deadlines[str] = Deadlines()
        # channel id -> when it goes offline (OFFLINE_TIMEOUT after its last listener left)
        self._going_offline: Deadlines[str] = Deadlines()
        # (pos, event, channel id), oldest first
        self._events: deque[tuple[int, str, str]] = deque(maxlen=settings.event_log_len)
        self._position = FIRST_POSITION
        self._listeners = 0
        self._published = 0
        # Answers handed to listeners, and their body bytes (for the metrics).
        self._delivered = 0
        self._delivered_bytes = 0
        # Queued bytes (each message once) and the channels with a queue,
        # least recently published to first: MAX_QUEUE_MB drops from the front.
        self._queued_bytes = 0
        self._queued_messages = 0
        self._by_publish: OrderedDict[str, None] = OrderedDict()
        self._queue_guard = QueueGuard()
        # Online channel ids, sorted: ONLINE reads a prefix's range, not every channel.
        self._online_ids = SortedList()
        # Answers rendered from the queues as they are now, by the cursors
        # asked with: identical polls at the same moment share one body.
        self._answers: dict[tuple, bytes] = {}

    # -- listening ---------------------------------------------------------

    def listen(self, listener: Listener) -> bytes | None:
        cursors = listener.cursors
        now = None
        for channel_id, cursor in cursors.items():
            if cursor is None:
                if now is None:
                    now = self._cursors.now()
                cursors[channel_id] = now
        self._clean_if_idle(cursors)
        body = self._answer_from_queues(cursors)
        if body is not None:
            self._delivered += 1
            self._delivered_bytes += len(body)
            return body
        for channel_id in cursors:
            channel = self._channels.get(channel_id)
            if channel is None:
                channel = self._channels[channel_id] = _Channel()
            if channel.add(listener):
                self._came_online(channel_id, channel)
        self._listeners += 1
        return None

    def unlisten(self, listener: Listener) -> None:
        registered = False
        for channel_id in listener.cursors:
            channel = self._channels.get(channel_id)
            if channel is not None and channel.remove(listener):
                registered = True
                if channel.held is None:
                    self._left(channel_id)
        if registered:
            self._listeners -= 1

    def _came_online(self, channel_id: str, channel: _Channel) -> None:
        if not self._going_offline.cancel(channel_id) and not channel.online:
            channel.online = True
            self._online_ids.add(channel_id)
            self._log("online", channel_id)

    def _left(self, channel_id: str) -> None:
        self._going_offline.set(channel_id, self._clock() + self.settings.offline_timeout)

    def _answer_from_queues(self, cursors: dict[str, Decimal]) -> bytes | None:
        key = tuple(cursors.items())
        body = self._answers.get(key)
        if body is None:
            body = self._queued_body(cursors)
            if body is not None:
                if len(self._answers) >= ANSWERS_KEPT:
                    del self._answers[next(iter(self._answers))]
                self._answers[key] = body
        return body

    def _queued_body(self, cursors: dict[str, Decimal]) -> bytes | None:
        # { id(_Message): [first cursor, data, [(channel id, cursor, cursor text), ...]] }
        parts: dict[int, list] = {}
        for channel_id, listened_from in cursors.items():
            channel = self._channels.get(channel_id)
            if channel is None or not channel.queue or channel.queue[-1][0] <= listened_from:
                continue     # nothing newer than the cursor: the usual case for a re-poll
            for cursor, text, message in reversed(channel.queue):
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
        return render_wait_body(([(c, t) for c, _, t in ids], data) for _, data, ids in ordered)

    # -- publishing --------------------------------------------------------

    def publish(self, targets: Sequence[tuple[str, Decimal | None, str | None]],
                data: bytes, limiters: frozenset[str] = frozenset()) -> list[tuple[str, str]]:
        self._published += 1
        message = _Message(data, limiters, self._published)
        fresh = None
        placed: list[tuple[str, Decimal, str]] = []
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
            channel = self._channels.get(channel_id)
            if channel is None:
                channel = self._channels[channel_id] = _Channel()
            self._enqueue(channel_id, channel, cursor, text, message)
            self._cleaning.set(channel_id, clean_at)
            placed.append((channel_id, cursor, text))
        if self._queued_bytes > self.settings.max_queue_bytes:
            self._drop_least_recent(seen)
        self._wake(placed, message)
        return [(channel_id, text) for channel_id, _, text in placed]

    def _enqueue(self, channel_id: str, channel: _Channel, cursor: Decimal, text: str,
                 message: _Message) -> None:
        self._answers.clear()
        queue = channel.queue
        if queue is None:
            queue = channel.queue = []
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
            self._release(queue.pop(first)[2])

    def _hold(self, message: _Message) -> None:
        if not message.queued:
            self._queued_bytes += len(message.data)
            self._queued_messages += 1
        message.queued += 1

    def _release(self, message: _Message) -> None:
        message.queued -= 1
        if not message.queued:
            self._queued_bytes -= len(message.data)
            self._queued_messages -= 1

    def _empty_queue(self, channel_id: str, channel: _Channel) -> None:
        if channel.queue is not None:
            for _, _, message in channel.queue:
                self._release(message)
            channel.queue = None
            self._answers.clear()
        self._by_publish.pop(channel_id, None)

    def _drop_least_recent(self, keep: set[str]) -> None:
        """Empty the queues least recently published to until under MAX_QUEUE_MB."""
        dropped = 0
        while self._queued_bytes > self.settings.max_queue_bytes and self._by_publish:
            channel_id = next(iter(self._by_publish))
            if channel_id in keep:
                break     # only the publish being made is left: it stays, even over the limit
            channel = self._channels[channel_id]
            self._empty_queue(channel_id, channel)
            self._cleaning.cancel(channel_id)
            self._forget_if_unused(channel_id, channel)
            dropped += 1
        self._queue_guard.dropped(dropped, self._queued_bytes, self.settings.max_queue_bytes, self._clock())

    def _wake(self, placed: list[tuple[str, Decimal, str]], message: _Message) -> None:
        if len(placed) == 1:
            self._wake_one_channel(*placed[0], message)
            return
        # Costs the placed ids plus, per woken listener, its own listened
        # ids: never listeners times placed ids.
        where = {channel_id: (index, cursor, text)
                 for index, (channel_id, cursor, text) in enumerate(placed)}
        # One body per distinct set of reached channels.
        bodies: dict[tuple[int, ...], bytes] = {}
        for channel_id, cursor, _ in placed:
            channel = self._channels[channel_id]
            woken = [listener for listener in channel.listeners()
                     if listener.cursors[channel_id] < cursor
                     and message.visible_to(listener.cursors)]
            for listener in woken:
                reached = _reached(where, listener.cursors)
                body = bodies.get(reached)
                if body is None:
                    ids = [(placed[index][0], placed[index][2]) for index in reached]
                    body = bodies[reached] = render_wait_body_one(ids, message.data)
                self._delivered += 1
                self._delivered_bytes += len(body)
                self.unlisten(listener)
                listener.deliver(body)

    def _wake_one_channel(self, channel_id: str, cursor: Decimal, text: str, message: _Message) -> None:
        # The common case, kept lean: every woken listener gets the same body.
        listeners = self._channels[channel_id].listeners()
        if message.limiters:
            woken = [listener for listener in listeners
                     if listener.cursors[channel_id] < cursor and message.visible_to(listener.cursors)]
        else:
            woken = [listener for listener in listeners if listener.cursors[channel_id] < cursor]
        if not woken:
            return
        body = render_wait_body_one(((channel_id, text),), message.data)
        self._delivered += len(woken)
        self._delivered_bytes += len(body) * len(woken)
        unlisten = self.unlisten
        for listener in woken:
            unlisten(listener)
            listener.deliver(body)

    # -- online and events -------------------------------------------------

    def online(self, prefixes: Sequence[str] = ()) -> list[tuple[str, int]]:
        return [item for part in self.online_steps(prefixes) for item in part]

    def online_steps(self, prefixes: Sequence[str] = ()) -> Iterator[list[tuple[str, int]]]:
        # Each step reads at most STEP_ITEMS ids, going on after the last
        # one given: channels that come and go between steps cannot make
        # it skip or repeat one that stays.
        ranges = [("", "\x7f")] if not prefixes else [(prefix, prefix + "\x7f") for prefix in _widest(prefixes)]
        channels, online_ids = self._channels, self._online_ids
        for low, high in ranges:
            after = None
            while True:
                ids = list(islice(online_ids.irange(after or low, high, inclusive=(after is None, False)),
                                  STEP_ITEMS))
                if ids:
                    yield [(channel_id, channels[channel_id].count()) for channel_id in ids]
                if len(ids) < STEP_ITEMS:
                    break
                after = ids[-1]

    def watch(self, after: int, prefixes: Sequence[str] = ()) -> list[tuple[str, int, str]]:
        latest: dict[str, tuple[str, int]] = {}
        for pos, event, channel_id in self._events:
            if pos > after and _has_prefix(channel_id, prefixes):
                latest.pop(channel_id, None)
                latest[channel_id] = (event, pos)
        return [(event, pos, channel_id) for channel_id, (event, pos) in latest.items()]

    def position(self) -> int:
        return self._position

    def _log(self, event: str, channel_id: str) -> None:
        self._position += 1
        self._events.append((self._position, event, channel_id))

    # -- housekeeping ------------------------------------------------------

    def expire(self) -> None:
        now = self._clock()
        for channel_id in self._going_offline.pop_due(now):
            channel = self._channels.get(channel_id)
            if channel is not None and channel.online:
                channel.online = False
                self._online_ids.remove(channel_id)
                self._log("offline", channel_id)
                self._forget_if_unused(channel_id, channel)
        for channel_id in self._cleaning.pop_due(now):
            channel = self._channels.get(channel_id)
            if channel is not None:
                self._empty_queue(channel_id, channel)
                self._forget_if_unused(channel_id, channel)

    def _clean_if_idle(self, channel_ids: Iterable[str]) -> None:
        # Expiry is swept periodically; a listener must not see a queue
        # that is already past CLEAN_ID_AFTER just because the sweep is late.
        now = self._clock()
        for channel_id in channel_ids:
            due = self._cleaning.get(channel_id)
            if due is not None and due <= now:
                self._cleaning.cancel(channel_id)
                self._empty_queue(channel_id, self._channels[channel_id])

    def _forget_if_unused(self, channel_id: str, channel: _Channel) -> None:
        if channel.queue is None and channel.held is None and not channel.online:
            del self._channels[channel_id]

    def reconfigure(self, settings: Settings) -> None:
        self.settings = settings
        self._answers.clear()
        if self._events.maxlen != settings.event_log_len:
            self._events = deque(self._events, maxlen=settings.event_log_len)

    # -- introspection -----------------------------------------------------

    def listener_count(self) -> int:
        return self._listeners

    def counts(self) -> StateCounts:
        return StateCounts(len(self._channels), len(self._online_ids), self._listeners,
                           len(self._by_publish), self._queued_messages, self._queued_bytes,
                           self._published, self._delivered, self._delivered_bytes,
                           self._queue_guard.total)

    def stats(self) -> str:
        return "".join(self.stats_steps())

    def stats_steps(self) -> Iterator[str]:
        yield "\n".join(self._stats_counts()) + "\n\n"
        # The largest channels: a scan of every channel, STEP_ITEMS at a time.
        ids = list(self._channels)
        largest: list[tuple[int, int, str]] = []
        for start in range(0, len(ids), STEP_ITEMS):
            for channel_id in ids[start:start + STEP_ITEMS]:
                channel = self._channels.get(channel_id)
                if channel is not None:
                    entry = (channel.count(), len(channel.queue or ()), channel_id)
                    if len(largest) < STATS_CHANNELS:
                        heapq.heappush(largest, entry)
                    elif entry > largest[0]:
                        heapq.heapreplace(largest, entry)
            yield ""
        lines = [f"largest channels (at most {STATS_CHANNELS}, by listeners, then queued):"]
        for _, _, channel_id in sorted(largest, reverse=True):
            channel = self._channels.get(channel_id)
            if channel is None:
                continue
            newest = channel.queue[-1][1] if channel.queue else "-"
            lines.append(f"[{channel_id}] online={'yes' if channel.online else 'no'} "
                         f"listeners={channel.count()} queued={len(channel.queue or ())} "
                         f"newest={newest}")
        yield "\n".join(lines) + "\n"

    def _stats_counts(self) -> list[str]:
        return [f"channels: {len(self._channels)}",
                 f"listeners: {self._listeners}",
                 f"online: {len(self._online_ids)}",
                 f"going offline: {len(self._going_offline)}",
                 f"event position: {self._position}",
                 f"queued bytes: {self._queued_bytes} (MAX_QUEUE_MB {self.settings.max_queue_bytes / (1 << 20):g})",
                 f"queues dropped over MAX_QUEUE_MB: {self._queue_guard.total}"]


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


def _reached(where: dict[str, tuple[int, Decimal, str]], listened: dict[str, Decimal]) -> tuple[int, ...]:
    """Publish-order indexes of the placed channels a listener hears this message on."""
    reached = []
    for channel_id, listened_from in listened.items():
        placed = where.get(channel_id)
        if placed is not None and listened_from < placed[1]:
            reached.append(placed[0])
    reached.sort()
    return tuple(reached)


def _within_cap(ordered: list[list], cap: int) -> list[list]:
    """The oldest parts whose data fit in ``cap`` bytes (at least one), as a poll may take them.

    The client asks next time, per channel, from the newest cursor it
    got, so what is left out must lie, on every channel, after all that
    is sent: a part whose cursor on some channel is beyond a left-out
    part's cursor there is left out too. With server cursors (one clock
    for every channel) that never happens; publishers' own cursors can
    make it so, and if nothing is left, everything is sent.
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
