"""The JSON API's requests and answers without I/O."""
from __future__ import annotations

import json
from decimal import Decimal

import pytest

from realplexor.inhttp import ApiError
from realplexor.jsonapi import online, parse_online, parse_publish, parse_watch, published, watch


def test_publish_to_a_list_of_ids():
    publish = parse_publish(b'{"ids": ["Alpha", "Beta"], "data": {"text": "hi"}}')
    assert publish.targets == (("Alpha", None, None), ("Beta", None, None))
    assert publish.data == b'{"text":"hi"}'
    assert publish.limiters == frozenset()


def test_publish_with_cursors_and_limiters():
    publish = parse_publish(b'{"ids": {"Alpha": "10.5", "Beta": null}, "data": null, "limit_to": ["f1", "f2"]}')
    assert publish.targets == (("Alpha", Decimal("10.5"), "10.5"), ("Beta", None, None))
    assert publish.data == b"null"
    assert publish.limiters == frozenset({"f1", "f2"})


def test_published_data_keeps_its_numbers_and_text():
    body = '{"ids": ["a"], "data": [1.50, 1e400, %s, "é\\ud800", "\\u00e9"]}' % ("9" * 5000)
    data = parse_publish(body.encode()).data
    assert data == ('[1.50,1E+400,%s,"\\u00e9\\ud800","\\u00e9"]' % ("9" * 5000)).encode()
    assert parse_publish('{"ids": ["a"], "data": "é"}'.encode()).data == '"é"'.encode()


@pytest.mark.parametrize("body, reason", [
    (b"{", "not valid JSON"),
    (b"NaN", "not valid JSON"),
    (b'{"ids": ["a"], "data": NaN}', "not valid JSON"),
    (b"\xff", "UTF-8"),
    (b"[" * 100000 + b"]" * 100000, "nest"),
    (b'["a"]', "must be a JSON object"),
    (b'{"ids": ["a"]}', "data is missing"),
    (b'{"data": 1}', "ids is missing"),
    (b'{"ids": [], "data": 1}', "ids is empty"),
    (b'{"ids": {}, "data": 1}', "ids is empty"),
    (b'{"ids": "a", "data": 1}', "ids must be a list"),
    (b'{"ids": ["a", "b-c"], "data": 1}', "'b-c' is not a channel id"),
    (b'{"ids": ["a", 5], "data": 1}', "ids: 5 is not a channel id"),
    (b'{"ids": {"a": 5}, "data": 1}', "the cursor of a must be a string"),
    (b'{"ids": {"a": "1e5"}, "data": 1}', "the cursor of a must be a string"),
    (b'{"ids": {"": "1"}, "data": 1}', "'' is not a channel id"),
    (b'{"ids": ["a"], "data": 1, "limit_to": "f"}', "limit_to must be a list"),
    (b'{"ids": ["a"], "data": 1, "limit_to": ["f g"]}', "limit_to: 'f g' is not a channel id"),
    (b'{"ids": ["a"], "data": 1, "limit": ["f"]}', "unknown field 'limit'"),
])
def test_bad_publishes_are_a_400_naming_the_fault(body, reason):
    with pytest.raises(ApiError) as caught:
        parse_publish(body)
    assert caught.value.status == 400
    assert reason in caught.value.reason
    assert "\n" not in caught.value.reason


def test_online_and_watch_queries():
    assert parse_online("") == []
    assert parse_online("prefix=a&prefix=b_") == ["a", "b_"]
    assert parse_watch("") == (None, [])
    assert parse_watch("pos=0&prefix=a") == (None, ["a"])
    assert parse_watch("prefix=a&pos=12") == (12, ["a"])


@pytest.mark.parametrize("parse, query, reason", [
    (parse_online, "prefix=", "is not the start of a channel id"),
    (parse_online, "prefix=a-b", "is not the start of a channel id"),
    (parse_online, "prefix=%ff", "malformed query string"),
    (parse_online, "prefixes=a", "unknown parameter 'prefixes'"),
    (parse_watch, "pos=-1", "pos must be a whole number"),
    (parse_watch, "pos=abc", "pos must be a whole number"),
    (parse_watch, "pos=" + "9" * 19, "pos must be a whole number"),
    (parse_watch, "pos=1&pos=2", "more than once"),
    (parse_watch, "since=1", "unknown parameter"),
])
def test_bad_queries_are_a_400(parse, query, reason):
    with pytest.raises(ApiError) as caught:
        parse(query)
    assert caught.value.status == 400 and reason in caught.value.reason


def test_answers():
    assert published([("a", "1.5")]) == {"ids": {"a": "1.5"}}
    assert published([("a", "1.5")], ["b"]) == {"ids": {"a": "1.5"}, "skipped": ["b"]}
    assert online([("a", 2), ("b", 0)]) == {"online": {"a": 2, "b": 0}}
    assert json.dumps(watch([("online", 12, "a")], 13)) == \
        '{"events": [{"event": "online", "pos": 12, "id": "a"}], "pos": 13}'
