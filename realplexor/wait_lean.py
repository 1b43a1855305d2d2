"""The lean WAIT engine: a waiting poll holds no greenlet.

Requests are read, answered and parked from the event loop's callbacks,
on non-blocking sockets: with ``TCP_DEFER_ACCEPT`` a connection is
accepted with its request already there, and a browser's next poll on a
kept-alive connection arrives whole. A waiting poll is its socket, a
:class:`LeanPoll` and a read watcher (to notice a client that leaves);
the publisher's fan-out writes the prebuilt body straight to each socket.
Only a request that arrives in pieces, or an answer the socket cannot
take at once, borrows a greenlet until it is done.

A connection's states:

    reading --(must wait)--> parked --(body, timeout)--> answered
       ^                                                   |
       +---------------- idle <---- (kept alive) ----------+
                                    (otherwise closed)
"""
from __future__ import annotations

import logging
import socket
import time
from decimal import Decimal

import gevent
import httptools
from gevent.hub import get_hub

from .channels import ChannelState
from .clientlog import bad_request, escape, peer
from .deadlines import Deadlines
from .eventloop import (READ, Acceptor, Sweeper, close_connection, lend, linger, recv_or_gone, sendall_within,
                        take_back)
from .protocol import ProtocolError
from .streams import EventStream, cuts_or_none, render_cuts, transport_counts
from .websocket import open_stream
from .wait import FIRST_BYTES, Reply, Subscription, WaitLine, error_reply, render_head, render_reply, wants_keep_alive

log = logging.getLogger("realplexor.wait")

READ_SIZE = 8192
# Bytes a request may carry besides what WAIT_MAXLEN counts (headers).
MAX_HEAD_BYTES = 16384
# Bytes a client may send while its poll waits (a request sent too
# early); more, and the poll is ended and the connection refused.
MAX_PARKED_INPUT = 4096
SWEEP_INTERVAL = 0.25
_LAST_CHUNK = b"0\r\n\r\n"
# A kept-alive poll's answer with no message: the first bytes, and the end.
_EMPTY_CHUNKED = b"3\r\n \r\n\r\n" + _LAST_CHUNK
# The only request headers the WAIT line looks at.
_WANTED_HEADERS = frozenset({b"origin", b"connection", b"content-length", b"if-modified-since",
                             b"access-control-request-headers", b"accept", b"last-event-id",
                             b"upgrade", b"sec-websocket-key", b"sec-websocket-version"})
# Headers in which a "close" makes llhttp refuse any further request.
_CLOSING_HEADERS = frozenset({b"connection", b"proxy-connection"})
# What happens to a connection once its answer is out.
_CLOSE, _IDLE, _PARK, _LINGER = "close", "idle", "park", "linger"


class _Request:
    """httptools callbacks: collects one request at a time.

    One parser and its collector serve every request that arrives whole
    (nearly all of them); a request that comes in pieces takes them
    with it, and fresh ones take their place.
    """

    __slots__ = ("url", "headers", "body", "complete", "pipelined", "closing")

    def __init__(self) -> None:
        self.headers: dict[str, str] = {}
        self.reset()

    def reset(self) -> None:
        """Forget the last request (its headers' dict is reused: nothing keeps it)."""
        self.url = b""
        self.headers.clear()
        self.body = b""
        self.complete = False
        self.pipelined = False
        self.closing = False

    def on_message_begin(self) -> None:
        if self.complete:
            # A second request in the same read: answered by closing after the first.
            self.pipelined = True

    def on_url(self, url: bytes) -> None:
        if not self.complete:
            self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.complete:
            return
        name = name.lower()
        if name in _WANTED_HEADERS:
            self.headers[name.decode("ascii")] = value.decode("latin-1")
        if name in _CLOSING_HEADERS and b"close" in value.lower():
            # Only the last header of a name is kept above; the parser saw them all.
            self.closing = True

    def on_body(self, body: bytes) -> None:
        if not self.complete:
            self.body += body

    def on_message_complete(self) -> None:
        self.complete = True


class _Parse:
    """A request collector and the parser that feeds it."""

    __slots__ = ("request", "parser", "served")

    def __init__(self) -> None:
        self.request = _Request()
        self.parser = httptools.HttpRequestParser(self.request)
        self.served = False     # whether a request was parsed whole with it


class LeanPoll:
    """One connection of the lean engine, and the listener it registers.

    ``deadline`` is when its request must have arrived whole (None while a
    kept-alive connection waits for its next request); ``early`` holds
    what the client sent while its poll waited.
    """

    __slots__ = ("cursors", "engine", "keep_alive", "sock", "watcher", "parked", "pending",
                 "deadline", "early", "head")

    def __init__(self, engine: "LeanWaitServer", sock: socket.socket, deadline: float | None):
        self.cursors: dict[str, Decimal | None] = {}
        self.engine = engine
        self.keep_alive = False
        self.sock = sock
        self.watcher = None
        self.parked = False
        self.pending: bytes | None = None     # a body that came before the poll was parked
        self.deadline = deadline
        self.early: bytes | None = None
        # A kept-alive poll's headers, sent together with its answer.
        self.head = b""

    def deliver(self, body: bytes) -> None:
        """Called by the channel state: write the body out now."""
        self.engine.deliver(self, body)


class LeanWaitServer:
    """Serves the WAIT line from event-loop callbacks; no greenlet per poll."""

    engine = "lean"

    def __init__(self, listener: socket.socket, line: WaitLine, state: ChannelState):
        self.line = line
        self.state = state
        self.open_connections = 0
        self._acceptor = Acceptor(listener, self._accepted)
        self.address = self._acceptor.address
        self._loop = get_hub().loop
        self._parse = _Parse()
        # parked polls -> when WAIT_TIMEOUT ends their wait
        self._parked: Deadlines[LeanPoll] = Deadlines()
        # new connections waiting for their request -> when they get a 408
        self._starting: Deadlines[LeanPoll] = Deadlines()
        # kept-alive connections waiting for their next request -> when they are closed
        self._idle: Deadlines[LeanPoll] = Deadlines()
        self._heads: dict[tuple, bytes] = {}
        self._framed_for: bytes | None = None
        self._framed = b""
        # Event streams served, each by a greenlet holding its connection.
        self._streams: set[EventStream] = set()
        self._sweeper = Sweeper(self._sweep, SWEEP_INTERVAL, "lean WAIT engine")

    @property
    def streams(self) -> set[EventStream]:
        """The event streams and WebSockets it serves now."""
        return self._streams

    def transport_counts(self) -> dict[str, int]:
        """Open connections by transport (a stream's connection is handed over, not counted open)."""
        return transport_counts(self.open_connections, self._streams)

    # -- life ----------------------------------------------------------------

    def start(self) -> None:
        """Begin serving."""
        self._acceptor.start()
        self._sweeper.start()

    def stop(self, timeout=None) -> None:
        """Stop accepting and close every connection (parked polls first)."""
        self._acceptor.close()
        self._sweeper.stop()
        for conn in list(self._parked):
            self.state.unlisten(conn)
            self._close(conn)
        for conn in [*self._starting, *self._idle]:
            self._close(conn)
        for stream in list(self._streams):
            stream.close("server stopping")
        self._parked.clear()
        self._starting.clear()
        self._idle.clear()

    def reconfigure(self) -> None:
        """Forget cached headers after a reload."""
        self._heads.clear()

    @property
    def accepting(self) -> bool:
        """Whether the line takes new connections (not paused for want of descriptors)."""
        return self._acceptor.accepting

    # -- reading -------------------------------------------------------------

    def _accepted(self, sock: socket.socket, address) -> None:
        """A new connection (in the accept callback: must not block)."""
        # The read watcher is made when the connection first has to wait.
        self.open_connections += 1
        self._read_now(LeanPoll(self, sock, time.monotonic() + self.line.config.WAIT_REQUEST_TIMEOUT))

    def _on_readable(self, conn: LeanPoll) -> None:
        conn.watcher.stop()
        if conn.deadline is None:
            # A kept-alive connection's next request begins: it has as long as a new one.
            self._idle.cancel(conn)
            conn.deadline = time.monotonic() + self.line.config.WAIT_REQUEST_TIMEOUT
        else:
            self._starting.cancel(conn)
        self._read_now(conn)

    def _read_now(self, conn: LeanPoll) -> None:
        try:
            data = conn.sock.recv(READ_SIZE)
        except BlockingIOError:
            self._wait_for_request(conn)
            return
        except OSError:
            self._close(conn)
            return
        if not data:
            self._close(conn)
            return
        parse = self._parse
        request = parse.request
        request.reset()
        refusal = self._feed(parse, data, len(data))
        if refusal is not None and parse.served and not request.complete:
            # The shared parser may have ended in a state not foreseen above:
            # one client must not be refused for another's request.
            parse = self._parse = _Parse()
            request = parse.request
            refusal = self._feed(parse, data, len(data))
        if request.complete:
            parse.served = True
            version = parse.parser.get_http_version()
            if request.pipelined or not _parser_goes_on(version, request):
                # The shared parser stopped inside a next request, or takes
                # no more after this one ("Connection: close", HTTP/1.0).
                self._parse = _Parse()
            self._respond(conn, request, parse.parser.get_method(), version)
        elif refusal is not None:
            self._parse = _Parse()
            self._send(conn, self._refusal(refusal, conn.sock, data), _LINGER)
        else:
            # This request's parser now holds a part of it: the connection
            # keeps it, and a fresh one serves the others.
            self._parse = _Parse()
            gevent.spawn(self._read_rest, conn, parse, len(data))

    def _feed(self, parse: _Parse, data: bytes, received: int) -> ProtocolError | None:
        """Feed the parser; for a bad or oversized request, why it is refused."""
        try:
            if received > self.line.config.WAIT_MAXLEN + MAX_HEAD_BYTES:
                raise ProtocolError(413, f"request longer than WAIT_MAXLEN "
                                         f"({self.line.config.WAIT_MAXLEN} bytes) plus headers")
            parse.parser.feed_data(data)
            if not parse.request.complete:
                _check_length(parse.request, self.line.config.WAIT_MAXLEN)
        except ProtocolError as error:
            return error
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            if parse.request.complete:   # junk after a whole request: answer it, then close
                parse.request.pipelined = True
                return None
            return ProtocolError(400, f"malformed HTTP request: {exc or 'upgrade'}")
        return None

    def _read_rest(self, conn: LeanPoll, parse: _Parse, received: int) -> None:
        """A request that came in pieces: read the rest in this greenlet, by its deadline."""
        sock = lend(conn.sock, None)
        conn.sock = None
        config = self.line.config
        try:
            while not parse.request.complete:
                data = _recv_by(sock, conn.deadline)
                if data is None:
                    self.line.refusals.count("wait", 408)
                    sendall_within(sock, _request_timeout(config.WAIT_REQUEST_TIMEOUT), config.WRITE_TIMEOUT)
                    raise ConnectionError("request too slow")
                if not data:
                    # A client that half-closed still reads: tell it why nothing happens.
                    self.line.refusals.count("wait", 400)
                    sendall_within(sock, render_reply(error_reply(ProtocolError(
                        400, "request ended before it was complete; nothing done"))), config.WRITE_TIMEOUT)
                    raise ConnectionError("closed mid-request")
                received += len(data)
                refusal = self._feed(parse, data, received)
                if refusal is not None:
                    sendall_within(sock, self._refusal(refusal, sock, data), config.WRITE_TIMEOUT)
                    linger(sock)
                    raise ConnectionError("request refused")
        except OSError:
            sock.close()
            self._close(conn)
            return
        conn.sock = take_back(sock)
        self._respond(conn, parse.request, parse.parser.get_method(), parse.parser.get_http_version())

    def _wait_for_request(self, conn: LeanPoll) -> None:
        self._watch(conn, self._on_readable)
        if conn.deadline is None:
            self._idle.set(conn, time.monotonic() + self.line.config.WAIT_KEEPALIVE_TIMEOUT)
        else:
            self._starting.set(conn, conn.deadline)

    def _watch(self, conn: LeanPoll, callback) -> None:
        if conn.watcher is None:
            conn.watcher = self._loop.io(conn.sock.fileno(), READ)
        conn.watcher.start(callback, conn)

    # -- answering -------------------------------------------------------------

    def _respond(self, conn: LeanPoll, request: _Request, method: bytes, version: str) -> None:
        result = self.line.answer(method.decode("latin-1"), request.url.decode("latin-1"),
                                  request.headers.get, lambda limit: request.body[:limit])
        if isinstance(result, Reply):
            # Bytes after the request: close gently, or the client may lose the reply.
            self._send(conn, render_reply(result), _LINGER if request.pipelined else _CLOSE)
            return
        keep_alive = not request.pipelined and wants_keep_alive(version, request.headers.get("connection"))
        origin = request.headers.get("origin")
        if isinstance(result, Subscription):
            if result.stream:
                self._start_stream(conn, result, origin)
            elif self.state.blocking:
                gevent.spawn(self._poll_with_cuts, conn, result, keep_alive, origin)
            else:
                self._poll_with_cuts(conn, result, keep_alive, origin)
            return
        self._poll(conn, result.listened(), keep_alive, origin)

    def _poll_with_cuts(self, conn: LeanPoll, subscription: Subscription, keep_alive: bool,
                        origin: str | None) -> None:
        """A long poll that asked for history cuts: told of them at once, if any."""
        cursors = subscription.cursors()[0]
        cuts = cuts_or_none(self.state, cursors)
        if cuts:
            self._send(conn, self._head(origin, keep_alive) + self._frame(FIRST_BYTES + render_cuts(cuts), keep_alive),
                       _IDLE if keep_alive else _CLOSE)
            return
        self._poll(conn, cursors, keep_alive, origin)

    def _start_stream(self, conn: LeanPoll, subscription: Subscription, origin: str | None) -> None:
        """Hand the connection to a greenlet that serves it as an event stream."""
        sock, conn.sock = conn.sock, None
        self._close(conn)
        stream = open_stream(subscription, sock, self.state, self.line.config)
        self._streams.add(stream)
        gevent.spawn(self._serve_stream, stream, sock, self.line.stream_head(origin, subscription))

    def _serve_stream(self, stream: EventStream, sock: socket.socket, head: bytes) -> None:
        try:
            stream.run(head)
        finally:
            self._streams.discard(stream)
            sock.close()

    def _poll(self, conn: LeanPoll, cursors: dict, keep_alive: bool, origin: str | None) -> None:
        conn.keep_alive = keep_alive
        conn.cursors = cursors
        conn.pending = None
        body = self.state.listen(conn)
        head = self._head(origin, keep_alive)
        if body is not None:
            self._send(conn, head + self._frame(FIRST_BYTES + body, keep_alive), _IDLE if keep_alive else _CLOSE)
        elif keep_alive:
            # Its headers wait for the answer: one write for both, when it comes.
            conn.head = head
            self._park(conn)
        else:
            # A raw client of the old server reads the headers at once.
            self._send(conn, head + FIRST_BYTES, _PARK)

    def _head(self, origin: str | None, keep_alive: bool) -> bytes:
        key = (origin, keep_alive)
        head = self._heads.get(key)
        if head is None:
            headers = self.line.poll_headers(origin) + (
                (("Connection", "keep-alive"), ("Transfer-Encoding", "chunked")) if keep_alive
                else (("Connection", "close"),))
            head = render_head("200 OK", headers)
            if len(self._heads) > 64:   # many distinct origins: do not grow without end
                self._heads.clear()
            self._heads[key] = head
        return head

    def _send(self, conn: LeanPoll, data: bytes, then: str) -> None:
        """Write ``data`` without blocking (a greenlet finishes what does not fit)."""
        try:
            sent = conn.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._drop(conn)
            return
        if sent < len(data):
            gevent.spawn(self._send_rest, conn, data[sent:], then)
        else:
            self._after_send(conn, then)

    def _send_two(self, conn: LeanPoll, head: bytes, body: bytes, then: str) -> None:
        """Write ``head`` and ``body`` in one system call, neither copied into the other."""
        try:
            sent = conn.sock.sendmsg((head, body))
        except BlockingIOError:
            sent = 0
        except OSError:
            self._drop(conn)
            return
        if sent < len(head) + len(body):
            gevent.spawn(self._send_rest, conn, (head + body)[sent:], then)
        else:
            self._after_send(conn, then)

    def _send_rest(self, conn: LeanPoll, data: bytes, then: str) -> None:
        sock = lend(conn.sock, None)
        conn.sock = None
        try:
            sendall_within(sock, data, self.line.config.WRITE_TIMEOUT)
        except OSError:
            sock.close()
            self._drop(conn)
            return
        conn.sock = take_back(sock)
        self._after_send(conn, then)

    def _after_send(self, conn: LeanPoll, then: str) -> None:
        if then == _PARK:
            self._park(conn)
        elif then == _IDLE and conn.early is not None:
            # A request sent before this answer: refused, not silently dropped.
            conn.early = None
            self.line.refusals.count("wait", 400)
            self._send(conn, _SENT_EARLY, _LINGER)
        elif then == _IDLE:
            conn.cursors = {}
            conn.deadline = None
            self._wait_for_request(conn)
        elif then == _LINGER:
            gevent.spawn(self._linger_and_close, conn)
        else:
            self._close(conn)

    def _linger_and_close(self, conn: LeanPoll) -> None:
        """After refusing a request the client may still be sending: let it read the refusal."""
        sock = lend(conn.sock, None)
        conn.sock = None
        linger(sock)
        sock.close()
        self._close(conn)

    # -- parking and waking ------------------------------------------------------

    def _park(self, conn: LeanPoll) -> None:
        if conn.pending is not None:
            # Delivered while the headers were going out.
            body, conn.pending = conn.pending, None
            self._answer_parked(conn, body)
            return
        conn.parked = True
        self._watch(conn, self._on_parked_readable)
        self._parked.set(conn, time.monotonic() + self.line.config.WAIT_TIMEOUT)

    def deliver(self, conn: LeanPoll, body: bytes) -> None:
        """Write ``body`` to a parked poll, then close it or keep it for the next poll."""
        if not conn.parked:
            conn.pending = body
            return
        conn.parked = False
        self._parked.cancel(conn)
        conn.watcher.stop()
        self._answer_parked(conn, body)

    def _answer_parked(self, conn: LeanPoll, body: bytes) -> None:
        if not conn.keep_alive:
            self._send(conn, body, _CLOSE)
            return
        if body is not self._framed_for:
            # Every listener of a publish gets the same body: frame it once.
            self._framed_for, self._framed = body, self._frame(FIRST_BYTES + body, True)
        self._send_two(conn, conn.head, self._framed, _IDLE)

    def _on_parked_readable(self, conn: LeanPoll) -> None:
        # Whatever the client sends is read, so that its leaving is
        # noticed at once however many bytes came before it.
        data = recv_or_gone(conn.sock, READ_SIZE)
        if data is None:
            return
        if not data:
            self._drop(conn)
            return
        conn.early = data if conn.early is None else conn.early + data
        if len(conn.early) > MAX_PARKED_INPUT:
            # The poll ends with nothing, and the connection is refused.
            self._parked.cancel(conn)
            self._end_empty(conn)

    def _end_empty(self, conn: LeanPoll) -> None:
        """End a parked poll with no message (its deadline is already off)."""
        conn.parked = False
        self.state.unlisten(conn)
        conn.watcher.stop()
        if conn.keep_alive:
            self._send(conn, conn.head + _EMPTY_CHUNKED, _IDLE)
        else:
            self._close(conn)

    def _drop(self, conn: LeanPoll) -> None:
        """The client left: forget its poll and close."""
        if conn.parked:
            conn.parked = False
            self._parked.cancel(conn)
        self.state.unlisten(conn)
        self._close(conn)

    def _close(self, conn: LeanPoll) -> None:
        # Called exactly once per connection accepted.
        self.open_connections -= 1
        self._idle.cancel(conn)
        self._starting.cancel(conn)
        close_connection(conn)

    # -- timeouts ------------------------------------------------------------

    def _sweep(self, now: float) -> None:
        for conn in self._parked.pop_due(now):
            self._end_empty(conn)
        for conn in self._starting.pop_due(now):
            conn.watcher.stop()
            self.line.refusals.count("wait", 408)
            self._send(conn, _request_timeout(self.line.config.WAIT_REQUEST_TIMEOUT), _CLOSE)
        for conn in self._idle.pop_due(now):
            self._close(conn)

    def _refusal(self, error: ProtocolError, sock, data: bytes) -> bytes:
        """Count a request refused while reading; its answer."""
        self.line.refusals.count("wait", error.status)
        return _refusal(error, sock, data)

    @staticmethod
    def _frame(data: bytes, keep_alive: bool) -> bytes:
        """A whole body: as is, or as one chunk and the last chunk."""
        if not keep_alive:
            return data
        return b"%x\r\n%s\r\n%s" % (len(data), data, _LAST_CHUNK)


def _refusal(error: ProtocolError, sock, data: bytes) -> bytes:
    """The answer to a request refused while reading; a malformed one is logged."""
    if error.status == 400:
        try:
            address = sock.getpeername()
        except OSError:
            address = None
        bad_request("WAIT %s: 400 %s: %s", peer(address), error.reason, escape(data))
    return render_reply(error_reply(error))


def _check_length(request: _Request, limit: int) -> None:
    """A ProtocolError 413 for an unfinished request already past WAIT_MAXLEN.

    As for a whole request (see :class:`WaitLine`), the target and the
    body count, and a declared Content-Length too: a body that would
    pass the limit is refused now, not once it has come (or never).
    """
    declared = request.headers.get("content-length", "")
    body = int(declared) if declared.isdigit() and len(declared) < 19 else len(request.body)
    if len(request.url) + max(body, len(request.body)) > limit:
        raise ProtocolError(413, f"request longer than WAIT_MAXLEN ({limit} bytes)")


def _recv_by(sock, deadline: float) -> bytes | None:
    """The next bytes from a lent socket, or None once ``deadline`` (monotonic) has passed."""
    left = deadline - time.monotonic()
    if left <= 0:
        return None
    sock.settimeout(left)
    try:
        return sock.recv(READ_SIZE)
    except TimeoutError:
        return None


_SENT_EARLY = render_reply(error_reply(ProtocolError(
    400, "a request sent before the previous poll's answer is not served: send it after the answer")))


def _request_timeout(seconds: float) -> bytes:
    return render_reply(error_reply(ProtocolError(
        408, f"no complete request within WAIT_REQUEST_TIMEOUT ({seconds:g} s)")))


def _parser_goes_on(version: str, request: _Request) -> bool:
    """Whether the parser takes another request after this one (llhttp
    refuses one after any ``Connection: close``, and after HTTP/1.0)."""
    return version == "1.1" and not request.closing
