"""The WAIT line as a WSGI application (the default engine, and gunicorn's).

Each waiting request is one greenlet parked on a gevent Event; the
channel state wakes it through :meth:`WaitListener.deliver`. The
standalone server runs it under gevent's WSGIServer with
:class:`LongPollHandler`; gunicorn's gevent worker runs it as is.
"""
from __future__ import annotations

import contextlib
import re
import socket
from decimal import Decimal
from typing import Callable, Iterable, Iterator

from gevent.event import Event
from gevent.hub import get_hub
from gevent.pywsgi import WSGIHandler

from .channels import ChannelState
from .clientlog import bad_request, escape, peer
from .eventloop import linger, peer_closed
from .protocol import ProtocolError
from .wait import FIRST_BYTES, ReadBody, Reply, WaitLine, error_reply, render_reply, wants_keep_alive

StartResponse = Callable[..., object]
_CLOSE = (("Connection", "close"),)
_READ = 1


class WaitListener:
    """A parked long poll: its cursors, and the Event that wakes it."""

    __slots__ = ("cursors", "body", "event")

    def __init__(self, cursors: dict[str, Decimal | None]):
        self.cursors = cursors
        self.body: bytes | None = None
        self.event = Event()

    def deliver(self, body: bytes) -> None:
        """Hand the body over and wake the waiting greenlet."""
        self.body = body
        self.event.set()


class WaitApp:
    """The WSGI application of the WAIT line."""

    def __init__(self, line: WaitLine, state: ChannelState):
        self.line = line
        self.state = state

    def __call__(self, environ: dict, start_response: StartResponse) -> Iterable[bytes]:
        target = environ.get("PATH_INFO", "")
        if environ.get("QUERY_STRING"):
            target += "?" + environ["QUERY_STRING"]
        result = self.line.answer(
            environ["REQUEST_METHOD"], target,
            lambda name: environ.get("HTTP_" + name.upper().replace("-", "_"))
            if name != "content-length" else environ.get("CONTENT_LENGTH"),
            _body_reader(environ))
        if isinstance(result, Reply):
            start_response(result.status, list(result.headers))
            return [result.body]
        listener = WaitListener(result.listened())
        body = self.state.listen(listener)
        headers = self.line.poll_headers(environ.get("HTTP_ORIGIN"))
        if not wants_keep_alive(environ.get("SERVER_PROTOCOL", ""), environ.get("HTTP_CONNECTION")):
            headers += _CLOSE
        start_response("200 OK", list(headers))
        if body is not None:
            return [FIRST_BYTES + body]
        return self._long_poll(listener, _client_socket(environ))

    def _long_poll(self, listener: WaitListener, sock: socket.socket | None) -> Iterator[bytes]:
        watcher = _watch_for_hangup(sock, self.state, listener) if sock is not None else None
        try:
            yield FIRST_BYTES
            if not listener.event.wait(self.line.config.WAIT_TIMEOUT):
                self.state.unlisten(listener)
            elif listener.body is not None:
                yield listener.body
        finally:
            if watcher is not None:
                watcher.stop()
            if listener.body is None:
                self.state.unlisten(listener)


def _body_reader(environ: dict) -> ReadBody:
    """``wsgi.input.read``, with a body that breaks off as the client's mistake.

    pywsgi (and gunicorn) raise an OSError for a body that ends before
    its Content-Length or its last chunk; left to the server, that is a 500.
    """
    read = environ["wsgi.input"].read

    def read_body(limit: int) -> bytes:
        try:
            return read(limit)
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
        gone = peer_closed(raw)
        if gone is None:
            return
        watcher.stop()
        if gone and listener.body is None:
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
        result = super().handle_one_request()
        if isinstance(result, tuple):
            # A request pywsgi cannot read: answer it here, then close gently.
            self.status, body = result
            with contextlib.suppress(OSError):
                self.socket.sendall(body)
                linger(self.socket)
            return None
        if result is None and self.socket is not None and _input_pending(self.socket):
            # Closing now would reset the connection, and the client could
            # lose the answer it has not read yet.
            linger(self.socket)
        return result

    def _handle_client_error(self, ex: Exception):
        # pywsgi's hook for a request it cannot parse (it ignores the answer
        # for a chunked body found malformed after the reply began).
        if isinstance(ex, (ConnectionError, TimeoutError)):
            return None
        what, message = _client_error(ex, getattr(self, "requestline", ""))
        bad_request("WAIT %s: 400 malformed HTTP request: %s", peer(self.client_address), escape(message))
        return "400", render_reply(error_reply(ProtocolError(400, f"malformed HTTP request: {what}")))

    def get_environ(self) -> dict:
        environ = super().get_environ()
        environ["realplexor.socket"] = self.socket
        return environ

    def finalize_headers(self) -> None:
        super().finalize_headers()
        if self.close_connection and self.response_use_chunked:
            self.response_use_chunked = False
            self.response_headers = [(k, v) for k, v in self.response_headers
                                     if k.lower() != b"transfer-encoding"]

    def _write_with_headers(self, data: bytes) -> None:
        self._held = bytearray()
        try:
            super()._write_with_headers(data)
        finally:
            held, self._held = self._held, None
            if held:
                super()._sendall(bytes(held))

    def _sendall(self, data: bytes) -> None:
        if self._held is not None:
            self._held += data
        else:
            super()._sendall(data)
