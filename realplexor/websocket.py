"""WebSocket on the WAIT line: an event stream whose client subscribes as it goes.

The handshake answer is made here (its accept token by ``wsproto``);
framing, pings and closing are ``wsproto``'s (a sans-I/O library). The
stream itself is an :class:`~realplexor.streams.EventStream`: the same
rounds of listening, the same parts, backlog and history cuts; each part
goes out as one text message, the same object a long poll carries.

The client sends text messages of JSON:

- ``{"subscribe": {"Alpha": "1732486800.5", "Beta": null}}`` (a cursor,
  or null for "from now"), or ``{"subscribe": ["Alpha", "Beta"]}``;
- ``{"unsubscribe": ["Alpha"]}``.

Anything else ends the connection with a close code and a reason:
1003 for a binary message, 1007 for text that is not such a command,
1008 for more subscriptions than WAIT_MAX_IDS, 1009 for a message over
WAIT_MAXLEN bytes, 1002 for frames that break the protocol.
"""
from __future__ import annotations

import base64
import binascii
import re
from decimal import Decimal

import simplejson
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, TextMessage
from wsproto.frame_protocol import CloseReason
from wsproto.utilities import LocalProtocolError, RemoteProtocolError, generate_accept_token

from .channels import ChannelState
from .config import Config
from .cursors import parse_cursor
from .protocol import ProtocolError
from .streams import EventStream


def open_stream(subscription, sock, state: ChannelState, config: Config) -> EventStream:
    """The stream a Subscription asks for, on ``sock``: an event stream or a WebSocket."""
    cursors, texts = subscription.cursors()
    kind = SocketStream if subscription.websocket_key is not None else EventStream
    return kind(sock, state, config, cursors, texts)

_ID_RE = re.compile(r"[A-Za-z0-9_]+\Z")
_READ_SIZE = 16384


def check_key(key: str | None) -> str:
    """The client's ``Sec-WebSocket-Key``, or ProtocolError 400 naming what is wrong."""
    try:
        if key is not None and len(base64.b64decode(key, validate=True)) == 16:
            return key
    except (binascii.Error, ValueError):
        pass
    raise ProtocolError(400, "a WebSocket handshake needs a Sec-WebSocket-Key of 16 bytes in base64")


def handshake_head(key: str, cors: tuple[tuple[str, str], ...]) -> bytes:
    """The ``101 Switching Protocols`` answer to a handshake with ``key``."""
    lines = ["HTTP/1.1 101 Switching Protocols", "Upgrade: websocket", "Connection: Upgrade",
             f"Sec-WebSocket-Accept: {generate_accept_token(key.encode()).decode()}",
             *(f"{name}: {value}" for name, value in cors)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class SocketStream(EventStream):
    """A WebSocket connection served as an event stream its client subscribes on."""

    transport = "websocket"

    def __init__(self, sock, state: ChannelState, config: Config,
                 cursors: dict[str, Decimal | None], texts: dict[str, str | None]):
        super().__init__(sock, state, config, cursors, texts)
        self._ws = Connection(ConnectionType.SERVER)
        self._message = ""

    # -- out -----------------------------------------------------------------------

    # The last part framed: every socket woken by one publish sends the same
    # frame (a server's frames are not masked, and no extension is agreed).
    _framed_line: bytes | None = None
    _framed: bytes = b""

    def _frame(self, line: bytes, event_id: bytes | None = None) -> bytes:
        if line is not SocketStream._framed_line:
            SocketStream._framed = self._ws.send(TextMessage(data=line.decode("utf-8")))
            SocketStream._framed_line = line
        return SocketStream._framed

    def _keep_alive(self) -> bytes:
        return self._ws.send(Ping())

    def _end(self, code: int, reason: str) -> None:
        """Say why, then close (what is still in the backlog goes first)."""
        try:
            self._write(self._ws.send(CloseConnection(code=code, reason=reason)))
        except LocalProtocolError:
            pass
        self.close(reason)

    # -- in ------------------------------------------------------------------------

    def _received_bytes(self, data: bytes) -> None:
        try:
            self._ws.receive_data(data)
            events = list(self._ws.events())
        except RemoteProtocolError as exc:
            self._end(CloseReason.PROTOCOL_ERROR, f"broken frame: {exc}")
            return
        for event in events:
            if self.closed is not None:
                return
            if isinstance(event, TextMessage):
                self._message += event.data
                if len(self._message.encode("utf-8")) > self._config.WAIT_MAXLEN:
                    self._end(CloseReason.MESSAGE_TOO_BIG,
                              f"a message over WAIT_MAXLEN ({self._config.WAIT_MAXLEN} bytes)")
                elif event.message_finished:
                    text, self._message = self._message, ""
                    self._command(text)
            elif isinstance(event, BytesMessage):
                self._end(CloseReason.UNSUPPORTED_DATA, "binary messages are not taken: send JSON text")
            elif isinstance(event, Ping):
                self._write(self._ws.send(event.response()))
            elif isinstance(event, CloseConnection):
                try:
                    self._write(self._ws.send(event.response()))
                except LocalProtocolError:
                    pass
                self.close("client closed")

    def _command(self, text: str) -> None:
        try:
            command = simplejson.loads(text)
            if not isinstance(command, dict) or len(command) != 1:
                raise ValueError
            (verb, argument), = command.items()
            if verb == "subscribe":
                self._subscribe(_subscriptions(argument))
            elif verb == "unsubscribe":
                self._unsubscribe(_ids(argument))
            else:
                raise ValueError
        except (ValueError, TypeError):
            self._end(CloseReason.INVALID_FRAME_PAYLOAD_DATA,
                      'not a command: send {"subscribe": {"ID": "CURSOR" or null}} or {"unsubscribe": ["ID"]}')

    def _subscribe(self, wanted: dict[str, tuple[Decimal | None, str | None]]) -> None:
        added = {channel_id: cursor for channel_id, cursor in wanted.items() if channel_id not in self._cursors}
        if len(self._cursors) + len(added) > self._config.WAIT_MAX_IDS:
            self._end(CloseReason.POLICY_VIOLATION,
                      f"more than WAIT_MAX_IDS ({self._config.WAIT_MAX_IDS}) subscriptions")
            return
        for channel_id, (cursor, text) in added.items():
            self._cursors[channel_id], self._texts[channel_id] = cursor, text
        if added:
            self.resubscribe({channel_id: cursor for channel_id, (cursor, _) in added.items()})

    def _unsubscribe(self, ids: list[str]) -> None:
        gone = [channel_id for channel_id in ids if channel_id in self._cursors]
        for channel_id in gone:
            del self._cursors[channel_id]
            del self._texts[channel_id]
        if gone:
            self.resubscribe({})


def _subscriptions(argument) -> dict[str, tuple[Decimal | None, str | None]]:
    """``{"ID": "CURSOR" or null}`` or ``["ID", ...]`` as ids with their cursors; ValueError otherwise."""
    if isinstance(argument, list):
        return {channel_id: (None, None) for channel_id in _ids(argument)}
    if not isinstance(argument, dict):
        raise ValueError
    wanted = {}
    for channel_id, text in argument.items():
        _ids([channel_id])
        if text is None:
            wanted[channel_id] = (None, None)
            continue
        cursor = parse_cursor(text) if isinstance(text, str) else None
        if cursor is None:
            raise ValueError
        wanted[channel_id] = (cursor, text)
    return wanted


def _ids(argument) -> list[str]:
    if not isinstance(argument, list) or not all(isinstance(i, str) and _ID_RE.match(i) for i in argument):
        raise ValueError
    return argument
