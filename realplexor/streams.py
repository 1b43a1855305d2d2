"""Event streams (EventSource) on the WAIT line, the same on both engines.

A stream is one connection that gets every message as an event for as
long as its client stays, in rounds:

    listen with its cursors -> parts -> events written -> cursors moved on -> listen again

Each round registers a fresh :class:`_Round` with the channel state,
exactly as a long poll would, so ONLINE, WATCH, limiters and history
are the long poll's. The fan-out hands over the long-poll body it
rendered; it is cut into parts once per body (every stream woken by one
publish gets the same bytes), each part's own text when the body is on
one line already. On the memory store the answer is written and the next
round registered right there, with no switch to the stream's greenlet;
on a store that may block, the greenlet does it, and a stream that comes
back after the queue dropped messages it had not taken is told of the cut.
An event is ``id: CURSOR:ID,...`` (every listened channel's cursor
after it, as an identifier) and ``data: PART``; a browser sends the id
back as ``Last-Event-ID`` when it reconnects.

Writing never blocks: a quiet stream sends at once; a flooded one (written
to already in this turn of the event loop, or in the one before within
FLOOD_GAP) sends what it got during the turn in one send when the turn ends; what the socket does not take waits
in the stream's backlog and goes out when the socket is writable. An answer that
finds more than STREAM_MAX_BACKLOG bytes still waiting closes the stream
(the first answer always goes, however large), as does a backlog that
nothing of is taken within WRITE_TIMEOUT; the client resumes by cursor.

A stream is ``open`` until it is ``closed``: by its client leaving (or
sending bytes), by its backlog, or by the server stopping. The engine
runs :meth:`EventStream.run` in a greenlet and closes the socket after.
"""
from __future__ import annotations

import logging
import time
from decimal import Decimal
from typing import Iterable

import simplejson
from gevent.event import Event
from gevent.hub import get_hub

from .channels import ChannelState
from .eventloop import recv_or_gone
from .config import Config
from .protocol import render_reset_parts
from .store import StoreDown

log = logging.getLogger("realplexor.wait")

_READ, _WRITE = 1, 2
_READ_SIZE = 4096
# Bytes a client may send on its event stream (it should send none).
MAX_STREAM_INPUT = 4096
_KEEP_ALIVE = b": keep-alive\n\n"
# Seconds within which a write in the loop's previous turn still counts as a flood.
FLOOD_GAP = 0.05

# Reads a part to find where it ends; its numbers are not kept, so floats do.
_DECODER = simplejson.JSONDecoder()


def render_cuts(cuts: list[tuple[str, str]]) -> bytes:
    """History cuts as a long-poll body of reset parts."""
    return b"[" + b",".join(render_reset_parts(cuts)) + b"]"


def cuts_or_none(state: ChannelState, cursors: dict[str, Decimal | None]) -> list[tuple[str, str]]:
    """``state.cuts(cursors)``; none while a shared store cannot be reached (the client
    still gets what is queued)."""
    try:
        return state.cuts(cursors)
    except StoreDown:
        return []


Cursors = list[tuple[str, Decimal, str]]


class _LastBody:
    """The last body cut into parts, and what streams of one channel send for it:
    a publish hands every stream it wakes the same bytes."""

    __slots__ = ("body", "parts", "sent")

    def __init__(self) -> None:
        self.body: bytes | None = None
        self.parts: list[tuple[Cursors, bytes]] = []
        # (channel id, stream class) -> (the events' bytes, the channel's cursor after them, its text)
        self.sent: dict[tuple[str, type], tuple[bytes, Decimal, str]] = {}

    def parts_of(self, body: bytes) -> list[tuple[Cursors, bytes]]:
        if body is not self.body:
            self.parts = _cut_into_parts(body)
            self.body = body
            self.sent = {}
        return self.parts


_last_body = _LastBody()


def parse_parts(body: bytes) -> list[tuple[Cursors, bytes]]:
    """A long-poll body's parts: each part's ids with their cursors (as numbers and
    as texts), and the part as one line of JSON."""
    return _last_body.parts_of(body)


def _cut_into_parts(body: bytes) -> list[tuple[Cursors, bytes]]:
    if b"\n" in body or b"\r" in body:
        return _parts_made_one_line(body)
    return _parts_as_they_are(body.decode("utf-8"))


def _parts_as_they_are(text: str) -> list[tuple[Cursors, bytes]]:
    """Each part's own text, cut out of a body that is on one line already."""
    parts = []
    end = len(text)
    at = _after_blanks(text, text.index("[") + 1)
    while at < end and text[at] != "]":
        part, part_end = _DECODER.raw_decode(text, at)
        parts.append((_cursors(part["ids"]), text[at:part_end].encode("utf-8")))
        at = _after_blanks(text, part_end)
        if at < end and text[at] == ",":
            at = _after_blanks(text, at + 1)
    return parts


def _after_blanks(text: str, at: int) -> int:
    while at < len(text) and text[at] in " \t":
        at += 1
    return at


def _parts_made_one_line(body: bytes) -> list[tuple[Cursors, bytes]]:
    """Each part as the same JSON on one line (an event's data cannot hold a line break)."""
    parts = []
    # Decimals keep the publisher's numbers exact.
    for part in simplejson.loads(body, use_decimal=True):
        line = simplejson.dumps(part, use_decimal=True, ensure_ascii=False, separators=(",", ":"))
        parts.append((_cursors(part["ids"]), line.encode("utf-8")))
    return parts


def _cursors(ids: dict[str, str]) -> Cursors:
    return [(channel_id, Decimal(text), text) for channel_id, text in ids.items()]


def transport_counts(polls: int, streams: Iterable["EventStream"]) -> dict[str, int]:
    """Connections by transport: ``polls`` long-poll connections, and the streams by kind."""
    counts = {"longpoll": polls, "eventsource": 0, "websocket": 0}
    for stream in streams:
        counts[stream.transport] += 1
    return counts


class _TurnEnd:
    """The streams with bytes to send, sent together when the loop's turn ends
    (one callback for them all): the messages published in one turn leave in
    one send per stream."""

    __slots__ = ("due",)

    def __init__(self) -> None:
        self.due: list[EventStream] = []

    def add(self, stream: "EventStream", loop) -> None:
        if not self.due:
            loop.run_callback(self._send_all)
        self.due.append(stream)

    def _send_all(self) -> None:
        due, self.due = self.due, []
        for stream in due:
            try:
                stream.flush_at_turn_end()
            except Exception:  # noqa: BLE001 - one stream's fault must not hold the others' bytes
                log.exception("stream flush failed")


_turn_end = _TurnEnd()


class _Round:
    """One round of a stream as the channel state sees it: a listener delivered once."""

    __slots__ = ("cursors", "stream")
    # A shared store puts history cuts before the messages it reads for a round.
    tells_cuts = True

    def __init__(self, cursors: dict[str, Decimal | None], stream: "EventStream"):
        self.cursors = cursors
        self.stream = stream

    def deliver(self, body: bytes) -> None:
        """Hand the body to the stream."""
        self.stream.delivered(self, body)


class EventStream:
    """One event stream on a non-blocking socket; :meth:`run` serves it to the end."""

    #: The name metrics give its kind of connection.
    transport = "eventsource"

    def __init__(self, sock, state: ChannelState, config: Config,
                 cursors: dict[str, Decimal | None], texts: dict[str, str | None]):
        self._sock = sock
        self._state = state
        self._config = config
        # channel id -> cursor listened from, and its text as the id line gives it
        self._cursors = cursors
        self._texts = texts
        self._wake = Event()
        self._backlog = bytearray()
        self._taken_at = self._written_at = time.monotonic()
        # A flooded stream's bytes wait for the end of the loop's turn, so that
        # messages published in one turn leave in one send. (Bytes a send left
        # unsent wait for the writer watcher instead: it is active then.)
        self._flush_due = False
        self._written_in_turn = -2
        self._loop = None
        self._ticked = False
        # The round registered with the channel state, and an answer left for the greenlet.
        self._round: _Round | None = None
        self._answer: tuple[bytes, _Round] | None = None
        self._received = 0
        self._reader = None
        self._writer = None
        # Channels subscribed on the open stream (a WebSocket's), to tell of cuts.
        self._added: dict[str, Decimal | None] = {}
        self._restart = False
        #: None while open; then why it closed.
        self.closed: str | None = None

    @property
    def listening(self) -> bool:
        """Whether a round of it waits with the channel state now."""
        return self._round is not None

    def wake(self) -> None:
        """Make the stream's greenlet look at its state."""
        self._wake.set()

    def delivered(self, done: _Round, body: bytes) -> None:
        """The fan-out's answer to a round: written at once, and the next round
        registered, with no switch to the stream's greenlet (which does it
        instead when the state may block, or the listened channels changed)."""
        self._round = None
        if self.closed is not None:
            return
        if self._restart or self._state.blocking:
            self._answer = (body, done)
            self._wake.set()
            return
        try:
            self._take(body, done)
            self._listen()
        except Exception:  # noqa: BLE001 - a fault of this stream must not reach the publisher or the others
            log.exception("event stream failed; closing it")
            self.close("server error")

    def resubscribe(self, added: dict[str, Decimal | None]) -> None:
        """The listened channels changed: the round starts again (``added``: new ones, to tell of cuts)."""
        self._added.update(added)
        self._restart = True
        self._wake.set()

    def close(self, why: str) -> None:
        """End the stream (its greenlet finishes and returns)."""
        if self.closed is None:
            self.closed = why
        self._wake.set()

    def run(self, head: bytes) -> str:
        """Send ``head``, then events until the stream closes; why it closed."""
        loop = self._loop = get_hub().loop
        fileno = self._sock.fileno()
        self._reader = loop.io(fileno, _READ)
        self._writer = loop.io(fileno, _WRITE)
        self._reader.start(self._readable)
        # One repeating timer per stream, not one per wait: it looks for
        # idleness and stuck backlogs (see _idle).
        tick = min(self._config.STREAM_PING_INTERVAL, self._config.WRITE_TIMEOUT)
        ticker = loop.timer(tick, tick)
        ticker.start(self._tick)
        try:
            self._write(head)
            self._tell_cuts(self._cursors)
            while self.closed is None:
                if self._restart:
                    self._restart = False
                    if self._round is not None:
                        self._state.unlisten(self._round)
                        self._round = None
                    added, self._added = self._added, {}
                    self._tell_cuts(added)
                if self._answer is not None:
                    (body, done), self._answer = self._answer, None
                    self._take(body, done)
                self._listen()
                self._wait()
        finally:
            if self._round is not None:
                self._state.unlisten(self._round)
                self._round = None
            if self._backlog:
                # The last words (a WebSocket's close frame) before the engine closes the socket.
                self._flush_due = False
                self._flush()
            self._loop = None
            ticker.close()
            self._reader.close()
            self._writer.close()
        return self.closed

    def _listen(self) -> None:
        """Register the next round; what is queued already is taken at once."""
        while self.closed is None and self._round is None and self._answer is None and self._cursors:
            # Set first: on a shared store the round may be answered while it registers.
            listening = self._round = _Round(dict(self._cursors), self)
            body = self._state.listen(listening)
            if body is None:
                return
            self._round = None
            # Messages came faster than the stream took them: some may have
            # left the queue before it came back. (A cut told before moved
            # the cursors past it, so none is told twice.)
            self._tell_cuts(listening.cursors)
            if self.closed is None:
                self._take(body, listening)

    # -- events ----------------------------------------------------------------------

    def _tell_cuts(self, cursors: dict[str, Decimal | None]) -> None:
        """History cuts before anything else: the client learns what it missed."""
        cuts = cuts_or_none(self._state, cursors) if cursors else []
        if cuts:
            self._take(render_cuts(cuts), None)

    def _take(self, body: bytes, done: _Round | None) -> None:
        """Turn an answer into events and write them; the cursors move on past it."""
        if done is not None:
            # "From now" cursors were set when the round was registered (for
            # channels still listened: a WebSocket may have left some since).
            for channel_id, cursor in done.cursors.items():
                if cursor is not None and channel_id in self._cursors and self._cursors[channel_id] is None:
                    self._cursors[channel_id], self._texts[channel_id] = cursor, str(cursor)
        cursors, texts = self._cursors, self._texts
        sent = self._one_channel_events(body) if len(cursors) == 1 else None
        if sent is not None:
            data, cursor, text = sent
            for channel_id in cursors:
                cursors[channel_id], texts[channel_id] = cursor, text
        else:
            events = []
            for ids, line in parse_parts(body):
                listened = False
                for channel_id, cursor, text in ids:
                    if channel_id in cursors:
                        cursors[channel_id], texts[channel_id] = cursor, text
                        listened = True
                if listened:     # not a part of channels a WebSocket has left since
                    events.append(self._frame(line))
            data = b"".join(events)
            if not data:
                return
        if self._writer.active and len(self._backlog) + len(data) > self._config.STREAM_MAX_BACKLOG:
            self.close(f"more than STREAM_MAX_BACKLOG ({self._config.STREAM_MAX_BACKLOG} bytes) not taken")
            return
        self._write(data)

    def _one_channel_events(self, body: bytes) -> tuple[bytes, Decimal, str] | None:
        """What a stream of one channel sends for ``body``, made once for all such
        streams of the channel: the events, and the channel's cursor after them."""
        parts = parse_parts(body)
        for channel_id in self._cursors:
            key = (channel_id, type(self))
            sent = _last_body.sent.get(key)
            if sent is None:
                events, cursor, text = [], None, None
                for ids, line in parts:
                    for part_channel_id, cursor, text in ids:
                        if part_channel_id == channel_id:
                            break
                    else:
                        return None     # not a part of this channel: the general way
                    events.append(self._frame(line, f"{text}:{channel_id}".encode()))
                if cursor is None:
                    return None
                sent = _last_body.sent[key] = (b"".join(events), cursor, text)
            return sent
        return None

    def _frame(self, line: bytes, event_id: bytes | None = None) -> bytes:
        """One part as it goes out: an event whose id is every cursor after it."""
        return b"id: %s\ndata: %s\n\n" % (event_id or self._event_id(), line)

    def _keep_alive(self) -> bytes:
        return _KEEP_ALIVE

    def _event_id(self) -> bytes:
        return ",".join(f"{text}:{channel_id}" for channel_id, text in self._texts.items()
                        if text is not None).encode()

    def _wait(self) -> None:
        """Sleep until woken; on a tick of the timer, look for idleness first."""
        self._wake.wait()
        self._wake.clear()
        if self._ticked:
            self._ticked = False
            if self.closed is None:
                self._idle()

    def _tick(self) -> None:
        self._ticked = True
        self._wake.set()

    def _idle(self) -> None:
        """A keep-alive comment after STREAM_PING_INTERVAL with nothing written,
        or the end of a backlog nothing of was taken within WRITE_TIMEOUT."""
        now = time.monotonic()
        if not self._backlog:
            if now - self._written_at >= self._config.STREAM_PING_INTERVAL:
                self._write(self._keep_alive())
        elif now - self._taken_at >= self._config.WRITE_TIMEOUT:
            self.close(f"nothing taken within WRITE_TIMEOUT ({self._config.WRITE_TIMEOUT:g} s)")

    # -- the socket --------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        if self._loop is None:
            return      # the stream has ended: its socket is the engine's again
        now = time.monotonic()
        # Flooded: written to already in this turn of the loop, or in the one
        # before and lately (an idle loop turns only when something happens).
        turn = getattr(self._loop, "iteration", None)     # a libev loop counts its turns
        if turn is None:
            flooded = False
        else:
            turns = turn - self._written_in_turn
            flooded = turns == 0 or (turns == 1 and now - self._written_at < FLOOD_GAP)
            self._written_in_turn = turn
        self._written_at = now
        if not self._backlog:
            if not flooded:
                self._send_now(data, now)
                return
            self._taken_at = now
        self._backlog += data
        if not self._flush_due and not self._writer.active:
            self._flush_due = True
            _turn_end.add(self, self._loop)

    def _send_now(self, data: bytes, now: float) -> None:
        """A stream that was quiet sends at once: a lone message waits for nothing."""
        self._taken_at = now
        try:
            sent = self._sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self.close("client gone")
            return
        if sent < len(data):
            self._backlog += data[sent:]
            if self.closed is None and not self._writer.active:
                self._writer.start(self._flush)

    def flush_at_turn_end(self) -> None:
        """Send what was written during the loop's turn (see _TurnEnd)."""
        if self._flush_due:
            self._flush_due = False
            self._flush()

    def _flush(self) -> None:
        """Send what the socket takes now; the rest when it is writable (a loop callback)."""
        try:
            sent = self._sock.send(self._backlog) if self._backlog else 0
        except BlockingIOError:
            sent = 0
        except OSError:
            self._backlog.clear()
            self.close("client gone")
            return
        if sent:
            del self._backlog[:sent]
            self._taken_at = time.monotonic()
        if self._backlog and self.closed is None:
            if not self._writer.active:
                self._writer.start(self._flush)
        elif self._writer.active:
            self._writer.stop()

    def _readable(self) -> None:
        data = recv_or_gone(self._sock, _READ_SIZE)
        if data is None:
            return
        if not data:
            self._reader.stop()
            self.close("client gone")
            return
        self._received_bytes(data)

    def _received_bytes(self, data: bytes) -> None:
        self._received += len(data)
        if self._received > MAX_STREAM_INPUT:
            self._reader.stop()
            self.close("client sent data on its event stream")
