"""A WAIT request's line and headers, for the WSGI engine, parsed by httptools.

pywsgi reads headers through ``http.client`` and the ``email`` feed
parser, and keeps every header for the life of the request; a parked
poll needs a handful. Here the head is read from the connection's
buffered reader (in one read when it is all there, as it nearly always
is) and parsed by llhttp, the parser of the lean engine, so both engines
refuse the same requests. Only the headers the WAIT line looks at are
kept, already under their WSGI environ names.

:class:`SocketReader` is the connection's reader: it holds no buffer
between requests, so a parked poll keeps none (a ``BufferedReader``
keeps its whole buffer for the life of the connection). No socket is
made here: it reads from any object with ``recv``.
"""
from __future__ import annotations

import httptools

from .protocol import ProtocolError

# Bytes a request's line and headers may take besides what WAIT_MAXLEN counts.
MAX_HEAD_BYTES = 16384

# The only request headers the WAIT line looks at, by their environ names.
_ENVIRON_NAMES = {
    b"origin": "HTTP_ORIGIN",
    b"connection": "HTTP_CONNECTION",
    b"content-length": "CONTENT_LENGTH",
    b"transfer-encoding": "HTTP_TRANSFER_ENCODING",
    b"if-modified-since": "HTTP_IF_MODIFIED_SINCE",
    b"access-control-request-headers": "HTTP_ACCESS_CONTROL_REQUEST_HEADERS",
    b"accept": "HTTP_ACCEPT",
    b"last-event-id": "HTTP_LAST_EVENT_ID",
    b"upgrade": "HTTP_UPGRADE",
    b"sec-websocket-key": "HTTP_SEC_WEBSOCKET_KEY",
    b"sec-websocket-version": "HTTP_SEC_WEBSOCKET_VERSION",
}
_BLANK_LINES = (b"\r\n", b"\n")
READ_SIZE = 4096


class SocketReader:
    """``peek``, ``read`` and ``readline`` over ``sock.recv``, buffering only what is unread.

    What pywsgi's request body reader (``Input``) and :func:`read_head`
    need of a file. ``buf`` is what came and was not read yet: empty,
    and holding no memory, while a poll waits.
    """

    __slots__ = ("sock", "buf", "closed")

    def __init__(self, sock) -> None:
        self.sock = sock
        self.buf = b""
        self.closed = False

    def _fill(self) -> bool:
        if self.closed:
            raise ValueError("read from a closed reader")
        data = self.sock.recv(READ_SIZE)
        if not data:
            return False
        self.buf += data
        return True

    def peek(self, size: int = 1) -> bytes:
        """What is buffered, after one receive if nothing is (b"" at the end)."""
        if not self.buf:
            self._fill()
        return self.buf

    def read(self, size: int = -1) -> bytes:
        """``size`` bytes, fewer at the end; everything to the end if ``size`` < 0."""
        if size is None or size < 0:
            while self._fill():
                pass
            data, self.buf = self.buf, b""
            return data
        while len(self.buf) < size and self._fill():
            pass
        data, self.buf = self.buf[:size], self.buf[size:]
        return data

    def readline(self, size: int = -1) -> bytes:
        """Up to and with the next newline, at most ``size`` bytes (if >= 0)."""
        start = 0
        while True:
            end = self.buf.find(b"\n", start)
            if end >= 0:
                end += 1
                break
            if 0 <= size <= len(self.buf):
                end = size
                break
            start = len(self.buf)
            if not self._fill():
                end = len(self.buf)
                break
        if 0 <= size < end:
            end = size
        data, self.buf = self.buf[:end], self.buf[end:]
        return data

    def close(self) -> None:
        self.closed = True
        self.buf = b""


class BadHead(ProtocolError):
    """A request refused while reading its head; ``data`` is what was read of it."""

    def __init__(self, status: int, reason: str, data: bytes):
        super().__init__(status, reason)
        self.data = data


class RequestHead:
    """One request's line and wanted headers (the httptools callbacks fill it in).

    ``headers``: ``{environ name: value}``, the last of a repeated header.
    """

    __slots__ = ("target", "headers", "complete", "method", "version", "keep_alive")

    def __init__(self) -> None:
        self.target = b""
        self.headers: dict[str, str] = {}
        self.complete = False
        self.method = ""
        self.version = ""
        self.keep_alive = False

    def on_url(self, url: bytes) -> None:
        self.target += url

    def on_header(self, name: bytes, value: bytes) -> None:
        key = _ENVIRON_NAMES.get(name.lower())
        if key is not None:
            self.headers[key] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.complete = True


def read_head(rfile, limit: int) -> RequestHead | None:
    """Read and parse the next request's line and headers from ``rfile``.

    None when the connection ends before a first byte. A request that is
    malformed, ends early or passes ``limit`` bytes raises BadHead (400 or
    413) with the reason; OSError is the connection's. The body
    (if any) stays in ``rfile``.
    """
    buffered = rfile.peek(1)
    if not buffered:
        return None
    end = buffered.find(b"\r\n\r\n")
    if 0 <= end < limit:
        data = rfile.read(end + 4)
    else:
        data = _read_lines(rfile, limit)
    head = RequestHead()
    parser = httptools.HttpRequestParser(head)
    try:
        parser.feed_data(data)
    except httptools.HttpParserUpgrade:
        pass    # no upgrade is served: answered as a plain request
    except httptools.HttpParserError as exc:
        if not head.complete:
            raise BadHead(400, f"malformed HTTP request: {exc}", data) from None
    if not head.complete:
        if len(data) > limit:
            raise BadHead(413, f"request line and headers longer than {limit} bytes", data)
        raise BadHead(400, "request ended before it was complete; nothing done", data)
    head.method = parser.get_method().decode("latin-1")
    head.version = parser.get_http_version()
    head.keep_alive = parser.should_keep_alive()
    return head


def _read_lines(rfile, limit: int) -> bytes:
    """The head line by line (it came in pieces): up to a blank line, the end, or past ``limit``."""
    lines = []
    size = 0
    while size <= limit:
        line = rfile.readline(limit + 1 - size)
        if not line:
            break
        lines.append(line)
        size += len(line)
        if line in _BLANK_LINES and len(lines) > 1:
            break
    return b"".join(lines)
