"""The IN line's HTTP routes, without I/O: which requests are theirs, parsing, replies.

Old clients send ``POST /`` (or no request line at all) and keep the old
protocol. A request whose request line names one of :data:`ROUTES`, with
any method, is read here as plain HTTP/1.x instead: a head and a body of
``Content-Length`` bytes; unless its head carries the old protocol's
``X-Realplexor`` header, the mark of an old client whatever its path. Its replies are ``HTTP/1.0`` with a
``Content-Length``, and the connection closes after them, as on the rest
of the IN line.
"""
from __future__ import annotations

import base64
import binascii
import re
from http import HTTPStatus
from typing import NamedTuple, Sequence

import httptools
import simplejson

from .protocol import ProtocolError

#: Path -> the methods it takes (HEAD wherever GET is).
ROUTES: dict[str, tuple[str, ...]] = {
    "/metrics": ("GET", "HEAD"),
    "/health": ("GET", "HEAD"),
    "/ready": ("GET", "HEAD"),
    "/publish": ("POST",),
    "/online": ("GET", "HEAD"),
    "/watch": ("GET", "HEAD"),
}
# A whole request line naming a route: "POST / HTTP/1.1" (every old
# client) fails at the character after the slash.
_ROUTE_LINE_RE = re.compile(
    rb"[A-Z]+ /(?:" + b"|".join(re.escape(path[1:].encode()) for path in ROUTES) + rb")(?:\?[^ \r\n]*)? HTTP/1\.[01]\r?\n")
_OLD_HEADER_RE = re.compile(rb"\nx-realplexor[ \t]*:", re.I)
_LOGIN_RE = re.compile(r"[A-Za-z0-9]+\Z")
Headers = Sequence[tuple[str, str]]


class ApiError(ProtocolError):
    """A refused route request: a status, a one-line reason and extra reply headers."""

    def __init__(self, status: int, reason: str, headers: Headers = ()):
        super().__init__(status, reason)
        self.headers = tuple(headers)


class HttpRequest(NamedTuple):
    """A complete request to one of the routes."""

    method: str
    path: str
    query: str
    headers: dict[str, str]      # lower-case names; the last of a repeated one
    body: bytes


def is_route(data: bytes | bytearray) -> bool:
    """Whether ``data`` is a request to one of :data:`ROUTES`: it begins with a whole
    request line naming one, and no ``X-Realplexor`` header comes before its blank line."""
    if _ROUTE_LINE_RE.match(data) is None:
        return False
    old = _OLD_HEADER_RE.search(data)
    return old is None or _head_ended_before(data, old.start())


def _head_ended_before(data: bytes | bytearray, end: int) -> bool:
    return data.find(b"\n\n", 0, end + 1) >= 0 or data.find(b"\n\r\n", 0, end + 1) >= 0


class _Collector:
    """httptools callbacks: one request's parts."""

    def __init__(self) -> None:
        self.url = b""
        self.headers: dict[str, str] = {}
        self.body: list[bytes] = []
        self.head_done = False
        self.complete = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.head_done:
            self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.head_done = True

    def on_body(self, body: bytes) -> None:
        if not self.complete:
            self.body.append(body)

    def on_message_complete(self) -> None:
        self.complete = True


def parse_http_request(buf: bytes, eof: bool) -> HttpRequest | None:
    """Parse a route's request from the bytes received so far.

    None while more are needed; ``eof`` says none will come. Raises
    :class:`ApiError` for a request that can never be served.
    """
    parts = _Collector()
    parser = httptools.HttpRequestParser(parts)
    try:
        parser.feed_data(bytes(buf))
    except httptools.HttpParserError as exc:
        # Bytes after a whole request are not this request's business.
        if not parts.complete:
            raise ApiError(400, f"malformed HTTP request: {exc}") from None
    if parts.head_done and "transfer-encoding" in parts.headers:
        raise ApiError(411, "a body in chunks (Transfer-Encoding) is not taken: send Content-Length")
    if not parts.complete:
        if not eof:
            return None
        if not parts.head_done:
            raise ApiError(400, "request ended before its blank line; nothing done")
        raise ApiError(400, f"request ended after {sum(map(len, parts.body))} of "
                            f"{parts.headers.get('content-length')} body bytes; nothing done")
    path, _, query = parts.url.decode("latin-1").partition("?")
    return HttpRequest(parser.get_method().decode("ascii"), path, query, parts.headers, b"".join(parts.body))


def check_method(request: HttpRequest) -> None:
    """ApiError 405 (with ``Allow``) unless the route takes the request's method."""
    allowed = ROUTES[request.path]
    if request.method not in allowed:
        raise ApiError(405, f"{request.path} takes {' or '.join(allowed)}", (("Allow", ", ".join(allowed)),))


def basic_credentials(request: HttpRequest) -> tuple[str, str] | None:
    """The login and password of an ``Authorization: Basic`` header, or None without one."""
    header = request.headers.get("authorization")
    if header is None:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "basic":
        raise ApiError(400, "only Basic authorization is taken (Authorization: Basic BASE64(LOGIN:PASSWORD))")
    try:
        text = base64.b64decode(token.strip(), validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        raise ApiError(400, "malformed Authorization header: not base64 of UTF-8 LOGIN:PASSWORD") from None
    login, colon, password = text.partition(":")
    if not colon:
        raise ApiError(400, "malformed Authorization header: no ':' between login and password")
    if not _LOGIN_RE.match(login):
        # Logins are alphanumeric: no users file line can match another.
        raise ApiError(403, "unknown login")
    return login, password


def unauthorized() -> ApiError:
    """The 401 of a request without credentials where guests are not let in."""
    return ApiError(401, "credentials needed: send HTTP Basic authorization with a USERS_FILE login",
                    (("WWW-Authenticate", 'Basic realm="realplexor"'),))


def render_reply(status: int, body: bytes, content_type: str, headers: Headers = (),
                 head_only: bool = False) -> bytes:
    """A reply: ``HTTP/1.0``, the headers, ``Content-Length`` and (unless ``head_only``) the body."""
    lines = [f"HTTP/1.0 {status} {_phrase(status)}", f"Content-Type: {content_type}",
             f"Content-Length: {len(body)}", "Cache-Control: no-store",
             *(f"{name}: {value}" for name, value in headers)]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + body


def render_json(status: int, value: object, headers: Headers = (), head_only: bool = False) -> bytes:
    """A JSON reply carrying ``value``, ended by a line break (for a shell's prompt)."""
    body = simplejson.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8") + b"\n"
    return render_reply(status, body, "application/json", headers, head_only)


def render_text(status: int, text: str, head_only: bool = False) -> bytes:
    """A plain-text reply of one line."""
    return render_reply(status, (text + "\n").encode("utf-8"), "text/plain; charset=utf-8", head_only=head_only)


def render_api_error(error: ProtocolError, head_only: bool = False) -> bytes:
    """An error reply: ``{"error": "one line"}`` with the error's status and headers."""
    return render_json(error.status, {"error": error.reason}, getattr(error, "headers", ()), head_only)


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"
