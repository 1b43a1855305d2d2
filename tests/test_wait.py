"""The WAIT line over real sockets: every rule of the protocol's WAIT section."""
from __future__ import annotations

import json
import signal
import socket
import time

import pytest

from conftest import (beyond_socket_buffers, parse_response, read_answer, read_to_eof, slow_reader,
                      start_server, write_config)

ENGINES = ["wsgi", "lean"]


@pytest.fixture(scope="module", params=ENGINES)
def engine(request):
    """Every WAIT-line test runs against both engines."""
    return request.param


@pytest.fixture(scope="module")
def server(engine, tmp_path_factory):
    path = write_config(tmp_path_factory.mktemp("rpl") / "realplexor.toml",
                        OFFLINE_TIMEOUT=1, WAIT_TIMEOUT=30, WAIT_ENGINE=engine)
    running = start_server(path)
    yield running
    running.stop()


@pytest.fixture
def server_factory(server_factory, engine):
    return lambda **options: server_factory(WAIT_ENGINE=engine, **options)


def parts(response):
    """The JSON parts of a WAIT response body (after the leading space)."""
    assert response.status == 200, response.raw
    assert response.body.startswith(b" \r\n"), response.body[:20]
    return json.loads(response.body[3:])


def test_headers_and_first_space_arrive_at_once(server, cid):
    poll = server.listen(f"{cid}a")
    head, _, first = poll.headers_arrived().partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    headers = head.decode().lower()
    assert "content-type: text/javascript; charset=utf-8" in headers
    assert "cache-control: no-store, no-cache, must-revalidate" in headers
    assert "expires: mon, 26 jul 1997" in headers
    assert "transfer-encoding" not in headers
    assert first == b" \r\n"
    assert not poll.has_ended(0.3)


def test_publish_wakes_listener_with_data_and_cursor(server, cid):
    poll = server.listen(f"{cid}a")
    server.publish(f"{cid}a", '{"text": "hello"}')
    body = parts(poll.response())
    assert len(body) == 1
    assert body[0]["data"] == {"text": "hello"}
    cursor = body[0]["ids"][f"{cid}a"]
    assert isinstance(cursor, str) and float(cursor) > time.time() - 60


def test_several_channels_in_one_request(server, cid):
    poll = server.listen(f"{cid}a,{cid}b,{cid}c")
    server.publish(f"{cid}b", '"to b"')
    body = parts(poll.response())
    assert [list(p["ids"]) for p in body] == [[f"{cid}b"]]
    assert body[0]["data"] == "to b"


def test_one_publish_to_several_listened_channels_is_one_part(server, cid):
    poll = server.listen(f"{cid}a,{cid}b")
    server.publish(f"{cid}a,{cid}b,{cid}other", '"both"')
    body = parts(poll.response())
    assert len(body) == 1
    assert set(body[0]["ids"]) == {f"{cid}a", f"{cid}b"}
    assert body[0]["ids"][f"{cid}a"] == body[0]["ids"][f"{cid}b"]


def test_buffered_data_reaches_a_later_client_with_an_older_cursor(server, cid):
    server.publish(f"{cid}a", '"first"')
    server.publish(f"{cid}a", '"second"')
    response = server.poll(f"identifier=0:{cid}a").response()
    body = parts(response)
    assert [p["data"] for p in body] == ["first", "second"]
    first, second = (p["ids"][f"{cid}a"] for p in body)
    assert first < second


def test_no_delivery_when_listened_cursor_is_newer(server, cid):
    server.publish(f"{cid}a", '"old"')
    cursor = parts(server.poll(f"identifier=0:{cid}a").response())[0]["ids"][f"{cid}a"]
    poll = server.listen(f"{cursor}:{cid}a")
    assert not poll.has_ended(0.5)


def test_listener_without_cursor_listens_from_now(server, cid):
    server.publish(f"{cid}a", '"before"')
    poll = server.listen(f"{cid}a")
    assert not poll.has_ended(0.3)
    server.publish(f"{cid}a", '"after"')
    assert [p["data"] for p in parts(poll.response())] == ["after"]


def test_sequential_publishes_and_reconnect_with_returned_cursor(server, cid):
    poll = server.listen(f"{cid}a")
    server.publish(f"{cid}a", '"one"')
    server.publish(f"{cid}a", '"two"')
    first = parts(poll.response())
    assert [p["data"] for p in first] == ["one"]
    cursor = first[0]["ids"][f"{cid}a"]
    second = parts(server.poll(f"identifier={cursor}:{cid}a").response())
    assert [p["data"] for p in second] == ["two"]
    assert second[0]["ids"][f"{cid}a"] > cursor


def test_publisher_cursors_are_exact_decimals(server, cid):
    # Two cursors a double cannot tell apart must still be told apart.
    server.publish(f"1732486800.12345678901234:{cid}a", '"x"')
    server.publish(f"1732486800.12345678901235:{cid}a", '"y"')
    body = parts(server.poll(f"identifier=1732486800.12345678901234:{cid}a").response())
    assert [(p["data"], p["ids"][f"{cid}a"]) for p in body] == [("y", "1732486800.12345678901235")]


def test_small_integer_cursors(server, cid):
    server.publish(f"5:{cid}a", '"five"')
    server.publish(f"7:{cid}a", '"seven"')
    body = parts(server.poll(f"identifier=5:{cid}a").response())
    assert [(p["data"], p["ids"][f"{cid}a"]) for p in body] == [("seven", "7")]


def test_parts_are_ordered_by_cursor_across_channels(server, cid):
    server.publish(f"3:{cid}b", '"b3"')
    server.publish(f"2:{cid}a", '"a2"')
    server.publish(f"4:{cid}a", '"a4"')
    body = parts(server.poll(f"identifier=0:{cid}a,0:{cid}b").response())
    assert [p["data"] for p in body] == ["a2", "b3", "a4"]


def test_limited_message_reaches_only_listeners_of_a_limiter(server, cid):
    plain = server.listen(f"{cid}a")
    allowed = server.listen(f"{cid}a,{cid}friend")
    server.publish(f"{cid}a,*{cid}friend", '"secret"')
    assert [p["data"] for p in parts(allowed.response())] == ["secret"]
    assert not plain.has_ended(0.3)
    server.publish(f"{cid}a", '"public"')
    assert [p["data"] for p in parts(plain.response())] == ["public"]


def test_limited_message_is_not_visible_in_history_either(server, cid):
    server.publish(f"{cid}a,*{cid}friend", '"secret"')
    server.publish(f"{cid}a", '"public"')
    body = parts(server.poll(f"identifier=0:{cid}a").response())
    assert [p["data"] for p in body] == ["public"]
    body = parts(server.poll(f"identifier=0:{cid}a,*{cid}friend").response())
    assert [p["data"] for p in body] == ["secret", "public"]


def test_a_limited_publish_to_several_channels_reaches_only_listeners_of_a_limiter(server, cid):
    plain = server.listen(f"{cid}a,{cid}b")
    allowed = server.listen(f"{cid}a,{cid}b,{cid}friend")
    allowed_on_b = server.listen(f"{cid}b,{cid}friend")
    server.publish(f"{cid}a,{cid}b,{cid}c,*{cid}friend", '"secret"')
    secret = parts(allowed.response())
    assert [(p["data"], sorted(p["ids"])) for p in secret] == [("secret", [f"{cid}a", f"{cid}b"])]
    assert [(p["data"], list(p["ids"])) for p in parts(allowed_on_b.response())] == [("secret", [f"{cid}b"])]
    # The plain listener still waits: the next publish is the first thing it gets.
    server.publish(f"{cid}a,{cid}b", '"public"')
    assert [p["data"] for p in parts(plain.response())] == ["public"]
    replayed = parts(server.poll(f"identifier=0:{cid}a,0:{cid}b").response())
    assert [p["data"] for p in replayed] == ["public"]


def test_limiters_are_not_publish_targets(server, cid):
    friend = server.listen(f"{cid}friend")
    server.publish(f"{cid}a,*{cid}friend", '"secret"')
    assert not friend.has_ended(0.3)


def test_wait_timeout_closes_with_empty_body(server_factory, cid):
    fast = server_factory(WAIT_TIMEOUT=0.5)
    poll = fast.listen(f"{cid}a")
    response = poll.response(timeout=5)
    assert response.status == 200
    assert response.body == b" \r\n"
    assert fast.wait_until(lambda: fast.online(cid) == {f"{cid}a": 0})


def test_post_with_identifier_in_body(server, cid):
    poll = server.poll("", method="POST", body=f"identifier={cid}a,{cid}b\n".encode())
    poll.headers_arrived()
    server.publish(f"{cid}b", '"posted"')
    assert [p["data"] for p in parts(poll.response())] == ["posted"]


def test_referer_header_is_ignored(server, cid):
    poll = server.listen(f"{cid}a", headers=f"Referer: http://x/?identifier={cid}evil\r\n")
    server.publish(f"{cid}evil", '"evil"')
    assert not poll.has_ended(0.3)
    assert server.online(cid) == {f"{cid}a": 1}


def test_identifier_anywhere_in_the_request_line(server, cid):
    poll = server.poll(f"ncrnd=5&identifier={cid}a")
    poll.headers_arrived()
    server.publish(f"{cid}a", '"x"')
    assert parts(poll.response())[0]["data"] == "x"


def test_credentials_on_the_wait_line_are_ignored(server, cid):
    poll = server.listen(f"bob:pw@{cid}a")
    server.publish(f"{cid}a", '"x"')
    assert parts(poll.response())[0]["data"] == "x"


@pytest.mark.parametrize("query", ["identifier=", "identifier=,,,", "identifier=bad-id!", "nothing=here"])
def test_empty_identifier_is_a_400(server, query):
    response = server.get(query)
    assert response.status == 400
    assert response.body.strip()
    assert b"\n" not in response.body.strip()


def test_request_longer_than_wait_maxlen_is_a_413(server, cid):
    ids = ",".join(f"{cid}{n}" for n in range(600))
    response = server.get(f"identifier={ids}")
    assert response.status in (413, 414)
    assert server.online(cid) == {}


def test_long_post_body_is_a_413_however_it_arrives(server, cid):
    ids = ",".join(f"{cid}{n}" for n in range(600)).encode()
    body = b"identifier=" + ids
    request = (f"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
    with socket.create_connection(("127.0.0.1", server.wait_port), timeout=10) as sock:
        for start in range(0, len(request), 100):
            sock.sendall(request[start:start + 100])
            time.sleep(0.001)
        response = parse_response(read_to_eof(sock))
    assert response.status == 413
    assert b"WAIT_MAXLEN" in response.body
    assert server.online(cid) == {}


def test_long_post_body_sent_at_once_is_a_413_not_a_reset(server, cid):
    body = b"identifier=" + ",".join(f"{cid}{n}" for n in range(20000)).encode()
    request = (f"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
    with socket.create_connection(("127.0.0.1", server.wait_port), timeout=10) as sock:
        sock.sendall(request)
        response = parse_response(read_to_eof(sock))
    assert response.status == 413
    assert b"WAIT_MAXLEN" in response.body


@pytest.mark.parametrize("how", ["at once", "in pieces", "never ended"])
@pytest.mark.parametrize("size", ["just over", "far over"])
def test_chunked_post_over_the_limit_is_a_413(server, cid, how, size):
    # WAIT_MAXLEN (5120 by default) counts the request target and the body.
    # A body that never ends is refused once past the limit, not at its end.
    count = 400 if size == "just over" else 20000
    body = b"identifier=" + ",".join(f"{cid}{n}" for n in range(count)).encode()
    assert len(body) > 5120
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 500]), body[i:i + 500])
                      for i in range(0, len(body), 500))
    if how != "never ended":
        chunks += b"0\r\n\r\n"
    request = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks
    with socket.create_connection(("127.0.0.1", server.wait_port), timeout=10) as sock:
        if how != "in pieces":
            sock.sendall(request)
        else:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for start in range(0, len(request), 1000):
                sock.sendall(request[start:start + 1000])
        response = parse_response(read_to_eof(sock))
    assert response.status == 413, response.raw[:300]
    assert b"WAIT_MAXLEN (5120 bytes)" in response.body
    assert server.online(cid) == {}


def test_post_declaring_a_body_over_the_limit_is_a_413_without_waiting_for_it(server, cid):
    head = f"POST /?identifier={cid}a HTTP/1.1\r\nHost: x\r\nContent-Length: 6000\r\n\r\n".encode()
    with socket.create_connection(("127.0.0.1", server.wait_port), timeout=10) as sock:
        sock.sendall(head + b"identifier=")     # the rest of the body never comes
        response = parse_response(read_to_eof(sock))
    assert response.status == 413, response.raw[:300]
    assert b"WAIT_MAXLEN (5120 bytes)" in response.body
    assert server.online(cid) == {}


def test_endless_headers_are_refused_without_waiting_for_their_end(server_factory, cid):
    server = server_factory(WAIT_REQUEST_TIMEOUT=60)
    headers = b"".join(b"X-Filler-%d: %s\r\n" % (n, b"f" * 1000) for n in range(200))
    with socket.create_connection(("127.0.0.1", server.wait_port), timeout=10) as sock:
        # 200 KB of headers and no blank line: refused long before WAIT_REQUEST_TIMEOUT.
        sock.sendall(f"GET /?identifier={cid}a HTTP/1.1\r\nHost: x\r\n".encode() + headers)
        response = parse_response(read_to_eof(sock))
    assert response.status in (400, 413), response.raw[:300]
    assert server.online(cid) == {}


def test_client_that_disconnects_mid_wait_is_removed(server, cid):
    polls = [server.listen(f"{cid}a,{cid}b") for _ in range(5)]
    assert server.online(cid) == {f"{cid}a": 5, f"{cid}b": 5}
    for poll in polls:
        poll.close()
    assert server.wait_until(lambda: server.online(cid) == {f"{cid}a": 0, f"{cid}b": 0})


def test_offline_timeout_runs_from_when_the_last_listener_left(server_factory, cid):
    server = server_factory(OFFLINE_TIMEOUT=3)
    first = server.listen(f"{cid}a")
    second = server.listen(f"{cid}a")
    start = server.command("WATCH").text.split()[1].split(":")[0]
    first.close()
    server.wait_until(lambda: server.online(cid) == {f"{cid}a": 1})
    second.close()
    left = time.monotonic()
    server.wait_until(lambda: server.online(cid) == {f"{cid}a": 0})
    # Online with no listener for the whole OFFLINE_TIMEOUT (less a margin for
    # noticing the close), then offline soon after it.
    server.holds_until(lambda: server.online(cid) == {f"{cid}a": 0}, until=left + 2.5)
    server.wait_until(lambda: server.online(cid) == {}, timeout=3)
    assert time.monotonic() - left < 4.5
    events = server.command(f"WATCH {start} {cid}").text.splitlines()
    assert [e.split()[0] for e in events] == ["offline"]


def test_new_listener_within_offline_timeout_cancels_offline(server, cid):
    # The shared server runs with OFFLINE_TIMEOUT = 1.
    poll = server.listen(f"{cid}a")
    start = server.command("WATCH").text.split()[1].split(":")[0]
    poll.close()
    left = time.monotonic()
    server.wait_until(lambda: server.online(cid) == {f"{cid}a": 0})
    again = server.listen(f"{cid}a")
    server.holds_until(lambda: server.online(cid) == {f"{cid}a": 1}, until=left + 1.6)
    assert server.command(f"WATCH {start} {cid}").text == ""
    again.close()


def test_delivered_listener_is_removed_from_all_its_channels(server, cid):
    poll = server.listen(f"{cid}a,{cid}b")
    server.publish(f"{cid}a", '"x"')
    parts(poll.response())
    assert server.online(cid) == {f"{cid}a": 0, f"{cid}b": 0}


def test_http_10_client_gets_a_close_delimited_body(server, cid):
    poll = server.poll(f"identifier={cid}a", version="HTTP/1.0")
    poll.headers_arrived()
    server.publish(f"{cid}a", '"x"')
    response = poll.response()
    assert parts(response)[0]["data"] == "x"


def test_iframe_page_with_substitutions(server):
    response = server.get("identifier=IFRAME")
    assert response.status == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert response.headers["origin-agent-cluster"] == "?0"
    assert "public" in response.headers["cache-control"]
    assert response.headers["last-modified"].endswith("GMT")
    assert "$" not in response.text.replace("$)", "")
    assert "identifier=SCRIPT" in response.text


def test_script_page_with_substitutions(server):
    response = server.get("identifier=SCRIPT")
    assert response.status == 200
    assert response.headers["content-type"].startswith("text/javascript")
    assert "$WAIT_TIMEOUT" not in response.text and "$JS_WAIT_URI" not in response.text
    assert int(response.headers["content-length"]) == len(response.body)


def test_page_not_modified_since(server):
    first = server.get("identifier=SCRIPT")
    again = server.get("identifier=SCRIPT",
                       headers=f"If-Modified-Since: {first.headers['last-modified']}\r\n")
    assert again.status == 304
    assert again.body == b""


def test_cors_simple_request_and_preflight(server, cid):
    poll = server.listen(f"{cid}a", headers="Origin: http://www.example.com\r\n")
    assert b"access-control-allow-origin: *" in poll.headers_arrived().lower()
    preflight = server.get("identifier=x", method="OPTIONS",
                           headers="Origin: http://www.example.com\r\n"
                                   "Access-Control-Request-Method: POST\r\n"
                                   "Access-Control-Request-Headers: content-type\r\n")
    assert preflight.status == 204
    assert preflight.headers["access-control-allow-origin"] == "*"
    assert "POST" in preflight.headers["access-control-allow-methods"]
    assert preflight.headers["access-control-allow-headers"] == "content-type"


def test_cors_only_for_configured_origins(server_factory, cid):
    strict = server_factory(CORS_ORIGINS=["http://good.example"])
    good = strict.listen(f"{cid}a", headers="Origin: http://good.example\r\n")
    assert b"access-control-allow-origin: http://good.example" in good.headers_arrived().lower()
    bad = strict.listen(f"{cid}a", headers="Origin: http://evil.example\r\n")
    assert b"access-control-allow-origin" not in bad.headers_arrived().lower()
    preflight = strict.get("identifier=x", method="OPTIONS", headers="Origin: http://evil.example\r\n")
    assert preflight.status == 403


def test_unsupported_method_is_a_405(server):
    response = server.get("identifier=x", method="DELETE")
    assert response.status == 405
    assert response.headers["x-content-type-options"] == "nosniff"


def test_a_405_does_not_echo_the_method(server):
    response = server.get("identifier=x", method="PROPFIND")
    assert response.status == 405 and b"PROPFIND" not in response.body


# -- the WSGI application in-process (webtest), for what needs no waiting --

@pytest.fixture
def wsgi_app(tmp_path):
    from webtest import TestApp

    from realplexor.channels import MemoryChannels
    from realplexor.config import validate
    from realplexor.pages import load_pages
    from realplexor.wait import WaitLine
    from realplexor.wait_wsgi import WaitApp

    script = tmp_path / "script.js"
    script.write_text("var uri = '$JS_WAIT_URI', id = '$IDENTIFIER', t = $WAIT_TIMEOUT, keep = '$UNKNOWN';\n")
    config = validate({"JS_WAIT_URI": "/rpl/", "IDENTIFIER": "ident", "WAIT_TIMEOUT": 42,
                       "SCRIPT_FILE": str(script), "WAIT_MAXLEN": 200})
    state = MemoryChannels()
    return TestApp(WaitApp(WaitLine(config, load_pages(config)), state)), state


def test_wsgi_app_answers_queued_data_at_once(wsgi_app):
    app, state = wsgi_app
    state.publish([("a", None, None)], b'{"k": 1}')
    response = app.get("/?ident=0:a")
    assert response.headers["Content-Type"] == "text/javascript; charset=utf-8"
    assert response.body.startswith(b" \r\n")
    assert json.loads(response.body)[0]["data"] == {"k": 1}


def test_wsgi_app_script_substitution(wsgi_app):
    app, _ = wsgi_app
    text = app.get("/?ident=SCRIPT").text
    assert text == "var uri = '/rpl/', id = 'ident', t = 42, keep = '$UNKNOWN';\n"


def test_wsgi_app_errors_are_one_line(wsgi_app):
    app, _ = wsgi_app
    response = app.get("/?ident=", status=400)
    assert response.text.count("\n") == 1 and "empty identifier list" in response.text
    response = app.get("/?ident=" + "a," * 150, status=413)
    assert "WAIT_MAXLEN (200 bytes)" in response.text
    response = app.post("/", "ident=" + "a," * 150, status=413)
    assert response.text.count("\n") == 1


# -- kept-alive long polls ------------------------------------------------

class KeptAlive:
    """A browser-like connection that sends several polls, one after another."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buf = b""

    def send_poll(self, query: str) -> None:
        self.sock.sendall(f"GET /?{query} HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n\r\n".encode())

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("server closed a kept-alive connection")
        self.buf += chunk

    def read_response(self):
        """One response, chunked or with a Content-Length: (head, body)."""
        head, body = self.read_response_head_or_whole()
        if body is None:
            _, body = self.finish_chunked(b"")
        return head, body

    def read_response_head_or_whole(self):
        """(head, body) of a Content-Length response, or (head, None) of a chunked one."""
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        length = parse_response(head + b"\r\n\r\n").headers.get("content-length")
        if length is None:
            return head.decode(), None
        while len(self.buf) < int(length):
            self._fill()
        body, self.buf = self.buf[:int(length)], self.buf[int(length):]
        return head.decode(), body

    def finish_chunked(self, body: bytes):
        """The rest of a chunked body whose head was read: (None, whole body)."""
        body = body or b""
        while True:
            while b"\r\n" not in self.buf:
                self._fill()
            size_line, _, rest = self.buf.partition(b"\r\n")
            size = int(size_line, 16)
            while len(rest) < size + 2:
                self._fill()
                size_line, _, rest = self.buf.partition(b"\r\n")
            self.buf = rest[size + 2:]
            if size == 0:
                return None, body
            body += rest[:size]

    def close(self):
        self.sock.close()


def test_kept_alive_connection_carries_two_polls_and_publishes(server, cid):
    conn = KeptAlive(server.wait_port)
    try:
        conn.send_poll(f"identifier={cid}a")
        server.wait_until(lambda: server.online(cid) == {f"{cid}a": 1})
        server.publish(f"{cid}a", '"first"')
        head, body = conn.read_response()
        assert "transfer-encoding: chunked" in head.lower()
        assert "connection: close" not in head.lower()
        assert body.startswith(b" \r\n")
        first = json.loads(body)
        cursor = first[0]["ids"][f"{cid}a"]
        assert first[0]["data"] == "first"
        conn.send_poll(f"identifier={cursor}:{cid}a")
        server.wait_until(lambda: server.online(cid) == {f"{cid}a": 1})
        server.publish(f"{cid}a", '"second"')
        _, body = conn.read_response()
        assert [p["data"] for p in json.loads(body)] == ["second"]
        # Queued data on a kept-alive connection is answered at once.
        server.publish(f"{cid}a", '"third"')
        conn.send_poll(f"identifier={cursor}:{cid}a")
        _, body = conn.read_response()
        assert [p["data"] for p in json.loads(body)] == ["second", "third"]
    finally:
        conn.close()


def test_kept_alive_poll_times_out_and_stays_usable(server_factory, cid):
    quick = server_factory(WAIT_TIMEOUT=0.5)
    conn = KeptAlive(quick.wait_port)
    try:
        conn.send_poll(f"identifier={cid}a")
        head, body = conn.read_response()
        assert head.startswith("HTTP/1.1 200") and body == b" \r\n"
        conn.send_poll(f"identifier={cid}a")
        quick.wait_until(lambda: quick.online(cid) == {f"{cid}a": 1})
        quick.publish(f"{cid}a", '"after timeout"')
        _, body = conn.read_response()
        assert json.loads(body)[0]["data"] == "after timeout"
    finally:
        conn.close()


def test_raw_http11_client_without_keep_alive_sees_the_close(server, cid):
    poll = server.listen(f"{cid}a")
    server.publish(f"{cid}a", '"x"')
    response = poll.response()
    assert response.headers.get("connection") == "close"
    assert "transfer-encoding" not in response.headers
    assert json.loads(response.body[3:])[0]["data"] == "x"


def test_client_leaving_a_kept_alive_poll_is_removed(server, cid):
    conn = KeptAlive(server.wait_port)
    conn.send_poll(f"identifier={cid}a")
    server.wait_until(lambda: server.online(cid) == {f"{cid}a": 1})
    conn.close()
    server.wait_until(lambda: server.online(cid) == {f"{cid}a": 0})


def test_many_parked_polls_on_one_channel_all_get_the_publish(server, cid):
    polls = [server.listen(f"{cid}a") for _ in range(200)]
    server.publish(f"{cid}a", '{"n": 200}')
    for poll in polls:
        assert json.loads(poll.response().body[3:])[0]["data"] == {"n": 200}
    assert server.online(cid) == {f"{cid}a": 0}


def test_malformed_http_is_a_400(server):
    with socket.create_connection(("127.0.0.1", server.wait_port), timeout=10) as sock:
        sock.sendall(b"GARBAGE\x00\x01 / HTTP/9\r\n\r\n")
        response = parse_response(read_to_eof(sock))
    assert response.status == 400


def test_wsgi_handler_sends_headers_and_first_bytes_in_one_send(tmp_path):
    """A parked poll's status line, headers and first space leave in one send."""
    import gevent
    import gevent.socket

    from realplexor.channels import MemoryChannels
    from realplexor.config import validate
    from realplexor.pages import load_pages
    from realplexor.wait import WaitLine
    from realplexor.wait_wsgi import WaitApp
    from realplexor.wsgi_server import LongPollHandler

    class CountingRaw:
        """The standard socket under a gevent one; the handler may send through it directly."""

        def __init__(self, raw, sends):
            self.raw, self.sends = raw, sends

        def send(self, data, *flags):
            sent = self.raw.send(data, *flags)
            self.sends.append(bytes(data[:sent]))
            return sent

        def __getattr__(self, name):
            return getattr(self.raw, name)

    class CountingSocket:
        def __init__(self, sock):
            self.sock, self.sends = sock, []
            self._sock = CountingRaw(sock._sock, self.sends)

        def sendall(self, data):
            self.sends.append(bytes(data))
            return self.sock.sendall(data)

        def __getattr__(self, name):
            return getattr(self.sock, name)

    config = validate({"WAIT_TIMEOUT": 0.2})
    app = WaitApp(WaitLine(config, load_pages(config)), MemoryChannels())
    server_side, client_side = gevent.socket.socketpair()
    counting = CountingSocket(server_side)

    class FakeServer:
        application = app
        log = error_log = None

        def get_environ(self):
            return {"wsgi.errors": None, "SERVER_NAME": "x", "SERVER_PORT": "1"}

    client_side.sendall(b"GET /?identifier=abc HTTP/1.1\r\nHost: x\r\n\r\n")
    handler = LongPollHandler(counting, ("127.0.0.1", 1), FakeServer())
    handler.log_request = lambda: None
    worker = gevent.spawn(handler.handle_one_request)
    gevent.sleep(0.1)
    assert len(counting.sends) == 1
    assert counting.sends[0].startswith(b"HTTP/1.1 200 OK\r\n")
    assert counting.sends[0].endswith(b"\r\n\r\n \r\n")
    worker.join(timeout=5)
    server_side.close()
    client_side.close()


def test_request_arriving_in_pieces_is_served(server, cid):
    with socket.create_connection(("127.0.0.1", server.wait_port), timeout=10) as sock:
        sock.sendall(f"GET /?identifier={cid}a HTTP/1.1\r\n".encode())
        time.sleep(0.2)
        sock.sendall(b"Host: x\r\n")
        time.sleep(0.2)
        sock.sendall(b"\r\n")
        server.wait_until(lambda: server.online(cid) == {f"{cid}a": 1})
        server.publish(f"{cid}a", '"pieces"')
        response = parse_response(read_to_eof(sock))
    assert json.loads(response.body[3:])[0]["data"] == "pieces"


def test_kept_alive_poll_after_a_request_in_pieces(server, cid):
    conn = KeptAlive(server.wait_port)
    try:
        conn.sock.sendall(f"GET /?identifier={cid}a HTTP/1.1\r\nHost: x\r\n".encode())
        time.sleep(0.2)
        conn.sock.sendall(b"Connection: keep-alive\r\n\r\n")
        server.wait_until(lambda: server.online(cid) == {f"{cid}a": 1})
        server.publish(f"{cid}a", '"one"')
        cursor = json.loads(conn.read_response()[1])[0]["ids"][f"{cid}a"]
        conn.send_poll(f"identifier={cursor}:{cid}a")
        server.wait_until(lambda: server.online(cid) == {f"{cid}a": 1})
        server.publish(f"{cid}a", '"two"')
        assert [p["data"] for p in json.loads(conn.read_response()[1])] == ["two"]
    finally:
        conn.close()


def test_request_in_pieces_does_not_disturb_others_read_meanwhile(server, cid):
    with socket.create_connection(("127.0.0.1", server.wait_port), timeout=10) as slow:
        slow.sendall(f"GET /?identifier={cid}slow HTTP/1.1\r\nHo".encode())
        time.sleep(0.2)
        quick = server.listen(f"{cid}quick")
        server.wait_until(lambda: server.online(cid).get(f"{cid}quick") == 1)
        slow.sendall(b"st: x\r\n\r\n")
        server.wait_until(lambda: server.online(cid).get(f"{cid}slow") == 1)
        server.publish(f"{cid}slow,{cid}quick", '"both"')
        assert json.loads(parse_response(read_to_eof(slow)).body[3:])[0]["data"] == "both"
    assert json.loads(quick.response().body[3:])[0]["data"] == "both"


@pytest.mark.parametrize("extra", [b"GET /?identifier=", b"\x00junk"])
def test_bytes_after_a_whole_request_do_not_disturb_other_clients(server, cid, extra):
    with socket.create_connection(("127.0.0.1", server.wait_port), timeout=10) as first:
        first.sendall(b"GET /?identifier=IFRAME HTTP/1.1\r\nHost: x\r\n\r\n" + extra)
        response = parse_response(read_to_eof(first))
    assert response.status == 200 and b"<html" in response.body.lower()
    after = server.get("identifier=IFRAME")
    assert after.status == 200 and after.body == response.body
    poll = server.listen(f"{cid}a")
    server.publish(f"{cid}a", '"fine"')
    assert json.loads(poll.response().body[3:])[0]["data"] == "fine"


def test_http10_and_connection_close_requests_do_not_disturb_the_next_ones(server, cid):
    for request_line, header in [("GET /?identifier=IFRAME HTTP/1.0", ""),
                                 ("GET /?identifier=IFRAME HTTP/1.1", "Connection: close\r\n")]:
        with socket.create_connection(("127.0.0.1", server.wait_port), timeout=10) as sock:
            sock.sendall(f"{request_line}\r\nHost: x\r\n{header}\r\n".encode())
            assert parse_response(read_to_eof(sock)).status == 200
    poll = server.listen(f"{cid}a")
    server.publish(f"{cid}a", '"next"')
    assert json.loads(poll.response().body[3:])[0]["data"] == "next"


@pytest.mark.parametrize("header", ["Connection: close\r\nConnection: keep-alive\r\n",
                                    "Proxy-Connection: close\r\n"], ids=["repeated", "proxy"])
def test_any_close_header_does_not_disturb_the_next_requests(server, cid, header):
    with socket.create_connection(("127.0.0.1", server.wait_port), timeout=10) as sock:
        sock.sendall(f"GET /?identifier=IFRAME HTTP/1.1\r\nHost: x\r\n{header}\r\n".encode())
        assert parse_response(read_to_eof(sock)).status == 200
    assert server.get("identifier=IFRAME").status == 200
    poll = server.listen(f"{cid}a")
    server.publish(f"{cid}a", '"next"')
    assert json.loads(poll.response().body[3:])[0]["data"] == "next"


@pytest.mark.parametrize("request_line", [b"GET /\x00 HTTP/1.1", b"GET /?no=identifier HTTP/1.1"])
def test_refused_request_with_more_bytes_behind_it_reads_its_400_not_a_reset(server, request_line):
    with socket.create_connection(("127.0.0.1", server.wait_port), timeout=10) as sock:
        sock.sendall(request_line + b"\r\nHost: x\r\n\r\n" + b"x" * 200_000)
        response = parse_response(read_to_eof(sock))
    assert response.status == 400


def test_head_poll_gets_the_poll_headers_and_no_body_at_once(server, cid):
    with socket.create_connection(("127.0.0.1", server.wait_port), timeout=10) as sock:
        sock.sendall(f"HEAD /?identifier={cid}a HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n\r\n".encode())
        response = parse_response(read_to_eof(sock))
    assert response.status == 200
    assert response.headers["content-type"].startswith("text/javascript")
    assert response.body == b""
    assert server.online(cid) == {}


def test_answers_are_capped_and_every_queued_message_arrives_exactly_once(server_factory, cid):
    server = server_factory(WAIT_MAX_ANSWER=4000)
    channels = [f"{cid}c{n}" for n in range(20)]
    for n in range(30):
        for channel in channels:
            server.publish(channel, json.dumps(f"{channel}:{n:02d}:" + "x" * 60))
    cursors = {channel: "0" for channel in channels}
    seen, answers = [], 0
    while len(seen) < 600:
        identifier = ",".join(f"{cursor}:{channel}" for channel, cursor in cursors.items())
        got = parts(server.poll(f"identifier={identifier}").response())
        answers += 1
        assert got and sum(len(json.dumps(part["data"])) for part in got) <= 4000
        for part in got:
            seen.append(part["data"])
            (channel, cursor), = part["ids"].items()
            cursors[channel] = cursor
        assert answers < 100
    assert sorted(seen) == sorted(f"{c}:{n:02d}:" + "x" * 60 for c in channels for n in range(30))
    assert answers >= 600 * 80 // 4000


def test_a_poll_of_more_than_wait_max_ids_is_a_413(server_factory, cid):
    server = server_factory(WAIT_MAX_IDS=50)
    many = server.get("identifier=" + ",".join(f"{cid}{n}" for n in range(51)))
    assert many.status == 413 and b"51 ids in one poll; at most WAIT_MAX_IDS (50)" in many.body
    assert server.online(cid) == {}
    fifty = server.listen(",".join(f"{cid}{n}" for n in range(50)))
    assert len(server.online(cid)) == 50
    fifty.close()


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
@pytest.mark.parametrize("ending", ["half-close", "close"])
def test_post_body_ending_early_is_a_400_not_a_500(server, cid, framing, ending):
    body = f"identifier={cid}a".encode()
    if framing == "chunked":
        head, body = "Transfer-Encoding: chunked", b"%x\r\n" % (len(body) + 50) + body
    else:
        head = f"Content-Length: {len(body) + 50}"
    seen = len(server.output.lines)
    with socket.create_connection(("127.0.0.1", server.wait_port), timeout=10) as sock:
        sock.sendall(f"POST / HTTP/1.1\r\nHost: x\r\n{head}\r\n\r\n".encode() + body)
        if ending == "half-close":
            sock.shutdown(socket.SHUT_WR)
            response = parse_response(read_to_eof(sock))
            assert response.status == 400, response.raw
            assert len(response.body.strip().splitlines()) == 1, response.raw
    assert server.online(cid) == {}
    log = "\n".join(server.settled_log()[seen:])
    assert "Traceback" not in log and " ERROR " not in log, log


# -- hostile clients: ghosts, trickles, early requests, readers that never read --

def test_a_poll_whose_client_sends_a_byte_and_leaves_is_gone_at_once(server, cid):
    polls = [server.listen(f"{cid}a") for _ in range(3)]
    assert server.online(cid) == {f"{cid}a": 3}
    for poll in polls:
        poll.sock.sendall(b"x")
        poll.sock.close()
    server.wait_until(lambda: server.online(cid) == {f"{cid}a": 0}, timeout=5)


def test_a_request_sent_before_the_answer_is_refused_after_it(server, cid):
    conn = KeptAlive(server.wait_port)
    try:
        conn.send_poll(f"identifier={cid}a")
        server.wait_until(lambda: server.online(cid) == {f"{cid}a": 1})
        conn.send_poll(f"identifier={cid}b")          # too early: the first has no answer yet
        server.publish(f"{cid}a", '"first"')
        _, body = conn.read_response()
        assert [p["data"] for p in json.loads(body)] == ["first"]
        # Unless the early poll reached the server only after the answer left
        # (then it is simply served next), it is refused, and the connection closed.
        head, body = conn.read_response_head_or_whole()
        if head.startswith("HTTP/1.1 200"):
            server.publish(f"{cid}b", '"second"')
            _, body = conn.finish_chunked(body)
            assert [p["data"] for p in json.loads(body)] == ["second"]
        else:
            assert head.startswith("HTTP/1.1 400") and b"after the answer" in body
            assert read_to_eof(conn.sock, 5) == b""
        assert server.online(cid).get(f"{cid}a") == 0
    finally:
        conn.close()


def test_a_client_sending_kilobytes_while_parked_is_refused(server, cid):
    conn = KeptAlive(server.wait_port)
    try:
        conn.send_poll(f"identifier={cid}a")
        server.wait_until(lambda: server.online(cid) == {f"{cid}a": 1})
        conn.sock.sendall(b"z" * 5000)
        _, body = conn.read_response()
        assert body == b" \r\n"                        # the poll ends with nothing
        head, _ = conn.read_response()
        assert head.startswith("HTTP/1.1 400")
        server.wait_until(lambda: server.online(cid) == {f"{cid}a": 0}, timeout=5)
    finally:
        conn.close()


def test_a_trickled_request_gets_a_408_by_its_deadline(server_factory, cid):
    server = server_factory(WAIT_REQUEST_TIMEOUT=1)
    with socket.create_connection(("127.0.0.1", server.wait_port), timeout=10) as sock:
        sock.sendall(f"GET /?identifier={cid}a HTTP/1.1\r\n".encode())
        started = time.monotonic()
        reply = b""
        sock.settimeout(0.3)
        while not reply and time.monotonic() - started < 8:
            try:
                sock.sendall(b"X")                     # a byte at a time, never a whole request
                reply = sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                break
    assert parse_response(reply).status == 408 and b"WAIT_REQUEST_TIMEOUT" in reply
    assert server.online(cid) == {}


def test_an_answer_not_taken_in_time_is_dropped(server_factory, cid):
    server = server_factory(WRITE_TIMEOUT=1, IN_MAXLEN=3_000_000, WAIT_MAX_ANSWER=30_000_000)
    for _ in range(8):      # 20 MB: more than the kernel's buffers on both sides hold
        server.publish(f"{cid}a", json.dumps("x" * 2_500_000))
    big = b"x" * 20_000_000
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", server.wait_port))
    try:
        sock.sendall(f"GET /?identifier=0:{cid}a HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        # Take nothing for well past WRITE_TIMEOUT, then read what is left.
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            time.sleep(0.1)
        got = b""
        try:
            got = read_to_eof(sock, 10)
        except ConnectionResetError:
            pass
        assert len(got) < len(big)
    finally:
        sock.close()


@pytest.mark.parametrize("when", ["queued", "published while parked"])
@pytest.mark.parametrize("keep_alive", [True, False], ids=["kept alive", "close"])
def test_an_answer_larger_than_the_socket_buffers_reaches_a_late_reader_whole(server_factory, cid,
                                                                              keep_alive, when):
    size = beyond_socket_buffers()
    server = server_factory(IN_MAXLEN=size + 1000, WAIT_MAX_ANSWER=3 * size)
    sent = [f"{n}:" + "x" * (size // 2) for n in range(2)]
    sock = slow_reader(server.wait_port)
    connection = "Connection: keep-alive\r\n" if keep_alive else ""
    try:
        if when == "queued":
            for data in sent:
                server.publish(f"{cid}a", json.dumps(data))
            sock.sendall(f"GET /?identifier=0:{cid}a HTTP/1.1\r\nHost: x\r\n{connection}\r\n".encode())
        else:
            sock.sendall(f"GET /?identifier={cid}a HTTP/1.1\r\nHost: x\r\n{connection}\r\n".encode())
            server.wait_until(lambda: server.online(cid) == {f"{cid}a": 1})
            server.publish(f"{cid}a", json.dumps(sent[0]))
            sent = sent[:1]
        # The answer cannot all leave while this client reads nothing; others are served meanwhile.
        other = server.listen(f"{cid}b")
        server.publish(f"{cid}b", '"meanwhile"')
        assert [p["data"] for p in parts(other.response())] == ["meanwhile"]
        head, body = read_answer(sock)
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
        assert body.startswith(b" \r\n")
        got = json.loads(body[3:])
        assert [part["data"] for part in got] == sent
        if keep_alive:
            # The connection carries the next poll as usual.
            cursor = got[-1]["ids"][f"{cid}a"]
            sock.sendall(f"GET /?identifier={cursor}:{cid}a HTTP/1.1\r\nHost: x\r\n{connection}\r\n".encode())
            server.wait_until(lambda: server.online(cid).get(f"{cid}a") == 1)
            server.publish(f"{cid}a", '"next"')
            _, body = read_answer(sock)
            assert [part["data"] for part in json.loads(body)] == ["next"]
        else:
            assert read_to_eof(sock) == b""
    finally:
        sock.close()


def test_sighup_reload_takes_effect_and_parked_polls_survive_it(server_factory, engine, cid):
    old, new = "http://old.example", "http://new.example"
    server = server_factory(CORS_ORIGINS=[old], MAX_DATA_FOR_ID=30)
    # Polls from each origin, before the reload: their headers are made (and kept) now.
    parked = server.listen(f"{cid}a", headers=f"Origin: {old}\r\n")
    assert f"Access-Control-Allow-Origin: {old}\r\n".encode() in parked.headers_arrived()
    kept = KeptAlive(server.wait_port)
    try:
        # A kept-alive poll's headers, made now, go out with its answer.
        kept.sock.sendall(f"GET /?identifier={cid}a HTTP/1.1\r\nHost: x\r\nOrigin: {old}\r\n"
                          f"Connection: keep-alive\r\n\r\n".encode())
        assert b"Access-Control" not in server.listen(f"{cid}b", headers=f"Origin: {new}\r\n").headers_arrived()
        server.wait_until(lambda: server.online(cid) == {f"{cid}a": 2, f"{cid}b": 1})

        write_config(server.config_path, WAIT_ENGINE=engine, CORS_ORIGINS=[new], MAX_DATA_FOR_ID=2)
        reloads = server.output.text().count("configuration reloaded")
        server.process.send_signal(signal.SIGHUP)
        server.wait_until(lambda: server.output.text().count("configuration reloaded") > reloads)

        # The polls parked before the reload are still there and get the next message.
        assert server.online(cid) == {f"{cid}a": 2, f"{cid}b": 1}
        server.publish(f"{cid}a", '"after the reload"')
        assert [p["data"] for p in parts(parked.response())] == ["after the reload"]
        head, body = kept.read_response()
        assert f"Access-Control-Allow-Origin: {old}" in head
        assert [p["data"] for p in json.loads(body)] == ["after the reload"]
        # The new configuration: the old origin is no longer allowed, the new one is.
        assert b"Access-Control" not in server.listen(f"{cid}c", headers=f"Origin: {old}\r\n").headers_arrived()
        assert (f"Access-Control-Allow-Origin: {new}\r\n".encode()
                in server.listen(f"{cid}c", headers=f"Origin: {new}\r\n").headers_arrived())
        for n in range(4):
            server.publish(f"{cid}d", str(n))
        assert [p["data"] for p in parts(server.get(f"identifier=0:{cid}d"))] == [2, 3]
    finally:
        kept.close()


def test_an_idle_kept_alive_connection_is_closed_after_the_keepalive_timeout(server_factory, cid):
    server = server_factory(WAIT_KEEPALIVE_TIMEOUT=0.5)
    server.publish(f"{cid}a", '"x"')
    conn = KeptAlive(server.wait_port)
    try:
        conn.send_poll(f"identifier=0:{cid}a")
        conn.read_response()
        conn.sock.settimeout(5)
        assert conn.sock.recv(100) == b""              # closed by the server, not by the timeout here
    finally:
        conn.close()


def test_a_kept_alive_poll_gets_its_headers_with_its_answer_in_one_write(server, cid):
    with socket.create_connection(("127.0.0.1", server.wait_port), timeout=10) as sock:
        sock.sendall(f"GET /?identifier={cid}a HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n\r\n".encode())
        server.wait_until(lambda: server.online(cid) == {f"{cid}a": 1})
        sock.settimeout(0.3)
        with pytest.raises(socket.timeout):
            sock.recv(65536)                      # nothing early: no headers, no first bytes
        server.publish(f"{cid}a", '"together"')
        sock.settimeout(10)
        first = sock.recv(65536)                  # one write: the first read has it all
    assert first.startswith(b"HTTP/1.1 200 OK\r\n")
    head, _, body = first.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head.lower()
    assert b'"together"' in body and body.endswith(b"0\r\n\r\n")
