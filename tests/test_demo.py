"""The sandbox (``python -m realplexor.demo``) in real headless Chromium.

Two browser contexts stand for two people on two computers. The pages
poll a real Realplexor server through the JavaScript client; the
sandbox's back end publishes through ``realplexor.client``.
"""
from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
import urllib.error
import urllib.request

import pytest

from conftest import BROWSER_WAIT_MS, spawn, wait_parts, write_config
from realplexor.client import Listener, Realplexor
from realplexor.demo.app import Sandbox, SandboxServer
from realplexor.demo.messages import BadInput, parse_post
from realplexor.demo.online import OnlineList
from realplexor.demo.publisher import JsonPublisher

WAIT_MS = BROWSER_WAIT_MS
NAMESPACE = "demo_"


class Demo:
    """A sandbox on a free port in this process, over a Realplexor server of its own."""

    def __init__(self, server):
        self.server = server
        self.client = Realplexor("127.0.0.1", server.in_port, namespace=NAMESPACE, timeout=5)
        self.online = OnlineList(self.client, interval=0.3)
        self.http = SandboxServer(("127.0.0.1", 0), Sandbox(
            self.client, f"http://127.0.0.1:{server.wait_port}/", self.online))
        self.url = self.http.url
        self.online.start()
        self.http.serve_in_background()

    def listeners(self, channel: str) -> int:
        return self.server.online(NAMESPACE).get(NAMESPACE + channel, 0)

    def wait_listeners(self, channel: str, count: int) -> None:
        self.server.wait_until(lambda: self.listeners(channel) >= count)

    def post(self, payload, raw: bytes | None = None) -> tuple[int, dict]:
        body = raw if raw is not None else json.dumps(payload).encode()
        request = urllib.request.Request(self.url + "api/send", data=body,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            with error:
                return error.code, json.loads(error.read())

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()
        self.online.stop()


@pytest.fixture
def demo(server_factory):
    running = Demo(server_factory(OFFLINE_TIMEOUT=1, WAIT_TIMEOUT=30))
    yield running
    running.close()


@pytest.fixture
def open_page(browser):
    """Open the sandbox in a fresh browser context: ``open_page(url)``."""
    contexts = []

    def opener(url: str):
        context = browser.new_context(viewport={"width": 1200, "height": 900})
        context.set_default_timeout(WAIT_MS)
        contexts.append(context)
        page = context.new_page()
        page.errors = []
        page.on("pageerror", lambda error: page.errors.append(str(error)))
        page.goto(url)
        page.wait_for_selector("html[data-ready=true]", timeout=WAIT_MS)
        return page

    yield opener
    for context in contexts:
        context.close()


def messages(page, channel: str) -> list[dict]:
    return page.eval_on_selector_all(
        f'.channel[data-id="{channel}"] .message',
        """items => items.map(item => ({
            channel: item.querySelector('.message-channel').textContent,
            cursor: item.querySelector('.message-cursor').textContent,
            author: item.querySelector('.meta .message-author')?.textContent ?? null,
            cursorInMeta: item.querySelector('.meta .message-cursor') !== null,
            time: item.querySelector('.message-time').textContent,
            text: item.querySelector('.message-body').innerText,
            html: item.querySelector('.message-body').innerHTML}))""")


def wait_messages(page, channel: str, count: int) -> list[dict]:
    page.wait_for_function(
        f"document.querySelectorAll('.channel[data-id=\"{channel}\"] .message').length >= {count}",
        timeout=WAIT_MS)
    return messages(page, channel)


def online_list(page) -> dict[str, str]:
    return page.eval_on_selector_all(
        "#online li", "items => Object.fromEntries(items.map(i => [i.dataset.id, i.dataset.count]))")


def open_channels(page) -> list[str]:
    return page.eval_on_selector_all(".channel", "items => items.map(i => i.dataset.id)")


def send_from(page, ids: str, text: str, structured: bool = False) -> None:
    page.fill("#post-ids", ids)
    page.fill("#post-text", text)
    page.set_checked("#post-structured", structured)
    page.click("#post-send")


def test_a_message_to_two_channels_reaches_both_pages_once(demo, open_page):
    first, second = open_page(demo.url), open_page(demo.url)
    assert open_channels(first) == open_channels(second) == ["Alpha", "Beta", "RuTvit"]
    for channel in ("Alpha", "Beta", "RuTvit"):
        demo.wait_listeners(channel, 2)

    send_from(first, "Alpha, Beta", "hello, both")
    first.wait_for_function("document.getElementById('post-feedback').textContent.includes('Sent to')")
    assert first.text_content("#post-feedback") == "Sent to Alpha, Beta in one request."
    for page in (first, second):
        alpha, beta = wait_messages(page, "Alpha", 1), wait_messages(page, "Beta", 1)
    time.sleep(0.5)
    for page in (first, second):
        alpha, beta = messages(page, "Alpha"), messages(page, "Beta")
        assert [m["text"] for m in alpha] == [m["text"] for m in beta] == ["hello, both"]
        assert messages(page, "RuTvit") == []
        assert (alpha[0]["channel"], beta[0]["channel"]) == ("Alpha", "Beta")
        # One publish: one cursor, shared by both channels and both pages.
        assert re.fullmatch(r"\d+\.\d+", alpha[0]["cursor"])
        assert alpha[0]["cursor"] == beta[0]["cursor"] == messages(first, "Alpha")[0]["cursor"]
        assert re.search(r"\d{1,2}:\d{2}:\d{2}", alpha[0]["time"])
        # A plain post names its author; the raw cursor sits below, not in the heading line.
        assert alpha[0]["author"] == "guest" and not alpha[0]["cursorInMeta"]
        assert page.errors == []
    assert first.input_value("#post-text") == ""


def test_online_list_follows_an_added_and_a_closed_channel(demo, open_page):
    first, second = open_page(demo.url), open_page(demo.url)
    second.wait_for_function("document.querySelector('#online li[data-id=Alpha]')?.dataset.count === '2'")
    assert "online_list" not in online_list(second)

    first.fill("#add-id", "Gamma")
    first.click("#add-form button")
    assert open_channels(first)[-1] == "Gamma"
    assert "ids=Alpha,Beta,RuTvit,Gamma" in first.url
    second.wait_for_selector('#online li[data-id="Gamma"][data-count="1"]', timeout=5000)
    assert "Gamma" not in open_channels(second)

    first.click('.channel[data-id="Gamma"] .channel-close')
    assert "Gamma" not in open_channels(first)
    # Gone once the server's OFFLINE_TIMEOUT (1 s here) has passed.
    second.wait_for_selector('#online li[data-id="Gamma"]', state="detached", timeout=6000)
    assert online_list(second) == {"Alpha": "2", "Beta": "2", "RuTvit": "2"}

    # A closed channel gets nothing more; the others still do.
    demo.wait_listeners("Alpha", 2)
    demo.client.send(["Gamma", "Alpha"], "after closing")
    wait_messages(first, "Alpha", 1)
    assert first.locator('.channel[data-id="Gamma"]').count() == 0


def test_no_message_is_lost_while_the_page_reconnects(demo, open_page):
    page = open_page(demo.url + "?ids=Alpha,Beta")
    for round_ in range(5):
        demo.wait_listeners("Alpha", 1)
        demo.wait_listeners("Beta", 1)
        # The first ends the page's poll; the second comes before it polls again.
        first, second = ("Beta", "Alpha") if round_ % 2 else ("Alpha", "Beta")
        demo.client.send(first, f"{round_} first")
        demo.client.send(second, f"{round_} second")
        wait_messages(page, first, round_ + 1)
        wait_messages(page, second, round_ + 1)
    time.sleep(0.3)
    texts = sorted(m["text"] for channel in ("Alpha", "Beta") for m in messages(page, channel))
    assert texts == sorted(f"{n} {which}" for n in range(5) for which in ("first", "second"))


def test_ids_in_the_address_choose_the_channels(demo, open_page):
    page = open_page(demo.url + "?ids=Habrahabr,bad-name")
    assert open_channels(page) == ["Habrahabr"]
    assert "bad-name" in page.text_content("#add-error")
    assert page.input_value("#post-ids") == "Habrahabr"
    demo.wait_listeners("Habrahabr", 1)
    assert demo.listeners("Alpha") == 0
    demo.client.send("Habrahabr", "hi from the back end")
    assert [m["text"] for m in wait_messages(page, "Habrahabr", 1)] == ["hi from the back end"]

    empty = open_page(demo.url + "?ids=")
    assert open_channels(empty) == []
    assert empty.is_visible("#no-channels")


def test_structured_data_is_shown_as_structure(demo, open_page):
    page = open_page(demo.url + "?ids=Alpha")
    demo.wait_listeners("Alpha", 1)
    page.fill("#post-author", "Ann")
    send_from(page, "Alpha", "structured hello", structured=True)
    message = wait_messages(page, "Alpha", 1)[0]
    body = page.locator('.channel[data-id="Alpha"] .message-body').first
    keys = body.locator(":scope > dl.tree > dt").all_text_contents()
    assert keys == ["author", "text", "sent_at", "to"]
    assert message["author"] == "Ann"
    assert body.locator(":scope > dl.tree > dd").nth(0).text_content() == "Ann"
    assert body.locator("ol.tree > li").all_text_contents() == ["Alpha"]
    assert "{" not in message["text"]

    demo.wait_listeners("Alpha", 1)
    demo.client.send("Alpha", {"user": {"name": "Bob", "tags": ["x", "y"]}, "n": 3, "ok": True,
                               "markup": "<b>not bold</b>"})
    wait_messages(page, "Alpha", 2)
    newest = page.locator('.channel[data-id="Alpha"] .message-body').first
    assert newest.locator(":scope > dl.tree > dt").all_text_contents() == ["user", "n", "ok", "markup"]
    nested = newest.locator(":scope > dl.tree > dd").first.locator(":scope > dl.tree")
    assert nested.locator(":scope > dt").all_text_contents() == ["name", "tags"]
    assert nested.locator("ol.tree > li").all_text_contents() == ["x", "y"]
    assert newest.locator("b").count() == 0   # text, never markup
    assert "<b>not bold</b>" in newest.inner_text()


def test_bad_input_shows_a_message_and_publishes_nothing(demo, open_page):
    page = open_page(demo.url)
    demo.wait_listeners("Alpha", 1)
    posted = []
    page.on("request", lambda request: posted.append(request) if "/api/send" in request.url else None)

    send_from(page, "Alpha", "   ")
    assert page.text_content("#post-error") == "Write a message first: the text is empty."
    send_from(page, "Alpha,Al pha", "hello")
    assert page.text_content("#post-error") == \
        "Invalid channel name 'Al pha': use letters, digits and _ only."
    send_from(page, " , ", "hello")
    assert page.text_content("#post-error") == "Name at least one channel to send to."
    send_from(page, "online_list", "hello")
    assert "reserved" in page.text_content("#post-error")
    assert posted == []

    # What only the back end checks comes back from it, shown the same way.
    page.evaluate("document.getElementById('post-text').removeAttribute('maxlength')")
    send_from(page, "Alpha", "x" * 1001)
    page.wait_for_function("document.getElementById('post-error').textContent.includes('too long')")
    assert page.text_content("#post-error") == "The message is too long: at most 1000 characters."
    assert len(posted) == 1

    page.fill("#add-id", "no spaces")
    page.click("#add-form button")
    assert "letters, digits and _ only" in page.text_content("#add-error")
    page.fill("#add-id", "Alpha")
    page.click("#add-form button")
    assert page.text_content("#add-error") == "Alpha is already open."
    assert open_channels(page) == ["Alpha", "Beta", "RuTvit"]

    time.sleep(0.5)
    assert all(messages(page, channel) == [] for channel in ("Alpha", "Beta", "RuTvit"))
    send_from(page, "Alpha", "good")
    assert [m["text"] for m in wait_messages(page, "Alpha", 1)] == ["good"]
    assert page.text_content("#post-error") == ""


def test_api_send_rejects_bad_input_with_400(demo):
    poll = demo.server.listen("demo_Alpha,demo_Beta")
    bad = [
        ({"ids": "Alpha", "text": ""}, "write a message first"),
        ({"ids": "Alpha"}, "write a message first"),
        ({"ids": "Alpha", "text": 5}, "write a message first"),
        ({"ids": "", "text": "hi"}, "name at least one channel"),
        ({"ids": "Alpha,Be-ta", "text": "hi"}, "invalid channel name 'Be-ta'"),
        ({"ids": ["Alpha", 3], "text": "hi"}, "ids must be channel names"),
        ({"ids": "online_list", "text": "hi"}, "reserved"),
        ({"ids": ",".join(f"c{i}" for i in range(21)), "text": "hi"}, "too many channels"),
        ({"ids": "Alpha", "text": "hi", "structured": "yes"}, "structured must be true or false"),
        ({"ids": "Alpha", "text": "x" * 1001}, "too long"),
        (["Alpha", "hi"], "send a JSON object"),
    ]
    for payload, reason in bad:
        status, answer = demo.post(payload)
        assert status == 400, payload
        assert reason in answer["error"], (payload, answer)
    status, answer = demo.post(None, raw=b"{not json")
    assert (status, answer) == (400, {"error": "the request body is not valid JSON"})

    assert demo.post({"ids": "Alpha, Beta,Alpha", "text": " ok "}) == (200, {"ok": True, "ids": ["Alpha", "Beta"]})
    parts = wait_parts(poll.response())
    assert len(parts) == 1
    assert parts[0]["data"] == {"author": "guest", "text": "ok"}
    assert sorted(parts[0]["ids"]) == ["demo_Alpha", "demo_Beta"]


def test_posts_go_through_the_json_api(server_factory):
    running = Demo(server_factory(OFFLINE_TIMEOUT=1, WAIT_TIMEOUT=30, VERBOSITY=2))
    try:
        poll = running.server.listen("demo_Alpha")
        assert running.post({"ids": "Alpha", "text": "via the API"}) == (200, {"ok": True, "ids": ["Alpha"]})
        running.server.output.wait_for(r"IN 127\.0\.0\.1:\d+: POST /publish")
        assert wait_parts(poll.response())[0]["data"] == {"author": "guest", "text": "via the API"}
    finally:
        running.close()


def test_a_refused_publish_is_a_502_with_the_servers_reason(server_factory, tmp_path):
    from conftest import write_users_file

    users = write_users_file(tmp_path / "users.htpasswd", {"alice": "secret"})
    running = Demo(server_factory(USERS_FILE=str(users)))
    try:
        status, answer = running.post({"ids": "Alpha", "text": "hi"})
        assert status == 502
        assert answer["error"] == ("Realplexor did not take the message: credentials needed: "
                                   "send HTTP Basic authorization with a USERS_FILE login")
    finally:
        running.close()


def test_the_json_publisher_strips_its_namespace(server_factory):
    server = server_factory()
    cursors = JsonPublisher("127.0.0.1", server.in_port, "ns_", timeout=5).publish(["a", "b"], {"n": 1})
    assert sorted(cursors) == ["a", "b"]
    assert wait_parts(server.get("identifier=0:ns_a"))[0] == {"ids": {"ns_a": cursors["a"]}, "data": {"n": 1}}


def test_a_plain_post_shows_its_author_and_the_page_has_an_icon(demo, open_page):
    page = open_page(demo.url + "?ids=Alpha")
    demo.wait_listeners("Alpha", 1)
    page.fill("#post-author", "Ann")
    send_from(page, "Alpha", "plain hello")
    (message,) = wait_messages(page, "Alpha", 1)
    assert (message["author"], message["text"]) == ("Ann", "plain hello")
    icon = page.get_attribute('link[rel="icon"]', "href")
    for path in (icon, "/favicon.ico"):
        with urllib.request.urlopen(demo.url.rstrip("/") + path, timeout=10) as response:
            assert response.headers["Content-Type"] == "image/svg+xml"
            assert response.read().startswith(b"<svg")


def test_structured_posts_carry_author_text_time_and_channels():
    from datetime import datetime, timezone

    now = datetime(2024, 11, 25, 12, 0, tzinfo=timezone.utc)
    post = parse_post({"ids": "Alpha,Beta", "text": "hi", "structured": True, "author": " "}, now)
    assert post.ids == ("Alpha", "Beta")
    assert post.data == {"author": "guest", "text": "hi", "sent_at": "2024-11-25T12:00:00+00:00",
                         "to": ["Alpha", "Beta"]}
    assert parse_post({"ids": ["Alpha"], "text": "plain"}).data == {"author": "guest", "text": "plain"}
    assert parse_post({"ids": ["Alpha"], "text": "plain", "author": "Ann"}).data == {"author": "Ann", "text": "plain"}
    with pytest.raises(BadInput, match="name is too long"):
        parse_post({"ids": "Alpha", "text": "hi", "structured": True, "author": "a" * 41})


def _wait_exit(process, timeout: float = 10) -> int:
    return process.wait(timeout)


def test_command_starts_a_server_and_stops_it_on_ctrl_c(tmp_path):
    config = write_config(tmp_path / "realplexor.toml", OFFLINE_TIMEOUT=1)
    process, output = spawn([sys.executable, "-m", "realplexor.demo", "--port", "0",
                             "--config", str(config)])
    try:
        pid = int(output.wait_for(r"Realplexor server started \(pid (\d+)\)").group(1))
        url = output.wait_for(r"open (http://127\.0\.0\.1:\d+/)").group(1)
        wait_port = int(re.search(r"WAIT line listening on [\d.]+:(\d+)", output.text()).group(1))
        with urllib.request.urlopen(url, timeout=10) as response:
            page = response.read().decode()
        assert f'src="http://127.0.0.1:{wait_port}/?identifier=SCRIPT"' in page
        request = urllib.request.Request(url + "api/send", data=b'{"ids": "Alpha", "text": "hi"}')
        with urllib.request.urlopen(request, timeout=10) as response:
            assert json.loads(response.read()) == {"ok": True, "ids": ["Alpha"]}
        process.send_signal(signal.SIGINT)
        assert _wait_exit(process) == 0
        output.wait_for("Realplexor server stopped")
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def test_command_uses_a_running_server(server_factory):
    server = server_factory()
    process, output = spawn([sys.executable, "-m", "realplexor.demo", "--port", "0",
                             "--in-port", str(server.in_port),
                             "--wait-url", f"http://127.0.0.1:{server.wait_port}/"])
    try:
        output.wait_for(f"Using the Realplexor server whose IN line is 127.0.0.1:{server.in_port}")
        output.wait_for(r"open http://127\.0\.0\.1:\d+/")
        process.send_signal(signal.SIGTERM)
        assert _wait_exit(process) == 0
        assert "Realplexor server started" not in output.text()
        assert server.process.poll() is None
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def test_command_fails_clearly_without_a_server_when_told_not_to_start_one(tmp_path):
    from conftest import free_port

    process, output = spawn([sys.executable, "-m", "realplexor.demo", "--port", "0", "--no-server",
                             "--in-port", str(free_port())])
    assert _wait_exit(process) == 1
    output.wait_for("no Realplexor server answers on 127.0.0.1:")


def test_the_page_shows_how_it_listens(demo, open_page):
    page = open_page(demo.url + "?ids=Alpha")
    page.wait_for_function("document.getElementById('connection').dataset.transport !== ''",
                           timeout=WAIT_MS)
    transport = page.get_attribute("#connection", "data-transport")
    assert transport in ("websocket", "eventsource", "longpoll")
    assert transport in page.text_content("#connection")


def channel_entries(page, channel: str) -> list[tuple[str, str]]:
    """A channel's list, newest first: ("message", text) or ("cut", cursor) per entry."""
    entries = page.eval_on_selector_all(
        f'.channel[data-id="{channel}"] .messages > li',
        """items => items.map(item => item.hasAttribute('data-reset')
            ? ['cut', item.getAttribute('data-reset')]
            : ['message', item.querySelector('.message-body').innerText])""")
    return [tuple(entry) for entry in entries]


def test_a_history_cut_shows_a_notice_then_the_latest_messages(server_factory, open_page):
    demo = Demo(server_factory(OFFLINE_TIMEOUT=1, WAIT_TIMEOUT=30, MAX_DATA_FOR_ID=2))
    try:
        page = open_page(demo.url + "?ids=Alpha")
        demo.wait_listeners("Alpha", 1)
        demo.client.send("Alpha", "before")
        wait_messages(page, "Alpha", 1)

        # The page goes away: every poll it starts fails until the route is lifted.
        refused = []

        def refuse(route):
            refused.append(route.request.url)
            route.abort()

        def is_poll(url: str) -> bool:
            return "identifier=" in url and "identifier=SCRIPT" not in url

        page.route(is_poll, refuse)
        demo.client.send("Alpha", "m1")      # ends the poll in flight, if it got past the route
        deadline = time.monotonic() + WAIT_MS / 1000
        while not refused:
            assert time.monotonic() < deadline, "the page never polled again"
            page.wait_for_timeout(50)
        for n in range(2, 6):
            demo.client.send("Alpha", f"m{n}")   # MAX_DATA_FOR_ID 2: m4 and m5 are kept
        (told,) = Listener({"Alpha": 0}, "127.0.0.1", demo.server.wait_port, NAMESPACE, timeout=5).poll()
        assert told.reset
        page.unroute(is_poll, refuse)

        page.wait_for_selector('.channel[data-id="Alpha"] .history-cut[data-reset]', timeout=WAIT_MS)
        notice = page.text_content('.channel[data-id="Alpha"] .history-cut')
        assert notice.startswith("Some messages on Alpha were lost while this page was away")
        page.wait_for_function(
            """document.querySelector('.channel[data-id="Alpha"] .messages > li .message-body')
                 ?.innerText === 'm5'""", timeout=WAIT_MS)
        entries = channel_entries(page, "Alpha")
        assert entries[:3] == [("message", "m5"), ("message", "m4"), ("cut", told.ids["Alpha"])]
        assert entries[-1] == ("message", "before")
        assert ("message", "m2") not in entries and ("message", "m3") not in entries
        assert page.errors == []
    finally:
        demo.close()
