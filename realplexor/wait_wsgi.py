"""The WAIT line as a WSGI application (the default engine, and gunicorn's).

Each waiting request is one greenlet parked on a gevent Event; the
channel state wakes it through :meth:`WaitListener.deliver`. The
standalone server runs it under gevent's WSGIServer with its own
handler (:mod:`realplexor.wsgi_server`); gunicorn's gevent worker runs
it as is.
"""
from __future__ import annotations

import contextlib
import socket
import time
from decimal import Decimal
from typing import Callable, Iterable, Iterator

from gevent.event import Event
from gevent.hub import get_hub

from .channels import ChannelState
from .eventloop import recv_or_gone
from .protocol import ProtocolError
from .streams import EventStream, cuts_or_none, render_cuts
from .wait import FIRST_BYTES, ReadBody, Reply, Subscription, WaitLine, wants_keep_alive
from .websocket import open_stream
from .wsgi_deadlines import ConnectionDeadlines, RequestTimedOut

StartResponse = Callable[..., object]
_CLOSE = (("Connection", "close"),)
_READ = 1
_READ_SIZE = 8192
# Bytes a client may send while its poll waits (a request sent too
# early); more, and the poll is ended and the connection refused.
MAX_PARKED_INPUT = 4096


class WaitListener:
    """A parked long poll: its cursors, the Event that wakes it, and what
    its client sent while it waited (``early``)."""

    __slots__ = ("cursors", "body", "event", "early")

    def __init__(self, cursors: dict[str, Decimal | None]):
        self.cursors = cursors
        self.body: bytes | None = None
        self.event = Event()
        self.early: bytes | None = None

    def deliver(self, body: bytes) -> None:
        """Hand the body over and wake the waiting greenlet."""
        self.body = body
        self.event.set()


class WaitApp:
    """The WSGI application of the WAIT line."""

    def __init__(self, line: WaitLine, state: ChannelState):
        self.line = line
        self.state = state
        # The deadlines of LongPollHandler's connections (other servers keep their own).
        self.deadlines = ConnectionDeadlines()
        self.streams: set[EventStream] = set()

    def __call__(self, environ: dict, start_response: StartResponse) -> Iterable[bytes]:
        target = environ.get("PATH_INFO", "")
        if environ.get("QUERY_STRING"):
            target += "?" + environ["QUERY_STRING"]
        result = self.line.answer(
            environ["REQUEST_METHOD"], target,
            lambda name: environ.get("HTTP_" + name.upper().replace("-", "_"))
            if name != "content-length" else environ.get("CONTENT_LENGTH"),
            _body_reader(environ))
        request_read = environ.get("realplexor.request_read")
        if request_read is not None:
            request_read()
        if isinstance(result, Reply):
            start_response(result.status, list(result.headers))
            return [result.body]
        body = None
        if isinstance(result, Subscription):
            if result.stream:
                return self._stream(environ, start_response, result)
            cursors = result.cursors()[0]
            cuts = cuts_or_none(self.state, cursors)
            if cuts:
                body = render_cuts(cuts)
        else:
            cursors = result.listened()
        listener = WaitListener(cursors)
        environ["realplexor.listener"] = listener
        if body is None:
            body = self.state.listen(listener)
        headers = self.line.poll_headers(environ.get("HTTP_ORIGIN"))
        keep_alive = wants_keep_alive(environ.get("SERVER_PROTOCOL", ""), environ.get("HTTP_CONNECTION"))
        if not keep_alive:
            headers += _CLOSE
        start_response("200 OK", list(headers))
        if body is not None:
            return [FIRST_BYTES + body]
        return LongPoll(self, listener, _client_socket(environ), "realplexor.socket" in environ, keep_alive)

    def _stream(self, environ: dict, start_response: StartResponse, subscription: Subscription) -> Iterable[bytes]:
        """Serve a stream (events or a WebSocket) on the connection, taken over from the WSGI server."""
        sock = environ.get("realplexor.socket")
        if sock is None:
            # Under gunicorn the connection cannot be taken over: the client long-polls instead.
            reply = self.line.refused(ProtocolError(406, "streams are not served here: long-poll instead"),
                                      self.line.cors_headers(environ.get("HTTP_ORIGIN")))
            start_response(reply.status, list(reply.headers))
            return [reply.body]
        environ["realplexor.taken_over"] = True
        stream = open_stream(subscription, getattr(sock, "_sock", sock), self.state, self.line.config)
        self.streams.add(stream)
        try:
            stream.run(self.line.stream_head(environ.get("HTTP_ORIGIN"), subscription))
        finally:
            self.streams.discard(stream)
        return []


class LongPoll:
    """A parked poll's answer, as the WSGI application returns it.

    Any WSGI server iterates it: a raw client of the old server gets the
    first bytes at once and the body later; a kept-alive poll gets
    everything in one piece, with its headers. The WSGI engine's handler
    calls :meth:`wait` itself instead, with no generator between it and
    the wait (a parked poll keeps less). ``close`` ends the poll however
    it went; WSGI servers call it.
    """

    __slots__ = ("state", "seconds", "listener", "sock", "ours", "keep_alive", "watcher", "closed")

    def __init__(self, app: WaitApp, listener: WaitListener, sock: socket.socket | None, ours: bool,
                 keep_alive: bool):
        self.state = app.state
        self.seconds = app.line.config.WAIT_TIMEOUT
        self.listener = listener
        self.sock = sock
        self.ours = ours
        self.keep_alive = keep_alive
        self.watcher = _watch_for_hangup(sock, app.state, listener) if sock is not None else None
        self.closed = False

    def wait(self) -> bytes | None:
        """The body, once published; None after WAIT_TIMEOUT or if the client left."""
        listener = self.listener
        if listener.event.wait(self.seconds):
            return listener.body
        return None

    def wait_by(self, deadlines: ConnectionDeadlines) -> bytes | None:
        """:meth:`wait`, with WAIT_TIMEOUT kept by ``deadlines`` (no timer of its own)."""
        listener = self.listener
        deadlines.polls.set(self, time.monotonic() + self.seconds)
        try:
            listener.event.wait()
        finally:
            deadlines.polls.cancel(self)
        return listener.body

    def expire(self) -> None:
        """WAIT_TIMEOUT is over: the poll ends with nothing."""
        listener = self.listener
        if listener.body is None:
            self.state.unlisten(listener)
            listener.event.set()

    def __iter__(self) -> Iterator[bytes]:
        try:
            if not self.keep_alive:
                yield FIRST_BYTES
            body = self.wait()
        finally:
            self.close()
        if self.keep_alive:
            yield FIRST_BYTES if body is None else FIRST_BYTES + body
        elif body is not None:
            yield body

    def close(self) -> None:
        """Stop waiting (idempotent)."""
        if self.closed:
            return
        self.closed = True
        if self.watcher is not None:
            self.watcher.stop()
            self.watcher = None
        listener = self.listener
        if listener.body is None:
            self.state.unlisten(listener)
        if listener.early is not None and self.sock is not None and not self.ours:
            # Under another server (gunicorn), the bytes read while
            # waiting are gone from its reader: let it see the end.
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RD)


def _body_reader(environ: dict) -> ReadBody:
    """``wsgi.input.read``, with a body that breaks off as the client's mistake.

    pywsgi (and gunicorn) raise an OSError for a body that ends before
    its Content-Length or its last chunk; left to the server, that is a 500.
    """
    read = environ["wsgi.input"].read

    def read_body(limit: int) -> bytes:
        try:
            return read(limit)
        except RequestTimedOut:
            raise ProtocolError(408, "no complete request within WAIT_REQUEST_TIMEOUT") from None
        except OSError:
            if environ.get("CONTENT_LENGTH"):
                raise ProtocolError(400, "request ended before its Content-Length; nothing done") from None
            raise ProtocolError(400, "malformed or unfinished chunked body; nothing done") from None

    return read_body


def _client_socket(environ: dict) -> socket.socket | None:
    return environ.get("realplexor.socket") or environ.get("gunicorn.socket")



def _watch_for_hangup(sock: socket.socket, state: ChannelState, listener: WaitListener):
    """Unregister ``listener`` as soon as its client closes the connection."""
    raw = getattr(sock, "_sock", sock)
    try:
        watcher = get_hub().loop.io(raw.fileno(), _READ)
    except (OSError, ValueError):
        return None
    watcher.start(_read_while_parked, raw, state, listener, watcher)
    return watcher


def _read_while_parked(raw, state: ChannelState, listener: WaitListener, watcher) -> None:
    # Whatever the client sends is read, so that its leaving is
    # noticed at once however many bytes came before it.
    data = recv_or_gone(raw, _READ_SIZE)
    if data is None:
        return
    if data:
        listener.early = data if listener.early is None else listener.early + data
        if len(listener.early) <= MAX_PARKED_INPUT:
            return
    # Gone, or too much sent: the poll ends with nothing.
    watcher.stop()
    if listener.body is None:
        state.unlisten(listener)
        listener.event.set()
