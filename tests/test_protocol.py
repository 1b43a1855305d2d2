"""Protocol parsing and rendering, with plain bytes and no sockets.

IN-line requests live as files under ``requests/in``: each ``NNN_name.http``
(escapes ``\\r`` and ``\\n`` stand for those bytes; real line breaks are
only for reading) has a ``NNN_name.json`` beside it with what the parser
must make of it. Adding a case is adding two files.
"""
from __future__ import annotations

import json
import tracemalloc
from decimal import Decimal
from pathlib import Path

import pytest
import simplejson

from realplexor.protocol import (Identifier, InRequestBuffer, ProtocolError, find_identifier,
                                 parse_identifier, parse_in_request, parse_wait_request,
                                 render_in_reply, render_online, render_wait_body,
                                 render_wait_body_one, render_watch)

REQUESTS = Path(__file__).parent / "requests" / "in"


def load_request(path: Path) -> bytes:
    text = path.read_text().replace("\n", "")
    return text.replace("\\r", "\r").replace("\\n", "\n").encode()


def cases(kind: str):
    return [pytest.param(path, id=path.stem) for path in sorted((REQUESTS / kind).glob("*.http"))]


@pytest.mark.parametrize("path", cases("valid"))
def test_valid_in_request(path):
    expected = json.loads(path.with_suffix(".json").read_text())
    raw = load_request(path)
    request = parse_in_request(raw, eof=expected.get("eof", False))
    assert request is not None
    ident = request.identifier
    assert (ident.login, ident.password) == (expected.get("login"), expected.get("password"))
    assert request.command == expected.get("command")
    if request.command:
        assert list(request.args) == expected["args"]
    else:
        assert [[i.id, i.cursor_text] for i in ident.targets] == expected["targets"]
        assert sorted(ident.limiters) == sorted(expected.get("limiters", []))
        assert request.data == expected["data"].encode()
    if not expected.get("eof") and expected.get("prefix_check", True):
        for end in range(len(raw)):
            assert parse_in_request(raw[:end], eof=False) is None, raw[:end]


@pytest.mark.parametrize("path", cases("invalid"))
def test_invalid_in_request(path):
    expected = json.loads(path.with_suffix(".json").read_text())
    with pytest.raises(ProtocolError) as caught:
        parse_in_request(load_request(path), eof=expected.get("eof", False))
    assert caught.value.status == expected["status"]
    assert expected["reason"] in caught.value.reason
    assert "\n" not in caught.value.reason


def test_in_request_waits_for_half_close_without_content_length():
    raw = b'identifier=a\n\n"data"'
    assert parse_in_request(raw, eof=False) is None
    assert parse_in_request(raw, eof=True).data == b'"data"'


def test_custom_marker_word():
    request = parse_in_request(b"X-Realplexor: ident=a,b\r\n\r\n1", eof=True, marker="ident")
    assert [i.id for i in request.identifier.targets] == ["a", "b"]
    assert parse_in_request(b"X-Realplexor: identifier=a\r\n\r\n1", eof=True, marker="ident") \
        .identifier == Identifier()


def test_parse_identifier_items():
    ident = parse_identifier("user:secret@10:abc,def,*ghi,1.5:jk,bad!,:x,7:")
    assert (ident.login, ident.password) == ("user", "secret")
    assert [(i.id, i.cursor, i.limiter) for i in ident.items] == [
        ("abc", Decimal(10), False), ("def", None, False), ("ghi", None, True),
        ("jk", Decimal("1.5"), False)]
    assert ident.limiters == frozenset({"ghi"})
    assert [i.id for i in ident.targets] == ["abc", "def", "jk"]


def test_password_may_contain_colons_and_at_signs():
    ident = parse_identifier("user:p:a@ss@abc")
    assert (ident.login, ident.password, ident.items[0].id) == ("user", "p:a@ss", "abc")


def test_find_identifier_needs_a_word_boundary():
    assert find_identifier("GET /?xidentifier=a&identifier=b,c HTTP/1.1") == "b,c"
    assert find_identifier("nothing") is None


def test_wait_request_pages_and_ids():
    assert parse_wait_request("/?identifier=IFRAME", "", "identifier", "IFRAME", "SCRIPT").page == "IFRAME"
    assert parse_wait_request("/?identifier=SCRIPT&x", "", "identifier", "IFRAME", "SCRIPT").page == "SCRIPT"
    request = parse_wait_request("/?identifier=5:a%2Cb", "", "identifier", "IFRAME", "SCRIPT")
    assert request.identifier.listened() == {"a": Decimal(5), "b": None}
    request = parse_wait_request("/", "identifier=x,*y\n", "identifier", "IFRAME", "SCRIPT")
    assert request.identifier.listened() == {"x": None, "y": None}


@pytest.mark.parametrize("target", ["/?identifier=", "/?identifier=%20", "/?foo=1", "/?identifier=-"])
def test_wait_request_without_ids_is_a_400(target):
    with pytest.raises(ProtocolError) as caught:
        parse_wait_request(target, "", "identifier", "IFRAME", "SCRIPT")
    assert caught.value.status == 400


def test_render_wait_body_is_json_with_data_as_is():
    body = render_wait_body([([("a", "1.5"), ("b", "1.5")], b'{"x": [1, 2]}'), ([("a", "2")], b'"s"')])
    assert b'{"x": [1, 2]}' in body
    assert simplejson.loads(body) == [
        {"ids": {"a": "1.5", "b": "1.5"}, "data": {"x": [1, 2]}},
        {"ids": {"a": "2"}, "data": "s"}]


def test_render_in_reply_has_exact_content_length():
    reply = render_in_reply(200, "a 1\nb 2\n")
    head, body = reply.split(b"\r\n\r\n")
    assert head.split(b"\r\n")[0] == b"HTTP/1.0 200 OK"
    assert b"Content-Type: text/plain" in head
    assert b"Content-Length: 8" in head and body == b"a 1\nb 2\n"
    assert b"Content-Length: 3\r\n" in render_in_reply(200, "é\n")


def test_render_online_and_watch():
    assert render_online([("a", 2), ("b", 0)]) == "a 2\nb 0\n"
    assert render_watch([("online", 3, "a"), ("FAKE", 7, "FAKE")]) == "online 3:a\nFAKE 7:FAKE\n"


def test_one_message_body_renders_as_a_list_of_one_part():
    ids = [("a", "1.5"), ("b", "2")]
    assert render_wait_body_one(ids, b'{"x":1}') == render_wait_body([(ids, b'{"x":1}')])
    assert json.loads(render_wait_body_one(ids, b"[1]")) == [{"ids": {"a": "1.5", "b": "2"}, "data": [1]}]


@pytest.mark.parametrize("blank", [b"\n\n", b"\r\n\r\n", b"\n\r\n", b"\r\n\n"])
def test_head_ends_at_the_first_blank_line_whatever_the_line_ends(blank):
    request = parse_in_request(b"X-Realplexor: identifier=abc" + blank + b'"x"', True)
    assert request.identifier.items[0].id == "abc" and request.data == b'"x"'
    with pytest.raises(ProtocolError):   # the second blank line is part of the data
        parse_in_request(b"X-Realplexor: identifier=abc" + blank + b'"x"' + blank + b'"y"', True)
    assert parse_in_request(b"X-Realplexor: identifier=abc" + blank + b'"x"' + blank, True).data == b'"x"'


def test_parsing_many_distinct_long_identifiers_holds_no_memory():
    # Browsers re-poll with ever new cursors, and anyone may send long lists.
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for n in range(200):
            value = ",".join(f"{n}.{i}:c{i}" for i in range(300))
            parse_wait_request(f"/?identifier={value}", "", "identifier", "IFRAME", "SCRIPT")
            parse_in_request(f"X-Realplexor: identifier={value}\n\n1".encode(), True)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held < 2_000_000


def feed_bytewise(raw: bytes) -> list[int]:
    """Feed ``raw`` one byte at a time; the lengths at which parsing was worth it."""
    buffer = InRequestBuffer()
    worth = []
    for i in range(len(raw)):
        buffer.add(raw[i:i + 1])
        if buffer.worth_parsing(eof=False):
            worth.append(len(buffer))
    assert bytes(buffer.data) == raw
    return worth


def test_buffer_asks_for_a_parse_at_the_head_end_and_when_the_body_is_whole():
    head = b"POST / HTTP/1.1\r\nContent-Length: 7\r\nX-Realplexor: identifier=abc\r\n\r\n"
    raw = head + b'{"m":1}'
    assert feed_bytewise(raw) == [len(head), len(raw)]
    assert parse_in_request(raw, False).data == b'{"m":1}'


def test_buffer_without_content_length_waits_for_the_end_after_the_head():
    head = b"X-Realplexor: identifier=abc\n\n"
    assert feed_bytewise(head + b'"data"') == [len(head)]
    buffer = InRequestBuffer()
    buffer.add(head + b'"data"')
    assert buffer.worth_parsing(eof=True)


@pytest.mark.parametrize("cut", range(1, 4))
def test_buffer_finds_a_blank_line_cut_in_two(cut):
    head = b"ONLINE\r\n\r\n"
    buffer = InRequestBuffer()
    buffer.add(head[:len(head) - 4 + cut])
    assert not buffer.worth_parsing(eof=False)
    buffer.add(head[len(head) - 4 + cut:])
    assert buffer.worth_parsing(eof=False)
    assert parse_in_request(buffer.data, False).command == "ONLINE"
