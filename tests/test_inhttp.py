"""The IN line's HTTP routes without I/O: which requests are theirs, parsing, replies."""
from __future__ import annotations

import base64

import pytest

from realplexor.inhttp import (ApiError, HttpRequest, basic_credentials, check_method, is_route,
                               parse_http_request, render_api_error, render_json, render_reply)

from test_protocol import REQUESTS, load_request


@pytest.mark.parametrize("path", sorted(REQUESTS.glob("*/*.http")), ids=lambda path: path.stem)
def test_no_old_request_is_taken_for_a_route(path):
    assert not is_route(load_request(path))


@pytest.mark.parametrize("data", [
    b"GET /metrics HTTP/1.1\r\n",
    b"GET /health HTTP/1.0\r\nHost: x\r\n\r\n",
    b"HEAD /ready HTTP/1.1\n\n",
    b"POST /publish HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}",
    b"GET /online?prefix=a&prefix=b HTTP/1.1\r\n",
    b"GET /watch?pos=10 HTTP/1.1\r\n",
    b"DELETE /watch HTTP/1.1\r\n",
    # The old header in the body is the body's business.
    b"POST /publish HTTP/1.1\r\nContent-Length: 20\r\n\r\n\nX-Realplexor: a=b\r\n",
])
def test_route_requests(data):
    assert is_route(data)


@pytest.mark.parametrize("data", [
    b"POST / HTTP/1.1\r\nX-Realplexor: identifier=metrics\r\n\r\n1",
    b"GET /?identifier=metrics HTTP/1.1\r\n\r\n",
    b"GET /metrics/ HTTP/1.1\r\n\r\n",
    b"GET /metricsx HTTP/1.1\r\n\r\n",
    b"POST /publishing HTTP/1.1\r\n\r\n",
    b"get /metrics HTTP/1.1\r\n\r\n",
    b"GET /metrics HTTP/2.0\r\n\r\n",
    b"GET /metrics",
    b"GET /metrics HTTP/1.1",
    b"GET  /metrics HTTP/1.1\r\n\r\n",
    b"X-Realplexor: identifier=publish\r\n\r\n1",
    b"ONLINE /online\n\n",
    # An old client that posts to a path of its own, with the old header, stays old.
    b"POST /publish HTTP/1.1\r\nHost: x\r\nX-Realplexor: identifier=a\r\nContent-Length: 1\r\n\r\n1",
    b"POST /publish HTTP/1.1\nx-realplexor:identifier=a\n\n1",
])
def test_other_requests_keep_the_old_protocol(data):
    assert not is_route(data)


def test_a_request_is_parsed_once_it_is_whole():
    raw = b"POST /publish?x=1 HTTP/1.1\r\nHost: h\r\nContent-Length: 9\r\nX-Two: a\r\nx-two: b\r\n\r\n{\"a\": 1}\n"
    for end in range(len(raw)):
        assert parse_http_request(raw[:end], eof=False) is None
    request = parse_http_request(raw, eof=False)
    assert request == HttpRequest("POST", "/publish", "x=1", {"host": "h", "content-length": "9", "x-two": "b"},
                                  b'{"a": 1}\n')
    # Bytes after the request are not its own.
    assert parse_http_request(raw + b"GARBAGE\r\n\r\n", eof=True) == request


def test_a_request_without_a_body_ends_with_its_head():
    request = parse_http_request(b"GET /health HTTP/1.1\r\n\r\n", eof=False)
    assert (request.method, request.path, request.query, request.body) == ("GET", "/health", "", b"")


@pytest.mark.parametrize("data, eof, status, reason", [
    (b"POST /publish HTTP/1.1\r\nContent-Length: 10\r\n\r\n{}", True, 400, "after 2 of 10 body bytes"),
    (b"GET /health HTTP/1.1\r\nHost: x\r\n", True, 400, "before its blank line"),
    (b"POST /publish HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", False, 411, "Content-Length"),
    (b"POST /publish HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n{}", False, 400, "malformed"),
    (b"POST /publish HTTP/1.1\r\nContent-Length: -1\r\n\r\n{}", False, 400, "malformed"),
    (b"GET /health HTTP/1.1\r\nBad Name: x\r\n\r\n", False, 400, "malformed"),
])
def test_requests_that_can_never_be_served(data, eof, status, reason):
    with pytest.raises(ApiError) as caught:
        parse_http_request(data, eof)
    assert caught.value.status == status and reason in caught.value.reason


def _with_authorization(value: str | None) -> HttpRequest:
    return HttpRequest("GET", "/online", "", {} if value is None else {"authorization": value}, b"")


def test_basic_credentials():
    token = base64.b64encode("alice:sé:cret".encode()).decode()
    assert basic_credentials(_with_authorization(f"Basic {token}")) == ("alice", "sé:cret")
    assert basic_credentials(_with_authorization(f"basic  {token} ")) == ("alice", "sé:cret")
    assert basic_credentials(_with_authorization(None)) is None


@pytest.mark.parametrize("value, status", [
    ("Bearer abc", 400),
    ("Basic !!!", 400),
    ("Basic " + base64.b64encode(b"alice").decode(), 400),
    ("Basic " + base64.b64encode(b"\xff:x").decode(), 400),
    ("Basic " + base64.b64encode(b"al-ice:x").decode(), 403),
])
def test_malformed_credentials(value, status):
    with pytest.raises(ApiError) as caught:
        basic_credentials(_with_authorization(value))
    assert caught.value.status == status


def test_a_wrong_method_is_a_405_naming_the_allowed_ones():
    check_method(HttpRequest("HEAD", "/metrics", "", {}, b""))
    with pytest.raises(ApiError) as caught:
        check_method(HttpRequest("GET", "/publish", "", {}, b""))
    assert caught.value.status == 405 and caught.value.headers == (("Allow", "POST"),)


def test_replies_are_http_1_0_with_their_length():
    reply = render_json(200, {"online": {"é": 1}})
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200 OK\r\n")
    assert b"\r\nContent-Length: %d\r\n" % len(body) in head + b"\r\n"
    assert body == '{"online":{"é":1}}\n'.encode()
    assert render_reply(200, b"abc", "text/plain", head_only=True).endswith(b"Content-Length: 3\r\n"
                                                                           b"Cache-Control: no-store\r\n\r\n")
    error = render_api_error(ApiError(401, "who?", (("WWW-Authenticate", 'Basic realm="realplexor"'),)))
    assert error.startswith(b"HTTP/1.0 401 Unauthorized\r\n")
    assert b'\r\nWWW-Authenticate: Basic realm="realplexor"\r\n' in error
    assert error.endswith(b'\r\n\r\n{"error":"who?"}\n')
