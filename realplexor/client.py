"""Python clients of Realplexor: the IN line (publish, query) and the WAIT line (listen).

    from realplexor.client import Listener, Realplexor

    rpl = Realplexor("127.0.0.1", 10010, namespace="demo_")
    rpl.send(["Alpha", "Beta"], {"text": "hello"})
    rpl.send({"Alpha": cursor}, "at a cursor of my own")
    rpl.send("Alpha", "only for friends", show_only_for_ids=["friends"])
    rpl.online()                  # ["Alpha", ...]
    rpl.online_with_counters()    # {"Alpha": 2, ...}
    rpl.watch(0)                  # [WatchEvent("FAKE", 12, "FAKE")]: start from 12
    rpl.watch(12)                 # [WatchEvent("online", 13, "Alpha"), ...]

    listener = Listener({"Alpha": cursor, "Beta": None}, "127.0.0.1", 8088, namespace="demo_")
    for part in listener.poll():  # one long poll: [Part(ids, data, reset), ...]
        ...                       # part.reset: messages up to part.ids[id] were lost
    listener.cursors              # {"Alpha": "1732486800.5", ...}: the next poll resumes there

Each request is one TCP connection (TLS on port 443), so one client
object may be shared by threads (a listener, which keeps cursors, may
not). It uses the standard ``socket`` module looked up at call time:
after ``gevent.monkey.patch_all()`` it is cooperative, or pass
``connect=gevent.socket.create_connection``.

This module needs nothing but the standard library (simplejson is used
when installed), so it can be copied alone into a back end.
"""
from __future__ import annotations

import re
import socket
import ssl as _ssl
import time
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Callable, Iterable, Mapping, Union

try:
    import simplejson as _json
except ImportError:  # pragma: no cover - simplejson is installed with the server
    import json as _json  # type: ignore[no-redef]

__all__ = ["Listener", "Part", "Realplexor", "RealplexorError", "WatchEvent"]

#: A cursor as the server sends it (a decimal string), or a small integer.
Cursor = Union[str, int, Decimal]
#: One id, a list of ids, or a map of id to cursor (None: the server picks).
Ids = Union[str, Iterable[str], Mapping[str, Union[Cursor, None]]]
#: Opens a TCP connection: ``connect((host, port), timeout)``.
Connect = Callable[[tuple[str, int], float], socket.socket]

_ID_RE = re.compile(r"[A-Za-z0-9_]+\Z")
_PREFIX_RE = re.compile(r"[A-Za-z0-9_]*\Z")
_LOGIN_RE = re.compile(r"[A-Za-z0-9]+\Z")
_PASSWORD_BAD_RE = re.compile(r"[\s&;\"'<>]")
_CURSOR_RE = re.compile(r"\d+(?:\.\d+)?\Z")
_STATUS_RE = re.compile(r"HTTP/\d+\.\d+ +(\d{3})(?: +(.*))?\Z")
_WATCH_LINE_RE = re.compile(r"(\w+)\s+(\d+):(\S+)\Z")
_ONLINE_LINE_RE = re.compile(r"(\S+)\s+(\d+)\Z")
_RECV_SIZE = 65536
#: How far (in seconds) the server's clock may be behind this host's: a "from now"
#: channel takes an answer's cursor as its own only if it is not older than the poll.
_CLOCK_SKEW = 60
#: Longer poll targets go as POST bodies, as the JavaScript client sends them.
_MAX_GET_TARGET = 1500


class RealplexorError(Exception):
    """The server refused a request, or could not be reached.

    ``reason`` is the server's one-line reason (or what went wrong on the
    way); ``status`` the HTTP status of the answer, None when there was none.
    """

    def __init__(self, reason: str, status: int | None = None):
        super().__init__(reason)
        self.reason = reason
        self.status = status

    def __repr__(self) -> str:
        return f"RealplexorError({self.reason!r}, {self.status!r})"


@dataclass(frozen=True)
class WatchEvent:
    """One WATCH answer line: a channel went ``online`` or ``offline`` at ``pos``.

    ``event == "FAKE"`` (id ``"FAKE"``) only names the current position,
    for a watcher that asked without one.
    """

    event: str
    pos: int
    id: str


class _Endpoint:
    """Where a client connects, and the namespace of the ids it sends (both clients')."""

    def __init__(self, host: str, port: int, namespace: str, identifier: str, timeout: float,
                 connect: Connect | None, ssl_context: _ssl.SSLContext | None):
        self.host = host
        self.port = int(port)
        self.namespace = namespace or ""
        self.identifier = identifier
        self.timeout = timeout
        self._connect = connect
        self._ssl_context = ssl_context
        if self.namespace and not _PREFIX_RE.match(self.namespace):
            raise ValueError(f"invalid namespace {self.namespace!r}: use letters, digits and _ only")

    def _channel_id(self, channel: str) -> str:
        full = self.namespace + str(channel)
        if not isinstance(channel, (str, int)) or not _ID_RE.match(full):
            raise ValueError(f"invalid channel id {full!r}: use letters, digits and _ only")
        return full

    def _strip(self, channel: str) -> str:
        if self.namespace and channel.startswith(self.namespace):
            return channel[len(self.namespace):]
        return channel

    def _open(self) -> socket.socket:
        """A connected socket with ``timeout`` set; TLS on port 443 or with ``ssl_context``."""
        sock = (self._connect or socket.create_connection)((self.host, self.port), self.timeout)
        sock.settimeout(self.timeout)
        if self._ssl_context is not None or self.port == 443:
            context = self._ssl_context or _ssl.create_default_context()
            try:
                sock = context.wrap_socket(sock, server_hostname=self.host)
            except BaseException:
                sock.close()
                raise
        return sock


class Realplexor(_Endpoint):
    """Publishes to and queries one Realplexor server over its IN line.

    ``namespace`` is prepended to every id sent (targets, limiters,
    prefixes) and stripped from the ids returned. ``identifier`` is the
    server's IDENTIFIER word. ``timeout`` bounds connecting and each read
    or write, in seconds. TLS is used when ``port`` is 443 or an
    ``ssl_context`` is given.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 10010, namespace: str = "",
                 identifier: str = "identifier", timeout: float = 30.0, *,
                 connect: Connect | None = None, ssl_context: _ssl.SSLContext | None = None):
        super().__init__(host, port, namespace, identifier, timeout, connect, ssl_context)
        self._credentials = ""

    def logon(self, login: str, password: str) -> None:
        """Send the following requests as ``login`` of the server's USERS_FILE.

        A logged-in client may only touch ids prefixed ``LOGIN_``.
        """
        if not _LOGIN_RE.match(login):
            raise ValueError(f"invalid login {login!r}: it must be alphanumeric")
        if _PASSWORD_BAD_RE.search(password):
            raise ValueError(f"invalid password for login {login}: "
                             "it cannot contain spaces or any of &;\"'<>")
        self._credentials = f"{login}:{password}@"

    def send(self, ids_or_ids_to_cursors: Ids, data: Any,
             show_only_for_ids: str | Iterable[str] | None = None) -> None:
        """Publish ``data`` (anything JSON can encode) to channels.

        ``ids_or_ids_to_cursors`` is an id, a list of ids, or a map of id
        to cursor (None lets the server pick one). With
        ``show_only_for_ids``, only listeners that also listen to one of
        those ids receive the message.
        """
        payload = _json.dumps(data, separators=(",", ":"), allow_nan=False).encode("utf-8")
        items = []
        if isinstance(ids_or_ids_to_cursors, Mapping):
            for channel, cursor in ids_or_ids_to_cursors.items():
                full = self._channel_id(channel)
                items.append(full if cursor is None else f"{_cursor_text(cursor)}:{full}")
        else:
            items.extend(self._channel_id(channel) for channel in _as_list(ids_or_ids_to_cursors))
        items.extend("*" + self._channel_id(channel) for channel in _as_list(show_only_for_ids))
        if not items:
            raise ValueError("no channel ids to send to")
        self._request(",".join(items), payload)

    def online(self, prefixes: str | Iterable[str] | None = None) -> list[str]:
        """Ids of the channels online now, optionally only those under ``prefixes``."""
        return list(self.online_with_counters(prefixes))

    def online_with_counters(self, prefixes: str | Iterable[str] | None = None) -> dict[str, int]:
        """Online channels and their numbers of open listeners.

        A count is 0 while a channel only waits out its offline timeout.
        """
        counters = {}
        for line in self._command_lines(" ".join(["ONLINE", *self._prefixes(prefixes)])):
            match = _ONLINE_LINE_RE.match(line)
            if match is None:
                raise RealplexorError(f"cannot parse the ONLINE answer line {line!r}")
            counters[self._strip(match.group(1))] = int(match.group(2))
        return counters

    def watch(self, from_pos: int | str | None,
              prefixes: str | Iterable[str] | None = None) -> list[WatchEvent]:
        """Channels that went online or offline after ``from_pos``, oldest first.

        Each id appears once, with its latest transition. Without a
        position (None, 0, "" or anything but digits, as the old server
        took them) the answer is one ``FAKE`` event naming the current
        position: watch from there. A fresh server's position is 10, so
        ``watch(1)`` lists every event the server still keeps.
        """
        words = ["WATCH"]
        if from_pos is not None and str(from_pos).isdigit():
            words += [str(from_pos), *self._prefixes(prefixes)]
        events = []
        for line in self._command_lines(" ".join(words)):
            match = _WATCH_LINE_RE.match(line)
            if match is None:
                raise RealplexorError(f"cannot parse the WATCH answer line {line!r}")
            event, pos, channel = match.groups()
            events.append(WatchEvent(event, int(pos), channel if event == "FAKE" else self._strip(channel)))
        return events

    def stats(self) -> str:
        """The server's human-readable state dump (not for logged-in clients)."""
        return self._request("", b"STATS\n")

    def _prefixes(self, prefixes: str | Iterable[str] | None) -> list[str]:
        given = _as_list(prefixes)
        if self.namespace and not given:
            given = [""]
        result = []
        for prefix in given:
            full = self.namespace + prefix
            if not _PREFIX_RE.match(full):
                raise ValueError(f"invalid id prefix {full!r}: use letters, digits and _ only")
            if full:
                result.append(full)
        return result

    def _command_lines(self, command: str) -> list[str]:
        body = self._request("", (command + "\n").encode("ascii"))
        return [line.strip() for line in body.splitlines() if line.strip()]

    def _request(self, items: str, body: bytes) -> str:
        """Send one request; the body of the 200 answer, else RealplexorError."""
        head = (f"POST / HTTP/1.1\r\nHost: {self.host}\r\nContent-Length: {len(body)}\r\n"
                f"X-Realplexor: {self.identifier}={self._credentials}{items}\r\n\r\n")
        where = f"{self.host}:{self.port}"
        try:
            sock = self._open()
        except OSError as exc:
            raise RealplexorError(f"cannot connect to Realplexor at {where}: {exc}") from exc
        try:
            with sock:
                sock.sendall(head.encode("latin-1") + body)
                if not isinstance(sock, _ssl.SSLSocket):
                    # Old servers act on end of input; this one also on
                    # Content-Length. Half-closing would drop TLS state.
                    try:
                        sock.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass  # the server may have answered and closed already
                reply = _read_to_eof(sock)
        except OSError as exc:
            raise RealplexorError(f"request to Realplexor at {where} failed: {exc}") from exc
        return _reply_body(reply, where)


@dataclass(frozen=True)
class Part:
    """One part of a WAIT-line answer.

    ``ids`` maps each listened channel the part reached (namespace
    stripped) to its cursor there. A message carries its ``data``. A
    history cut (``reset`` True, no data) says the server dropped the
    messages of its one channel up to that cursor before this listener
    got them; what follows comes after it.
    """

    ids: Mapping[str, str]
    data: Any = None
    reset: bool = False


class Listener(_Endpoint):
    """Listens to channels on a Realplexor server's WAIT line, one long poll at a time.

    ``ids`` is an id, a list of ids, or a map of id to cursor (None: from
    the first poll on). Each :meth:`poll` asks from the newest cursor seen
    on each channel, so polls in a row neither miss nor repeat a message;
    it asks to be told of history cuts (``reset=1``). ``timeout`` bounds
    connecting and the wait for an answer, in seconds. ``namespace``,
    ``identifier``, ``connect`` and ``ssl_context`` are as for
    :class:`Realplexor`. A listener is for one thread or greenlet at a time.
    """

    def __init__(self, ids: Ids, host: str = "127.0.0.1", port: int = 8088, namespace: str = "",
                 identifier: str = "identifier", timeout: float = 30.0, *,
                 connect: Connect | None = None, ssl_context: _ssl.SSLContext | None = None):
        super().__init__(host, port, namespace, identifier, timeout, connect, ssl_context)
        # Full channel id -> the cursor text to ask from (None: from now).
        self._cursors: dict[str, str | None] = {}
        if isinstance(ids, Mapping):
            for channel, cursor in ids.items():
                self._cursors[self._channel_id(channel)] = None if cursor is None else _cursor_text(cursor)
        else:
            for channel in _as_list(ids):
                self._cursors[self._channel_id(channel)] = None
        if not self._cursors:
            raise ValueError("no channel ids to listen to")

    @property
    def cursors(self) -> dict[str, str | None]:
        """Each channel's cursor (namespace stripped), where the next poll resumes; None: from now.

        Save it to resume later: ``Listener(listener.cursors, ...)``.
        """
        return {self._strip(channel): cursor for channel, cursor in self._cursors.items()}

    def poll(self) -> list[Part]:
        """Wait for one answer: its parts, oldest first; [] when none came within ``timeout``.

        History cuts come first and alone; the next poll brings what the
        server still holds after them. Raises RealplexorError when the
        server cannot be reached, refuses the poll (with its reason and
        status) or answers something that is not a list of parts.
        """
        where = f"{self.host}:{self.port}"
        started = time.time()
        reply = self._answer(where)
        if reply is None:
            return []
        text = _reply_body(reply, where).strip()
        if not text:
            return []      # the server's WAIT_TIMEOUT passed first
        parts = _parse_parts(text, where)
        self._advance(parts, started)
        return [Part({self._strip(channel): cursor for channel, cursor in part["ids"].items()},
                     part.get("data"), part.get("reset") is True) for part in parts]

    def _poll_request(self, where: str) -> bytes:
        """The poll's request: a GET, or a POST when the ids make a long URL (as the widget does)."""
        items = ",".join(channel if cursor is None else f"{cursor}:{channel}"
                         for channel, cursor in self._cursors.items())
        target = f"/?{self.identifier}={items}&reset=1"
        if len(target) <= _MAX_GET_TARGET:
            return f"GET {target} HTTP/1.0\r\nHost: {where}\r\n\r\n".encode("latin-1")
        body = f"{self.identifier}={items}\n".encode("latin-1")
        return (f"POST /?reset=1 HTTP/1.0\r\nHost: {where}\r\n"
                f"Content-Type: application/x-www-form-urlencoded\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode("latin-1") + body

    def _answer(self, where: str) -> bytes | None:
        """The whole reply to one poll; None when a started answer did not end in time."""
        # HTTP/1.0: the server answers without chunks and closes when done.
        request = self._poll_request(where)
        try:
            sock = self._open()
        except OSError as exc:
            raise RealplexorError(f"cannot connect to Realplexor at {where}: {exc}") from exc
        deadline = time.monotonic() + self.timeout
        try:
            with sock:
                sock.sendall(request)
                reply, ended = _read_until(sock, deadline)
        except OSError as exc:
            raise RealplexorError(f"poll of Realplexor at {where} failed: {exc}") from exc
        if ended:
            return reply
        status = _STATUS_RE.match(reply.partition(b"\r\n")[0].decode("latin-1"))
        if status is None or status.group(1) != "200":
            raise RealplexorError(f"no answer from Realplexor at {where} within {self.timeout:g} s")
        # The server answers a poll's status line at once, then waits: nothing new came.
        return None

    def _advance(self, parts: list[dict], started: float) -> None:
        """Move each channel's cursor to the newest a part names for it."""
        newest = None
        for part in parts:
            for channel, cursor in part["ids"].items():
                # A cut's cursor is of a message dropped long ago, perhaps.
                if part.get("reset") is not True and (newest is None or Decimal(cursor) > Decimal(newest)):
                    newest = cursor
                if channel not in self._cursors:
                    continue
                known = self._cursors[channel]
                if known is None or Decimal(cursor) > Decimal(known):
                    self._cursors[channel] = cursor
        # A channel listening from now would miss what comes between this
        # answer and the next poll: it listens from the answer's newest cursor
        # when that is the server's clock at about the time of the poll (not
        # history replayed on another channel, nor a publisher's own small
        # cursors, which say nothing about other channels).
        if newest is not None and Decimal(newest) > Decimal(started - _CLOCK_SKEW):
            for channel, cursor in self._cursors.items():
                if cursor is None:
                    self._cursors[channel] = newest


def _as_list(value: str | Iterable[str] | None) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (str, int)):
        return [str(value)]
    return [str(v) for v in value]


def _cursor_text(cursor: Cursor) -> str:
    if isinstance(cursor, float):
        raise TypeError("a float cannot hold a cursor exactly: pass the server's cursor string")
    text = str(cursor)
    if not _CURSOR_RE.match(text):
        raise ValueError(f"invalid cursor {text!r}: expected DIGITS[.DIGITS]")
    return text


def _read_to_eof(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        chunk = sock.recv(_RECV_SIZE)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _read_until(sock: socket.socket, deadline: float) -> tuple[bytes, bool]:
    """What the peer sends until it closes or ``deadline`` (monotonic) passes; and whether it closed."""
    chunks = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return b"".join(chunks), False
        sock.settimeout(left)
        try:
            chunk = sock.recv(_RECV_SIZE)
        except socket.timeout:
            return b"".join(chunks), False
        if not chunk:
            return b"".join(chunks), True
        chunks.append(chunk)


def _parse_parts(text: str, where: str) -> list[dict]:
    """The parts of a WAIT answer's JSON; RealplexorError for anything else."""
    try:
        parts = _json.loads(text)
    except ValueError as exc:
        raise RealplexorError(f"bad answer from Realplexor at {where}: not JSON ({exc})", 200) from None
    if not isinstance(parts, list) or not all(_is_part(part) for part in parts):
        raise RealplexorError(f"bad answer from Realplexor at {where}: not a list of parts "
                              f"{{\"ids\": {{ID: CURSOR}}, ...}}: {text[:200]!r}", 200)
    return parts


def _is_part(part: Any) -> bool:
    ids = part.get("ids") if isinstance(part, dict) else None
    return (isinstance(ids, dict) and bool(ids)
            and all(isinstance(cursor, str) and _CURSOR_RE.match(cursor) for cursor in ids.values()))


def _reply_body(reply: bytes, where: str) -> str:
    """Check a raw IN-line reply; its body for a 200, else RealplexorError."""
    if not reply:
        raise RealplexorError(f"no HTTP response from Realplexor at {where} (empty reply)")
    head, sep, body = reply.partition(b"\r\n\r\n")
    if not sep:
        head, sep, body = reply.partition(b"\n\n")
    lines = head.decode("latin-1").splitlines()
    status_line = lines[0].strip() if lines else ""
    match = _STATUS_RE.match(status_line)
    if match is None:
        raise RealplexorError(f"no HTTP response from Realplexor at {where}; got {reply[:200]!r}")
    status = int(match.group(1))
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length" and value.strip() != str(len(body)):
            raise RealplexorError(f"bad answer from Realplexor at {where}: Content-Length is "
                                  f"{value.strip()}, but the body has {len(body)} bytes", status)
    text = body.decode("utf-8", "replace")
    if status != 200:
        raise RealplexorError(text.strip() or status_line, status)
    return text
