"""The IN line's HTTP routes over real sockets: health, readiness and the JSON API."""
from __future__ import annotations

import base64
import http.client
import json
import socket

import pytest

from conftest import TIMEOUT, Response, parse_response, start_server, wait_parts, write_config, write_users_file

# Users of the guarded server: no ":" line, so guests are refused.
USERS = {"alice": "secret", "bob": "b0b"}


def call(server, method: str, target: str, body: bytes | str | dict | None = None,
         login: tuple[str, str] | None = None, headers: str = "", half_close: bool = False) -> Response:
    """One HTTP request to the IN line, as curl sends it; the reply read to its end."""
    if isinstance(body, dict):
        body = json.dumps(body)
    if isinstance(body, str):
        body = body.encode()
    if login is not None:
        token = base64.b64encode(f"{login[0]}:{login[1]}".encode()).decode()
        headers += f"Authorization: Basic {token}\r\n"
    if body is not None:
        headers += f"Content-Length: {len(body)}\r\n"
    request = f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n{headers}\r\n".encode() + (body or b"")
    return parse_response(server.in_raw(request, half_close=half_close))


def answer(response: Response, status: int = 200):
    """The JSON body of a reply, once its status and framing are checked."""
    assert response.status == status, response.raw
    assert response.raw.startswith(b"HTTP/1.0 ")
    assert response.headers["content-type"] == "application/json"
    assert int(response.headers["content-length"]) == len(response.body)
    return json.loads(response.body)


def error(response: Response, status: int) -> str:
    """The one-line reason of an error reply."""
    body = answer(response, status)
    assert list(body) == ["error"] and "\n" not in body["error"], body
    return body["error"]


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    """A server whose USERS_FILE has logins and no guest entry."""
    base = tmp_path_factory.mktemp("routes")
    users = write_users_file(base / "users.htpasswd", USERS)
    running = start_server(write_config(base / "realplexor.toml", USERS_FILE=str(users),
                                        OFFLINE_TIMEOUT=1, WAIT_TIMEOUT=30))
    yield running
    running.stop()


# -- health and readiness --------------------------------------------------------

@pytest.mark.parametrize("path, text", [("/health", "ok\n"), ("/ready", "ready\n")])
def test_health_and_ready_need_no_credentials_and_say_little(guarded, path, text):
    response = call(guarded, "GET", path)
    assert (response.status, response.text) == (200, text)
    assert response.headers["content-type"] == "text/plain; charset=utf-8"
    head = call(guarded, "HEAD", path)
    assert (head.status, head.body) == (200, b"")
    assert head.headers["content-length"] == str(len(text))


def test_health_and_ready_take_no_other_method(server):
    assert error(call(server, "POST", "/ready", b""), 405) == "/ready takes GET or HEAD"
    response = call(server, "PUT", "/health", b"x")
    assert response.status == 405 and response.headers["allow"] == "GET, HEAD"


OPEN_FILES = 48


@pytest.mark.parametrize("engine", ["wsgi", "lean"])
def test_ready_is_a_503_while_a_line_cannot_accept(tmp_path, cid, engine):
    server = start_server(write_config(tmp_path / "c.toml", WAIT_ENGINE=engine), open_files=OPEN_FILES)
    polls = []
    try:
        # Accepted before the descriptors run out: it can still ask.
        asking = socket.create_connection(("127.0.0.1", server.in_port), timeout=TIMEOUT)
        assert call(server, "GET", "/ready").status == 200
        for _ in range(OPEN_FILES + 12):
            sock = socket.create_connection(("127.0.0.1", server.wait_port), timeout=TIMEOUT)
            sock.sendall(f"GET /?identifier={cid}a HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            polls.append(sock)
        server.output.wait_for(r"cannot accept connections: .*; pausing")
        asking.sendall(b"GET /ready HTTP/1.1\r\nHost: x\r\n\r\n")
        response = parse_response(_read_reply(asking))
        assert response.status == 503
        assert response.text == "not ready: the WAIT line is not accepting connections (out of file descriptors)\n"
        asking.close()
        for sock in polls:
            sock.close()
        polls = []
        server.wait_until(lambda: call(server, "GET", "/ready").status == 200)
    finally:
        for sock in polls:
            sock.close()
        server.stop()


def _read_reply(sock: socket.socket) -> bytes:
    sock.settimeout(TIMEOUT)
    raw = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return raw
        raw += chunk


# -- the JSON API ------------------------------------------------------------------

def test_publish_reaches_waiting_polls_with_the_cursors_it_answers(server, cid):
    alpha, both = server.listen(f"{cid}Alpha"), server.listen(f"{cid}Alpha,{cid}Beta")
    body = answer(call(server, "POST", "/publish",
                       '{"ids": ["%sAlpha", "%sBeta"], "data": {"text": "hi", "n": [1.50, null]}}' % (cid, cid)))
    assert set(body) == {"ids"} and set(body["ids"]) == {f"{cid}Alpha", f"{cid}Beta"}
    assert len(set(body["ids"].values())) == 1
    assert wait_parts(alpha.response()) == [{"ids": {f"{cid}Alpha": body["ids"][f"{cid}Alpha"]},
                                             "data": {"text": "hi", "n": [1.5, None]}}]
    assert b'"data":{"text":"hi","n":[1.50,null]}' in both.response().body


def test_publish_at_given_cursors_and_to_limiters_only(server, cid):
    body = answer(call(server, "POST", "/publish", {"ids": {f"{cid}a": "10", f"{cid}b": None}, "data": "x"}))
    assert body["ids"][f"{cid}a"] == "10" and body["ids"][f"{cid}b"] != "10"
    plain, friend = server.listen(f"{cid}c"), server.listen(f"{cid}c,{cid}friends")
    answer(call(server, "POST", "/publish", {"ids": [f"{cid}c"], "data": "secret", "limit_to": [f"{cid}friends"]}))
    assert [part["data"] for part in wait_parts(friend.response())] == ["secret"]
    assert not plain.has_ended(0.3)
    parts = wait_parts(server.get(f"identifier=0:{cid}a,0:{cid}b"))
    assert parts[0]["ids"] == body["ids"]


def test_online_lists_channels_by_prefix(server, cid):
    server.listen(f"{cid}x_1")
    server.listen(f"{cid}x_1")
    server.listen(f"{cid}y_2")
    assert answer(call(server, "GET", f"/online?prefix={cid}x")) == {"online": {f"{cid}x_1": 2}}
    both = answer(call(server, "GET", f"/online?prefix={cid}x&prefix={cid}y_&prefix={cid}x_"))
    assert both == {"online": {f"{cid}x_1": 2, f"{cid}y_2": 1}}
    assert answer(call(server, "GET", "/online"))["online"][f"{cid}y_2"] == 1
    assert answer(call(server, "GET", f"/online?prefix={cid}z")) == {"online": {}}


def test_watch_reports_transitions_after_a_position(server, cid):
    start = answer(call(server, "GET", "/watch"))
    assert start["events"] == [] and start["pos"] >= 10
    assert answer(call(server, "GET", "/watch?pos=0")) == start
    poll = server.listen(f"{cid}w")
    body = answer(call(server, "GET", f"/watch?pos={start['pos']}&prefix={cid}"))
    assert body["events"] == [{"event": "online", "pos": body["pos"], "id": f"{cid}w"}]
    poll.close()
    server.wait_until(lambda: answer(call(server, "GET", f"/watch?pos={body['pos']}&prefix={cid}"))["events"])
    later = answer(call(server, "GET", f"/watch?pos={body['pos']}&prefix={cid}"))
    assert later["events"] == [{"event": "offline", "pos": later["pos"], "id": f"{cid}w"}]
    assert answer(call(server, "GET", f"/watch?pos={later['pos']}")) == {"events": [], "pos": later["pos"]}


def test_a_plain_http_client_gets_the_same_answers(server, cid):
    connection = http.client.HTTPConnection("127.0.0.1", server.in_port, timeout=TIMEOUT)
    try:
        connection.request("POST", "/publish", body=json.dumps({"ids": [f"{cid}h"], "data": 1}),
                           headers={"Content-Type": "application/json"})
        reply = connection.getresponse()
        assert reply.status == 200 and list(json.loads(reply.read())["ids"]) == [f"{cid}h"]
    finally:
        connection.close()


@pytest.mark.parametrize("body, reason", [
    (b'{"ids": ["a"], "data": }', "the body is not valid JSON"),
    (b'{"ids": ["a b"], "data": 1}', "is not a channel id"),
    (b'{"ids": {"a": "x1"}, "data": 1}', "must be a string of DIGITS[.DIGITS] or null"),
    (b'["a"]', "must be a JSON object"),
])
def test_a_bad_publish_is_a_400_and_publishes_nothing(server, cid, body, reason):
    poll = server.listen(f"{cid}a")
    assert reason in error(call(server, "POST", "/publish", body.replace(b'"a', f'"{cid}a'.encode())), 400)
    assert not poll.has_ended(0.2)


def test_a_publish_without_content_length_is_a_411(server):
    assert "Content-Length" in error(call(server, "POST", "/publish"), 411)
    chunked = call(server, "POST", "/publish", headers="Transfer-Encoding: chunked\r\n")
    assert "Transfer-Encoding" in error(chunked, 411)


def test_wrong_methods_are_a_405_with_allow(server):
    response = call(server, "GET", "/publish")
    assert error(response, 405) == "/publish takes POST" and response.headers["allow"] == "POST"
    response = call(server, "POST", "/online", b"{}")
    assert response.status == 405 and response.headers["allow"] == "GET, HEAD"


def test_bad_queries_are_a_400(server):
    assert "unknown parameter" in error(call(server, "GET", "/online?prefx=a"), 400)
    assert "pos must be a whole number" in error(call(server, "GET", "/watch?pos=-3"), 400)


def test_a_request_over_in_maxlen_is_a_json_413(server_factory):
    small = server_factory(IN_MAXLEN=1000)
    response = call(small, "POST", "/publish", {"ids": ["a"], "data": "x" * 2000})
    assert "IN_MAXLEN" in error(response, 413)


def test_an_unfinished_request_is_a_json_408_after_in_timeout(server_factory):
    quick = server_factory(IN_TIMEOUT=0.5)
    with socket.create_connection(("127.0.0.1", quick.in_port), timeout=TIMEOUT) as sock:
        sock.sendall(b"POST /publish HTTP/1.1\r\nContent-Length: 50\r\n\r\n{")
        assert "IN_TIMEOUT" in error(parse_response(_read_reply(sock)), 408)


def test_an_old_client_posting_to_a_route_path_keeps_the_old_protocol(server, cid):
    poll = server.listen(f"{cid}a")
    request = (f"POST /publish HTTP/1.1\r\nContent-Length: 5\r\nX-Realplexor: identifier={cid}a\r\n\r\n"
               '"old"').encode()
    reply = parse_response(server.in_raw(request))
    assert (reply.status, reply.headers["content-type"], reply.body) == (200, "text/plain", b"")
    assert wait_parts(poll.response())[0]["data"] == "old"


# -- credentials and login scoping -------------------------------------------------

@pytest.mark.parametrize("method, target", [("GET", "/metrics"), ("POST", "/publish"), ("GET", "/online"),
                                            ("GET", "/watch?pos=1")])
def test_without_credentials_a_guarded_server_answers_401(guarded, method, target):
    response = call(guarded, method, target, {"ids": ["alice_a"], "data": 1} if method == "POST" else None)
    assert "credentials needed" in error(response, 401)
    assert response.headers["www-authenticate"] == 'Basic realm="realplexor"'


def test_wrong_credentials_are_a_403(guarded):
    assert error(call(guarded, "GET", "/online", login=("alice", "wrong")), 403) == \
        "invalid password for login: alice"
    assert error(call(guarded, "GET", "/online", login=("eve", "x")), 403) == "unknown login: eve"
    assert "Basic" in error(call(guarded, "GET", "/online", headers="Authorization: Bearer x\r\n"), 400)


def test_too_many_password_checks_waiting_is_a_json_503(tmp_path):
    import selectors

    from realplexor.auth import MAX_WAITING_CHECKS

    # bcrypt at its default cost takes a good fraction of a second: the
    # checks pile up behind the first two while every request arrives.
    users = write_users_file(tmp_path / "users.htpasswd", {"alice": "secret"})
    server = start_server(write_config(tmp_path / "realplexor.toml", USERS_FILE=str(users)))
    socks = []
    try:
        with selectors.DefaultSelector() as selector:
            for n in range(MAX_WAITING_CHECKS + 6):
                sock = socket.create_connection(("127.0.0.1", server.in_port), timeout=TIMEOUT)
                token = base64.b64encode(f"alice:wrong{n}".encode()).decode()
                sock.sendall(f"GET /online HTTP/1.1\r\nAuthorization: Basic {token}\r\n\r\n".encode())
                sock.setblocking(False)
                selector.register(sock, selectors.EVENT_READ, bytearray())
                socks.append(sock)
            busy = []
            while len(busy) < 6:
                events = selector.select(TIMEOUT)
                assert events, f"only {len(busy)} answers of 503"
                for key, _ in events:
                    chunk = key.fileobj.recv(65536)
                    key.data.extend(chunk)
                    if not chunk:
                        selector.unregister(key.fileobj)
                        response = parse_response(bytes(key.data))
                        assert response.status == 503, response.raw
                        busy.append(error(response, 503))
        assert set(busy) == {"too many password checks waiting; try again shortly"}
    finally:
        for sock in socks:
            sock.close()
        server.stop()


def test_a_login_publishes_only_to_its_own_ids(guarded):
    poll = guarded.listen("alice_room")
    body = answer(call(guarded, "POST", "/publish", {"ids": ["alice_room", "bob_room"], "data": "hi"},
                       login=("alice", "secret")))
    assert list(body["ids"]) == ["alice_room"] and body["skipped"] == ["bob_room"]
    assert wait_parts(poll.response())[0]["data"] == "hi"
    reason = error(call(guarded, "POST", "/publish", {"ids": ["bob_room"], "data": "hi"},
                        login=("alice", "secret")), 403)
    assert reason == "login alice may publish only to ids starting with alice_; nothing published"


def test_a_login_sees_only_its_own_ids_online_and_in_watch(guarded, cid):
    start = answer(call(guarded, "GET", "/watch", login=("bob", "b0b")))["pos"]
    guarded.listen(f"alice_{cid}seen")
    guarded.listen(f"bob_{cid}seen")
    alice = ("alice", "secret")
    assert answer(call(guarded, "GET", f"/online?prefix=alice_{cid}&prefix=bob_{cid}", login=alice)) == \
        {"online": {f"alice_{cid}seen": 1}}
    # No prefix means nothing, as in the old protocol.
    assert answer(call(guarded, "GET", "/online", login=alice)) == {"online": {}}
    events = answer(call(guarded, "GET", f"/watch?pos={start}&prefix=alice_{cid}&prefix=bob_{cid}",
                         login=alice))["events"]
    assert [event["id"] for event in events] == [f"alice_{cid}seen"]
    assert answer(call(guarded, "GET", f"/watch?pos={start}", login=alice))["events"] == []


def test_the_readme_curl_commands_run_as_pasted(tmp_path):
    import shutil
    import subprocess

    from test_client import readme_snippet

    if shutil.which("curl") is None:
        pytest.skip("no curl")
    users = write_users_file(tmp_path / "users.htpasswd", {"alice": "secret"}, anonymous=True)
    server = start_server(write_config(tmp_path / "realplexor.toml", USERS_FILE=str(users)))
    try:
        script = readme_snippet("sh", "## Monitoring and the JSON API").replace("10010", str(server.in_port))
        result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert lines[:3] == ["ok", "ready", "realplexor_publishes_total 0.0"]
        answers = [json.loads(line) for line in lines[3:]]
        assert [sorted(answer) for answer in answers] == [["ids"], ["ids"], ["online"], ["events", "pos"],
                                                          ["events", "pos"], ["online"]]
        assert answers[1]["ids"]["Alpha"] == "1732486800.5"
    finally:
        server.stop()
