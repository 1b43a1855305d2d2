"""The WAIT line's rules, shared by both engines (WSGI and lean).

An engine hands over the request's method, target, headers and body;
:class:`WaitLine` answers with a complete :class:`Reply` (a page, a
preflight, an error) or with the :class:`Identifier` to long-poll.
Engines differ only in how they read, wait and write.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Callable

from .config import Config
from .metrics import Refusals
from .pages import Page
from .protocol import Identifier, ProtocolError, asks_reset, parse_resume, parse_wait_request
from .websocket import check_key, handshake_head

FIRST_BYTES = b" \r\n"
NO_CACHE = (("Cache-Control", "no-store, no-cache, must-revalidate"),
            ("Expires", "Mon, 26 Jul 1997 05:00:00 GMT"))
_STATUS = {200: "200 OK", 204: "204 No Content", 304: "304 Not Modified",
           400: "400 Bad Request", 403: "403 Forbidden", 405: "405 Method Not Allowed",
           406: "406 Not Acceptable", 408: "408 Request Timeout", 413: "413 Payload Too Large"}
EVENT_STREAM = "text/event-stream"

Header = Callable[[str], "str | None"]
ReadBody = Callable[[int], bytes]


@dataclass(frozen=True)
class Reply:
    """A complete answer; the connection closes after it."""

    status: str
    headers: tuple[tuple[str, str], ...]
    body: bytes = b""


@dataclass(frozen=True)
class Subscription:
    """A WAIT request that is more than a plain long poll.

    ``stream``: an event stream (``Accept: text/event-stream``), which is
    always told of history cuts; otherwise a long poll that asked for them
    (``reset=1``). ``resume`` holds the cursors of the stream's
    ``Last-Event-ID``, which win over those of the identifier.
    """

    identifier: Identifier
    stream: bool = False
    resume: dict = field(default_factory=dict)
    #: A WebSocket handshake's Sec-WebSocket-Key (the stream is then a WebSocket).
    websocket_key: str | None = None

    def cursors(self) -> tuple[dict[str, Decimal | None], dict[str, str | None]]:
        """Each listened channel's cursor and its text (None: from now)."""
        cursors, texts = {}, {}
        for item in self.identifier.items:
            cursors[item.id], texts[item.id] = self.resume.get(item.id, (item.cursor, item.cursor_text))
        return cursors, texts


class WaitLine:
    """Decides what each WAIT request gets, for any engine.

    ``refusals`` counts the requests refused, here and by the engines.
    """

    def __init__(self, config: Config, pages: dict[str, Page], refusals: Refusals | None = None):
        self.refusals = refusals if refusals is not None else Refusals()
        self.reconfigure(config, pages)

    def reconfigure(self, config: Config, pages: dict[str, Page]) -> None:
        """Take on a new configuration (on reload)."""
        self.config = config
        self.pages = pages
        self._poll_headers = (("Content-Type", f"text/javascript; charset={config.CHARSET}"), *NO_CACHE)
        self._any_origin = "*" in config.CORS_ORIGINS
        self._origins = frozenset(config.CORS_ORIGINS)
        # The last GET target that was a poll, and its Identifier: a broadcast's
        # polls all ask again with the same target, one after another.
        self._last_poll: tuple[str, Identifier] | None = None

    def answer(self, method: str, target: str, header: Header,
               read_body: ReadBody) -> Reply | Identifier | Subscription:
        """A Reply to send as is, the Identifier of a plain long poll, or a Subscription."""
        last = self._last_poll
        if (last is not None and method == "GET" and last[0] == target
                and header("upgrade") is None and EVENT_STREAM not in (header("accept") or "")):
            # A plain GET poll's answer depends on its target alone (no body).
            return last[1]
        cors = self.cors_headers(header("origin"))
        try:
            if method == "OPTIONS":
                return self._preflight(header, cors)
            if method not in ("GET", "POST", "HEAD"):
                # The method is not echoed: whatever a client sends stays out of the page.
                raise ProtocolError(405, "method not allowed: use GET or POST")
            if method == "GET" and (header("upgrade") or "").lower() == "websocket":
                return self._websocket(target, header, cors)
            request = self._parse(method, target, header, read_body)
            if request.page is None and len(request.identifier.items) > self.config.WAIT_MAX_IDS:
                raise ProtocolError(413, f"{len(request.identifier.items)} ids in one poll; at most "
                                         f"WAIT_MAX_IDS ({self.config.WAIT_MAX_IDS})")
        except ProtocolError as error:
            return self.refused(error, cors)
        if request.page is not None:
            return self._page(method, header, request.page, cors)
        if method == "HEAD":
            # A poll's headers and no body: a HEAD request can never get a message.
            return Reply(_STATUS[200], (*self._poll_headers, *cors, ("Connection", "close")))
        accept = header("accept")
        if accept is not None and EVENT_STREAM in accept:
            return self._stream(method, header, request.identifier, cors)
        if asks_reset(target):
            return Subscription(request.identifier)
        if method == "GET":
            self._last_poll = (target, request.identifier)
        return request.identifier

    def refused(self, error: ProtocolError, cors=()) -> Reply:
        """Count a refused request and make its reply."""
        self.refusals.count("wait", error.status)
        return error_reply(error, cors)

    def _stream(self, method: str, header: Header, identifier: Identifier, cors) -> Reply | Subscription:
        if "eventsource" not in self.config.STREAM_TRANSPORTS or method != "GET":
            return self.refused(ProtocolError(406, "event streams are not served here: long-poll instead"), cors)
        try:
            resume = parse_resume(header("last-event-id"))
        except ProtocolError as error:
            return self.refused(error, cors)
        return Subscription(identifier, stream=True, resume=resume)

    def _websocket(self, target: str, header: Header, cors) -> Reply | Subscription:
        """A WebSocket handshake: the Subscription to serve, or why not."""
        if "websocket" not in self.config.STREAM_TRANSPORTS:
            raise ProtocolError(406, "WebSockets are not served here: long-poll instead")
        if header("origin") is not None and not cors:
            raise ProtocolError(403, f"origin {header('origin')!r} is not allowed")
        if header("sec-websocket-version") != "13":
            raise ProtocolError(400, "WebSocket version 13 only (Sec-WebSocket-Version: 13)")
        key = check_key(header("sec-websocket-key"))
        # The identifier is optional: the client may subscribe on the open socket.
        identifier = Identifier()
        if f"{self.config.IDENTIFIER}=" in target:
            identifier = self._parse("GET", target, header, lambda limit: b"").identifier
            if len(identifier.items) > self.config.WAIT_MAX_IDS:
                raise ProtocolError(413, f"{len(identifier.items)} ids at once; at most "
                                         f"WAIT_MAX_IDS ({self.config.WAIT_MAX_IDS})")
        return Subscription(identifier or Identifier(), stream=True, websocket_key=key)

    def stream_head(self, origin: str | None, subscription: Subscription | None = None) -> bytes:
        """The status line and headers of a stream (its body ends when the connection does)."""
        if subscription is not None and subscription.websocket_key is not None:
            return handshake_head(subscription.websocket_key, self.cors_headers(origin))
        return render_head(_STATUS[200], (
            ("Content-Type", f"{EVENT_STREAM}; charset=utf-8"), *NO_CACHE,
            # nginx would otherwise hold the events back in its buffer.
            ("X-Accel-Buffering", "no"), *self.cors_headers(origin), ("Connection", "close")))

    def poll_headers(self, origin: str | None) -> tuple[tuple[str, str], ...]:
        """Headers of a long poll's ``200`` (the engine adds how the body ends)."""
        return self._poll_headers + self.cors_headers(origin)

    def cors_headers(self, origin: str | None) -> tuple[tuple[str, str], ...]:
        """CORS headers for a request from ``origin`` (none for a foreign one)."""
        if origin is None:
            return ()
        if self._any_origin:
            return (("Access-Control-Allow-Origin", "*"),)
        if origin in self._origins:
            return (("Access-Control-Allow-Origin", origin), ("Vary", "Origin"))
        return ()

    def _parse(self, method: str, target: str, header: Header, read_body: ReadBody):
        config = self.config
        room = config.WAIT_MAXLEN - len(target)
        body = ""
        if method == "POST":
            length = header("content-length") or ""
            if length.isdigit() and int(length) > room:
                raise _too_long(config)
            raw = read_body(max(room, 0) + 1)
            if len(raw) > room:
                raise _too_long(config)
            body = raw.decode("latin-1")
        elif room < 0:
            raise _too_long(config)
        return parse_wait_request(target, body, config.IDENTIFIER, config.IFRAME_ID, config.SCRIPT_ID)

    def _page(self, method: str, header: Header, name: str, cors) -> Reply:
        page = self.pages[name]
        if header("if-modified-since") == page.last_modified:
            return Reply(_STATUS[304], (("Last-Modified", page.last_modified),
                                        ("Connection", "close"), *cors))
        return Reply(_STATUS[200], (*page.headers, ("Connection", "close"), *cors),
                     b"" if method == "HEAD" else page.body)

    def _preflight(self, header: Header, cors) -> Reply:
        if not cors:
            raise ProtocolError(403, f"origin {header('origin')!r} is not allowed")
        return Reply(_STATUS[204], (
            *cors, ("Connection", "close"),
            ("Access-Control-Allow-Methods", "GET, POST, OPTIONS"),
            ("Access-Control-Allow-Headers", header("access-control-request-headers") or "Content-Type"),
            ("Access-Control-Max-Age", "86400")))


def error_reply(error: ProtocolError, cors=()) -> Reply:
    """A ``4xx`` with the one-line reason as a plain-text body."""
    body = (error.reason + "\n").encode()
    return Reply(_STATUS.get(error.status, f"{error.status} Error"), (
        ("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body))),
        ("X-Content-Type-Options", "nosniff"), ("Connection", "close"), *cors), body)


def render_head(status: str, headers) -> bytes:
    """An HTTP/1.1 status line and headers, ended by the blank line."""
    lines = [f"HTTP/1.1 {status}"] + [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def render_reply(reply: Reply) -> bytes:
    """A complete reply as the bytes to send."""
    return render_head(reply.status, reply.headers) + reply.body


def _too_long(config: Config) -> ProtocolError:
    return ProtocolError(413, f"request longer than WAIT_MAXLEN ({config.WAIT_MAXLEN} bytes)")


def wants_keep_alive(version: str, connection: str | None) -> bool:
    """Whether to keep the connection for the next poll.

    Only when an HTTP/1.1 request says ``Connection: keep-alive`` (browsers
    do): the answer is then chunked. Raw clients of the old server send no
    such header and read the answer to end of file.
    """
    if not connection or not version.endswith("1.1"):
        return False
    connection = connection.lower()
    return connection == "keep-alive" or "keep-alive" in (token.strip() for token in connection.split(","))
