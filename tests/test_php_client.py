"""The PHP client (contrib/php/Dklab/Realplexor.php) against a real server.

Each test runs a PHP closure through tests/php/harness.php and checks what
a user sees: WAIT listeners receiving the data, ONLINE/WATCH answers, and
exception messages.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import free_port, wait_parts

PHP = shutil.which("php")
HARNESS = Path(__file__).resolve().parent / "php" / "harness.php"

pytestmark = pytest.mark.skipif(PHP is None, reason="php-cli is not installed (Debian: php-cli)")


class PhpException(Exception):
    """A Dklab_Realplexor_Exception thrown in the PHP run."""


def php(body: str, ini: dict[str, str] | None = None, **args):
    """Run ``function ($a) { BODY }`` with ``$a`` = ``args``; its return value.

    Raises PhpException with the message of a Dklab_Realplexor_Exception.
    """
    settings = [f"-d{name}={value}" for name, value in (ini or {}).items()]
    code = f"require {json.dumps(str(HARNESS))}; rpl_run(function ($a) {{ {body} }});"
    proc = subprocess.run([PHP, *settings, "-r", code], capture_output=True, text=True, timeout=30,
                          env={**os.environ, "RPL_ARGS": json.dumps(args)})
    assert proc.returncode == 0, f"php failed:\n{proc.stdout}\n{proc.stderr}"
    outcome = json.loads(proc.stdout)
    if "exception" in outcome:
        assert outcome["exception"] == "Dklab_Realplexor_Exception"
        raise PhpException(outcome["message"])
    return outcome["result"]


NEW = "$r = new Dklab_Realplexor('127.0.0.1', $a['port'], $a['ns'] ?? null);"


def test_send_to_a_list_of_ids_reaches_listeners(server, cid):
    alpha = server.listen(f"{cid}Alpha")
    beta = server.listen(f"{cid}Beta")
    php(NEW + "$r->send(['Alpha', 'Beta'], ['text' => 'héllo', 'n' => [1, 2.5, null, true]]);",
        port=server.in_port, ns=cid)
    for poll, channel in ((alpha, "Alpha"), (beta, "Beta")):
        parts = wait_parts(poll.response())
        assert [p["data"] for p in parts] == [{"text": "héllo", "n": [1, 2.5, None, True]}]
        assert list(parts[0]["ids"]) == [f"{cid}{channel}"]


def test_one_send_to_several_listened_ids_is_one_part(server, cid):
    poll = server.listen(f"{cid}a,{cid}b")
    php(NEW + "$r->send([$a['cid'] . 'a', $a['cid'] . 'b'], 'both');", port=server.in_port, cid=cid)
    parts = wait_parts(poll.response())
    assert len(parts) == 1 and parts[0]["data"] == "both"
    assert parts[0]["ids"][f"{cid}a"] == parts[0]["ids"][f"{cid}b"]


def test_send_to_a_single_id_string(server, cid):
    poll = server.listen(f"{cid}one")
    php(NEW + "$r->send('one', 42);", port=server.in_port, ns=cid)
    assert [p["data"] for p in wait_parts(poll.response())] == [42]


def test_send_with_cursors_keeps_them_exactly(server, cid):
    php(NEW + "$r->send(['a' => '1732486800.12345678901234'], 'x');"
              "$r->send(['a' => '1732486800.12345678901235'], 'y');"
              "$r->send(['b' => 7], 'seven');",
        port=server.in_port, ns=cid)
    parts = wait_parts(server.poll(f"identifier=1732486800.12345678901234:{cid}a").response())
    assert [(p["data"], p["ids"]) for p in parts] == [("y", {f"{cid}a": "1732486800.12345678901235"})]
    parts = wait_parts(server.poll(f"identifier=0:{cid}b").response())
    assert [(p["data"], p["ids"]) for p in parts] == [("seven", {f"{cid}b": "7"})]


def test_mixed_ids_and_ids_to_cursors(server, cid):
    php(NEW + "$r->send(['plain', 'timed' => 5, 'free' => null], 'mixed');", port=server.in_port, ns=cid)
    parts = wait_parts(server.poll(f"identifier=0:{cid}plain,0:{cid}timed,0:{cid}free").response())
    ids = {}
    for part in parts:
        assert part["data"] == "mixed"
        ids.update(part["ids"])
    assert ids[f"{cid}timed"] == "5"
    assert set(ids) == {f"{cid}plain", f"{cid}timed", f"{cid}free"}
    assert ids[f"{cid}plain"] == ids[f"{cid}free"] != "5"


def test_integer_keys_are_list_positions_even_with_gaps(server, cid):
    # array_unique() and array_filter() leave gaps; the values are still ids.
    poll = server.listen(f"{cid}7,{cid}9")
    php(NEW + "$r->send(array_unique(['7', '7', '9']), 'dedup');", port=server.in_port, ns=cid)
    parts = wait_parts(poll.response())
    assert len(parts) == 1 and set(parts[0]["ids"]) == {f"{cid}7", f"{cid}9"}
    assert float(parts[0]["ids"][f"{cid}7"]) > 1e9


def test_show_only_for_ids_limits_the_listeners(server, cid):
    plain = server.listen(f"{cid}a")
    friend = server.listen(f"{cid}a,{cid}friends")
    php(NEW + "$r->send(['a'], 'secret', ['friends']);", port=server.in_port, ns=cid)
    assert [p["data"] for p in wait_parts(friend.response())] == ["secret"]
    assert not plain.has_ended(0.3)
    php(NEW + "$r->send(['a'], 'public');", port=server.in_port, ns=cid)
    assert [p["data"] for p in wait_parts(plain.response())] == ["public"]


def test_limiter_alone_is_not_a_target(server, cid):
    friends = server.listen(f"{cid}friends")
    php(NEW + "$r->send(['a'], 'secret', ['friends']);", port=server.in_port, ns=cid)
    assert not friends.has_ended(0.3)


def test_cmd_online_strips_the_namespace(server, cid):
    server.listen(f"{cid}Alpha")
    server.listen(f"{cid}Alpha,{cid}Beta")
    server.listen(f"other{cid}x")
    result = php(NEW + "return [$r->cmdOnline(), $r->cmdOnlineWithCounters()];", port=server.in_port, ns=cid)
    assert result == [["Alpha", "Beta"], {"Alpha": 2, "Beta": 1}]


def test_cmd_online_with_prefixes(server, cid):
    server.listen(f"{cid}Alpha,{cid}Beta,{cid}Bravo")
    result = php(NEW + "return [$r->cmdOnline(['B']), $r->cmdOnlineWithCounters('Al'), $r->cmdOnline(['X'])];",
                 port=server.in_port, ns=cid)
    assert result == [["Beta", "Bravo"], {"Alpha": 1}, []]


def test_cmd_online_without_namespace(server, cid):
    server.listen(f"{cid}a")
    result = php("$r = new Dklab_Realplexor('127.0.0.1', $a['port']);"
                 "return [$r->cmdOnline([$a['cid']]), $r->cmdOnline()];", port=server.in_port, cid=cid)
    assert result[0] == [f"{cid}a"]
    assert f"{cid}a" in result[1]


def test_cmd_online_keeps_numeric_ids_as_strings(server, cid):
    server.listen(f"{cid}10")
    assert php(NEW + "return array_map('gettype', $r->cmdOnline());", port=server.in_port, ns=cid) == ["string"]


def test_cmd_watch_reports_online_and_offline(server, cid):
    fake = php(NEW + "return $r->cmdWatch(null);", port=server.in_port, ns=cid)
    assert len(fake) == 1 and fake[0]["event"] == "FAKE" and fake[0]["id"] == "FAKE"
    start = fake[0]["pos"]
    assert isinstance(start, int)
    poll = server.listen(f"{cid}a")
    events = php(NEW + "return $r->cmdWatch($a['pos']);", port=server.in_port, ns=cid, pos=start)
    assert [(e["event"], e["id"]) for e in events] == [("online", "a")]
    assert events[0]["pos"] > start
    poll.close()

    def offline():
        return php(NEW + "return $r->cmdWatch($a['pos']);", port=server.in_port, ns=cid, pos=start)

    events = server.wait_until(lambda: [e for e in offline() if e["event"] == "offline"] and offline())
    assert [(e["event"], e["id"]) for e in events] == [("offline", "a")]


def test_cmd_watch_with_prefixes(server, cid):
    start = php(NEW + "return $r->cmdWatch(null)[0]['pos'];", port=server.in_port, ns=cid)
    server.listen(f"{cid}Alpha,{cid}Beta")
    events = php(NEW + "return $r->cmdWatch($a['pos'], ['B']);", port=server.in_port, ns=cid, pos=start)
    assert [(e["event"], e["id"]) for e in events] == [("online", "Beta")]


@pytest.mark.parametrize("start", ["0", "null", "''", "'x'"])
def test_cmd_watch_without_a_true_position_names_the_current_one(server, cid, start):
    events = php(NEW + f"return $r->cmdWatch({start}, 'a');", port=server.in_port, ns=cid)
    assert len(events) == 1 and events[0]["event"] == "FAKE" and events[0]["id"] == "FAKE"
    assert events[0]["pos"] >= 10


def test_cmd_watch_from_an_old_scripts_first_position(server_factory, cid):
    fresh = server_factory(EVENT_CHAIN_LEN=3)
    new = "$r = new Dklab_Realplexor('127.0.0.1', $a['port'], $a['ns']);"
    assert php(new + "return $r->cmdWatch(0);", port=fresh.in_port, ns=cid) == [
        {"event": "FAKE", "pos": 10, "id": "FAKE"}]
    fresh.listen(",".join(f"{cid}c{n}" for n in range(20)))
    fresh.wait_until(lambda: len(fresh.online(cid)) == 20)
    events = php(new + "return $r->cmdWatch(1);", port=fresh.in_port, ns=cid)
    assert events[-12:] == [{"event": "online", "pos": 11 + n, "id": f"c{n}"} for n in range(8, 20)]


def test_logon_publishes_under_the_login_prefix(auth_server, cid):
    own = auth_server.listen(f"alice_{cid}a")
    foreign = auth_server.listen(f"{cid}a")
    php("$r = new Dklab_Realplexor('127.0.0.1', $a['port']); $r->logon('alice', 'secret');"
        "$r->send(['alice_' . $a['cid'] . 'a', $a['cid'] . 'a'], 'hi');", port=auth_server.in_port, cid=cid)
    assert [p["data"] for p in wait_parts(own.response())] == ["hi"]
    assert not foreign.has_ended(0.3)


def test_logon_with_a_namespace_sees_only_its_ids(auth_server, cid):
    auth_server.listen(f"alice_{cid}a,{cid}b")
    result = php("$r = new Dklab_Realplexor('127.0.0.1', $a['port'], $a['ns']); $r->logon('alice', 'secret');"
                 "return [$r->cmdOnlineWithCounters(), $r->cmdWatch(1)];",
                 port=auth_server.in_port, ns=f"alice_{cid}")
    counters, events = result
    assert counters == {"a": 1}
    assert [(e["event"], e["id"]) for e in events] == [("online", "a")]


@pytest.mark.parametrize("login, password, reason", [
    ("mallory", "secret", "unknown login: mallory"),
    ("alice", "wrong", "invalid password for login: alice"),
    (None, None, "access denied for guest user"),
])
def test_refused_credentials_throw_with_the_servers_reason(auth_server, cid, login, password, reason):
    poll = auth_server.listen(f"alice_{cid}a")
    logon = f"$r->logon('{login}', '{password}');" if login else ""
    with pytest.raises(PhpException) as caught:
        php("$r = new Dklab_Realplexor('127.0.0.1', $a['port']);" + logon +
            "$r->send(['alice_' . $a['cid'] . 'a'], 'x');", port=auth_server.in_port, cid=cid)
    message = str(caught.value)
    assert reason in message
    assert "HTTP/1.0 403 Forbidden" in message
    assert not poll.has_ended(0.3)
    with pytest.raises(PhpException, match=reason):
        php("$r = new Dklab_Realplexor('127.0.0.1', $a['port']);" + logon + "$r->cmdOnline();",
            port=auth_server.in_port)


def test_connection_refused_names_the_address():
    port = free_port()
    with pytest.raises(PhpException) as caught:
        php("$r = new Dklab_Realplexor('127.0.0.1', $a['port']); $r->send('a', 1);", port=port)
    assert f"127.0.0.1:{port}" in str(caught.value)
    assert "refused" in str(caught.value).lower()


def test_custom_identifier_word(server_factory, cid):
    custom = server_factory(IDENTIFIER="rplid")
    poll = custom.poll(f"rplid={cid}a")
    poll.headers_arrived()
    php("$r = new Dklab_Realplexor('127.0.0.1', $a['port'], null, 'rplid'); $r->send($a['id'], 'custom');",
        port=custom.in_port, id=f"{cid}a")
    assert [p["data"] for p in wait_parts(poll.response())] == ["custom"]


@pytest.mark.parametrize("call, message", [
    ("$r->send(['bad-id'], 1);", 'Invalid channel id "bad-id"'),
    ("$r->send(['a' => 'soon'], 1);", 'Invalid cursor "soon"'),
    ("$r->send([], 1);", "No channel ids"),
    ("$r->send('a', NAN);", "Cannot encode the data as JSON"),
    ("$r->send('a', \"\\xff\");", "Cannot encode the data as JSON"),
    ("$r->logon('bad login', 'x');", "Invalid login"),
    ("$r->logon('bob', 'two words');", "Invalid password"),
])
def test_bad_arguments_throw_before_sending(fake_in_line, call, message):
    fake = fake_in_line(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n")
    with pytest.raises(PhpException, match=message):
        php("$r = new Dklab_Realplexor('127.0.0.1', $a['port']);" + call, port=fake.port)
    assert fake.requests == []


def test_request_on_the_wire(fake_in_line):
    fake = fake_in_line(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 0\r\n\r\n")
    php("$r = new Dklab_Realplexor('127.0.0.1', $a['port'], 'ns_'); $r->logon('bob', 'pw');"
        "$r->send(['a', 'b' => '12.5'], ['k' => 'v'], ['f']);", port=fake.port)
    body = b'{"k":"v"}'
    assert fake.requests == [b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 9\r\n"
                             b"X-Realplexor: identifier=bob:pw@ns_a,12.5:ns_b,*ns_f\r\n\r\n" + body]


@pytest.mark.parametrize("reply, message", [
    (b"", "No HTTP response"),
    (b"garbage\r\n\r\n", "No HTTP response"),
    (b"HTTP/1.0 200 OK\r\nContent-Length: 10\r\n\r\nabc", "Content-Length is 10, but the body has 3 bytes"),
    (b"HTTP/1.0 400 Bad Request\r\nContent-Length: 11\r\n\r\nbad things\n",
     'answered "HTTP/1.0 400 Bad Request": bad things'),
])
def test_bad_or_failed_answers_throw(fake_in_line, reply, message):
    fake = fake_in_line(reply)
    with pytest.raises(PhpException, match=message):
        php("$r = new Dklab_Realplexor('127.0.0.1', $a['port']); $r->send('a', 1);", port=fake.port)


def test_silent_server_times_out(fake_in_line):
    fake = fake_in_line(None)
    with pytest.raises(PhpException, match="timed out"):
        php("$r = new Dklab_Realplexor('127.0.0.1', $a['port']); $r->cmdOnline();",
            ini={"default_socket_timeout": "1"}, port=fake.port)


def test_port_443_speaks_tls(port_443, tls_files):
    cert, _ = tls_files
    result = php("$r = new Dklab_Realplexor('127.0.0.1', 443, 'secure_'); return $r->cmdOnlineWithCounters();",
                 ini={"openssl.cafile": str(cert)})
    assert result == {"a": 1}
    assert port_443.requests[0].startswith(b"POST / HTTP/1.1\r\n")
    assert port_443.requests[0].endswith(b"\r\n\r\nONLINE secure_\n")
