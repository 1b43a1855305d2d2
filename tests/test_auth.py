"""Logins and the ids they may touch.

A client logged in as ``bob`` may publish to, and see, only ids that
start with ``bob_``: ``bob_`` itself (an id with an empty suffix) is his,
``bob``, ``bobby_x``, ``BOB_x`` and ``xbob_y`` are not. Checked for the
principal alone, then over real sockets for every shape of publish (one
id, several, several with limiters, limiters alone), sent raw, through
the Python client and through the PHP client, on both WAIT engines.

Whether a listener was reached is decided without waiting: after bob's
publish a guest publishes a marker to every listened id, and each poll
answers with whichever of the two came first.
"""
from __future__ import annotations

import json
import shutil

import pytest

from conftest import start_server, wait_parts, write_config, write_users_file
from realplexor.auth import GUEST, Principal
from realplexor.client import Realplexor, RealplexorError

OWN = ["bob_x", "bob_"]
NEAR_MISSES = ["bob", "bobby_x", "BOB_x", "xbob_y"]
IDS = OWN + NEAR_MISSES
LIMITER = "bob_f"
PASSWORD = "pw"
REFUSED = "login bob may publish only to ids starting with bob_; nothing published"
NO_TARGET = "no channel ids to publish to"


@pytest.mark.parametrize("channel, his", [(channel, True) for channel in OWN + ["bob_bob", "bob__"]]
                         + [(channel, False) for channel in NEAR_MISSES + ["bo", "", "_bob_x"]])
def test_a_login_touches_exactly_the_ids_under_login_underscore(channel, his):
    assert Principal("bob").prefix == "bob_"
    assert Principal("bob").may_touch(channel) is his
    assert GUEST.may_touch(channel)


@pytest.fixture(scope="module", params=["wsgi", "lean"])
def server(request, tmp_path_factory):
    """A server that knows ``bob`` and lets guests in, on each WAIT engine."""
    base = tmp_path_factory.mktemp("rplbob")
    users = write_users_file(base / "users.htpasswd", {"bob": PASSWORD}, anonymous=True)
    running = start_server(write_config(base / "realplexor.toml", USERS_FILE=str(users),
                                        WAIT_ENGINE=request.param, OFFLINE_TIMEOUT=1, WAIT_TIMEOUT=30))
    yield running
    running.stop()


# -- what each publish shape reaches --------------------------------------------

# (targets, limiters): the shapes of a publish.
SHAPES = {
    **{f"one {channel}": ([channel], []) for channel in IDS},
    "several": (IDS, []),
    "several, none his": (NEAR_MISSES, []),
    "several with a limiter": (IDS, [LIMITER]),
    "several with a limiter, none his": (NEAR_MISSES, [LIMITER]),
    "limiters alone": ([], ["bob_x", LIMITER]),
}


def expected_status(targets: list[str]) -> tuple[int, str]:
    if not targets:
        return 400, NO_TARGET
    if not any(channel in OWN for channel in targets):
        return 403, REFUSED
    return 200, ""


def send_raw(server, targets, limiters, data):
    items = ",".join(targets + ["*" + limiter for limiter in limiters])
    response = server.in_http(f"bob:{PASSWORD}@{items}", json.dumps(data))
    return response.status, response.text


def send_python(server, targets, limiters, data):
    rpl = Realplexor("127.0.0.1", server.in_port, timeout=10)
    rpl.logon("bob", PASSWORD)
    try:
        rpl.send(targets, data, limiters or None)
    except RealplexorError as error:
        return error.status, error.reason
    return 200, ""


def send_php(server, targets, limiters, data):
    from test_php_client import PHP, PhpException, php

    if PHP is None:
        pytest.skip("php-cli is not installed (Debian: php-cli)")
    try:
        php("$r = new Dklab_Realplexor('127.0.0.1', $a['port']); $r->logon('bob', $a['password']);"
            "$r->send($a['targets'], $a['data'], $a['limiters'] ?: null);",
            port=server.in_port, password=PASSWORD, targets=targets, limiters=limiters, data=data)
    except PhpException as error:
        status = int(str(error).split("HTTP/1.0 ")[1].split()[0]) if "HTTP/1.0 " in str(error) else 0
        return status, str(error)
    return 200, ""


SENDERS = {"raw": send_raw, "python": send_python, "php": send_php}


@pytest.mark.parametrize("sender", list(SENDERS))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_a_publish_by_bob_reaches_only_his_ids(server, shape, sender):
    targets, limiters = SHAPES[shape]
    polls = {}
    for channel in IDS:
        polls[channel] = server.listen(channel)
        polls[f"{channel}+{LIMITER}"] = server.listen(f"{channel},{LIMITER}")
    polls[LIMITER] = server.listen(LIMITER)
    polls["all"] = server.listen(",".join(IDS))

    status, reason = SENDERS[sender](server, targets, limiters, {"from": "bob"})
    want_status, want_reason = expected_status(targets)
    assert status == want_status, reason
    assert want_reason in reason
    server.publish(",".join(IDS + [LIMITER]), '"marker"')

    reached = set()
    heard_on = {}
    for name, poll in polls.items():
        first = wait_parts(poll.response())[0]
        if first["data"] == {"from": "bob"}:
            reached.add(name)
            heard_on[name] = sorted(first["ids"])
        else:
            assert first["data"] == "marker", (name, first)
        poll.close()
    his = [channel for channel in targets if channel in OWN] if want_status == 200 else []
    expected = {f"{channel}+{LIMITER}" for channel in his}
    if not limiters:
        expected |= set(his) | ({"all"} if his else set())
    assert reached == expected
    for name in expected:
        # A listener hears bob's message only on his ids: the all-ids poll gets one part naming them.
        assert heard_on[name] == (sorted(his) if name == "all" else [name.split("+")[0]])


# -- what bob may see -----------------------------------------------------------

def test_online_and_watch_show_bob_only_his_ids(server):
    poll = server.listen(",".join(IDS))
    try:
        def online(prefixes: str) -> dict[str, int]:
            body = server.command(f"ONLINE {prefixes}".strip(), identifier=f"bob:{PASSWORD}@").text
            return {line.split()[0]: int(line.split()[1]) for line in body.splitlines()}

        mine = online("bob_")
        assert set(OWN) <= set(mine) and all(channel.startswith("bob_") for channel in mine)
        assert online("bob") == {} and online("") == {} and online("BOB_") == {} and online("x") == {}
        assert online("bob_x bobby") == {"bob_x": 1}
        everyone = server.online("")
        assert set(IDS) <= set(everyone)

        def watch(prefixes: str) -> set[str]:
            # From the first position on: every id that went online or offline so far.
            body = server.command(f"WATCH 1 {prefixes}".strip(), identifier=f"bob:{PASSWORD}@").text
            return {line.split(":", 1)[1] for line in body.splitlines()}

        assert set(OWN) <= watch("bob_") <= {"bob_", "bob_x", LIMITER}
        assert set(IDS) <= {line.split(":", 1)[1] for line in server.command("WATCH 1").text.splitlines()}
        assert watch("bob") == set() and watch("") == set() and watch("xbob") == set()
        rpl = Realplexor("127.0.0.1", server.in_port, timeout=10)
        rpl.logon("bob", PASSWORD)
        assert set(rpl.online(["bob"])) == set()
        assert set(OWN) <= set(rpl.online(["bob_"])) <= {"bob_", "bob_x", LIMITER}
    finally:
        poll.close()


@pytest.mark.skipif(shutil.which("php") is None, reason="php-cli is not installed (Debian: php-cli)")
def test_php_client_online_with_a_near_miss_prefix_sees_nothing(server):
    from test_php_client import php

    poll = server.listen(",".join(IDS))
    try:
        seen = php("$r = new Dklab_Realplexor('127.0.0.1', $a['port']); $r->logon('bob', $a['password']);"
                   "return [$r->cmdOnline(['bob']), $r->cmdOnline(['bob_'])];",
                   port=server.in_port, password=PASSWORD)
        assert seen[0] == []
        assert set(OWN) <= set(seen[1]) <= {"bob_", "bob_x", LIMITER}
    finally:
        poll.close()
