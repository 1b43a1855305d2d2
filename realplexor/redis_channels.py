"""The channel state of one process among many: the Redis store and this process's fan-out.

Publishes go to Redis (one script: queued on every channel with one
cursor from Redis's clock, and a notice per channel); every process
hears the notices of the channels it has listeners on (the feed) and
delivers through its fan-out. A poll whose cursors this process can
answer from what it already heard (a browser's next poll, most of the
time) is registered at once; any other poll first reads the channels'
queues from Redis, in a greenlet of its own, so the event loop never
waits for Redis. Presence (which channels are online, with how many
listeners, and the WATCH log) is the cluster's: each process reports
its own in a heartbeat, and a process that stops beating stops counting
after PROCESS_TIMEOUT.

Calls that read or write Redis (publish, online, watch, position,
stats) block their greenlet: :attr:`RedisChannels.blocking` tells the
IN line to make them from a greenlet. They raise StoreDown when Redis
cannot be reached.
"""
from __future__ import annotations

import logging
import uuid
from decimal import Decimal
from typing import Iterator, Sequence

import gevent

from .channels import ChannelState, StateCounts
from .cursors import CursorClock
from .fanout import FanOut, Listener
from .protocol import render_reset_parts, render_wait_body
from .redis_feed import Feed
from .redis_store import Notice, RedisStore, connect
from .store import Message, Settings, StoreDown

log = logging.getLogger("realplexor.redis")

HEARTBEAT_SECONDS = 1.0
# Presence changes wait this long to go out together.
PRESENCE_BATCH_SECONDS = 0.05
# A poll's catching up reads the queues again if a publish to its
# channels came meanwhile, at most this many times.
CATCH_UP_ROUNDS = 3
# A poll whose history could not be read tries again after this long.
HISTORY_RETRY_SECONDS = 1.0
_ZERO = Decimal(0)


class RedisChannels(ChannelState):
    """Channels shared through Redis by every process configured with the same BACKEND."""

    blocking = True

    def __init__(self, settings: Settings, url: str):
        self.process_id = uuid.uuid4().hex[:12]
        self._store = RedisStore(connect(url), settings, self.process_id)
        self._fanout = FanOut(self._occupied, self._vacated)
        self._feed = Feed(connect(url), self.process_id, self._heard, self._lost, self._back, self._released)
        self._feed.keep_for = max(settings.offline_timeout, 1.0)
        # channel id -> (newest cursor heard, number of the notice that told it),
        # for channels whose notices reach this process
        self._known: dict[str, tuple[Decimal, int]] = {}
        self._notices = 0
        self._catching_up: set[Listener] = set()
        self._presence: list[str] = []
        self._presence_due = False
        self._sent_counts: dict[str, int] = {}
        self._local_clock = CursorClock()
        self._beating: gevent.Greenlet | None = None
        self._store_down = False
        self._published = 0

    @property
    def settings(self) -> Settings:
        return self._store.settings

    # -- life --------------------------------------------------------------------

    def start(self) -> None:
        """Check Redis (StoreDown if unreachable) and begin hearing and beating."""
        self._store.check()
        self._feed.start()
        self._beating = gevent.spawn(self._beat)

    def stop(self) -> None:
        """Stop; this process's listeners stop counting at once."""
        if self._beating is not None:
            self._beating.kill(block=False)
        self._feed.stop()
        try:
            self._store.leave()
        except StoreDown:
            pass

    def ready(self) -> str | None:
        """None when the shared store can be used, else why not (one line)."""
        if not self._feed.connected.is_set() or self._store_down:
            return "shared store unreachable"
        return None

    # -- listening ---------------------------------------------------------------------

    def listen(self, listener: Listener) -> bytes | None:
        cursors = listener.cursors
        known = self._known
        if self._feed.confirmed(cursors):
            fast = True
            for channel_id, cursor in cursors.items():
                newest = known.get(channel_id)
                if newest is None or (cursor is not None and cursor < newest[0]):
                    fast = False
                    break
            if fast:
                for channel_id, cursor in cursors.items():
                    if cursor is None:
                        cursors[channel_id] = known[channel_id][0]
                self._fanout.register(listener)
                return None
        self._catching_up.add(listener)
        gevent.spawn(self._catch_up, listener)
        return None

    def unlisten(self, listener: Listener) -> None:
        self._catching_up.discard(listener)
        self._fanout.unregister(listener)

    def cuts(self, cursors: dict[str, Decimal | None]) -> list[tuple[str, str]]:
        return self._store.dropped_after(cursors)

    def _catch_up(self, listener: Listener) -> None:
        """Read what the poll missed from Redis, then deliver it or register the poll."""
        cursors = listener.cursors
        asked = dict(cursors)
        try:
            for _ in range(CATCH_UP_ROUNDS):
                self._feed.wait_confirmed(cursors)
                mark = self._notices
                parts, newest = self._store.history(asked)
                if listener not in self._catching_up:
                    self._let_go(cursors)
                    return     # gone meanwhile
                for channel_id, top in newest.items():
                    self._learn(channel_id, top, mark)
                if parts:
                    body = render_wait_body(parts)
                    if getattr(listener, "tells_cuts", False):
                        body = _with_cuts(self._store.dropped_after(asked), body)
                    if listener not in self._catching_up:
                        self._let_go(cursors)
                        return     # gone meanwhile
                    self._catching_up.discard(listener)
                    listener.deliver(body)
                    self._let_go(cursors)
                    return
                if all(self._known.get(channel_id, (None, 0))[1] <= mark for channel_id in cursors):
                    break     # nothing published meanwhile: registering now misses nothing
            for channel_id, cursor in asked.items():
                if cursor is None:
                    cursors[channel_id] = newest.get(channel_id, _ZERO)
        except StoreDown as exc:
            # The poll keeps waiting, and reads again in a while: what it
            # missed is still queued, with whatever comes meanwhile. (Heard
            # alone, a new message would pass over the ones it missed.)
            log.info("a poll waits without its history, reading it again in %g s: %s",
                     HISTORY_RETRY_SECONDS, exc)
            cursors.update(asked)
            gevent.spawn_later(HISTORY_RETRY_SECONDS, self._catch_up_again, listener)
            return
        if listener in self._catching_up:
            self._catching_up.discard(listener)
            self._fanout.register(listener)

    def _catch_up_again(self, listener: Listener) -> None:
        """Read the history of a poll still waiting for it (unless it left meanwhile)."""
        if listener in self._catching_up:
            self._catch_up(listener)

    def _let_go(self, channel_ids) -> None:
        """Channels a poll subscribed to and left without waiting here: unsubscribed in due course."""
        for channel_id in channel_ids:
            if not self._fanout.count(channel_id):
                self._feed.unwant(channel_id)

    def _learn(self, channel_id: str, cursor: Decimal, number: int) -> None:
        known = self._known.get(channel_id)
        if known is None or cursor > known[0]:
            self._known[channel_id] = (cursor, number if known is None else max(known[1], number))

    # -- hearing -------------------------------------------------------------------------

    def _heard(self, notices: list[Notice]) -> None:
        self._notices += 1
        number = self._notices
        placed = []
        for notice in notices:
            known = self._known.get(notice.channel_id)
            newest = notice.cursor if known is None or notice.cursor > known[0] else known[0]
            self._known[notice.channel_id] = (newest, number)
            placed.append((notice.channel_id, notice.cursor, notice.cursor_text))
        first = notices[0]
        self._fanout.wake(placed, Message(first.data, first.limiters, first.number))

    def _lost(self) -> None:
        # Nothing heard is trusted now: every poll reads the queues when it comes.
        self._known.clear()

    def _back(self) -> None:
        # Polls that waited through the outage may have missed a publish.
        waiting = {listener for channel_id in list(self._fanout.channels())
                   for listener in self._fanout.listeners_of(channel_id)}
        for listener in waiting:
            self._fanout.unregister(listener)
            self._catching_up.add(listener)
            gevent.spawn(self._catch_up, listener)

    def _released(self, channel_ids: list[str]) -> None:
        for channel_id in channel_ids:
            self._known.pop(channel_id, None)

    # -- publishing ----------------------------------------------------------------------

    def publish(self, targets: Sequence[tuple[str, Decimal | None, str | None]],
                data: bytes, limiters: frozenset[str] = frozenset()) -> list[tuple[str, str]]:
        placed = self._store.publish(targets, data, limiters)
        self._published += 1
        return [(channel_id, text) for channel_id, _, text in placed]

    # -- presence ------------------------------------------------------------------------

    def _occupied(self, channel_id: str) -> None:
        self._feed.want((channel_id,))
        self._presence.append("+" + channel_id)
        self._presence_soon()

    def _vacated(self, channel_id: str) -> None:
        self._feed.unwant(channel_id)
        self._presence.append("-" + channel_id)
        self._presence_soon()

    def _presence_soon(self) -> None:
        if not self._presence_due:
            self._presence_due = True
            gevent.spawn_later(PRESENCE_BATCH_SECONDS, self._send_presence)

    def _send_presence(self, with_counts: bool = False) -> None:
        self._presence_due = False
        changes, self._presence = self._presence, []
        # Listener counts go with the heartbeat: finding them reads every local channel.
        counts = self._count_changes() if with_counts else {}
        try:
            self._store.occupy(_net(changes), counts)
            self._sent_counts.update(counts)
            for channel_id, count in counts.items():
                if not count:
                    self._sent_counts.pop(channel_id, None)
            self._store_state(None)
        except StoreDown as exc:
            self._presence = changes + self._presence     # sent with the next beat
            self._store_state(exc)

    def _count_changes(self) -> dict[str, int]:
        fanout = self._fanout
        current = {channel_id: fanout.count(channel_id) for channel_id in fanout.channels()}
        changes = {channel_id: count for channel_id, count in current.items()
                   if self._sent_counts.get(channel_id) != count}
        changes.update((channel_id, 0) for channel_id in self._sent_counts if channel_id not in current)
        return changes

    def _beat(self) -> None:
        while True:
            self._send_presence(with_counts=True)
            try:
                self._store.expire()
            except StoreDown:
                pass
            gevent.sleep(HEARTBEAT_SECONDS)

    def _store_state(self, exc: StoreDown | None) -> None:
        if exc is not None and not self._store_down:
            self._store_down = True
            log.error("presence cannot reach the shared store: %s", exc)
        elif exc is None and self._store_down:
            self._store_down = False
            log.warning("presence reaches the shared store again")

    def online(self, prefixes: Sequence[str] = ()) -> list[tuple[str, int]]:
        return self._store.online(prefixes)

    def online_steps(self, prefixes: Sequence[str] = ()) -> Iterator[list[tuple[str, int]]]:
        yield self.online(prefixes)

    def watch(self, after: int, prefixes: Sequence[str] = ()) -> list[tuple[str, int, str]]:
        return self._store.watch(after, prefixes)

    def position(self) -> int:
        return self._store.position()

    # -- housekeeping ----------------------------------------------------------------------

    def expire(self) -> None:
        # Queues expire in Redis; presence is swept by the heartbeat.
        return None

    def reconfigure(self, settings: Settings) -> None:
        self._store.settings = settings
        self._feed.keep_for = max(settings.offline_timeout, 1.0)

    # -- introspection ---------------------------------------------------------------------

    def listener_count(self) -> int:
        return self._fanout.listeners

    def counts(self) -> StateCounts:
        # This process's own figures: the cluster's queues live in Redis.
        fanout = self._fanout
        return StateCounts(channels=fanout.channel_count(), listeners=fanout.listeners,
                           publishes=self._published, deliveries=fanout.deliveries,
                           delivered_bytes=fanout.delivered_bytes)

    def stats(self) -> str:
        return "".join(self.stats_steps())

    def stats_steps(self) -> Iterator[str]:
        lines = [f"store: redis (process {self.process_id})",
                 f"listeners here: {self._fanout.listeners}",
                 f"channels heard here: {len(self._known)}",
                 *self._store.stats_lines()]
        yield "\n".join(lines) + "\n"


def _net(changes: list[str]) -> list[str]:
    """Presence changes with what undid itself left out (``+a -a`` is nothing), in order."""
    balance: dict[str, int] = {}
    for change in changes:
        balance[change[1:]] = balance.get(change[1:], 0) + (1 if change[0] == "+" else -1)
    return [("+" if net > 0 else "-") + channel_id for channel_id, net in balance.items() if net]


def _with_cuts(cuts: list[tuple[str, str]], body: bytes) -> bytes:
    """A body of parts with the reset parts of ``cuts`` before them."""
    if not cuts:
        return body
    return b"[" + b",".join(render_reset_parts(cuts)) + b"," + body[1:]
