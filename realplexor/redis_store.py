"""The shared store on Redis: queues, cursors, presence and the event log of a cluster.

Every process serving the same channels talks to one Redis. What lives
there (``KEY_PREFIX`` ``rpl:``):

- ``q:{id}``: a channel's queue, a list in publish order of entries
  ``cursor NUL message-number NUL limiters NUL data``, cut to
  MAX_DATA_FOR_ID and expiring CLEAN_ID_AFTER after the last publish;
- ``clock``: the last fresh cursor handed out (Redis's own ``TIME``, so
  hosts' clocks do not matter), ``seq``: the count of publishes;
- ``c:{id}``: the pub/sub channel a publish's notice goes to;
- presence: ``procs`` (live process ids), ``alive:{pid}`` (expires
  unless the process beats), ``occ:{pid}`` (channels it has listeners
  on), ``cnt:{pid}`` (its listener counts), ``n`` (processes occupying
  each channel), ``on`` (online channels), ``leaving`` (channels in
  their offline countdown, by deadline), ``pos`` and ``events`` (the
  WATCH log).

Each change is one Lua script, so it is atomic. Calls block the calling
greenlet (never the event loop: the connection uses gevent's sockets)
and raise :class:`StoreDown` when Redis cannot be reached. At most
MAX_CONNECTIONS calls of a process are in flight; more greenlets wait
for a turn (redis-py's pool would refuse them a connection).
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from decimal import Decimal
from typing import Sequence
from urllib.parse import urlsplit

import gevent.lock
import gevent.socket
import redis
import redis.connection
from redis.exceptions import RedisError

from .store import FIRST_POSITION, Part, Placed, Settings, StoreDown, _within_cap

log = logging.getLogger("realplexor.redis")

# redis-py opens its sockets through this module's ``socket``: gevent's
# make every call a cooperative one, without patching anything else.
redis.connection.socket = gevent.socket

KEY_PREFIX = "rpl:"
SOCKET_TIMEOUT = 5.0
# Connections a process opens for commands, at most (the feed has its own).
MAX_CONNECTIONS = 50
_SEP = b"\x00"

# Lua: whether cursor text a is greater than b, as exact decimals.
_NEWER = """
local function newer(a, b)
  local ai, af = string.match(a, '^0*(%d*)%.?(%d*)$')
  local bi, bf = string.match(b, '^0*(%d*)%.?(%d*)$')
  if #ai ~= #bi then return #ai > #bi end
  if ai ~= bi then return ai > bi end
  local width = math.max(#af, #bf)
  af, bf = af .. string.rep('0', width - #af), bf .. string.rep('0', width - #bf)
  return af > bf
end"""

_PUBLISH = """
-- KEYS: clock, seq; ARGV: prefix, max_data, clean_after, limiters, data, then id, cursor pairs
local prefix, max_data, clean_after = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
%(NEWER)s
local function mark(key, cursor)
  local old = redis.call('GET', key)
  if not old or newer(cursor, old) then redis.call('SET', key, cursor) end
end
local limiters, data = ARGV[4], ARGV[5]
local fresh = nil
local seq = redis.call('INCR', KEYS[2])
local n = (#ARGV - 5) / 2
local placed = {}
for i = 0, n - 1 do
  local id, cursor = ARGV[6 + 2 * i], ARGV[7 + 2 * i]
  if cursor == '' then
    if not fresh then
      local t = redis.call('TIME')
      local sec, units = tonumber(t[1]), tonumber(t[2]) * 100000000
      local last = redis.call('GET', KEYS[1])
      if last then
        local lsec, lunits = string.match(last, '^(%d+)%.(%d+)$')
        lsec, lunits = tonumber(lsec), tonumber(lunits)
        if sec < lsec or (sec == lsec and units <= lunits) then
          sec, units = lsec, lunits + 1
          if units >= 100000000000000 then sec, units = sec + 1, 0 end
        end
      end
      fresh = string.format('%d.%014.0f', sec, units)
      redis.call('SET', KEYS[1], fresh)
    end
    cursor = fresh
  end
  local entry = cursor .. '\\0' .. seq .. '\\0' .. limiters .. '\\0' .. data
  local queue, dropped, last = prefix .. 'q:' .. id, prefix .. 'd:' .. id, prefix .. 'l:' .. id
  if redis.call('EXISTS', queue) == 0 then
    -- An expired queue's messages are all dropped: its newest cursor is the mark.
    local before = redis.call('GET', last)
    if before then mark(dropped, before) end
  end
  redis.call('RPUSH', queue, entry)
  local over = redis.call('LLEN', queue) - max_data
  if over > 0 then
    for _, old in ipairs(redis.call('LRANGE', queue, 0, over - 1)) do
      mark(dropped, string.sub(old, 1, string.find(old, '\\0', 1, true) - 1))
    end
  end
  redis.call('LTRIM', queue, -max_data, -1)
  redis.call('PEXPIRE', queue, math.floor(clean_after * 1000))
  mark(last, cursor)
  -- The marks outlive the queue by CLEAN_ID_AFTER, as in the memory store.
  redis.call('PEXPIRE', last, math.floor(clean_after * 2000))
  if redis.call('EXISTS', dropped) == 1 then redis.call('PEXPIRE', dropped, math.floor(clean_after * 2000)) end
  placed[#placed + 1] = cursor
end
-- A small publish names all its channels in each notice, so that a process
-- knows at once when it has heard every one of them it listens to.
local all = ''
if n <= %(NAMED)d then
  local ids = {}
  for i = 0, n - 1 do ids[#ids + 1] = ARGV[6 + 2 * i] end
  all = table.concat(ids, ',')
end
for i = 0, n - 1 do
  local id = ARGV[6 + 2 * i]
  redis.call('PUBLISH', prefix .. 'c:' .. id, placed[i + 1] .. '\\0' .. seq .. '\\0' .. i .. '/' .. n
             .. '\\0' .. all .. '\\0' .. limiters .. '\\0' .. data)
end
return placed
"""

# Publishes to at most this many channels name them all in every notice.
NAMED_CHANNELS = 32
_PUBLISH = _PUBLISH.replace("%(NEWER)s", _NEWER).replace("%(NAMED)d", str(NAMED_CHANNELS))

_OCCUPY = """
-- KEYS: n, on, leaving, pos, events, occ:{pid}; ARGV: event_log_len, offline_timeout, then +id / -id
local changed = 0
for i = 3, #ARGV do
  local sign, id = string.sub(ARGV[i], 1, 1), string.sub(ARGV[i], 2)
  if sign == '+' then
    if redis.call('SADD', KEYS[6], id) == 1 then
      if redis.call('HINCRBY', KEYS[1], id, 1) == 1 then
        if redis.call('ZREM', KEYS[3], id) == 0 and redis.call('SADD', KEYS[2], id) == 1 then
          local pos = redis.call('INCR', KEYS[4])
          redis.call('RPUSH', KEYS[5], pos .. ' online ' .. id)
          changed = changed + 1
        end
      end
    end
  elseif redis.call('SREM', KEYS[6], id) == 1 then
    if redis.call('HINCRBY', KEYS[1], id, -1) <= 0 then
      redis.call('HDEL', KEYS[1], id)
      local t = redis.call('TIME')
      redis.call('ZADD', KEYS[3], tonumber(t[1]) + tonumber(t[2]) / 1000000 + tonumber(ARGV[2]), id)
    end
  end
end
redis.call('LTRIM', KEYS[5], -tonumber(ARGV[1]), -1)
return changed
"""

_EXPIRE = """
-- KEYS: n, on, leaving, pos, events, procs; ARGV: prefix, event_log_len, offline_timeout
local prefix = ARGV[1]
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
-- Processes that stopped beating: their channels are left as if their listeners went.
for _, pid in ipairs(redis.call('SMEMBERS', KEYS[6])) do
  if redis.call('EXISTS', prefix .. 'alive:' .. pid) == 0 then
    local occ = prefix .. 'occ:' .. pid
    for _, id in ipairs(redis.call('SMEMBERS', occ)) do
      if redis.call('HINCRBY', KEYS[1], id, -1) <= 0 then
        redis.call('HDEL', KEYS[1], id)
        redis.call('ZADD', KEYS[3], now + tonumber(ARGV[3]), id)
      end
    end
    redis.call('DEL', occ, prefix .. 'cnt:' .. pid)
    redis.call('SREM', KEYS[6], pid)
  end
end
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now)) do
  redis.call('ZREM', KEYS[3], id)
  if redis.call('SREM', KEYS[2], id) == 1 then
    local pos = redis.call('INCR', KEYS[4])
    redis.call('RPUSH', KEYS[5], pos .. ' offline ' .. id)
  end
end
redis.call('LTRIM', KEYS[5], -tonumber(ARGV[2]), -1)
return 0
"""


@dataclass(frozen=True)
class Notice:
    """A publish as one channel's subscribers hear it."""

    channel_id: str
    cursor: Decimal
    cursor_text: str
    number: int          # the publish's number: one message, several channels
    index: int           # this channel's place among the publish's channels
    count: int           # how many channels the publish reached
    channels: tuple[str, ...]   # all of them, for a publish to at most NAMED_CHANNELS; else ()
    limiters: frozenset[str]
    data: bytes


def connect(url: str) -> redis.Redis:
    """A client for ``redis://host:port/db`` (``redis+sentinel://`` is not taken yet)."""
    if urlsplit(url).scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"BACKEND {url!r}: use redis://host:port/db")
    return redis.Redis.from_url(url, socket_timeout=SOCKET_TIMEOUT, socket_connect_timeout=SOCKET_TIMEOUT,
                                health_check_interval=30, max_connections=MAX_CONNECTIONS)


class RedisStore:
    """The cluster's queues, cursors and presence, in Redis; every call may block its greenlet."""

    def __init__(self, client: redis.Redis, settings: Settings, process_id: str):
        self.client = client
        self.settings = settings
        self.process_id = process_id
        self._publish = client.register_script(_PUBLISH)
        self._occupy = client.register_script(_OCCUPY)
        self._expire = client.register_script(_EXPIRE)
        # One turn per connection of the pool: a greenlet beyond them waits here.
        self._turns = gevent.lock.BoundedSemaphore(client.connection_pool.max_connections)

    def _key(self, name: str) -> str:
        return KEY_PREFIX + name

    @contextmanager
    def _calling(self):
        """A turn on the pool (waiting while every connection is busy); Redis's errors as StoreDown."""
        if not self._turns.acquire(timeout=SOCKET_TIMEOUT):
            raise StoreDown(f"shared store busy: no free connection within {SOCKET_TIMEOUT:g} s")
        try:
            with _down_as_store_down():
                yield
        finally:
            self._turns.release()

    def check(self) -> None:
        """StoreDown unless Redis answers; makes a fresh cluster's positions start at FIRST_POSITION."""
        with self._calling():
            self.client.ping()
            self.client.set(self._key("pos"), FIRST_POSITION, nx=True)

    # -- queues ----------------------------------------------------------------

    def publish(self, targets: Sequence[tuple[str, Decimal | None, str | None]],
                data: bytes, limiters: frozenset[str]) -> list[Placed]:
        """Queue ``data`` on each target, atomically, and notify subscribers; where it went."""
        args: list[bytes | str | int | float] = [KEY_PREFIX, self.settings.max_data_for_id,
                                                 self.settings.clean_id_after, ",".join(sorted(limiters)), data]
        seen: set[str] = set()
        ids = []
        for channel_id, _, text in targets:
            if channel_id in seen:
                continue     # "d,d,d" is one channel
            seen.add(channel_id)
            ids.append(channel_id)
            args += [channel_id, text or ""]
        with self._calling():
            cursors = self._publish(keys=[self._key("clock"), self._key("seq")], args=args)
        placed = []
        for channel_id, raw in zip(ids, cursors):
            text = raw.decode()
            placed.append((channel_id, Decimal(text), text))
        return placed

    def history(self, cursors: dict[str, Decimal | None]) -> tuple[list[Part] | None, dict[str, Decimal]]:
        """What a listener of ``cursors`` has not seen, within WAIT_MAX_ANSWER, and each channel's newest cursor.

        A None cursor means "from now": nothing of that channel is replayed.
        """
        ids = list(cursors)
        with self._calling():
            pipe = self.client.pipeline(transaction=False)
            for channel_id in ids:
                pipe.lrange(self._key("q:" + channel_id), 0, -1)
            queues = pipe.execute()
        newest: dict[str, Decimal] = {}
        # { publish number: [first cursor, data, [(channel id, cursor, cursor text), ...]] }
        parts: dict[int, list] = {}
        for channel_id, entries in zip(ids, queues):
            listened_from = cursors[channel_id]
            top = Decimal(0)
            for entry in entries:
                text, number, limiters, data = entry.split(_SEP, 3)
                cursor = Decimal(text.decode())
                top = max(top, cursor)
                if listened_from is None or cursor <= listened_from:
                    continue
                if limiters and not any(limiter in cursors for limiter in limiters.decode().split(",")):
                    continue
                part = parts.get(int(number))
                if part is None:
                    parts[int(number)] = [cursor, data, [(channel_id, cursor, text.decode())]]
                else:
                    part[2].append((channel_id, cursor, text.decode()))
                    part[0] = min(part[0], cursor)
            newest[channel_id] = top
        if not parts:
            return None, newest
        ordered = sorted(parts.values(), key=lambda part: (part[0], part[1]))
        ordered = _within_cap(ordered, self.settings.max_answer)
        return [([(c, t) for c, _, t in ids], data) for _, data, ids in ordered], newest

    def dropped_after(self, cursors: dict[str, Decimal | None]) -> list[tuple[str, str]]:
        """The channels on which a message newer than the given cursor was dropped unsent.

        Each comes with the cursor text of the newest message dropped
        there (cut from the queue by MAX_DATA_FOR_ID, or expired with it
        after CLEAN_ID_AFTER). A None cursor ("from now") misses nothing.
        """
        asked = [(channel_id, cursor) for channel_id, cursor in cursors.items() if cursor is not None]
        if not asked:
            return []
        with _down_as_store_down():
            pipe = self.client.pipeline(transaction=False)
            for channel_id, _ in asked:
                pipe.exists(self._key("q:" + channel_id))
                pipe.get(self._key("d:" + channel_id))
                pipe.get(self._key("l:" + channel_id))
            found = pipe.execute()
        cut = []
        for index, (channel_id, cursor) in enumerate(asked):
            queued, dropped, last = found[3 * index:3 * index + 3]
            marks = [(Decimal(raw.decode()), raw.decode()) for raw in (dropped, None if queued else last) if raw]
            if marks and max(marks)[0] > cursor:
                cut.append((channel_id, max(marks)[1]))
        return cut

    # -- presence ----------------------------------------------------------------

    def occupy(self, changes: Sequence[str], counts: dict[str, int]) -> None:
        """Report this process's ``+id``/``-id`` occupancy changes and its listener counts."""
        with self._calling():
            pipe = self.client.pipeline(transaction=False)
            alive = self.settings.process_timeout
            pipe.set(self._key("alive:" + self.process_id), 1, px=int(alive * 1000))
            pipe.sadd(self._key("procs"), self.process_id)
            if changes:
                self._occupy(keys=[self._key(k) for k in ("n", "on", "leaving", "pos", "events")]
                             + [self._key("occ:" + self.process_id)],
                             args=[self.settings.event_log_len, self.settings.offline_timeout, *changes],
                             client=pipe)
            counted = self._key("cnt:" + self.process_id)
            present = {channel_id: count for channel_id, count in counts.items() if count}
            gone = [channel_id for channel_id, count in counts.items() if not count]
            if present:
                pipe.hset(counted, mapping=present)
            if gone:
                pipe.hdel(counted, *gone)
            pipe.pexpire(counted, int(alive * 3000))
            pipe.execute()

    def expire(self) -> None:
        """Take dead processes' listeners away and end due offline countdowns (any process may)."""
        with self._calling():
            self._expire(keys=[self._key(k) for k in ("n", "on", "leaving", "pos", "events", "procs")],
                         args=[KEY_PREFIX, self.settings.event_log_len, self.settings.offline_timeout])

    def leave(self) -> None:
        """This process stops: its listeners count no more (its channels start their countdowns)."""
        with self._calling():
            self.client.delete(self._key("alive:" + self.process_id))
        self.expire()

    def online(self, prefixes: Sequence[str]) -> list[tuple[str, int]]:
        """Online channels of the cluster under ``prefixes`` (all without), with listener counts."""
        with self._calling():
            ids = sorted(channel_id.decode() for channel_id in self.client.smembers(self._key("on")))
            if prefixes:
                ids = [channel_id for channel_id in ids if channel_id.startswith(tuple(prefixes))]
            if not ids:
                return []
            pids = [pid.decode() for pid in self.client.smembers(self._key("procs"))]
            pipe = self.client.pipeline(transaction=False)
            for pid in pids:
                pipe.hmget(self._key("cnt:" + pid), ids)
            counts = pipe.execute()
        totals = [sum(int(row[index] or 0) for row in counts) for index in range(len(ids))]
        return list(zip(ids, totals))

    def watch(self, after: int, prefixes: Sequence[str]) -> list[tuple[str, int, str]]:
        """The cluster's transitions after ``after``: each id once, its latest, oldest first."""
        with self._calling():
            events = self.client.lrange(self._key("events"), 0, -1)
        latest: dict[str, tuple[str, int]] = {}
        for raw in events:
            pos, event, channel_id = raw.decode().split(" ", 2)
            if int(pos) > after and (not prefixes or channel_id.startswith(tuple(prefixes))):
                latest.pop(channel_id, None)
                latest[channel_id] = (event, int(pos))
        return [(event, pos, channel_id) for channel_id, (event, pos) in latest.items()]

    def position(self) -> int:
        """The cluster's newest event position."""
        with self._calling():
            value = self.client.get(self._key("pos"))
        return int(value or FIRST_POSITION)

    def stats_lines(self) -> list[str]:
        """A few counts of the cluster, for STATS."""
        with self._calling():
            pipe = self.client.pipeline(transaction=False)
            pipe.scard(self._key("procs"))
            pipe.scard(self._key("on"))
            pipe.zcard(self._key("leaving"))
            pipe.get(self._key("pos"))
            pipe.info("memory")
            procs, online, leaving, pos, memory = pipe.execute()
        return [f"processes: {procs}", f"online (cluster): {online}", f"going offline (cluster): {leaving}",
                f"event position: {int(pos or FIRST_POSITION)}",
                f"redis memory: {memory.get('used_memory_human', '?')}"]


def parse_notice(channel: bytes, payload: bytes) -> Notice:
    """A pub/sub message of the publish script as a Notice."""
    text, number, share, channels, limiters, data = payload.split(_SEP, 5)
    index, count = share.split(b"/")
    return Notice(channel.decode()[len(KEY_PREFIX) + 2:], Decimal(text.decode()), text.decode(),
                  int(number), int(index), int(count),
                  tuple(channels.decode().split(",")) if channels else (),
                  frozenset(limiters.decode().split(",")) if limiters else frozenset(), data)


def notice_channel(channel_id: str) -> str:
    """The pub/sub channel of ``channel_id``'s notices."""
    return KEY_PREFIX + "c:" + channel_id


class _down_as_store_down:
    """Turns Redis's connection and command errors into StoreDown (a context manager)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exc, _tb) -> bool:
        if exc is not None and isinstance(exc, (RedisError, OSError)):
            raise StoreDown(f"shared store unreachable: {_one_line(exc)}") from None
        return False


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__

