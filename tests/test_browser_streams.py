"""The JavaScript client over event streams in a real headless Chromium.

The harness and fixtures are the long-poll browser tests' (tests/test_browser.py):
``window.requests`` records only fetch() calls, that is long polls.
"""
from __future__ import annotations

import socket
import threading

import pytest

from test_browser import (open_page, open_with_server_script, page, received, requests, site,  # noqa: F401
                          wait_listening, wait_url)

STREAMS = ["eventsource"]


def test_messages_arrive_over_an_event_stream_with_no_long_poll(page, site, server_factory, cid):
    server = server_factory(STREAM_TRANSPORTS=STREAMS)
    open_with_server_script(page, site, server)
    page.evaluate(f"""window.rpl = new Dklab_Realplexor({wait_url(server.wait_port)!r});
        rpl.subscribe("{cid}a", recorder("a")).subscribe("{cid}b", recorder("b")).execute()""")
    wait_listening(server, f"{cid}a", f"{cid}b")
    server.publish(f"{cid}a,{cid}b", '{"both": 1}')
    server.publish(f"{cid}b", '"only b"')
    got = received(page, 3)
    assert [(r["tag"], r["data"]) for r in got] == [("a", {"both": 1}), ("b", {"both": 1}), ("b", "only b")]
    assert got[0]["cursor"] == got[1]["cursor"] and got[0]["cursorType"] == "string"
    assert requests(page) == []


def test_subscribing_after_execute_reopens_the_stream_from_the_cursors_seen(page, site, server_factory, cid):
    server = server_factory(STREAM_TRANSPORTS=STREAMS)
    open_with_server_script(page, site, server)
    page.evaluate(f"""window.rpl = new Dklab_Realplexor({wait_url(server.wait_port)!r});
        rpl.subscribe("{cid}a", recorder("a")).execute()""")
    wait_listening(server, f"{cid}a")
    server.publish(f"{cid}a", '"one"')
    received(page, 1)
    server.publish(f"{cid}a", '"two"')      # may come before or after the stream reopens
    page.evaluate(f"""rpl.subscribe("{cid}b", recorder("b")).execute()""")
    wait_listening(server, f"{cid}b")
    server.publish(f"{cid}b", '"three"')
    got = received(page, 3)
    assert [(r["tag"], r["data"]) for r in got] == [("a", "one"), ("a", "two"), ("b", "three")]
    assert requests(page) == []


def test_a_refused_event_stream_falls_back_to_long_polling(page, site, server_factory, cid):
    # The plain file does not know the server refuses streams: it tries one first.
    server = server_factory(STREAM_TRANSPORTS=[])
    open_page(page, site, f"{site}/dklab_realplexor.js")
    page.evaluate(f"""window.rpl = new Dklab_Realplexor({wait_url(server.wait_port)!r});
        rpl.subscribe("{cid}a", recorder("a")).execute()""")
    wait_listening(server, f"{cid}a")
    server.publish(f"{cid}a", '"polled"')
    assert [r["data"] for r in received(page, 1)] == ["polled"]
    assert requests(page) and "reset=1" in requests(page)[0]["url"]


@pytest.mark.parametrize("transports", [STREAMS, []], ids=["eventsource", "long-poll"])
def test_a_history_cut_reaches_the_page(page, site, server_factory, cid, transports):
    server = server_factory(STREAM_TRANSPORTS=transports, MAX_DATA_FOR_ID=2)
    for n in range(4):
        server.publish(f"{cid}a", f'"{n}"')
        if n == 1:   # after what the cut will name: b, listened from now, must not get it
            server.publish(f"{cid}b", '"old b"')
    open_with_server_script(page, site, server)
    page.evaluate(f"""window.resets = [];
        window.rpl = new Dklab_Realplexor({wait_url(server.wait_port)!r});
        rpl.onReset(function (id, cursor) {{ resets.push([id, cursor, received.length]); }})
           .setCursor("{cid}a", "0").subscribe("{cid}a", recorder("a"))
           .subscribe("{cid}b", recorder("b")).execute()""")
    got = received(page, 2)
    page.wait_for_timeout(300)
    assert [r["data"] for r in received(page)] == ["2", "3"]
    resets = page.evaluate("resets")
    assert len(resets) == 1 and resets[0][0] == f"{cid}a" and resets[0][2] == 0
    assert resets[0][1] < got[0]["cursor"]
    assert (requests(page) == []) == bool(transports)


SOCKETS = ["websocket", "eventsource"]


def test_messages_arrive_over_a_websocket_and_subscriptions_go_on_it(page, site, server_factory, cid):
    server = server_factory(STREAM_TRANSPORTS=SOCKETS)
    sockets = []
    page.on("websocket", lambda ws: sockets.append(ws.url))
    open_with_server_script(page, site, server)
    page.evaluate(f"""window.rpl = new Dklab_Realplexor({wait_url(server.wait_port)!r});
        rpl.subscribe("{cid}a", recorder("a")).execute()""")
    wait_listening(server, f"{cid}a")
    server.publish(f"{cid}a", '"one"')
    received(page, 1)
    # Subscribed after execute(): sent on the open socket, no new connection.
    page.evaluate(f"""rpl.subscribe("{cid}b", recorder("b")).execute()""")
    wait_listening(server, f"{cid}b")
    server.publish(f"{cid}b", '"two"')
    got = received(page, 2)
    assert [(r["tag"], r["data"]) for r in got] == [("a", "one"), ("b", "two")]
    assert len(sockets) == 1 and sockets[0].startswith("ws://")
    assert requests(page) == []


def test_a_refused_websocket_falls_back_to_the_event_stream(page, site, server_factory, cid):
    # The script comes from a server that offers WebSockets; the polls go to
    # one that refuses them (as behind a proxy that breaks upgrades).
    offering = server_factory(STREAM_TRANSPORTS=SOCKETS)
    server = server_factory(STREAM_TRANSPORTS=STREAMS)
    sockets = []
    page.on("websocket", lambda ws: sockets.append(ws.url))
    open_with_server_script(page, site, offering)
    page.evaluate(f"""window.rpl = new Dklab_Realplexor({wait_url(server.wait_port)!r});
        rpl.subscribe("{cid}a", recorder("a")).execute()""")
    wait_listening(server, f"{cid}a")
    server.publish(f"{cid}a", '"streamed"')
    assert [r["data"] for r in received(page, 1)] == ["streamed"]
    assert len(sockets) == 1 and requests(page) == []


class UpgradeDroppingProxy:
    """A TCP proxy that drops a request's Upgrade header, as a misconfigured
    reverse proxy does: a WebSocket handshake reaches the server as a plain poll."""

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.stopped = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                client, _ = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return     # closed
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        client.settimeout(60)
        with client, socket.create_connection(("127.0.0.1", self.upstream_port), timeout=60) as upstream:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = client.recv(65536)
                if not chunk:
                    return
                head += chunk
            head, _, rest = head.partition(b"\r\n\r\n")
            lines = [line for line in head.split(b"\r\n") if not line.lower().startswith(b"upgrade:")]
            lines = [b"Connection: keep-alive" if line.lower().startswith(b"connection:") else line
                     for line in lines]
            upstream.sendall(b"\r\n".join(lines) + b"\r\n\r\n" + rest)
            threading.Thread(target=self._pipe, args=(upstream, client), daemon=True).start()
            self._pipe(client, upstream)

    @staticmethod
    def _pipe(source: socket.socket, target: socket.socket) -> None:
        try:
            while True:
                chunk = source.recv(65536)
                if not chunk:
                    break
                target.sendall(chunk)
        except OSError:
            pass
        finally:
            for sock in (source, target):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.stopped.set()
        self.listener.close()


def test_a_websocket_that_never_opens_is_given_up_for_the_event_stream(page, site, server_factory, cid):
    server = server_factory(STREAM_TRANSPORTS=SOCKETS)
    proxy = UpgradeDroppingProxy(server.wait_port)
    sockets = []
    page.on("websocket", lambda ws: sockets.append(ws.url))
    try:
        open_with_server_script(page, site, server)
        page.evaluate(f"""window.rpl = new Dklab_Realplexor({wait_url(proxy.port)!r});
            rpl.subscribe("{cid}a", recorder("a")).execute()""")
        page.wait_for_function("rpl.transport() === 'eventsource'", timeout=20000)
        wait_listening(server, f"{cid}a")
        server.publish(f"{cid}a", '"after the fall-back"')
        assert [r["data"] for r in received(page, 1)] == ["after the fall-back"]
        assert len(sockets) == 1 and requests(page) == []
    finally:
        proxy.close()
