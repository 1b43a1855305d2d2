"""The WAIT line: browsers' long polls, as a WSGI application.

Each waiting request is one greenlet parked on a gevent Event; the
channel state wakes it through :meth:`WaitListener.deliver`. The
standalone server runs this under gevent's WSGIServer with
:class:`LongPollHandler`; gunicorn's gevent worker runs it as is.
"""
from __future__ import annotations

import logging
import socket
from decimal import Decimal
from typing import Callable, Iterable, Iterator

from gevent.event import Event
from gevent.hub import get_hub
from gevent.pywsgi import WSGIHandler

from .channels import ChannelState
from .config import Config
from .pages import Page, load_pages
from .protocol import ProtocolError, WaitRequest, parse_wait_request

log = logging.getLogger("realplexor.wait")

FIRST_BYTES = b" \r\n"
_NO_CACHE = (("Cache-Control", "no-store, no-cache, must-revalidate"),
             ("Expires", "Mon, 26 Jul 1997 05:00:00 GMT"),
             ("Connection", "close"))
_PEEK_FLAGS = socket.MSG_PEEK | socket.MSG_DONTWAIT
_READ = 1

StartResponse = Callable[..., object]


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

    def __init__(self, config: Config, state: ChannelState, pages: dict[str, Page] | None = None):
        self.state = state
        self.reconfigure(config, pages if pages is not None else load_pages(config))

    def reconfigure(self, config: Config, pages: dict[str, Page]) -> None:
        """Take on a new configuration (on reload)."""
        self.config = config
        self.pages = pages
        self._json_type = ("Content-Type", f"text/javascript; charset={config.CHARSET}")
        self._any_origin = "*" in config.CORS_ORIGINS
        self._origins = frozenset(config.CORS_ORIGINS)

    def __call__(self, environ: dict, start_response: StartResponse) -> Iterable[bytes]:
        cors = self._cors_headers(environ.get("HTTP_ORIGIN"))
        method = environ["REQUEST_METHOD"]
        try:
            if method == "OPTIONS":
                return self._preflight(environ, start_response, cors)
            if method not in ("GET", "POST", "HEAD"):
                raise ProtocolError(405, f"method {method} not allowed: use GET or POST")
            request = self._read_request(environ)
        except ProtocolError as error:
            return _error(start_response, error, cors)
        if request.page is not None:
            return self._page(environ, start_response, request.page, cors)
        listener = WaitListener(request.identifier.listened())
        body = self.state.listen(listener)
        start_response("200 OK", [self._json_type, *_NO_CACHE, *cors])
        if body is not None:
            return [FIRST_BYTES + body]
        return self._long_poll(listener, _client_socket(environ))

    def _read_request(self, environ: dict) -> WaitRequest:
        config = self.config
        target = environ.get("PATH_INFO", "")
        if environ.get("QUERY_STRING"):
            target += "?" + environ["QUERY_STRING"]
        room = config.WAIT_MAXLEN - len(target)
        body = ""
        if environ["REQUEST_METHOD"] == "POST":
            length = environ.get("CONTENT_LENGTH") or ""
            if length.isdigit() and int(length) > room:
                raise _too_long(config)
            raw = environ["wsgi.input"].read(max(room, 0) + 1)
            if len(raw) > room:
                raise _too_long(config)
            body = raw.decode("latin-1")
        elif room < 0:
            raise _too_long(config)
        return parse_wait_request(target, body, config.IDENTIFIER,
                                  config.IFRAME_ID, config.SCRIPT_ID)

    def _long_poll(self, listener: WaitListener, sock: socket.socket | None) -> Iterator[bytes]:
        watcher = _watch_for_hangup(sock, self.state, listener) if sock is not None else None
        try:
            yield FIRST_BYTES
            if not listener.event.wait(self.config.WAIT_TIMEOUT):
                self.state.unlisten(listener)
            elif listener.body is not None:
                yield listener.body
        finally:
            if watcher is not None:
                watcher.stop()
            if listener.body is None:
                self.state.unlisten(listener)

    def _page(self, environ: dict, start_response: StartResponse, name: str,
              cors: list[tuple[str, str]]) -> Iterable[bytes]:
        page = self.pages[name]
        if environ.get("HTTP_IF_MODIFIED_SINCE") == page.last_modified:
            start_response("304 Not Modified", [("Last-Modified", page.last_modified),
                                                ("Connection", "close"), *cors])
            return []
        start_response("200 OK", [*page.headers, ("Connection", "close"), *cors])
        return [] if environ["REQUEST_METHOD"] == "HEAD" else [page.body]

    def _cors_headers(self, origin: str | None) -> list[tuple[str, str]]:
        if origin is None:
            return []
        if self._any_origin:
            return [("Access-Control-Allow-Origin", "*")]
        if origin in self._origins:
            return [("Access-Control-Allow-Origin", origin), ("Vary", "Origin")]
        return []

    def _preflight(self, environ: dict, start_response: StartResponse,
                   cors: list[tuple[str, str]]) -> Iterable[bytes]:
        if not cors:
            raise ProtocolError(403, f"origin {environ.get('HTTP_ORIGIN')!r} is not allowed")
        requested = environ.get("HTTP_ACCESS_CONTROL_REQUEST_HEADERS", "Content-Type")
        start_response("204 No Content", [
            *cors, ("Connection", "close"),
            ("Access-Control-Allow-Methods", "GET, POST, OPTIONS"),
            ("Access-Control-Allow-Headers", requested),
            ("Access-Control-Max-Age", "86400")])
        return []


def _too_long(config: Config) -> ProtocolError:
    return ProtocolError(413, f"request longer than WAIT_MAXLEN ({config.WAIT_MAXLEN} bytes)")


def _error(start_response: StartResponse, error: ProtocolError,
           cors: list[tuple[str, str]]) -> list[bytes]:
    body = (error.reason + "\n").encode()
    reason = {400: "Bad Request", 403: "Forbidden", 405: "Method Not Allowed",
              413: "Payload Too Large"}.get(error.status, "Error")
    start_response(f"{error.status} {reason}", [
        ("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body))),
        ("Connection", "close"), *cors])
    return [body]


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
        try:
            gone = raw.recv(1, _PEEK_FLAGS) == b""
        except BlockingIOError:
            return
        except OSError:
            gone = True
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
    - the client socket is in the environ, to notice a client that leaves.
    """

    READ_BUFFER = 1024
    _held: bytearray | None = None

    def __init__(self, sock, address, server):  # pylint: disable=super-init-not-called
        # pywsgi's own __init__ would allocate the 8 KB reader we avoid.
        self.socket = sock
        self.client_address = address
        self.server = server
        self.rfile = sock.makefile("rb", self.READ_BUFFER)

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
