"""The Python client (realplexor.client) against a real server.

Checks what a user sees: WAIT listeners receiving the data, ONLINE/WATCH
answers and error reasons; plus use from threads and gevent greenlets;
and the Listener on the WAIT line, history cuts included.
"""
from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import sys
import textwrap
import threading
import time
from decimal import Decimal
from pathlib import Path

import pytest

from conftest import ROOT, TIMEOUT, free_port, wait_parts
from realplexor.client import Listener, Part, Realplexor, RealplexorError, WatchEvent

OK = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 0\r\n\r\n"


def client(server, namespace: str = "", **kwargs) -> Realplexor:
    return Realplexor("127.0.0.1", server.in_port, namespace, timeout=10, **kwargs)


def test_send_to_a_list_of_ids_reaches_listeners(server, cid):
    alpha = server.listen(f"{cid}Alpha")
    beta = server.listen(f"{cid}Beta")
    client(server, cid).send(["Alpha", "Beta"], {"text": "héllo", "n": [1, 2.5, None, True]})
    for poll, channel in ((alpha, "Alpha"), (beta, "Beta")):
        parts = wait_parts(poll.response())
        assert [p["data"] for p in parts] == [{"text": "héllo", "n": [1, 2.5, None, True]}]
        assert list(parts[0]["ids"]) == [f"{cid}{channel}"]


def test_one_send_to_several_listened_ids_is_one_part(server, cid):
    poll = server.listen(f"{cid}a,{cid}b")
    client(server).send((f"{cid}{x}" for x in "ab"), "both")
    parts = wait_parts(poll.response())
    assert len(parts) == 1 and parts[0]["data"] == "both"
    assert parts[0]["ids"][f"{cid}a"] == parts[0]["ids"][f"{cid}b"]


def test_send_to_a_single_id_string(server, cid):
    poll = server.listen(f"{cid}one")
    client(server, cid).send("one", 42)
    assert [p["data"] for p in wait_parts(poll.response())] == [42]


def test_send_with_cursors_keeps_them_exactly(server, cid):
    rpl = client(server, cid)
    rpl.send({"a": "1732486800.12345678901234"}, "x")
    rpl.send({"a": Decimal("1732486800.12345678901235")}, "y")
    rpl.send({"b": 7, "c": None}, "seven")
    parts = wait_parts(server.poll(f"identifier=1732486800.12345678901234:{cid}a").response())
    assert [(p["data"], p["ids"]) for p in parts] == [("y", {f"{cid}a": "1732486800.12345678901235"})]
    parts = wait_parts(server.poll(f"identifier=0:{cid}b,0:{cid}c").response())
    assert [p["data"] for p in parts] == ["seven"]
    assert parts[0]["ids"][f"{cid}b"] == "7"
    assert float(parts[0]["ids"][f"{cid}c"]) > 1e9


def test_data_with_decimals_and_nesting(server, cid):
    poll = server.listen(f"{cid}a")
    client(server, cid).send("a", {"price": Decimal("1.10"), "tags": ("x", "y"), "quote": "</script>\"'"})
    assert wait_parts(poll.response())[0]["data"] == {"price": 1.1, "tags": ["x", "y"], "quote": "</script>\"'"}


def test_show_only_for_ids_limits_the_listeners(server, cid):
    plain = server.listen(f"{cid}a")
    friend = server.listen(f"{cid}a,{cid}friends")
    friends_only = server.listen(f"{cid}friends")
    rpl = client(server, cid)
    rpl.send(["a"], "secret", show_only_for_ids=["friends"])
    assert [p["data"] for p in wait_parts(friend.response())] == ["secret"]
    assert not plain.has_ended(0.3)
    assert not friends_only.has_ended(0.1)
    rpl.send("a", "public", show_only_for_ids=None)
    assert [p["data"] for p in wait_parts(plain.response())] == ["public"]


def test_online_strips_the_namespace(server, cid):
    server.listen(f"{cid}Alpha")
    server.listen(f"{cid}Alpha,{cid}Beta")
    server.listen(f"other{cid}x")
    rpl = client(server, cid)
    assert rpl.online() == ["Alpha", "Beta"]
    assert rpl.online_with_counters() == {"Alpha": 2, "Beta": 1}


def test_online_with_prefixes(server, cid):
    server.listen(f"{cid}Alpha,{cid}Beta,{cid}Bravo")
    rpl = client(server, cid)
    assert rpl.online(["B"]) == ["Beta", "Bravo"]
    assert rpl.online_with_counters("Al") == {"Alpha": 1}
    assert rpl.online(["X"]) == []


def test_online_without_namespace(server, cid):
    server.listen(f"{cid}a")
    rpl = client(server)
    assert rpl.online([cid]) == [f"{cid}a"]
    assert f"{cid}a" in rpl.online()


def test_watch_reports_online_and_offline(server, cid):
    rpl = client(server, cid)
    (fake,) = rpl.watch(None)
    assert fake.event == "FAKE" and fake.id == "FAKE" and isinstance(fake.pos, int)
    poll = server.listen(f"{cid}a")
    events = rpl.watch(fake.pos)
    assert [(e.event, e.id) for e in events] == [("online", "a")]
    assert events[0].pos > fake.pos
    poll.close()
    events = server.wait_until(lambda: [e for e in rpl.watch(fake.pos) if e.event == "offline"])
    assert [(e.event, e.id) for e in events] == [("offline", "a")]
    assert rpl.watch(events[0].pos) == []


def test_watch_with_prefixes(server, cid):
    rpl = client(server, cid)
    start = rpl.watch(None)[0].pos
    server.listen(f"{cid}Alpha,{cid}Beta")
    assert [(e.event, e.id) for e in rpl.watch(start, ["B"])] == [("online", "Beta")]
    assert [(e.event, e.id) for e in rpl.watch(str(start), "A")] == [("online", "Alpha")]


@pytest.mark.parametrize("start", [None, 0, "0", "", "x"])
def test_watch_without_a_true_position_names_the_current_one(server, cid, start):
    (fake,) = client(server, cid).watch(start, "a")
    assert fake.event == "FAKE" and fake.id == "FAKE" and fake.pos >= 10


def test_watch_event_is_a_frozen_value():
    event = WatchEvent("online", 3, "a")
    assert event == WatchEvent("online", 3, "a")
    with pytest.raises(AttributeError):
        event.pos = 4  # type: ignore[misc]


def test_stats_is_text(server, cid):
    server.listen(f"{cid}a")
    assert f"{cid}a" in client(server).stats()


def test_logon_publishes_under_the_login_prefix(auth_server, cid):
    own = auth_server.listen(f"alice_{cid}a")
    foreign = auth_server.listen(f"{cid}a")
    rpl = client(auth_server)
    rpl.logon("alice", "secret")
    rpl.send([f"alice_{cid}a", f"{cid}a"], "hi")
    assert [p["data"] for p in wait_parts(own.response())] == ["hi"]
    assert not foreign.has_ended(0.3)


def test_logon_with_a_namespace_sees_only_its_ids(auth_server, cid):
    auth_server.listen(f"alice_{cid}a,{cid}b")
    rpl = client(auth_server, f"alice_{cid}")
    rpl.logon("alice", "secret")
    assert rpl.online_with_counters() == {"a": 1}
    assert [(e.event, e.id) for e in rpl.watch(1)] == [("online", "a")]
    with pytest.raises(RealplexorError) as caught:
        rpl.stats()
    assert caught.value.status == 403 and "STATS" in caught.value.reason


@pytest.mark.parametrize("login, password, reason", [
    ("mallory", "secret", "unknown login: mallory"),
    ("alice", "wrong", "invalid password for login: alice"),
    (None, None, "access denied for guest user"),
])
def test_refused_credentials_raise_the_servers_reason(auth_server, cid, login, password, reason):
    poll = auth_server.listen(f"alice_{cid}a")
    rpl = client(auth_server)
    if login:
        rpl.logon(login, password)
    with pytest.raises(RealplexorError) as caught:
        rpl.send(f"alice_{cid}a", "x")
    assert (caught.value.reason, caught.value.status) == (reason, 403)
    assert str(caught.value) == reason
    assert not poll.has_ended(0.3)
    with pytest.raises(RealplexorError, match=reason):
        rpl.online()


def test_connection_refused_names_the_address():
    port = free_port()
    with pytest.raises(RealplexorError) as caught:
        Realplexor("127.0.0.1", port, timeout=5).send("a", 1)
    assert f"127.0.0.1:{port}" in caught.value.reason
    assert "refused" in caught.value.reason.lower()
    assert caught.value.status is None


def test_custom_identifier_word(server_factory, cid):
    custom = server_factory(IDENTIFIER="rplid")
    poll = custom.poll(f"rplid={cid}a")
    poll.headers_arrived()
    Realplexor("127.0.0.1", custom.in_port, identifier="rplid", timeout=10).send(f"{cid}a", "custom")
    assert [p["data"] for p in wait_parts(poll.response())] == ["custom"]


@pytest.mark.parametrize("call, error, message", [
    (lambda r: r.send(["bad-id"], 1), ValueError, "invalid channel id 'bad-id'"),
    (lambda r: r.send({"a": "soon"}, 1), ValueError, "invalid cursor 'soon'"),
    (lambda r: r.send({"a": 1.5}, 1), TypeError, "float"),
    (lambda r: r.send([], 1), ValueError, "no channel ids"),
    (lambda r: r.send("a", float("nan")), ValueError, "not JSON compliant"),
    (lambda r: r.send("a", object()), TypeError, "not JSON serializable"),
    (lambda r: r.online(["no-dash"]), ValueError, "invalid id prefix"),
    (lambda r: r.logon("bad login", "x"), ValueError, "invalid login"),
    (lambda r: r.logon("bob", "two words"), ValueError, "invalid password"),
], ids=["bad id", "bad cursor", "float cursor", "no ids", "nan", "not json", "bad prefix",
        "bad login", "bad password"])
def test_bad_arguments_raise_before_sending(fake_in_line, call, error, message):
    fake = fake_in_line(OK)
    with pytest.raises(error, match=message):
        call(Realplexor("127.0.0.1", fake.port, timeout=5))
    assert fake.requests == []


def test_request_on_the_wire(fake_in_line):
    fake = fake_in_line(OK)
    rpl = Realplexor("127.0.0.1", fake.port, "ns_", timeout=5)
    rpl.logon("bob", "pw")
    rpl.send({"a": None, "b": "12.5"}, {"k": "v"}, ["f"])
    assert fake.requests == [b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 9\r\n"
                             b"X-Realplexor: identifier=bob:pw@ns_a,12.5:ns_b,*ns_f\r\n\r\n"
                             b'{"k":"v"}']


@pytest.mark.parametrize("reply, message, status", [
    (b"", "no HTTP response", None),
    (b"garbage\r\n\r\n", "no HTTP response", None),
    (b"HTTP/1.0 200 OK\r\nContent-Length: 10\r\n\r\nabc", "Content-Length is 10, but the body has 3 bytes", 200),
    (b"HTTP/1.0 400 Bad Request\r\nContent-Length: 11\r\n\r\nbad things\n", "^bad things$", 400),
])
def test_bad_or_failed_answers_raise(fake_in_line, reply, message, status):
    fake = fake_in_line(reply)
    with pytest.raises(RealplexorError, match=message) as caught:
        Realplexor("127.0.0.1", fake.port, timeout=5).send("a", 1)
    assert caught.value.status == status


def test_silent_server_times_out(fake_in_line):
    fake = fake_in_line(None)
    started = time.monotonic()
    with pytest.raises(RealplexorError, match="timed out"):
        Realplexor("127.0.0.1", fake.port, timeout=0.5).online()
    assert time.monotonic() - started < 5


def test_tls_with_a_context(tls_files, fake_in_line):
    cert, key = tls_files
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert, key)
    fake = fake_in_line(b"HTTP/1.0 200 OK\r\nContent-Length: 9\r\n\r\nns_a 3\n\n\n", tls=server_context)
    rpl = Realplexor("localhost", fake.port, "ns_", timeout=5,
                     ssl_context=ssl.create_default_context(cafile=str(cert)))
    assert rpl.online_with_counters() == {"a": 3}
    assert fake.requests[0].endswith(b"\r\n\r\nONLINE ns_\n")


def test_port_443_speaks_tls(port_443, tls_files, monkeypatch):
    cert, _ = tls_files
    monkeypatch.setattr(ssl, "create_default_context",
                        lambda real=ssl.create_default_context: real(cafile=str(cert)))
    assert Realplexor("127.0.0.1", 443, "secure_", timeout=5).online() == ["a"]


def test_untrusted_certificate_is_refused(tls_files, fake_in_line):
    cert, key = tls_files
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert, key)
    fake = fake_in_line(OK, tls=server_context)
    rpl = Realplexor("localhost", fake.port, timeout=5, ssl_context=ssl.create_default_context())
    with pytest.raises(RealplexorError, match="certificate"):
        rpl.online()


def test_one_client_shared_by_threads(server, cid):
    count = 16
    polls = [server.listen(f"{cid}{n}") for n in range(count)]
    rpl = client(server, cid)
    errors: list[BaseException] = []
    seen: list[list[str]] = []

    def work(n: int) -> None:
        try:
            rpl.send(str(n), {"from": n})
            seen.append(rpl.online())
        except BaseException as exc:  # surfaced by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    for n, poll in enumerate(polls):
        assert [p["data"] for p in wait_parts(poll.response())] == [{"from": n}]
    assert len(seen) == count and all(isinstance(ids, list) for ids in seen)


def test_greenlets_with_a_gevent_connect(server, cid, fake_in_line):
    gevent = pytest.importorskip("gevent")
    import gevent.socket

    count = 10
    polls = [server.listen(f"{cid}{n}") for n in range(count)]
    rpl = client(server, cid, connect=gevent.socket.create_connection)
    jobs = [gevent.spawn(rpl.send, str(n), n) for n in range(count)]
    gevent.joinall(jobs, timeout=30, raise_error=True)
    for n, poll in enumerate(polls):
        assert [p["data"] for p in wait_parts(poll.response())] == [n]

    # Waits overlap: five requests to a silent server time out together.
    silent = Realplexor("127.0.0.1", fake_in_line(None).port, timeout=1,
                        connect=gevent.socket.create_connection)
    started = time.monotonic()
    jobs = [gevent.spawn(silent.online) for _ in range(5)]
    gevent.joinall(jobs, timeout=30)
    assert all(isinstance(job.exception, RealplexorError) for job in jobs)
    assert time.monotonic() - started < 3.5


MONKEY_SCRIPT = """
from gevent import monkey
monkey.patch_all()
import sys, time
import gevent
from realplexor.client import Realplexor, RealplexorError

in_port, silent_port, prefix, count = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
rpl = Realplexor("127.0.0.1", in_port, prefix, timeout=10)
gevent.joinall([gevent.spawn(rpl.send, str(n), n) for n in range(count)], timeout=30, raise_error=True)
print("online", ",".join(rpl.online()))
silent = Realplexor("127.0.0.1", silent_port, timeout=1)
started = time.monotonic()
jobs = [gevent.spawn(silent.online) for _ in range(5)]
gevent.joinall(jobs, timeout=30)
print("timeouts", sum(isinstance(job.exception, RealplexorError) for job in jobs))
print("elapsed", time.monotonic() - started)
"""


def test_greenlets_after_monkey_patching(server, cid, fake_in_line):
    pytest.importorskip("gevent")
    count = 10
    polls = [server.listen(f"{cid}{n}") for n in range(count)]
    silent = fake_in_line(None)
    proc = subprocess.run([sys.executable, "-c", MONKEY_SCRIPT, str(server.in_port), str(silent.port),
                           cid, str(count)], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines())
    for n, poll in enumerate(polls):
        assert [p["data"] for p in wait_parts(poll.response())] == [n]
    assert sorted(lines["online"].split(","), key=int) == [str(n) for n in range(count)]
    assert lines["timeouts"] == "5"
    assert float(lines["elapsed"]) < 3.5


def test_client_module_stands_alone(server, cid, tmp_path):
    # Copied without the server package and run without site-packages
    # (so without simplejson): it still publishes.
    shutil.copy(Path(ROOT, "realplexor", "client.py"), tmp_path / "client.py")
    poll = server.listen(f"{cid}a")
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        import client
        assert "realplexor" not in sys.modules and "simplejson" not in sys.modules, sorted(sys.modules)
        client.Realplexor("127.0.0.1", {server.in_port}, {cid!r}, timeout=10).send("a", {{"alone": True}})
    """)
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", script], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert [p["data"] for p in wait_parts(poll.response())] == [{"alone": True}]


def readme_snippet(language: str, after: str) -> str:
    """The README's first ``language`` code block after the heading ``after``."""
    text = (ROOT / "README.md").read_text()
    start = text.index(f"```{language}\n", text.index(after)) + len(language) + 4
    return text[start:text.index("```", start)]


def test_readme_snippet_runs_as_pasted(server):
    poll = server.listen("demo_Alpha")
    code = readme_snippet("python", "### Python (back ends)").replace("10010", str(server.in_port))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert [p["data"] for p in wait_parts(poll.response())] == [{"text": "hello"}]
    assert "'Alpha': 0" in result.stdout


def test_readme_listener_snippet_runs_as_pasted(server_factory):
    small = server_factory(MAX_DATA_FOR_ID=2)
    rpl = Realplexor("127.0.0.1", small.in_port, "demo_", timeout=10)
    for n in range(3):
        rpl.send("Alpha", n)
    code = readme_snippet("python", "A back end can listen too").replace("8088", str(small.wait_port))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    lost, cursors = result.stdout.splitlines()
    assert lost == "lost messages on Alpha"
    # Only a cut came: Beta still listens from now, not from Alpha's dropped message.
    assert cursors.startswith("{'Alpha': '1") and "'Beta': None" in cursors


# ---- Listener: the WAIT line ----

def listener(server, ids, namespace: str = "", **kwargs) -> Listener:
    kwargs.setdefault("timeout", 10)
    return Listener(ids, "127.0.0.1", server.wait_port, namespace, **kwargs)


def test_listener_gets_one_publish_to_several_channels_as_one_part(server, cid):
    rpl = client(server, cid)
    rpl.send(["Alpha", "Beta"], "before")             # a listener without cursors starts from now
    alpha_beta = listener(server, ["Alpha", "Beta", "Gamma"], cid)
    got = []
    thread = threading.Thread(target=lambda: got.extend(alpha_beta.poll()))
    thread.start()
    server.wait_until(lambda: server.online(cid).get(f"{cid}Gamma"))
    rpl.send(["Alpha", "Beta"], {"text": "both"})
    thread.join(TIMEOUT)
    assert len(got) == 1
    (part,) = got
    assert part.data == {"text": "both"} and part.reset is False
    assert set(part.ids) == {"Alpha", "Beta"}
    assert part.ids["Alpha"] == part.ids["Beta"]


def test_listener_from_now_is_not_moved_back_by_history_replayed_on_another_channel(server, cid):
    rpl = client(server, cid)
    hour_ago = int(time.time()) - 3600
    rpl.send({"Alpha": hour_ago}, "old on alpha")
    rpl.send({"Beta": hour_ago + 10}, "old on beta")       # before the listener existed
    old_and_new = listener(server, {"Alpha": hour_ago - 100, "Beta": None}, cid, timeout=1)
    assert [part.data for part in old_and_new.poll()] == ["old on alpha"]
    assert old_and_new.cursors["Beta"] is None
    assert old_and_new.poll() == []


def test_listener_of_many_channels_polls_by_post_and_gets_its_message(server, cid):
    rpl = client(server, cid)
    many = {f"ch{n}": "1700000000.000000001" for n in range(60)}     # a target past 1500 characters
    rpl.send("ch59", "to the last of them")
    got = listener(server, many, cid).poll()
    assert [(part.data, list(part.ids)) for part in got] == [("to the last of them", ["ch59"])]


def test_listener_resumes_from_the_cursors_it_saw(server, cid):
    rpl = client(server, cid)
    rpl.send({"a": 1}, "one")
    rpl.send({"a": 2, "b": 2}, "two")
    resumed = listener(server, {"a": 0, "b": None}, cid)
    assert [(p.data, dict(p.ids)) for p in resumed.poll()] == [("one", {"a": "1"}), ("two", {"a": "2"})]
    assert resumed.cursors == {"a": "2", "b": None}
    rpl.send({"a": 3}, "three")
    assert [p.data for p in resumed.poll()] == ["three"]
    assert resumed.cursors["a"] == "3"


def test_listener_on_server_cursors_misses_and_repeats_nothing(server, cid):
    rpl = client(server, cid)
    rpl.send("a", 0)
    first = listener(server, {"a": 0, "b": None}, cid).poll()
    follower = listener(server, {"a": first[0].ids["a"], "b": None}, cid)
    seen = []
    for n in range(1, 4):
        rpl.send("a", n)
        rpl.send("b", -n)            # b listens from now, then from the newest cursor seen
        while len(seen) < 2 * n:
            seen += [part.data for part in follower.poll()]
    assert seen[:2] == [1, -1] and sorted(seen) == [-3, -2, -1, 1, 2, 3]
    assert follower.cursors["b"] is not None


@pytest.mark.parametrize("engine", ["wsgi", "lean"])
def test_listener_poll_with_nothing_new_is_empty_after_its_timeout(server_factory, cid, engine):
    quiet = listener(server_factory(WAIT_ENGINE=engine), "nobody_sends_here", cid, timeout=0.5)
    started = time.monotonic()
    assert quiet.poll() == []
    assert 0.4 < time.monotonic() - started < 3
    assert quiet.cursors == {"nobody_sends_here": None}


@pytest.mark.parametrize("engine", ["wsgi", "lean"])
def test_listener_is_told_of_a_history_cut_then_gets_the_kept_messages(server_factory, cid, engine):
    small = server_factory(MAX_DATA_FOR_ID=2, WAIT_ENGINE=engine)
    rpl = Realplexor("127.0.0.1", small.in_port, cid, timeout=10)
    for n in range(1, 6):
        rpl.send({"a": n}, f"message {n}")
    behind = listener(small, {"a": 1}, cid)
    assert behind.poll() == [Part({"a": "3"}, None, True)]      # 2 and 3 were dropped
    assert behind.cursors == {"a": "3"}
    assert [(p.data, p.reset) for p in behind.poll()] == [("message 4", False), ("message 5", False)]


def test_listener_past_the_dropped_messages_is_told_of_no_cut(server_factory, cid):
    small = server_factory(MAX_DATA_FOR_ID=2)
    rpl = Realplexor("127.0.0.1", small.in_port, cid, timeout=10)
    for n in range(1, 6):
        rpl.send({"a": n}, n)
    assert [p.data for p in listener(small, {"a": 3}, cid).poll()] == [4, 5]


def test_listener_adds_and_strips_the_namespace_on_the_wire(fake_wait_line):
    fake = fake_wait_line(b'HTTP/1.0 200 OK\r\n\r\n \r\n[{"ids":{"ns_a":"1.5"},"data":[1]},'
                          b'{"ids":{"ns_b":"7"},"reset":true}]')
    ns = Listener({"a": "1.25", "b": None}, "127.0.0.1", fake.port, "ns_", identifier="rplid", timeout=5)
    assert ns.poll() == [Part({"a": "1.5"}, [1]), Part({"b": "7"}, None, True)]
    assert fake.requests == [f"GET /?rplid=1.25:ns_a,ns_b&reset=1 HTTP/1.0\r\n"
                             f"Host: 127.0.0.1:{fake.port}\r\n\r\n".encode()]
    assert ns.cursors == {"a": "1.5", "b": "7"}


@pytest.mark.parametrize("ids, error, message", [
    ([], ValueError, "no channel ids to listen to"),
    ({}, ValueError, "no channel ids to listen to"),
    (["bad-id"], ValueError, "invalid channel id 'bad-id'"),
    ("a,b", ValueError, "invalid channel id 'a,b'"),
    ({"a": "soon"}, ValueError, "invalid cursor 'soon'"),
    ({"a": 1.5}, TypeError, "float"),
], ids=["empty list", "empty map", "bad id", "comma in an id", "bad cursor", "float cursor"])
def test_listener_refuses_bad_ids_before_polling(ids, error, message):
    with pytest.raises(error, match=message):
        Listener(ids, "127.0.0.1", free_port(), timeout=5)


def test_listener_raises_the_servers_reason_for_a_refused_poll(server, cid):
    many = listener(server, [f"channel_number_{n}" for n in range(400)], cid)
    with pytest.raises(RealplexorError, match="WAIT_MAXLEN") as caught:
        many.poll()
    assert caught.value.status == 413


def test_listener_without_a_server_names_the_address():
    port = free_port()
    with pytest.raises(RealplexorError, match=f"127.0.0.1:{port}.*refused"):
        Listener("a", "127.0.0.1", port, timeout=5).poll()


@pytest.mark.parametrize("reply, close, message", [
    (b"", False, "no answer from Realplexor at 127.0.0.1:.* within 0.5 s"),
    (b"HTTP/1.0 503 Service Unavailable\r\n\r\nbusy", False, "no answer from Realplexor"),
    (b"HTTP/1.0 200 OK\r\n\r\n \r\n[{\"ids\"", True, "not JSON"),
    (b"HTTP/1.0 200 OK\r\n\r\n {\"ids\": {\"a\": \"1\"}}", True, "not a list of parts"),
    (b"HTTP/1.0 200 OK\r\n\r\n [{\"ids\": {\"a\": 1.5}}]", True, "not a list of parts"),
    (b"HTTP/1.0 400 Bad Request\r\n\r\nempty identifier list\n", True, "^empty identifier list$"),
], ids=["silent", "unfinished refusal", "cut short", "not a list", "number cursor", "refused"])
def test_listener_raises_for_a_bad_answer(fake_wait_line, reply, close, message):
    fake = fake_wait_line(reply, close)
    with pytest.raises(RealplexorError, match=message):
        Listener("a", "127.0.0.1", fake.port, timeout=0.5).poll()


def test_listener_answer_begun_but_unfinished_in_time_is_nothing_new(fake_wait_line):
    fake = fake_wait_line(b"HTTP/1.0 200 OK\r\nContent-Type: text/javascript\r\n\r\n \r\n", close=False)
    started = time.monotonic()
    assert Listener("a", "127.0.0.1", fake.port, timeout=0.5).poll() == []
    assert time.monotonic() - started < 3


class FakeWaitLine:
    """A stand-in WAIT line: records each request's head, sends ``reply``, closes unless told not to."""

    def __init__(self, reply: bytes, close: bool = True):
        self.reply = reply
        self.close_after = close
        self.requests: list[bytes] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(TIMEOUT)
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                head += chunk
            self.requests.append(head)
            conn.sendall(self.reply)
            if not self.close_after:
                conn.recv(1)         # until the client gives up

    def close(self) -> None:
        self.listener.close()
        self._thread.join(TIMEOUT)


@pytest.fixture
def fake_wait_line():
    """Start FakeWaitLine servers: ``fake_wait_line(reply, close=True)``."""
    started: list[FakeWaitLine] = []

    def factory(reply: bytes, close: bool = True) -> FakeWaitLine:
        fake = FakeWaitLine(reply, close)
        started.append(fake)
        return fake

    yield factory
    for fake in started:
        fake.close()
