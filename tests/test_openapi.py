"""docs/openapi.json against live servers: its examples are sent, the answers checked against it."""
from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import urlencode

import pytest
from jsonschema import Draft202012Validator

from conftest import Response, start_server, write_config, write_users_file
from realplexor.inhttp import ROUTES
from test_routes import call

DOC = json.loads((Path(__file__).resolve().parent.parent / "docs" / "openapi.json").read_text())
OPERATIONS = [(path, method) for path, item in DOC["paths"].items() for method in item]


def follow(node: dict) -> dict:
    """A response or parameter object, following its ``$ref`` within the document."""
    while "$ref" in node:
        target = DOC
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part.replace("~1", "/").replace("~0", "~")]
        node = target
    return node


def validator(schema: dict) -> Draft202012Validator:
    """A validator for ``schema``, whose ``$ref``s point into the document."""
    return Draft202012Validator({**schema, "components": DOC["components"]})


def operation(path: str, method: str) -> dict:
    return DOC["paths"][path][method]


def documented(path: str, method: str, response: Response) -> None:
    """Fail unless ``response`` is one the document gives for this operation, in shape and type."""
    responses = operation(path, method)["responses"]
    assert str(response.status) in responses, (path, method, response.status, response.raw[:300])
    spec = follow(responses[str(response.status)])
    media = response.headers["content-type"].split(";")[0]
    assert media in spec["content"], (path, method, response.status, media)
    value = json.loads(response.body) if media == "application/json" else response.text
    errors = list(validator(spec["content"][media]["schema"]).iter_errors(value))
    assert not errors, (path, method, response.status, value, [e.message for e in errors])
    for name, header in spec.get("headers", {}).items():
        assert not list(validator(header["schema"]).iter_errors(response.headers[name.lower()]))


def examples(media: dict) -> list:
    found = [example["value"] for example in media.get("examples", {}).values()]
    return found + ([media["example"]] if "example" in media else [])


def test_the_document_names_every_route_and_method():
    assert set(DOC["paths"]) == set(ROUTES)
    for path, item in DOC["paths"].items():
        assert {method.upper() for method in item} == set(ROUTES[path]) - {"HEAD"}, path


def test_every_schema_is_valid_and_every_example_fits_its_schema():
    for name, schema in DOC["components"]["schemas"].items():
        Draft202012Validator.check_schema(schema)
    checked = 0
    for path, method in OPERATIONS:
        op = operation(path, method)
        medias = [op["requestBody"]["content"]] if "requestBody" in op else []
        medias += [follow(response)["content"] for response in op["responses"].values()]
        for content in medias:
            for media in content.values():
                for value in examples(media):
                    errors = list(validator(media["schema"]).iter_errors(value))
                    assert not errors, (path, method, value, [e.message for e in errors])
                    checked += 1
        for parameter in map(follow, op.get("parameters", [])):
            assert not list(validator(parameter["schema"]).iter_errors(parameter["example"]))
    assert checked >= 20


def query(op: dict) -> str:
    """A query string made of the operation's parameter examples."""
    pairs = []
    for parameter in map(follow, op.get("parameters", [])):
        values = parameter["example"] if isinstance(parameter["example"], list) else [parameter["example"]]
        pairs += [(parameter["name"], value) for value in values]
    return "?" + urlencode(pairs) if pairs else ""


def test_the_documented_examples_get_documented_answers(server_factory):
    server = server_factory(OFFLINE_TIMEOUT=30)
    # Listeners first, so that ONLINE and WATCH have something to say.
    polls = [server.listen("Alpha"), server.listen("Beta,friends")]
    sent = 0
    for path, method in sorted(OPERATIONS, key=lambda pair: pair[0] != "/publish"):
        op = operation(path, method)
        if "requestBody" in op:
            for value in examples(op["requestBody"]["content"]["application/json"]):
                response = call(server, method.upper(), path, value)
                assert response.status == 200, response.raw
                documented(path, method, response)
                sent += 1
        else:
            response = call(server, method.upper(), path + query(op))
            assert response.status == 200, response.raw
            documented(path, method, response)
            sent += 1
    assert sent == 3 + 5
    assert [part["data"] for poll in polls for part in json.loads(poll.response().body[3:])] == \
        [{"text": "hello"}, {"text": "hello"}]


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    base = tmp_path_factory.mktemp("openapi")
    users = write_users_file(base / "users.htpasswd", {"alice": "secret"})
    running = start_server(write_config(base / "realplexor.toml", USERS_FILE=str(users), IN_MAXLEN=2000))
    yield running
    running.stop()


ALICE = ("alice", "secret")
ERRORS = [
    ("/publish", "post", dict(body=b'{"ids": ["alice_a"]', login=ALICE), 400),
    ("/publish", "post", dict(body={"ids": ["alice_a"], "data": 1}), 401),
    ("/publish", "post", dict(body={"ids": ["alice_a"], "data": 1}, login=("alice", "nope")), 403),
    ("/publish", "post", dict(body={"ids": ["bob_a"], "data": 1}, login=ALICE), 403),
    ("/publish", "post", dict(login=ALICE), 411),
    ("/publish", "post", dict(body={"ids": ["alice_a"], "data": "x" * 3000}, login=ALICE), 413),
    ("/online", "get", dict(target="/online?prefix=a-b", login=ALICE), 400),
    ("/online", "get", dict(), 401),
    ("/watch", "get", dict(target="/watch?pos=x", login=ALICE), 400),
    ("/watch", "get", dict(login=("bob", "x")), 403),
    ("/metrics", "get", dict(), 401),
]


@pytest.mark.parametrize("path, method, request_, status", ERRORS,
                         ids=[f"{method} {path} {status}" for path, method, _, status in ERRORS])
def test_errors_are_documented_as_they_are_answered(guarded, path, method, request_, status):
    request_ = dict(request_)
    target = request_.pop("target", path)
    response = call(guarded, method.upper(), target, **request_)
    assert response.status == status, response.raw
    documented(path, method, response)


def test_metrics_off_is_documented(server_factory):
    response = call(server_factory(METRICS=False), "GET", "/metrics")
    assert response.status == 404
    documented("/metrics", "get", response)
