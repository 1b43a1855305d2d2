"""The Realplexor wire protocol, without I/O.

Bytes of a WAIT or IN request go in, small immutable records come out;
parts and replies go in, bytes come out. Nothing here touches a socket,
so every case is testable with plain byte strings.
"""
from __future__ import annotations

import functools
import re
from decimal import Decimal
from typing import Iterable, NamedTuple, Sequence
from urllib.parse import unquote

import simplejson

COMMANDS = ("ONLINE", "WATCH", "STATS")
# Longer runs of digits are no length or position, and would exceed int()'s limit.
MAX_NUMBER_DIGITS = 18

_ITEM_RE = re.compile(r"(\*)?(?:(\d+(?:\.\d+)?):)?([A-Za-z0-9_]+)\Z")
_LOGIN_RE = re.compile(r"[A-Za-z0-9]+\Z")
_HTTP_LINE_RE = re.compile(rb"[A-Za-z]+ \S+ HTTP/\d+\.\d+\r?\Z")
_CONTENT_LENGTH_RE = re.compile(rb"^content-length:[ \t]*([^\r\n]*?)[ \t]*\r?$", re.I | re.M)
_TRANSFER_ENCODING_RE = re.compile(rb"^transfer-encoding:", re.I | re.M)
_COMMAND_LINE_RE = re.compile(
    rb"[ \t]*(online|watch|stats)(?:[ \t]+([^\r\n]*?))?[ \t]*(?:\r?\n|\Z)", re.I)
_COMMAND_WORD_RE = re.compile(rb"[A-Z]+(?=\s|\Z)")
_RESET_RE = re.compile(r"(?<![A-Za-z0-9_])reset=1(?![0-9])")
_RESUME_ITEM_RE = re.compile(r"(\d+(?:\.\d+)?):([A-Za-z0-9_]+)\Z")
# Bytes of a Last-Event-ID shown in a refusal.
_SHOWN = 40
_marker_patterns: dict[str, re.Pattern[str]] = {}
# Only identifier strings up to this long are kept parsed: a parsed item
# takes some 25 times its text, and the caches are bounded by count alone.
CACHED_IDENTIFIER_LEN = 256


class ProtocolError(Exception):
    """A request that cannot be served: an HTTP status and a one-line reason."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


class Item(NamedTuple):
    """One ``[*][CURSOR:]ID`` entry of an identifier string."""

    id: str
    cursor: Decimal | None = None
    cursor_text: str | None = None
    limiter: bool = False


class Identifier(NamedTuple):
    """A parsed identifier string: optional credentials and its items."""

    items: tuple[Item, ...] = ()
    login: str | None = None
    password: str | None = None

    @property
    def targets(self) -> tuple[Item, ...]:
        """Items naming channels to publish to (not limiters)."""
        return tuple(item for item in self.items if not item.limiter)

    @property
    def limiters(self) -> frozenset[str]:
        """Ids that a message is limited to (``*ID`` items)."""
        return frozenset(item.id for item in self.items if item.limiter)

    def listened(self) -> dict[str, Decimal | None]:
        """Channels a WAIT request listens to, with their cursors.

        On the WAIT line a ``*ID`` is just another listened channel.
        """
        return {item.id: item.cursor for item in self.items}


class WaitRequest(NamedTuple):
    """What a browser asked the WAIT line for."""

    page: str | None = None          # "IFRAME" or "SCRIPT" for the static pages
    identifier: Identifier | None = None


class InRequest(NamedTuple):
    """A complete IN-line request: a command or a publish."""

    identifier: Identifier
    command: str | None = None       # ONLINE, WATCH or STATS; None for a publish
    args: tuple[str, ...] = ()
    data: bytes = b""


def _marker_re(marker: str) -> re.Pattern[str]:
    pattern = _marker_patterns.get(marker)
    if pattern is None:
        pattern = re.compile(r"(?<![A-Za-z0-9_])" + re.escape(marker) + r"=([^\s&;\"'<>]*)")
        _marker_patterns[marker] = pattern
    return pattern


def find_identifier(text: str, marker: str = "identifier") -> str | None:
    """The value after the first ``MARKER=`` in ``text``, or None."""
    match = _marker_re(marker).search(text)
    return match.group(1) if match else None


def parse_identifier(value: str) -> Identifier:
    """Parse ``[LOGIN:PASSWORD@]item,item,...``; items that do not match are dropped."""
    login = password = None
    credentials, at, rest = value.rpartition("@")
    if at:
        value = rest
        login, colon, password = credentials.partition(":")
        if not colon or not _LOGIN_RE.match(login):
            raise ProtocolError(400, f"malformed credentials {credentials.split(':')[0]!r}: expected LOGIN:PASSWORD@ with an alphanumeric login")
    items = []
    for text in value.split(","):
        match = _ITEM_RE.match(text)
        if match is None:
            continue
        star, cursor_text, channel = match.groups()
        # The pattern has checked the cursor's digits.
        cursor = Decimal(cursor_text) if cursor_text else None
        items.append(Item(channel, cursor, cursor_text, star is not None))
    return Identifier(tuple(items), login, password)


def parse_wait_request(target: str, body: str, marker: str,
                       iframe_id: str, script_id: str) -> WaitRequest:
    """Find and parse the identifier of a WAIT request.

    ``target`` is the raw request target (path and query), ``body`` the
    request body; headers are never searched, so a Referer that carries
    another page's identifier cannot leak in.
    """
    value = find_identifier(unquote(target), marker)
    if value is None and body:
        value = find_identifier(unquote(body), marker)
    if value is None:
        raise ProtocolError(400, f"no {marker}= in the request")
    parse = _wait_request_once if len(value) <= CACHED_IDENTIFIER_LEN else _wait_request_for
    return parse(value, iframe_id, script_id)


def _wait_request_for(value: str, iframe_id: str, script_id: str) -> WaitRequest:
    if value == iframe_id:
        return WaitRequest(page="IFRAME")
    if value == script_id:
        return WaitRequest(page="SCRIPT")
    identifier = parse_identifier(value)
    if not identifier.items:
        raise ProtocolError(400, "empty identifier list: name at least one channel id ([A-Za-z0-9_]+)")
    return WaitRequest(identifier=identifier)


# After a broadcast, every browser on a page asks again with the same
# identifier (its random cache-buster lies outside it): parse each once.
_wait_request_once = functools.lru_cache(maxsize=4096)(_wait_request_for)


def asks_reset(target: str) -> bool:
    """Whether a WAIT request's target asks to be told of history cuts (``reset=1``)."""
    return "reset=1" in target and _RESET_RE.search(target) is not None


def parse_resume(value: str | None) -> dict[str, tuple[Decimal, str]]:
    """An event stream's ``Last-Event-ID`` (``CURSOR:ID,CURSOR:ID``): each id's cursor and its text.

    Empty or missing: nothing to resume. Anything else that is not that
    list is refused (400), since a stream from the wrong cursors would
    repeat or skip messages.
    """
    if not value:
        return {}
    resume = {}
    for text in value.split(","):
        match = _RESUME_ITEM_RE.match(text.strip())
        if match is None:
            shown = text[:_SHOWN].encode("ascii", "backslashreplace").decode()
            raise ProtocolError(400, f"Last-Event-ID item {shown!r} is not CURSOR:ID; "
                                     "reconnect without Last-Event-ID")
        resume[match.group(2)] = (Decimal(match.group(1)), match.group(1))
    return resume


def parse_in_request(buf: bytes, eof: bool, marker: str = "identifier") -> InRequest | None:
    """Parse the bytes of an IN-line request received so far.

    Returns None while more bytes are needed; ``eof`` says the client has
    closed its writing side, so nothing more will come. Raises
    ProtocolError for a request that can never be served.
    """
    newline = buf.find(b"\n")
    first_line = buf if newline < 0 else buf[:newline]
    if not _HTTP_LINE_RE.match(first_line):
        command = _COMMAND_LINE_RE.match(buf)
        if command is not None:
            head_end = _find_head_end(buf)
            if head_end is None and not eof:
                return None
            head = buf[:head_end[0]] if head_end else buf
            return _command(_head_identifier(head, marker), command)
    head_end = _find_head_end(buf)
    if head_end is None:
        if not eof:
            return None
        head, body = buf, b""
    else:
        head, body = buf[:head_end[0]], buf[head_end[1]:]
    body = _complete_body(head, body, eof)
    if body is None:
        return None
    data = body.strip()
    if not data and _COMMAND_WORD_RE.fullmatch(first_line.strip()):
        raise ProtocolError(400, f"{first_line.strip().decode()!r} is not a command "
                                 "(ONLINE, WATCH, STATS); nothing done")
    identifier = _head_identifier(head, marker)
    # A command is a word; JSON data starts with a letter only as true/false/null.
    command = _COMMAND_LINE_RE.fullmatch(data + b"\n") if data[:1].isalpha() else None
    if command is not None:
        return _command(identifier, command)
    return InRequest(identifier, data=_checked_data(data))


class InRequestBuffer:
    """An IN-line request's bytes as they come, and when to parse them.

    Until the head has ended, or the body has reached its Content-Length,
    or the client has closed its side, :func:`parse_in_request` can only
    say "not yet"; the buffer says when it may say more, so a request
    sent in many small pieces is not parsed again at every piece.
    """

    __slots__ = ("data", "_scanned", "_head_end", "_need")

    def __init__(self) -> None:
        self.data: bytes | bytearray = b""
        self._scanned = 0          # bytes searched for the head's end so far
        self._head_end: int | None = None
        self._need: int | None = None   # the request's whole length, once its head says

    def __len__(self) -> int:
        return len(self.data)

    def add(self, chunk: bytes) -> None:
        """Append received bytes."""
        if not self.data:
            self.data = chunk
        else:
            if isinstance(self.data, bytes):
                self.data = bytearray(self.data)
            self.data += chunk

    def worth_parsing(self, eof: bool) -> bool:
        """Whether parsing now may find the request complete (or wrong)."""
        if eof:
            return True
        if self._head_end is None:
            # A blank line may straddle the last search's end: look 3 bytes back.
            found = _find_head_end(self.data, max(self._scanned - 3, 0))
            self._scanned = len(self.data)
            if found is None:
                return False
            self._head_end = found[1]
            length = _CONTENT_LENGTH_RE.search(self.data, 0, found[0])
            if length is not None and length.group(1).isdigit() and len(length.group(1)) <= MAX_NUMBER_DIGITS:
                self._need = found[1] + int(length.group(1))
            return True
        return self._need is not None and len(self.data) >= self._need


def _find_head_end(buf: bytes, start: int = 0) -> tuple[int, int] | None:
    """Where the first blank line (``\r?\n\r?\n``) at or after ``start`` starts and ends, or None."""
    crlf = buf.find(b"\n\r\n", start)
    lf = buf.find(b"\n\n", start)
    if crlf < 0 and lf < 0:
        return None
    if lf < 0 or 0 <= crlf < lf:
        newline, end = crlf, crlf + 3
    else:
        newline, end = lf, lf + 2
    return (newline - 1 if newline and buf[newline - 1] == 13 else newline), end


def _head_identifier(head: bytes, marker: str) -> Identifier:
    value = find_identifier(head.decode("latin-1"), marker)
    if value is None:
        return Identifier()
    # Credentials are not kept in the cache.
    if "@" in value or len(value) > CACHED_IDENTIFIER_LEN:
        return parse_identifier(value)
    return _parse_identifier_once(value)


# A back end publishes to the same channels again and again.
_parse_identifier_once = functools.lru_cache(maxsize=4096)(parse_identifier)


def _command(identifier: Identifier, match: re.Match[bytes]) -> InRequest:
    args = tuple(a.decode("latin-1") for a in (match.group(2) or b"").split())
    return InRequest(identifier, match.group(1).decode().upper(), args)


def _complete_body(head: bytes, body: bytes, eof: bool) -> bytes | None:
    lengths = set(_CONTENT_LENGTH_RE.findall(head))
    if _TRANSFER_ENCODING_RE.search(head):
        if lengths:
            raise ProtocolError(400, "both Content-Length and Transfer-Encoding; nothing done")
        raise ProtocolError(411, "a body in chunks (Transfer-Encoding) is not taken: send Content-Length")
    if not lengths:
        return body if eof else None
    if len(lengths) > 1:
        raise ProtocolError(400, "Content-Length headers that disagree; nothing done")
    (value,) = lengths
    if not value.isdigit() or len(value) > MAX_NUMBER_DIGITS:
        raise ProtocolError(400, f"invalid Content-Length {value.decode('latin-1')!r}")
    length = int(value)
    if len(body) >= length:
        return body[:length]
    if eof:
        raise ProtocolError(400, f"request ended after {len(body)} of {length} body bytes; nothing published")
    return None


def _ignore(_text: str) -> None:
    return None


def _checked_data(data: bytes) -> bytes:
    """``data`` (stripped) if it is UTF-8 JSON, else ProtocolError."""
    if not data:
        raise ProtocolError(400, "no data to publish and no command (ONLINE, WATCH, STATS)")
    try:
        # Numbers are only checked, never converted: a long one is valid JSON.
        simplejson.loads(bytes(data).decode("utf-8"), parse_int=_ignore, parse_float=_ignore)
    except UnicodeDecodeError:
        raise ProtocolError(400, "data is not valid UTF-8; nothing published") from None
    except RecursionError:
        raise ProtocolError(400, "data nests arrays or objects too deeply to check; nothing published") from None
    except simplejson.JSONDecodeError as exc:
        word = _COMMAND_WORD_RE.match(data)
        if word:
            raise ProtocolError(400, f"data is not valid JSON, and {word.group(0).decode()!r} is not a "
                                     "command (ONLINE, WATCH, STATS); nothing done") from None
        raise ProtocolError(400, f"data is not valid JSON ({exc}); nothing published") from None
    except ValueError as exc:
        raise ProtocolError(400, f"data cannot be checked as JSON ({exc}); nothing published") from None
    return bytes(data)


def render_wait_body(parts: Iterable[tuple[Sequence[tuple[str, str]], bytes]]) -> bytes:
    """Render WAIT-line parts ``(ids with cursors, JSON data)`` as the JSON body."""
    rendered = []
    for ids, data in parts:
        pairs = ",".join(f'"{channel}":"{cursor}"' for channel, cursor in ids)
        rendered.append(b'{"ids":{' + pairs.encode() + b'},"data":' + data + b"}")
    return b"[" + b",".join(rendered) + b"]"


def render_wait_body_one(ids: Sequence[tuple[str, str]], data: bytes) -> bytes:
    """The body of one message: the same as ``render_wait_body([(ids, data)])``."""
    pairs = ",".join(f'"{channel}":"{cursor}"' for channel, cursor in ids)
    return b'[{"ids":{%s},"data":%s}]' % (pairs.encode(), data)


def render_reset_parts(cuts: Iterable[tuple[str, str]]) -> list[bytes]:
    """One part per channel that lost messages: ``{"ids": {ID: CURSOR}, "reset": true}``.

    CURSOR is the newest message dropped there; what follows the part
    comes after it.
    """
    return [b'{"ids":{"%s":"%s"},"reset":true}' % (channel.encode(), cursor.encode())
            for channel, cursor in cuts]


_REASONS = {200: "OK", 400: "Bad Request", 403: "Forbidden", 404: "Not Found",
            408: "Request Timeout", 411: "Length Required", 413: "Payload Too Large",
            500: "Internal Server Error", 503: "Service Unavailable"}


def render_in_reply(status: int, body: str = "") -> bytes:
    """An IN-line reply: ``HTTP/1.0``, plain text, correct Content-Length."""
    payload = body.encode("utf-8")
    return (f"HTTP/1.0 {status} {_REASONS.get(status, 'Error')}\r\n"
            f"Content-Type: text/plain\r\nContent-Length: {len(payload)}\r\n\r\n").encode() + payload


def render_error(error: ProtocolError) -> bytes:
    """An IN-line error reply carrying the one-line reason."""
    return render_in_reply(error.status, error.reason + "\n")


def render_online(counts: Iterable[tuple[str, int]]) -> str:
    """ONLINE's body: ``ID COUNT`` per line."""
    return "".join(f"{channel} {count}\n" for channel, count in counts)


def render_watch(events: Iterable[tuple[str, int, str]]) -> str:
    """WATCH's body: ``EVENT POS:ID`` per line."""
    return "".join(f"{event} {pos}:{channel}\n" for event, pos, channel in events)
