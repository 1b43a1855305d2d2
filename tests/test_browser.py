"""The JavaScript client in a real headless Chromium, against real servers.

A test page comes from one origin (a small HTTP server here) and polls the
WAIT line of a Realplexor on another, as on a real site. The page records
every callback in ``window.received`` and every request the client makes
in ``window.requests`` (``fetch`` is wrapped before the client loads).

Needs Playwright for Python (``pip install playwright``) and a Chromium
binary (Debian's ``chromium`` package, or the ``CHROMIUM`` environment
variable); no browser is downloaded.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest


STATIC = Path(__file__).resolve().parent.parent / "static"
from conftest import BROWSER_WAIT_MS as WAIT_MS

HARNESS = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>Realplexor client test</title>
<script>
window.requests = [];
window.received = [];
window.errors = [];
var realFetch = window.fetch.bind(window);
window.fetch = function (url, init) {
  init = init || {};
  requests.push({url: String(url), method: init.method || "GET",
                 body: init.body == null ? null : String(init.body), at: performance.now()});
  return realFetch(url, init);
};
window.recorder = function (tag) {
  return function (data, id, cursor) {
    received.push({tag: tag, data: data, id: id, cursor: cursor, cursorType: typeof cursor});
  };
};
window.addEventListener("error", function (event) { errors.push(String(event.message)); });
</script>
<script src="%(script)s"></script>
</head><body></body></html>
"""


class _SiteHandler(BaseHTTPRequestHandler):
    """The test site: the harness page, the client as a plain file, a failing endpoint."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        url = urlsplit(self.path)
        if url.path == "/page.html":
            script = parse_qs(url.query)["script"][0]
            self._send(200, "text/html; charset=utf-8", HARNESS % {"script": script})
        elif url.path == "/dklab_realplexor.js":
            self._send(200, "text/javascript", (STATIC / "dklab_realplexor.js").read_text())
        elif url.path == "/failing/":
            self._send(503, "text/plain", "down\n")
        else:
            self._send(404, "text/plain", "not found\n")

    do_POST = do_GET

    def _send(self, status: int, content_type: str, text: str) -> None:
        body = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Access-Control-Allow-Origin", "*")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def site():
    """The base URL of the test site, on its own origin."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _SiteHandler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def page(browser):
    context = browser.new_context()
    context.set_default_timeout(WAIT_MS)
    tab = context.new_page()
    yield tab
    context.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_url(port: int) -> str:
    return f"http://127.0.0.1:{port}/"


def open_page(page, site: str, script: str) -> None:
    """Load the harness with the client from ``script``."""
    page.goto(f"{site}/page.html?script={script}")
    page.wait_for_function("typeof Dklab_Realplexor === 'function'", timeout=WAIT_MS)


def open_with_server_script(page, site: str, server) -> None:
    """Load the harness with the client as the server serves it (?identifier=SCRIPT)."""
    open_page(page, site, f"{wait_url(server.wait_port)}%3Fidentifier%3DSCRIPT")


def received(page, count: int | None = None) -> list[dict]:
    """The callbacks so far; with ``count``, first wait until that many arrived."""
    if count is not None:
        page.wait_for_function(f"received.length >= {count}", timeout=WAIT_MS)
    return page.evaluate("received")


def requests(page) -> list[dict]:
    return page.evaluate("requests")


def wait_listening(server, *ids: str) -> None:
    """Wait until the server has an open poll on each of ``ids``."""
    server.wait_until(lambda: all(server.online().get(i, 0) >= 1 for i in ids))


def wait_not_listening(server, *ids: str) -> None:
    server.wait_until(lambda: all(server.online().get(i, 0) == 0 for i in ids))


def test_served_script_carries_the_server_settings(page, site, server):
    open_with_server_script(page, site, server)
    config = page.evaluate("Dklab_Realplexor.config")
    assert config == {"waitTimeout": 30, "maxBounces": 10, "reconnectDelay": 0.01,
                      "waitUri": "/", "identifier": "identifier", "debug": False}


def test_js_debug_logs_to_the_console(page, site, server_factory, cid):
    server = server_factory(JS_DEBUG=True)
    logged = []
    page.on("console", lambda message: logged.append(message.text))
    open_with_server_script(page, site, server)
    assert page.evaluate("Dklab_Realplexor.config.debug") is True
    page.evaluate(f"""new Dklab_Realplexor({wait_url(server.wait_port)!r})
                      .subscribe("{cid}a", recorder("a")).execute()""")
    wait_listening(server, f"{cid}a")
    page.wait_for_timeout(100)   # lets Playwright take in the console events
    assert any(line.startswith("Realplexor: GET") and f"{cid}a" in line for line in logged), logged


def test_plain_file_falls_back_to_defaults(page, site):
    open_page(page, site, f"{site}/dklab_realplexor.js")
    config = page.evaluate("Dklab_Realplexor.config")
    assert config == {"waitTimeout": 300, "maxBounces": 10, "reconnectDelay": 0.01,
                      "waitUri": "/", "identifier": "identifier", "debug": False}


def test_plain_file_client_receives(page, site, server, cid):
    open_page(page, site, f"{site}/dklab_realplexor.js")
    page.evaluate(f"""window.rpl = new Dklab_Realplexor({wait_url(server.wait_port)!r});
                      rpl.subscribe("{cid}a", recorder("a")).execute()""")
    wait_listening(server, f"{cid}a")
    server.publish(f"{cid}a", '"hello"')
    assert [r["data"] for r in received(page, 1)] == ["hello"]


def test_several_channels_in_one_request(page, site, server, cid):
    open_with_server_script(page, site, server)
    page.evaluate(f"""window.rpl = new Dklab_Realplexor({wait_url(server.wait_port)!r});
        rpl.subscribe("{cid}a", recorder("a")).subscribe("{cid}b", recorder("b"))
           .subscribe("{cid}c", recorder("c")).execute().execute()""")
    wait_listening(server, f"{cid}a", f"{cid}b", f"{cid}c")
    sent = requests(page)
    assert len(sent) == 1
    assert f"identifier={cid}a,{cid}b,{cid}c&ncrnd=" in sent[0]["url"]
    assert sent[0]["method"] == "GET"

    server.publish(f"{cid}b", '{"to": "b"}')
    first = received(page, 1)
    assert [(r["tag"], r["id"], r["data"]) for r in first] == [("b", f"{cid}b", {"to": "b"})]
    assert first[0]["cursorType"] == "string"

    # One publish to several channels: one call per subscribed channel.
    wait_listening(server, f"{cid}a", f"{cid}c")
    server.publish(f"{cid}a,{cid}c,{cid}other", '"both"')
    both = received(page, 3)[1:]
    assert sorted((r["tag"], r["id"], r["data"]) for r in both) == [
        ("a", f"{cid}a", "both"), ("c", f"{cid}c", "both")]
    assert both[0]["cursor"] == both[1]["cursor"]
    time.sleep(0.3)
    assert len(received(page)) == 3

    # The next poll carries each channel's own cursor, verbatim.
    page.wait_for_function("requests.length >= 3", timeout=WAIT_MS)
    last = requests(page)[-1]["url"]
    assert f"{first[0]['cursor']}:{cid}b" in last
    assert f"{both[0]['cursor']}:{cid}a" in last
    assert f",{cid}c" not in last

    # A channel added later joins the same poll at once.
    page.evaluate(f'rpl.subscribe("{cid}d", recorder("d")).execute()')
    wait_listening(server, f"{cid}d")
    assert f"{cid}d" in requests(page)[-1]["url"]
    server.publish(f"{cid}d", "4")
    assert received(page, 4)[3]["tag"] == "d"


@pytest.mark.parametrize("engine", ["wsgi", "lean"])
def test_200_rapid_publishes_arrive_once_and_in_order(page, site, server_factory, cid, engine):
    # Chromium keeps its polls alive: both engines answer them chunked.
    server = server_factory(MAX_DATA_FOR_ID=500, OFFLINE_TIMEOUT=1, WAIT_ENGINE=engine)
    open_with_server_script(page, site, server)
    page.evaluate(f"""window.rpl = new Dklab_Realplexor({wait_url(server.wait_port)!r});
                      rpl.subscribe("{cid}n", recorder("n")).execute()""")
    wait_listening(server, f"{cid}n")
    for number in range(200):
        server.publish(f"{cid}n", json.dumps({"n": number}))
    got = received(page, 200)
    time.sleep(0.5)
    got = received(page)
    assert [r["data"]["n"] for r in got] == list(range(200))
    cursors = [r["cursor"] for r in got]
    assert all(isinstance(c, str) for c in cursors)
    assert all(Decimal(a) < Decimal(b) for a, b in zip(cursors, cursors[1:]))
    sent = requests(page)
    assert len(sent) >= 2
    assert all(":" + f"{cid}n" in r["url"] for r in sent[1:])


def server_sockets(server) -> set[str]:
    """The sockets the server process holds open, as ``socket:[inode]``, from its descriptors (Linux ``/proc``)."""
    fds = f"/proc/{server.process.pid}/fd"
    try:
        links = {os.readlink(f"{fds}/{fd}") for fd in os.listdir(fds)}
    except OSError as exc:
        pytest.skip(f"cannot read the server's descriptors from /proc: {exc}")
    return {link for link in links if link.startswith("socket:")}


@pytest.mark.parametrize("engine", ["wsgi", "lean"])
def test_polls_are_kept_alive_chunked_and_share_one_connection(page, site, server_factory, cid, engine):
    server = server_factory(WAIT_ENGINE=engine)
    listening = server_sockets(server)
    answers = []
    # The long polls' answers (a first try at an event stream, refused with 406, is not one).
    page.on("response", lambda response: answers.append(response)
            if f"{cid}k" in response.url and response.status == 200 else None)
    open_page(page, site, f"{site}/dklab_realplexor.js")
    page.evaluate(f"""window.rpl = new Dklab_Realplexor({wait_url(server.wait_port)!r});
                      rpl.subscribe("{cid}k", recorder("k")).execute()""")
    wait_listening(server, f"{cid}k")
    connections = [server_sockets(server) - listening]
    for number in range(3):
        server.publish(f"{cid}k", json.dumps(number))
        received(page, number + 1)
        page.wait_for_function(f"requests.length >= {number + 2}", timeout=WAIT_MS)
        wait_listening(server, f"{cid}k")
        connections.append(server_sockets(server) - listening)
    assert [r["data"] for r in received(page)] == [0, 1, 2]
    # Four polls, each parked on the same one connection, as the server's own descriptors show.
    assert len(requests(page)) == 4
    assert all(len(held) == 1 for held in connections), connections
    assert len(set().union(*connections)) == 1, connections
    for response in answers[:3]:
        headers = response.headers
        assert headers.get("transfer-encoding") == "chunked" and "close" not in headers.get("connection", ""), headers


def test_empty_answers_after_wait_timeout_reconnect(page, site, server_factory, cid):
    server = server_factory(WAIT_TIMEOUT=0.5)
    open_with_server_script(page, site, server)
    page.evaluate(f"""window.rpl = new Dklab_Realplexor({wait_url(server.wait_port)!r});
                      rpl.subscribe("{cid}t", recorder("t")).execute()""")
    wait_listening(server, f"{cid}t")
    server.publish(f"{cid}t", '"first"')
    cursor = received(page, 1)[0]["cursor"]
    # Several polls end empty; each asks again from the same cursor, so a
    # publish between two polls is not lost.
    page.wait_for_function("requests.length >= 4", timeout=WAIT_MS)
    assert all(f"identifier={cursor}:{cid}t&" in r["url"] for r in requests(page)[1:])
    server.publish(f"{cid}t", '"late"')
    assert [r["data"] for r in received(page, 2)] == ["first", "late"]


def test_unsubscribe_one_callback_then_all(page, site, server, cid):
    open_with_server_script(page, site, server)
    page.evaluate(f"""window.one = recorder("one"); window.two = recorder("two");
        window.rpl = new Dklab_Realplexor({wait_url(server.wait_port)!r});
        rpl.subscribe("{cid}a", one).subscribe("{cid}a", two).subscribe("{cid}a", two)
           .subscribe("{cid}b", recorder("b")).execute()""")
    wait_listening(server, f"{cid}a", f"{cid}b")
    server.publish(f"{cid}a", "1")
    assert sorted(r["tag"] for r in received(page, 2)) == ["one", "two"]

    assert page.evaluate(f'rpl.unsubscribe("{cid}a", one) === rpl')
    wait_listening(server, f"{cid}a")
    server.publish(f"{cid}a", "2")
    assert [(r["tag"], r["data"]) for r in received(page, 3)[2:]] == [("two", 2)]

    page.evaluate(f'rpl.unsubscribe("{cid}a").execute()')
    wait_not_listening(server, f"{cid}a")
    wait_listening(server, f"{cid}b")
    assert f"{cid}a" not in requests(page)[-1]["url"]
    server.publish(f"{cid}a", "3")
    server.publish(f"{cid}b", "4")
    got = received(page, 4)
    time.sleep(0.3)
    assert [(r["tag"], r["data"]) for r in received(page)[3:]] == [("b", 4)]
    assert len(got) == 4


def test_set_cursor_replays_queued_history(page, site, server, cid):
    for number in range(3):
        server.publish(f"{cid}h", str(number))
    open_with_server_script(page, site, server)
    page.evaluate(f"""window.rpl = new Dklab_Realplexor({wait_url(server.wait_port)!r});
        rpl.setCursor("{cid}h", 0).subscribe("{cid}h", recorder("all")).execute()""")
    got = received(page, 3)
    assert [r["data"] for r in got] == [0, 1, 2]
    assert f"identifier=0:{cid}h&" in requests(page)[0]["url"]

    # From the first message's cursor on: the two after it.
    page.evaluate(f"""window.rpl2 = new Dklab_Realplexor({wait_url(server.wait_port)!r});
        rpl2.setCursor("{cid}h", {got[0]['cursor']!r}).subscribe("{cid}h", recorder("later")).execute()""")
    page.wait_for_function("received.filter(r => r.tag === 'later').length >= 2", timeout=WAIT_MS)
    time.sleep(0.3)
    assert [r["data"] for r in received(page) if r["tag"] == "later"] == [1, 2]


def test_throwing_callback_does_not_stop_the_others(page, site, server, cid):
    open_with_server_script(page, site, server)
    page.evaluate(f"""window.rpl = new Dklab_Realplexor({wait_url(server.wait_port)!r});
        rpl.subscribe("{cid}a", function () {{ throw new Error("callback broke"); }})
           .subscribe("{cid}a", recorder("a")).subscribe("{cid}b", recorder("b")).execute()""")
    wait_listening(server, f"{cid}a", f"{cid}b")
    server.publish(f"{cid}a,{cid}b", '"x"')
    assert sorted(r["tag"] for r in received(page, 2)) == ["a", "b"]
    page.wait_for_function("errors.length >= 1", timeout=WAIT_MS)
    assert "callback broke" in page.evaluate("errors")[0]
    wait_listening(server, f"{cid}a")
    server.publish(f"{cid}a", '"y"')
    assert received(page, 3)[2]["data"] == "y"


def test_reconnects_after_a_server_restart(page, site, server_factory, cid):
    port = free_port()
    first = server_factory(WAIT_ADDR=[f"127.0.0.1:{port}"])
    open_page(page, site, f"{site}/dklab_realplexor.js")
    page.evaluate(f"""window.rpl = new Dklab_Realplexor({wait_url(port)!r});
                      rpl.subscribe("{cid}r", recorder("r")).execute()""")
    wait_listening(first, f"{cid}r")
    first.publish(f"{cid}r", '"before"')
    received(page, 1)
    first.stop()
    time.sleep(0.5)
    second = server_factory(WAIT_ADDR=[f"127.0.0.1:{port}"])
    wait_listening(second, f"{cid}r")
    second.publish(f"{cid}r", '"after"')
    received(page, 2)
    time.sleep(0.3)
    assert [r["data"] for r in received(page)] == ["before", "after"]


@pytest.mark.parametrize("target", ["closed port", "failing server"])
def test_backs_off_while_the_server_is_down(page, site, cid, target):
    url = wait_url(free_port()) if target == "closed port" else f"{site}/failing/"
    open_page(page, site, f"{site}/dklab_realplexor.js")
    page.evaluate(f"""window.rpl = new Dklab_Realplexor({url!r});
                      rpl.subscribe("{cid}a", recorder("a")).execute()""")
    time.sleep(2.0)
    times = [r["at"] for r in requests(page)]
    assert 2 <= len(times) < 15, times
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert gaps[-1] > gaps[0]


def test_namespace_and_login_are_id_prefixes(page, site, server, cid):
    open_with_server_script(page, site, server)
    page.evaluate(f"""window.rpl = new Dklab_Realplexor({wait_url(server.wait_port)!r}, "{cid}ns_");
        rpl.subscribe("Alpha", recorder("ns")).execute();
        window.user = new Dklab_Realplexor({wait_url(server.wait_port)!r}, "{cid}");
        user.logon("user");
        user.subscribe("Beta", recorder("user")).execute()""")
    wait_listening(server, f"{cid}ns_Alpha", f"user_{cid}Beta")
    server.publish(f"{cid}ns_Alpha", '"a"')
    server.publish(f"user_{cid}Beta", '"b"')
    got = sorted((r["tag"], r["id"], r["data"]) for r in received(page, 2))
    assert got == [("ns", "Alpha", "a"), ("user", "Beta", "b")]


def test_execute_inside_a_callback_makes_no_extra_request(page, site, server, cid):
    open_with_server_script(page, site, server)
    page.evaluate(f"""window.rpl = new Dklab_Realplexor({wait_url(server.wait_port)!r});
        var record = recorder("a");
        rpl.subscribe("{cid}a", function (data, id, cursor) {{
            record(data, id, cursor); rpl.execute(); rpl.execute();
        }}).execute()""")
    wait_listening(server, f"{cid}a")
    server.publish(f"{cid}a", "1")
    cursor = received(page, 1)[0]["cursor"]
    page.wait_for_function("requests.length >= 2", timeout=WAIT_MS)
    time.sleep(0.5)
    sent = requests(page)
    assert len(sent) == 2
    assert f"identifier={cursor}:{cid}a&" in sent[1]["url"]


def test_no_request_while_nothing_is_subscribed(page, site, server, cid):
    open_with_server_script(page, site, server)
    page.evaluate(f"""window.rpl = new Dklab_Realplexor({wait_url(server.wait_port)!r});
        window.f = recorder("a");
        rpl.execute();
        rpl.subscribe("{cid}a", f).unsubscribe("{cid}a", f).execute()""")
    time.sleep(0.5)
    assert requests(page) == []

    page.evaluate(f'rpl.subscribe("{cid}a", f).execute()')
    wait_listening(server, f"{cid}a")
    page.evaluate(f'rpl.unsubscribe("{cid}a", f).execute()')
    wait_not_listening(server, f"{cid}a")
    time.sleep(0.5)
    assert len(requests(page)) == 1


def test_long_channel_lists_go_as_post(page, site, server, cid):
    ids = [f"{cid}channel{number:03d}" for number in range(150)]
    open_with_server_script(page, site, server)
    page.evaluate(f"""window.rpl = new Dklab_Realplexor({wait_url(server.wait_port)!r});
        {json.dumps(ids)}.forEach(id => rpl.subscribe(id, recorder("x")));
        rpl.execute()""")
    wait_listening(server, ids[0], ids[-1])
    sent = requests(page)
    assert len(sent) == 1
    assert sent[0]["method"] == "POST"
    assert sent[0]["body"].startswith("identifier=" + ",".join(ids[:3]))
    assert "identifier=" not in sent[0]["url"]
    server.publish(ids[-1], '"last"')
    assert received(page, 1)[0]["id"] == ids[-1]


def test_iframe_page_offers_the_loader_of_the_original_client(page, server, cid):
    page.goto(f"{wait_url(server.wait_port)}?identifier=IFRAME")
    page.wait_for_function("typeof Dklab_Realplexor_Loader === 'object'", timeout=WAIT_MS)
    page.evaluate(f"""window.received = [];
        window.map = {{"x": {{cursor: null, callbacks: [
            function (data, id) {{ received.push({{data: data, id: id}}); }},
            function () {{ throw new Error("old callback broke"); }}]}}}};
        window.caller = function (func, args) {{
            try {{ func.apply(null, args); return null; }} catch (e) {{ return "" + e; }}
        }};
        Dklab_Realplexor_Loader.execute(map, caller, "{cid}")""")
    wait_listening(server, f"{cid}x")
    server.publish(f"{cid}x", '"old"')
    assert received(page, 1) == [{"data": "old", "id": "x"}]
    page.wait_for_function("map.x.cursor !== null", timeout=WAIT_MS)


def test_channel_without_a_message_misses_nothing_between_polls(page, site, server, cid):
    # The first publish ends the poll; the second comes before the next poll,
    # to a channel that has had no message (so no cursor) yet.
    open_with_server_script(page, site, server)
    page.evaluate(f"""window.rpl = new Dklab_Realplexor({wait_url(server.wait_port)!r});
        rpl.subscribe("{cid}a", recorder("a")).subscribe("{cid}b", recorder("b")).execute()""")
    expected = []
    for round_ in range(4):
        wait_listening(server, f"{cid}a", f"{cid}b")
        first, second = (f"{cid}b", f"{cid}a") if round_ % 2 else (f"{cid}a", f"{cid}b")
        server.publish(first, json.dumps(f"{round_} first"))
        server.publish(second, json.dumps(f"{round_} second"))
        expected += [f"{round_} first", f"{round_} second"]
        received(page, len(expected))
    time.sleep(0.3)
    assert sorted(r["data"] for r in received(page)) == sorted(expected)
