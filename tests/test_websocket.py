"""WebSocket on the WAIT line over real sockets, on both engines (frames made with wsproto)."""
from __future__ import annotations

import base64
import json
import os
import socket

import pytest
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, Pong, TextMessage

from conftest import TIMEOUT, parse_response, received_in_loop, stream_in_process

ENGINES = ["wsgi", "lean"]


@pytest.fixture(params=ENGINES)
def server(request, server_factory):
    return server_factory(WAIT_ENGINE=request.param, STREAM_TRANSPORTS=["websocket"], OFFLINE_TIMEOUT=0.5,
                          STREAM_PING_INTERVAL=0.3, MAX_DATA_FOR_ID=3, WAIT_MAX_IDS=5)


class Client:
    """A WebSocket client on a raw socket: the handshake by hand, frames by wsproto."""

    def __init__(self, port: int, query: str = "", headers: str = "", rcvbuf: int | None = None):
        self.sock = socket.socket()
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect(("127.0.0.1", port))
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET /?{query} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                           f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{headers}\r\n").encode())
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = self.sock.recv(65536)
            assert chunk, buf
            buf += chunk
        head, _, rest = buf.partition(b"\r\n\r\n")
        self.response = parse_response(head + b"\r\n\r\n")
        self.ws = Connection(ConnectionType.CLIENT)
        self.ws.receive_data(rest)
        self.pending = list(self.ws.events())

    def send(self, command) -> None:
        self.sock.sendall(self.ws.send(TextMessage(data=json.dumps(command))))

    def event(self, skip_pings: bool = True):
        """The next event from the server (pings answered and skipped)."""
        while True:
            while not self.pending:
                chunk = self.sock.recv(65536)
                self.ws.receive_data(chunk or None)
                self.pending = list(self.ws.events())
            event = self.pending.pop(0)
            if isinstance(event, Ping) and skip_pings:
                self.sock.sendall(self.ws.send(event.response()))
                continue
            return event

    def part(self) -> dict:
        event = self.event()
        assert isinstance(event, TextMessage), event
        return json.loads(event.data)

    def close(self) -> None:
        self.sock.close()


def test_the_handshake_and_messages_as_the_long_polls_parts(server, cid):
    client = Client(server.wait_port, f"identifier={cid}a")
    try:
        assert client.response.status == 101 and "sec-websocket-accept" in client.response.headers
        server.wait_until(lambda: server.online(cid) == {f"{cid}a": 1})
        server.publish(f"{cid}a,{cid}b", '{"n": 1}')
        part = client.part()
        assert part["data"] == {"n": 1} and list(part["ids"]) == [f"{cid}a"]
    finally:
        client.close()


def test_subscribe_and_unsubscribe_on_the_open_socket_with_a_cursor(server, cid):
    server.publish(f"{cid}b", '"queued"')
    client = Client(server.wait_port)
    try:
        client.send({"subscribe": {f"{cid}a": None, f"{cid}b": "0"}})
        assert client.part()["data"] == "queued"               # replayed after cursor 0
        server.wait_until(lambda: server.online(cid) == {f"{cid}a": 1, f"{cid}b": 1})
        client.send({"unsubscribe": [f"{cid}b"]})
        server.wait_until(lambda: server.online(cid).get(f"{cid}b") == 0)
        server.publish(f"{cid}b", '"not for me"')
        server.publish(f"{cid}a", '"for me"')
        assert client.part()["data"] == "for me"
    finally:
        client.close()


def test_limiters_hold_on_a_websocket(server, cid):
    client = Client(server.wait_port, f"identifier={cid}a")
    try:
        server.wait_until(lambda: server.online(cid) == {f"{cid}a": 1})
        server.publish(f"{cid}a,*{cid}friends", '"secret"')
        server.publish(f"{cid}a", '"public"')
        assert client.part()["data"] == "public"
    finally:
        client.close()


def test_the_server_pings_an_idle_socket(server, cid):
    client = Client(server.wait_port, f"identifier={cid}a")
    try:
        assert isinstance(client.event(skip_pings=False), Ping)
    finally:
        client.close()


@pytest.mark.parametrize("send, code, reason", [
    (lambda ws: ws.send(TextMessage(data="not json")), 1007, "not a command"),
    (lambda ws: ws.send(TextMessage(data='{"dance": []}')), 1007, "not a command"),
    (lambda ws: ws.send(TextMessage(data='{"subscribe": ["bad id!"]}')), 1007, "not a command"),
    (lambda ws: ws.send(BytesMessage(data=b"\x00\x01")), 1003, "binary"),
    (lambda ws: ws.send(TextMessage(data='{"subscribe": ["a1","a2","a3","a4","a5","a6"]}')), 1008,
     "WAIT_MAX_IDS"),
    (lambda ws: ws.send(TextMessage(data='{"subscribe": ["' + "x" * 6000 + '"]}')), 1009, "WAIT_MAXLEN"),
], ids=["garbage", "unknown-command", "bad-id", "binary", "too-many", "oversize"])
def test_bad_input_is_closed_with_a_code_and_a_reason_and_nobody_else_notices(server, cid, send, code, reason):
    other = Client(server.wait_port, f"identifier={cid}other")
    bad = Client(server.wait_port)
    try:
        bad.sock.sendall(send(bad.ws))
        closing = bad.event()
        assert isinstance(closing, CloseConnection) and closing.code == code and reason in closing.reason
        server.wait_until(lambda: server.online(cid).get(f"{cid}other") == 1)
        server.publish(f"{cid}other", '"still here"')
        assert other.part()["data"] == "still here"
    finally:
        bad.close()
        other.close()


@pytest.mark.parametrize("headers, status", [
    ("", 101), ("Sec-WebSocket-Version: 8\r\n", 400)], ids=["fine", "old-version"])
def test_a_bad_handshake_is_refused_with_a_reason(server, cid, headers, status):
    with socket.create_connection(("127.0.0.1", server.wait_port), timeout=TIMEOUT) as sock:
        version = "" if headers else "Sec-WebSocket-Version: 13\r\n"
        sock.sendall((f"GET /?identifier={cid}a HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                      f"Sec-WebSocket-Key: {base64.b64encode(b'0123456789abcdef').decode()}\r\n"
                      f"{version}{headers}\r\n").encode())
        sock.settimeout(TIMEOUT)
        head = sock.recv(65536)
    assert parse_response(head).status == status


def test_websockets_can_be_refused(server_factory, cid):
    server = server_factory(STREAM_TRANSPORTS=[])
    with socket.create_connection(("127.0.0.1", server.wait_port), timeout=TIMEOUT) as sock:
        sock.sendall((f"GET /?identifier={cid}a HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                      f"Sec-WebSocket-Key: {base64.b64encode(b'0123456789abcdef').decode()}\r\n"
                      "Sec-WebSocket-Version: 13\r\n\r\n").encode())
        sock.settimeout(TIMEOUT)
        assert parse_response(sock.recv(65536)).status == 406


@pytest.mark.parametrize("engine", ENGINES)
def test_a_slow_reader_is_closed_past_its_backlog_and_resumes_by_cursor(server_factory, cid, engine):
    server = server_factory(WAIT_ENGINE=engine, STREAM_TRANSPORTS=["websocket"], STREAM_MAX_BACKLOG=65536)
    slow = Client(server.wait_port, f"identifier={cid}a", rcvbuf=4096)
    try:
        server.wait_until(lambda: server.online().get(f"{cid}a", 0) >= 1)
        chunk = "x" * 50000
        for n in range(200):
            server.publish(f"{cid}a", f'"{n:03d}{chunk}"')
            if server.online(cid).get(f"{cid}a", 0) == 0:
                break     # the socket was closed and left its channel
        else:
            pytest.fail("a WebSocket that read nothing was never closed")
        parts, text = [], ""
        while True:
            event = slow.event()
            if not isinstance(event, TextMessage):
                break     # the end of what the server had sent (a message cut short is not kept)
            text += event.data
            if event.message_finished:
                parts.append(json.loads(text))
                text = ""
    finally:
        slow.close()
    numbers = [int(part["data"][:3]) for part in parts]
    assert numbers == list(range(len(numbers)))     # what came is a prefix, in order
    last = parts[-1]["ids"][f"{cid}a"]
    again = Client(server.wait_port)
    try:
        again.send({"subscribe": {f"{cid}a": last}})
        reset_or_next = again.part()
    finally:
        again.close()
    # MAX_DATA_FOR_ID (30) kept the newest: either the very next one, or a cut before it.
    assert reset_or_next.get("reset") or reset_or_next["data"][:3] == f"{len(numbers):03d}"


def test_a_publish_racing_an_unsubscribe_is_not_sent_and_the_channel_stays_left():
    """An unsubscribe read, then a publish to that channel before the socket's
    greenlet runs again: the message is not sent, and later ones neither."""
    import gevent

    from realplexor.channels import MemoryChannels
    from realplexor.config import validate
    from realplexor.server import channel_settings
    from realplexor.websocket import SocketStream

    config = validate({})
    state = MemoryChannels(channel_settings(config))
    client = Connection(ConnectionType.CLIENT)
    with stream_in_process(state, config, ["a", "b"], SocketStream) as (stream, theirs):
        stream._command('{"unsubscribe": ["b"]}')      # as its reader does with such a message
        state.publish([("b", None, None)], b'"raced"')
        gevent.sleep(0.05)
        state.publish([("b", None, None)], b'"later"')
        state.publish([("a", None, None)], b'"on a"')
        client.receive_data(received_in_loop(theirs, lambda got: b"on a" in got))
    received = [json.loads(event.data)["data"] for event in client.events() if isinstance(event, TextMessage)]
    assert received == ["on a"]
