"""The WAIT line as a WSGI application (the default engine, and gunicorn's).

Each waiting request is one greenlet parked on a gevent Event; the
channel state wakes it through :meth:`WaitListener.deliver`. The
standalone server runs it under gevent's WSGIServer with
:class:`LongPollHandler`; gunicorn's gevent worker runs it as is.
"""
from __future__ import annotations

import contextlib
import errno
import re
import socket
from decimal import Decimal
from typing import Callable, Iterable, Iterator

import gevent
from gevent.event import Event
from gevent.hub import get_hub
from gevent.pywsgi import WSGIHandler, WSGIServer

from .channels import ChannelState
from .clientlog import bad_request, escape, peer
from .eventloop import ACCEPT_PAUSE, Starvation, linger, out_of_files, peer_closed
from .protocol import ProtocolError
from .streams import EventStream, cuts_or_none, render_cuts
from .websocket import open_stream
from .wait import FIRST_BYTES, ReadBody, Reply, Subscription, WaitLine, error_reply, render_reply, wants_keep_alive

StartResponse = Callable[..., object]
_CLOSE = (("Connection", "close"),)
_READ = 1
_READ_SIZE = 8192
# Bytes a client may send while its poll waits (a request sent too
# early); more, and the poll is ended and the connection refused.
MAX_PARKED_INPUT = 4096
_SENT_EARLY = render_reply(error_reply(ProtocolError(
    400, "a request sent before the previous poll's answer is not served: send it after the answer")))


class _RequestTimedOut(BaseException):
    """Raised in a handler's greenlet: the request did not arrive whole in time.

    A BaseException, so that pywsgi's handling of broken requests does
    not take it for one.
    """


class _AnswerNotTaken(BaseException):
    """Raised in a handler's greenlet: the client did not take an answer in time."""


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
        # The whole response, last chunk included, leaves in one write.
        environ["realplexor.one_write"] = keep_alive
        return self._long_poll(listener, _client_socket(environ), "realplexor.socket" in environ, keep_alive)

    def _stream(self, environ: dict, start_response: StartResponse, subscription: Subscription) -> Iterable[bytes]:
        """Serve an event stream on the connection, taken over from the WSGI server."""
        sock = environ.get("realplexor.socket")
        if sock is None:
            # Under gunicorn the connection cannot be taken over: the client long-polls instead.
            reply = error_reply(ProtocolError(406, "event streams are not served here: long-poll instead"),
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

    def _long_poll(self, listener: WaitListener, sock: socket.socket | None, ours: bool,
                   keep_alive: bool) -> Iterator[bytes]:
        watcher = _watch_for_hangup(sock, self.state, listener) if sock is not None else None
        try:
            if not keep_alive:
                # A raw client of the old server reads the headers at once; a
                # kept-alive poll gets them with its answer, in one write.
                yield FIRST_BYTES
            if not listener.event.wait(self.line.config.WAIT_TIMEOUT):
                self.state.unlisten(listener)
                if keep_alive:
                    yield FIRST_BYTES
            elif listener.body is not None:
                yield FIRST_BYTES + listener.body if keep_alive else listener.body
            elif keep_alive:
                yield FIRST_BYTES
        finally:
            if watcher is not None:
                watcher.stop()
            if listener.body is None:
                self.state.unlisten(listener)
            if listener.early is not None and sock is not None and not ours:
                # Under another server (gunicorn), the bytes read while
                # waiting are gone from its reader: let it see the end.
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RD)


def _body_reader(environ: dict) -> ReadBody:
    """``wsgi.input.read``, with a body that breaks off as the client's mistake.

    pywsgi (and gunicorn) raise an OSError for a body that ends before
    its Content-Length or its last chunk; left to the server, that is a 500.
    """
    read = environ["wsgi.input"].read

    def read_body(limit: int) -> bytes:
        try:
            return read(limit)
        except _RequestTimedOut:
            raise ProtocolError(408, "no complete request within WAIT_REQUEST_TIMEOUT") from None
        except OSError:
            if environ.get("CONTENT_LENGTH"):
                raise ProtocolError(400, "request ended before its Content-Length; nothing done") from None
            raise ProtocolError(400, "malformed or unfinished chunked body; nothing done") from None

    return read_body


def _client_error(ex: Exception, request_line: str) -> tuple[str, str]:
    """What pywsgi found wrong in a request (no client bytes), and all it said."""
    message = getattr(ex, "formatted_message", None)
    if message is not None:
        # pywsgi's own: "Invalid HTTP method: '...'", "Expected GET method; Got ..."
        return re.split(r"[:;]", message, maxsplit=1)[0], message
    return "unreadable request line or headers", f"{type(ex).__name__}: {ex}; request line {request_line!r}"


def _input_pending(sock) -> bool:
    """Whether the client has sent bytes not read yet."""
    return peer_closed(getattr(sock, "_sock", sock)) is False


def _client_socket(environ: dict) -> socket.socket | None:
    return environ.get("realplexor.socket") or environ.get("gunicorn.socket")



def _watch_for_hangup(sock: socket.socket, state: ChannelState, listener: WaitListener):
    """Unregister ``listener`` as soon as its client closes the connection."""
    raw = getattr(sock, "_sock", sock)
    try:
        watcher = get_hub().loop.io(raw.fileno(), _READ)
    except (OSError, ValueError):
        return None

    def readable() -> None:
        # Whatever the client sends is read, so that its leaving is
        # noticed at once however many bytes came before it.
        try:
            data = raw.recv(_READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            listener.early = data if listener.early is None else listener.early + data
            if len(listener.early) <= MAX_PARKED_INPUT:
                return
        # Gone, or too much sent: the poll ends with nothing.
        watcher.stop()
        if listener.body is None:
            state.unlisten(listener)
            listener.event.set()

    watcher.start(readable)
    return watcher


class LongPollHandler(WSGIHandler):
    """pywsgi's handler, tuned for connections that mostly wait.

    - a 1 KB read buffer instead of 8 KB: a parked poll keeps its reader;
    - the status line, headers and first body bytes leave in one send;
    - a response that closes the connection is close-delimited, not
      chunked, as raw clients of the old server read to end of file;
    - the client socket is in the environ, to notice a client that leaves;
    - a request it cannot read is the client's mistake: a 400 with the
      reason, answered before the connection lingers, and an INFO line
      with the client's bytes escaped (pywsgi logs it at ERROR, raw);
    - a client that leaves while sending its request is not logged.
    """

    READ_BUFFER = 1024
    _held: bytearray | None = None
    _served = False
    _body_left = False
    _request_timer: gevent.Timeout | None = None

    def __init__(self, sock, address, server):  # pylint: disable=super-init-not-called
        # pywsgi's own __init__ would allocate the 8 KB reader we avoid.
        self.socket = sock
        self.client_address = address
        self.server = server
        self.rfile = sock.makefile("rb", self.READ_BUFFER)
        # The body follows the headers in a second write: without this it
        # may wait 40 ms for the client's delayed ACK.
        with contextlib.suppress(OSError):   # not a TCP socket (a UNIX one)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def handle_one_request(self):
        config = self.server.application.line.config
        if self._served and not self._next_request_begins(config.WAIT_KEEPALIVE_TIMEOUT):
            return None     # idle for the keep-alive timeout, or gone
        self._served = True
        # The request line, headers and body must all arrive by this deadline;
        # the application ends it once it has read them (realplexor.request_read).
        timer = self._request_timer = gevent.Timeout(config.WAIT_REQUEST_TIMEOUT, _RequestTimedOut)
        timer.start()
        try:
            result = super().handle_one_request()
        except _RequestTimedOut:
            self.server.application.line.refusals.count("wait", 408)
            with contextlib.suppress(OSError):
                self._send_by_deadline(render_reply(error_reply(ProtocolError(
                    408, f"no complete request within WAIT_REQUEST_TIMEOUT "
                         f"({config.WAIT_REQUEST_TIMEOUT:g} s)"))))
            return None
        finally:
            timer.close()
        listener = (getattr(self, "environ", None) or {}).get("realplexor.listener")
        if listener is not None and listener.early is not None:
            # Bytes came while the poll waited: refuse them, then close.
            if result is True:
                self.server.application.line.refusals.count("wait", 400)
                with contextlib.suppress(OSError):
                    self._send_by_deadline(_SENT_EARLY)
                    linger(self.socket)
            return None
        if isinstance(result, tuple):
            # A request pywsgi cannot read: answer it here, then close gently.
            self.status, body = result
            with contextlib.suppress(OSError):
                self.socket.sendall(body)
                linger(self.socket)
            return None
        if result is None and self.socket is not None and (self._body_left or _input_pending(self.socket)):
            # Closing now would reset the connection, and the client could
            # lose the answer it has not read yet.
            linger(self.socket)
        return result

    def run_application(self):
        try:
            super().run_application()
        finally:
            body = self.wsgi_input
            if self.close_connection and body is not None and (
                    body.position < (body.content_length or 0) or (body.chunked_input and body.chunk_length)):
                # The connection closes after this answer (a refusal above
                # all) with its body not read to the end: pywsgi would read
                # the rest first, and wait for ever on a body that never
                # ends. The connection lingers instead, for a bounded time.
                body._chunked_input_error = True
                self._body_left = True

    def _handle_client_error(self, ex: Exception):
        # pywsgi's hook for a request it cannot parse (it ignores the answer
        # for a chunked body found malformed after the reply began).
        if isinstance(ex, (ConnectionError, TimeoutError)):
            return None
        what, message = _client_error(ex, getattr(self, "requestline", ""))
        bad_request("WAIT %s: 400 malformed HTTP request: %s", peer(self.client_address), escape(message))
        self.server.application.line.refusals.count("wait", 400)
        return "400", render_reply(error_reply(ProtocolError(400, f"malformed HTTP request: {what}")))

    def _next_request_begins(self, patience: float) -> bool:
        """Wait up to ``patience`` s for a kept-alive connection's next request."""
        with gevent.Timeout(patience, False):
            try:
                return bool(self.rfile.peek(1))
            except (OSError, ValueError):
                return False
        return False

    def get_environ(self) -> dict:
        environ = super().get_environ()
        environ["realplexor.socket"] = self.socket
        environ["realplexor.request_read"] = self._request_timer.close
        return environ

    def finalize_headers(self) -> None:
        super().finalize_headers()
        if self.close_connection and self.response_use_chunked:
            self.response_use_chunked = False
            self.response_headers = [(k, v) for k, v in self.response_headers
                                     if k.lower() != b"transfer-encoding"]

    def _write_with_headers(self, data: bytes) -> None:
        if self._held is not None:      # the whole response is being held
            super()._write_with_headers(data)
            return
        self._held = bytearray()
        try:
            super()._write_with_headers(data)
        finally:
            held, self._held = self._held, None
            if held:
                self._send_by_deadline(bytes(held))

    def process_result(self) -> None:
        if self.environ.get("realplexor.taken_over"):
            # An event stream wrote its own response, and ended it by closing.
            self.status, self.headers_sent, self.close_connection = "200 OK", True, True
            return
        if not self.environ.get("realplexor.one_write"):
            super().process_result()
            return
        # A kept-alive poll's answer: headers, body and last chunk in one write.
        self._held = bytearray()
        try:
            super().process_result()
        finally:
            held, self._held = self._held, None
            if held:
                self._send_by_deadline(bytes(held))

    def _sendall(self, data: bytes) -> None:
        if self._held is not None:
            self._held += data
        else:
            self._send_by_deadline(data)

    def _send_by_deadline(self, data: bytes) -> None:
        # However slowly the client reads, an answer must be taken by
        # WRITE_TIMEOUT; pywsgi takes EPIPE as a client gone, quietly.
        seconds = self.server.application.line.config.WRITE_TIMEOUT
        try:
            with gevent.Timeout(seconds, _AnswerNotTaken):
                super()._sendall(data)
        except _AnswerNotTaken:
            raise OSError(errno.EPIPE, f"answer not taken within WRITE_TIMEOUT ({seconds:g} s)") from None


class WaitServer(WSGIServer):
    """gevent's WSGIServer, pausing quietly when it runs out of descriptors.

    gevent would log a traceback for every failed accept; here there is
    one line when it begins and one when it ends.
    """

    engine = "wsgi"
    transport = "longpoll"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._starvation: Starvation | None = None
        self.open_connections = 0

    @property
    def accepting(self) -> bool:
        """Whether it takes connections: started, and its last accept did not fail for want
        of descriptors."""
        return self.started and (self._starvation is None or not self._starvation.active)

    def handle(self, sock, address):
        """Serve one connection (in its greenlet), counted while it is open."""
        self.open_connections += 1
        try:
            super().handle(sock, address)
        finally:
            self.open_connections -= 1

    def do_read(self):
        try:
            accepted = super().do_read()
        except OSError as exc:
            if not out_of_files(exc):
                raise
            if self._starvation is None:
                self._starvation = Starvation(peer(self.address))
            self._starvation.paused(exc)
            self.stop_accepting()
            self._timer = self.loop.timer(ACCEPT_PAUSE)
            self._timer.start(self._start_accepting_if_started)
            return None
        if accepted is not None and self._starvation is not None and self._starvation.active:
            self._starvation.fed()
        return accepted
