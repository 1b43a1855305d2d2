"""Event streams on the WAIT line over real sockets, on both engines."""
from __future__ import annotations

import json
import socket
from decimal import Decimal

import gevent
import pytest

from realplexor.channels import MemoryChannels
from realplexor.config import validate
from realplexor.server import channel_settings
from realplexor.streams import EventStream, parse_parts

from conftest import TIMEOUT, event_parts, parse_response, read_to_eof, received_in_loop, start_server, \
    stream_in_process, wait_in_loop, write_config

ENGINES = ["wsgi", "lean"]


@pytest.fixture(scope="module", params=ENGINES)
def engine(request):
    return request.param


@pytest.fixture(scope="module")
def server(engine, tmp_path_factory):
    path = write_config(tmp_path_factory.mktemp("rpl") / "realplexor.toml",
                        OFFLINE_TIMEOUT=0.5, WAIT_TIMEOUT=30, WAIT_ENGINE=engine, MAX_DATA_FOR_ID=3,
                        STREAM_PING_INTERVAL=0.3, STREAM_TRANSPORTS=["eventsource"])
    running = start_server(path)
    yield running
    running.stop()


@pytest.fixture
def server_factory(server_factory, engine):
    return lambda **options: server_factory(**{"WAIT_ENGINE": engine, "STREAM_TRANSPORTS": ["eventsource"],
                                               **options})


class Stream:
    """An EventSource-like client on a raw socket; every read has a timeout."""

    def __init__(self, port: int, identifier: str, headers: str = "", rcvbuf: int | None = None):
        self.sock = socket.socket()
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect(("127.0.0.1", port))
        self.sock.sendall((f"GET /?identifier={identifier}&ncrnd=1 HTTP/1.1\r\nHost: x\r\n"
                           f"Accept: text/event-stream\r\nConnection: keep-alive\r\n{headers}\r\n").encode())
        self.buf = b""
        self.head = b""

    def _more(self, timeout: float) -> bool:
        self.sock.settimeout(timeout)
        chunk = self.sock.recv(65536)
        self.buf += chunk
        return bool(chunk)

    def headers(self, timeout: float = TIMEOUT) -> dict[str, str]:
        """The status and headers (status under ':status')."""
        while b"\r\n\r\n" not in self.buf:
            assert self._more(timeout), self.buf
        self.head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        response = parse_response(self.head + b"\r\n\r\n")
        return {":status": response.status, **response.headers}

    def block(self, timeout: float = TIMEOUT) -> bytes:
        """The next event or comment block (up to its blank line)."""
        if not self.head:
            self.headers(timeout)
        while b"\n\n" not in self.buf:
            assert self._more(timeout), f"stream ended; had {self.buf!r}"
        block, _, self.buf = self.buf.partition(b"\n\n")
        return block

    def event(self, timeout: float = TIMEOUT) -> tuple[str, dict]:
        """The next event's id and part, skipping comments."""
        while True:
            block = self.block(timeout)
            if not block.startswith(b":"):
                fields = dict(line.split(b": ", 1) for line in block.split(b"\n"))
                return fields[b"id"].decode(), json.loads(fields[b"data"])

    def ended(self, timeout: float = TIMEOUT) -> bytes:
        """Everything left until the server closes."""
        return self.buf + read_to_eof(self.sock, timeout)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def streams(server):
    opened: list[Stream] = []

    def open_stream(identifier: str, on=None, **kwargs) -> Stream:
        stream = Stream((on or server).wait_port, identifier, **kwargs)
        opened.append(stream)
        return stream

    yield open_stream
    for stream in opened:
        stream.close()


def listening(server, *ids: str) -> None:
    server.wait_until(lambda: all(server.online().get(i, 0) >= 1 for i in ids))


def test_messages_arrive_as_events_with_the_long_polls_parts(server, streams, cid):
    stream = streams(f"{cid}a,{cid}b", headers="Origin: http://site.example\r\n")
    headers = stream.headers()
    assert headers[":status"] == 200
    assert headers["content-type"] == "text/event-stream; charset=utf-8"
    assert headers["access-control-allow-origin"] == "*"
    listening(server, f"{cid}a", f"{cid}b")
    server.publish(f"{cid}a,{cid}b,{cid}other", '{"n": 1.50, "big": 12345678901234567890}')
    server.publish(f"{cid}b", '"second"')
    first_id, first = stream.event()
    assert set(first["ids"]) == {f"{cid}a", f"{cid}b"}
    assert first["data"] == {"n": 1.5, "big": 12345678901234567890}
    cursor = first["ids"][f"{cid}a"]
    assert first_id == f"{cursor}:{cid}a,{cursor}:{cid}b"
    second_id, second = stream.event()
    assert second == {"ids": {f"{cid}b": second["ids"][f"{cid}b"]}, "data": "second"}
    assert second_id == f"{cursor}:{cid}a,{second['ids'][f'{cid}b']}:{cid}b"


def test_limited_messages_reach_only_streams_listening_to_a_limiter(server, streams, cid):
    plain, friend = streams(f"{cid}a"), streams(f"{cid}a,{cid}friend")
    listening(server, f"{cid}a", f"{cid}friend")
    server.wait_until(lambda: server.online()[f"{cid}a"] == 2)
    server.publish(f"{cid}a,*{cid}friend", '"secret"')
    server.publish(f"{cid}a", '"public"')
    assert [friend.event()[1]["data"] for _ in range(2)] == ["secret", "public"]
    assert plain.event()[1]["data"] == "public"


def test_last_event_id_resumes_with_no_gap_and_no_duplicate(server, streams, cid):
    first = streams(f"{cid}a,{cid}b")
    listening(server, f"{cid}a", f"{cid}b")
    server.publish(f"{cid}a", '"one"')
    last_id, _ = first.event()
    first.close()
    server.publish(f"{cid}b", '"two"')
    server.publish(f"{cid}a", '"three"')
    # The URL's cursors (none: from now) give way to the Last-Event-ID's.
    again = streams(f"{cid}a,{cid}b", headers=f"Last-Event-ID: {last_id}\r\n")
    assert [again.event()[1]["data"] for _ in range(2)] == ["two", "three"]
    server.publish(f"{cid}a", '"four"')
    assert again.event()[1]["data"] == "four"


def test_an_idle_stream_gets_keep_alive_comments(server, streams, cid):
    stream = streams(f"{cid}a")
    assert stream.block() == b": keep-alive"
    assert stream.block() == b": keep-alive"


def test_a_stream_counts_for_online_while_connected_then_goes_offline(server, streams, cid):
    stream = streams(f"{cid}a")
    listening(server, f"{cid}a")
    assert server.online(cid) == {f"{cid}a": 1}
    stream.close()
    server.wait_until(lambda: server.online(cid) == {f"{cid}a": 0})
    server.wait_until(lambda: server.online(cid) == {})


def test_a_stream_behind_the_queue_is_told_of_the_cut_first(server, streams, cid):
    cursors = [server.publish(f"{cid}a", f'"{n}"') for n in range(5)]
    assert cursors
    stream = streams(f"0:{cid}a")
    event_id, reset = stream.event()
    assert reset["reset"] is True and "data" not in reset
    assert event_id == f"{reset['ids'][f'{cid}a']}:{cid}a"
    # MAX_DATA_FOR_ID is 3: messages 0 and 1 are gone, 2..4 follow.
    assert [stream.event()[1]["data"] for _ in range(3)] == ["2", "3", "4"]


def test_a_long_poll_that_asks_is_told_of_the_cut_and_old_polls_are_not(server, cid):
    for n in range(5):
        server.publish(f"{cid}a", f'"{n}"')
    old = json.loads(server.poll(f"identifier=0:{cid}a").response().body)
    assert [part["data"] for part in old] == ["2", "3", "4"]
    told = json.loads(server.poll(f"identifier=0:{cid}a&reset=1").response().body)
    assert len(told) == 1 and told[0]["reset"] is True
    cursor = told[0]["ids"][f"{cid}a"]
    rest = json.loads(server.poll(f"identifier={cursor}:{cid}a&reset=1").response().body)
    assert [part["data"] for part in rest] == ["2", "3", "4"]


@pytest.mark.parametrize("last_event_id, reason", [
    ("garbage", "Last-Event-ID item 'garbage' is not CURSOR:ID"),
    ("1.5:a,x:y", "Last-Event-ID item 'x:y' is not CURSOR:ID"),
    ("1.5.5:a", "is not CURSOR:ID"),
])
def test_a_bad_last_event_id_is_refused_with_a_reason(server, streams, cid, last_event_id, reason):
    stream = streams(f"{cid}a", headers=f"Last-Event-ID: {last_event_id}\r\n")
    response = parse_response(stream.ended())
    assert response.status == 400 and reason in response.text
    good = streams(f"{cid}a")
    listening(server, f"{cid}a")
    server.publish(f"{cid}a", '"fine"')
    assert good.event()[1]["data"] == "fine"


def test_a_client_that_sends_bytes_on_its_stream_is_closed(server, streams, cid):
    stream = streams(f"{cid}a")
    stream.headers()
    stream.sock.sendall(b"x" * 5000)
    stream.ended()
    server.wait_until(lambda: server.online(cid).get(f"{cid}a", 0) == 0)


def test_event_streams_can_be_refused_and_long_polls_still_served(server_factory, cid):
    server = server_factory(STREAM_TRANSPORTS=[])
    stream = Stream(server.wait_port, f"{cid}a")
    try:
        response = parse_response(stream.ended())
    finally:
        stream.close()
    assert response.status == 406 and "long-poll" in response.text
    poll = server.listen(f"{cid}a")
    server.publish(f"{cid}a", '"x"')
    assert json.loads(poll.response().body)[0]["data"] == "x"


def test_a_slow_reader_is_closed_past_its_backlog_and_resumes_by_cursor(server_factory, cid):
    server = server_factory(STREAM_MAX_BACKLOG=65536)
    slow = Stream(server.wait_port, f"{cid}a", rcvbuf=4096)
    try:
        slow.headers()
        listening(server, f"{cid}a")
        chunk = "x" * 50000
        for n in range(200):
            server.publish(f"{cid}a", f'"{n:03d}{chunk}"')
            if server.online(cid).get(f"{cid}a", 0) == 0:
                break     # the stream was closed and left its channel
        else:
            pytest.fail("a stream that read nothing was never closed")
        got = slow.ended()
    finally:
        slow.close()
    events = [block for block in got.split(b"\n\n") if block.startswith(b"id: ")]
    numbers = [int(json.loads(block.split(b"\ndata: ", 1)[1])["data"][:3]) for block in events
               if b"\ndata: " in block and block.endswith(b"}")]
    assert numbers == list(range(len(numbers)))     # what came is a prefix, in order
    resume_id = events[len(numbers) - 1].split(b"\n")[0][4:].decode()
    again = Stream(server.wait_port, f"{cid}a", headers=f"Last-Event-ID: {resume_id}\r\n")
    try:
        _, reset_or_next = again.event()
    finally:
        again.close()
    # MAX_DATA_FOR_ID (30) kept the newest: either the very next one, or a cut before it.
    assert reset_or_next.get("reset") or reset_or_next["data"][:3] == f"{len(numbers):03d}"


class SharedLikeChannels(MemoryChannels):
    """The memory state flagged as one that may block, as a shared store's is:
    a stream takes its answers in its own greenlet."""

    blocking = True


def burst_into_one_stream(state: MemoryChannels, config) -> tuple[list[dict], list[str]]:
    """Five publishes with no yield between them to a stream of channel ``a``:
    the parts the stream sent, and the five cursors."""
    with stream_in_process(state, config, ["a"]) as (_, theirs):
        cursors = [state.publish([("a", None, None)], b"%d" % n)[0][1] for n in range(1, 6)]
        received = received_in_loop(theirs, lambda got: got.count(b"\n\n") >= 4, settle=0.05)
    return event_parts(received), cursors


def test_a_stream_takes_every_publish_of_a_burst_as_it_comes():
    config = validate({"MAX_DATA_FOR_ID": 2})
    parts, cursors = burst_into_one_stream(MemoryChannels(channel_settings(config)), config)
    assert parts == [{"ids": {"a": cursor}, "data": n} for n, cursor in enumerate(cursors, 1)]


def test_a_lone_message_is_on_the_wire_when_its_publish_returns_and_a_burst_by_the_turns_end():
    """On the memory store a quiet stream writes as the publish is made; more
    publishes in the same turn of the loop are there when it ends."""
    config = validate({})
    state = MemoryChannels(channel_settings(config))
    with stream_in_process(state, config, ["a"]) as (_, theirs):
        quiet_since = gevent.get_hub().loop.iteration
        # A few turns with nothing written: the stream is quiet.
        wait_in_loop(lambda: gevent.get_hub().loop.iteration >= quiet_since + 3)
        state.publish([("a", None, None)], b'"lone"')
        assert b'"data":"lone"' in theirs.recv(65536)     # no yield to the loop since the publish
        state.publish([("a", None, None)], b'"second"')
        state.publish([("a", None, None)], b'"third"')
        gevent.sleep(0)
        burst = theirs.recv(65536)
        assert b'"data":"second"' in burst and b'"data":"third"' in burst


def test_a_stream_outrun_by_publishes_is_told_of_what_left_the_queue_meanwhile():
    """On a state that may block the stream catches up in its greenlet: with room
    for two, it gets the first, then a cut up to the third, then the last two."""
    config = validate({"MAX_DATA_FOR_ID": 2})
    parts, cursors = burst_into_one_stream(SharedLikeChannels(channel_settings(config)), config)
    assert parts == [{"ids": {"a": cursors[0]}, "data": 1},
                     {"ids": {"a": cursors[2]}, "reset": True},
                     {"ids": {"a": cursors[3]}, "data": 4},
                     {"ids": {"a": cursors[4]}, "data": 5}]


def test_parts_keep_their_text_and_lose_only_line_breaks():
    one_line = b'[{"ids":{"a":"1.5","b":"2"},"data":{"x":1.10,"s":"],["}}, {"ids":{"a":"3"},"data":[]}]'
    assert parse_parts(one_line) == [
        ([("a", Decimal("1.5"), "1.5"), ("b", Decimal("2"), "2")], b'{"ids":{"a":"1.5","b":"2"},"data":{"x":1.10,"s":"],["}}'),
        ([("a", Decimal("3"), "3")], b'{"ids":{"a":"3"},"data":[]}')]
    broken = b'[{"ids": {"a": "1"},\n "data": {\r\n"x": 1.10}}]'
    assert parse_parts(broken) == [([("a", Decimal("1"), "1")], b'{"ids":{"a":"1"},"data":{"x":1.10}}')]
    assert parse_parts(b"[]") == []


class FaultyStream(EventStream):
    """A stream with a fault in taking its answers."""

    def _take(self, body, done):
        raise RuntimeError("a fault of this stream")


def test_a_stream_that_fails_on_delivery_is_closed_and_nobody_else_notices(caplog):
    config = validate({})
    state = MemoryChannels(channel_settings(config))
    with stream_in_process(state, config, ["a"], FaultyStream) as (broken, _), \
            stream_in_process(state, config, ["a"], listeners=2) as (sound, theirs):
        assert state.publish([("a", None, None)], b'"hello"')
        assert b'"data":"hello"' in received_in_loop(theirs, lambda got: b"\n\n" in got)
        wait_in_loop(lambda: broken.closed is not None)
        assert broken.closed == "server error" and sound.closed is None
        assert "event stream failed" in caplog.text
