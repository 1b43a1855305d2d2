"""The feed: this process's subscription to the notices of the channels it serves.

One Redis pub/sub connection per process, owned by one greenlet. It is
subscribed to the channels that have listeners here (and only those, so
adding a process does not multiply anyone's traffic), plus the
process's own control channel, which keeps the connection subscribed.
A channel whose last listener left stays subscribed for
``keep_for`` seconds (the state passes OFFLINE_TIMEOUT, and at least
a second), so a broadcast's re-polls do not churn.

A publish to several channels sends one notice per channel, one after
another (the publish is one script); the feed hands over the notices of
one publish together, so a listener of several of its channels gets one
part. When the connection breaks, the feed tells its owner (every
listener may have missed something), retries with back-off, logs each
change of state once, and resubscribes.
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Iterable

import gevent
import redis
from gevent.event import Event
from gevent.queue import Empty, Queue
from redis.exceptions import RedisError

from .redis_store import KEY_PREFIX, Notice, notice_channel, parse_notice
from .store import StoreDown

log = logging.getLogger("realplexor.redis")

# How long a publish's later notices are waited for, once one has come.
GATHER_SECONDS = 0.02
RETRY_FIRST, RETRY_MAX = 0.2, 10.0
CONFIRM_SECONDS = 5.0


class Feed:
    """Subscribes as asked, and hands over the notices of each publish together."""

    def __init__(self, client: redis.Redis, process_id: str,
                 on_notices: Callable[[list[Notice]], None], on_lost: Callable[[], None],
                 on_back: Callable[[], None], on_released: Callable[[list[str]], None]):
        self._client = client
        self._control = KEY_PREFIX + "p:" + process_id
        self._on_notices = on_notices
        self._on_lost = on_lost
        self._on_back = on_back
        self._on_released = on_released
        self._wanted: set[str] = set()
        # unwanted channel id -> when its subscription may go
        self._leaving: dict[str, float] = {}
        self._confirmed: set[str] = set()
        self._to_subscribe: set[str] = set()
        self._waiters: list[tuple[set[str], Event]] = []
        self._pubsub = None
        self._greenlets: list[gevent.Greenlet] = []
        self._heard: Queue = Queue()
        #: Seconds a subscription outlives the channel's last listener here.
        self.keep_for = 30.0
        self._subscribing = False
        self.connected = Event()

    def start(self) -> None:
        """Begin reading (in greenlets of its own)."""
        self._greenlets = [gevent.spawn(self._run), gevent.spawn(self._gather), gevent.spawn(self._sweep)]

    def stop(self) -> None:
        """Stop reading and close the connection."""
        for greenlet in self._greenlets:
            greenlet.kill(block=False)
        self._greenlets = []
        self._close()

    # -- what to subscribe to ----------------------------------------------------

    def want(self, channel_ids: Iterable[str]) -> None:
        """Subscribe to these channels (if not yet) and keep them."""
        for channel_id in channel_ids:
            if channel_id not in self._wanted:
                self._wanted.add(channel_id)
                self._to_subscribe.add(channel_id)
            self._leaving.pop(channel_id, None)
        if self._to_subscribe and not self._subscribing and self._pubsub is not None:
            # Sent from a greenlet: this may be called from an event-loop callback.
            self._subscribing = True
            gevent.spawn(self._subscribe_wanted)

    def unwant(self, channel_id: str) -> None:
        """This channel has no listener here now: let it go after ``keep_for`` seconds."""
        if channel_id in self._wanted:
            self._leaving[channel_id] = time.monotonic() + self.keep_for

    def confirmed(self, channel_ids: Iterable[str]) -> bool:
        """Whether every one of these channels' notices reaches this process now."""
        return all(channel_id in self._confirmed for channel_id in channel_ids)

    def wait_confirmed(self, channel_ids: Iterable[str]) -> None:
        """Block the greenlet until the subscriptions are in place; StoreDown if they cannot be."""
        ids = set(channel_ids)
        self.want(ids)
        missing = ids - self._confirmed
        if not missing:
            return
        done = Event()
        waiter = (missing, done)
        self._waiters.append(waiter)
        try:
            if not done.wait(CONFIRM_SECONDS):
                raise StoreDown("shared store unreachable: no subscription within "
                                f"{CONFIRM_SECONDS:g} s")
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    # -- reading ---------------------------------------------------------------------

    def _run(self) -> None:
        retry = RETRY_FIRST
        down_since: float | None = None
        while True:
            try:
                self._connect()
                if down_since is not None:
                    log.warning("shared store reachable again after %.1f s: resubscribing %d channels",
                                time.monotonic() - down_since, len(self._wanted))
                    down_since = None
                    self._on_back()
                retry = RETRY_FIRST
                self._read()
            except (RedisError, OSError) as exc:
                self._close()
                if down_since is None:
                    down_since = time.monotonic()
                    log.error("shared store unreachable, retrying with back-off: %s",
                              " ".join(str(exc).split()) or type(exc).__name__)
                self._lost()
                gevent.sleep(retry)
                retry = min(retry * 2, RETRY_MAX)

    def _connect(self) -> None:
        pubsub = self._client.pubsub(ignore_subscribe_messages=False)
        # Always subscribed (to the process's own channel): redis-py waits on a
        # thread Event while a pub/sub connection has no subscription.
        pubsub.subscribe(self._control)
        self._pubsub = pubsub
        self._to_subscribe = set(self._wanted)
        if self._to_subscribe:
            pubsub.subscribe(*(notice_channel(channel_id) for channel_id in self._to_subscribe))
            self._to_subscribe = set()
        self.connected.set()

    def _read(self) -> None:
        # Blocking reads only: they wait on gevent's socket. (redis-py's
        # reads with a timeout poll the socket and would stop the loop.)
        for message in self._pubsub.listen():
            kind = message["type"]
            if kind == "message":
                self._heard.put(parse_notice(message["channel"], message["data"]))
            elif kind == "subscribe":
                self._confirm(message["channel"])

    def _gather(self) -> None:
        """Hand over the notices of each publish together."""
        gathered: list[Notice] = []
        while True:
            try:
                notice = self._heard.get(timeout=GATHER_SECONDS if gathered else None)
            except Empty:
                self._hand_over(gathered)
                gathered = []
                continue
            if gathered and gathered[0].number != notice.number:
                self._hand_over(gathered)
                gathered = []
            gathered.append(notice)
            if self._heard_all(gathered):
                self._hand_over(gathered)
                gathered = []

    def _heard_all(self, gathered: list[Notice]) -> bool:
        """Whether no more notices of this publish can come to this process."""
        last = gathered[-1]
        if last.index == last.count - 1:
            return True
        if not last.channels:
            return False     # a wide publish: wait a moment for the rest
        # The publish's channels after this one: is any of them subscribed here?
        return not any(channel_id in self._wanted for channel_id in last.channels[last.index + 1:])

    def _hand_over(self, notices: list[Notice]) -> None:
        try:
            self._on_notices(notices)
        except Exception:  # noqa: BLE001 - one bad delivery must not stop the feed
            log.exception("delivering a publish from the shared store failed")

    def _subscribe_wanted(self) -> None:
        self._subscribing = False
        channels, self._to_subscribe = self._to_subscribe, set()
        if not channels or self._pubsub is None:
            return
        try:
            self._pubsub.subscribe(*(notice_channel(channel_id) for channel_id in channels))
        except (RedisError, OSError):
            self._to_subscribe |= channels     # the reader notices the break and resubscribes all

    def _sweep(self) -> None:
        """Unsubscribe, now and then, from channels unwanted for ``keep_for`` seconds."""
        while True:
            gevent.sleep(1.0)
            now = time.monotonic()
            going = [channel_id for channel_id, until in self._leaving.items() if until <= now]
            if not going:
                continue
            for channel_id in going:
                del self._leaving[channel_id]
                self._wanted.discard(channel_id)
                self._confirmed.discard(channel_id)
            self._on_released(going)
            if self._pubsub is not None:
                try:
                    self._pubsub.unsubscribe(*(notice_channel(channel_id) for channel_id in going))
                except (RedisError, OSError):
                    pass

    def _confirm(self, channel: bytes) -> None:
        name = channel.decode()
        if not name.startswith(KEY_PREFIX + "c:"):
            return
        channel_id = name[len(KEY_PREFIX) + 2:]
        if channel_id not in self._wanted:
            return
        self._confirmed.add(channel_id)
        for missing, done in list(self._waiters):
            missing.discard(channel_id)
            if not missing:
                done.set()

    def _lost(self) -> None:
        self.connected.clear()
        self._confirmed.clear()
        self._on_lost()

    def _close(self) -> None:
        if self._pubsub is not None:
            try:
                self._pubsub.close()
            except (RedisError, OSError):
                pass
            self._pubsub = None
