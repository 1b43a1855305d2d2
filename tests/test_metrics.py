"""GET /metrics over real sockets, read with prometheus_client's own parser; the loop-lag timer."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import start_server, write_config, write_users_file
from realplexor.metrics import LoopLag
from test_routes import call, error

DASHBOARD = Path(__file__).resolve().parent.parent / "docs" / "grafana-dashboard.json"


class Scrape:
    """One scrape: every sample by name and labels."""

    def __init__(self, text: str):
        self.families = {family.name: family for family in text_string_to_metric_families(text)}
        self.samples = {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
                        for family in self.families.values() for sample in family.samples}

    def value(self, name: str, **labels) -> float:
        return self.samples[(name, tuple(sorted(labels.items())))]

    def names(self) -> set[str]:
        """Every series name, those without samples yet too (a counter's with its ``_total``)."""
        names = {name for name, _ in self.samples}
        for family in self.families.values():
            names.add(family.name + "_total" if family.type == "counter" else family.name)
        return names


def scrape(server, **kwargs) -> Scrape:
    response = call(server, "GET", "/metrics", **kwargs)
    assert response.status == 200, response.raw
    assert response.headers["content-type"].startswith("text/plain; version=")
    return Scrape(response.text)


@pytest.mark.parametrize("engine", ["wsgi", "lean"])
def test_metrics_count_what_the_server_did(server_factory, cid, engine):
    server = server_factory(WAIT_ENGINE=engine, OFFLINE_TIMEOUT=30)
    before = scrape(server)
    assert before.value("realplexor_publishes_total") == 0
    assert before.value("realplexor_waiting_listeners", line="wait", engine=engine, transport="longpoll") == 0

    polls = [server.listen(f"{cid}a") for _ in range(3)] + [server.listen(f"{cid}b")]
    now = scrape(server)
    assert now.value("realplexor_waiting_listeners", line="wait", engine=engine, transport="longpoll") == 4
    assert now.value("realplexor_connections", line="wait", engine=engine, transport="longpoll") == 4
    # The scrape's own connection is the IN line's only one.
    assert now.value("realplexor_connections", line="in", engine="eventloop", transport="http") == 1
    assert now.value("realplexor_online_channels") == 2

    server.publish(f"{cid}a", '"to three"')                       # wakes 3 polls
    answer_bytes = [len(poll.response().body) - 3 for poll in polls[:3]]   # minus the leading " \r\n"
    for n in range(4):                                              # queued on channels nobody waits on
        server.publish(f"{cid}q{n},{cid}r", '"%d"' % n)
    for _ in range(5):
        assert server.in_http(f"{cid}a", "not json").status == 400
    assert server.get("nothing=here").status == 400                 # a WAIT request without identifier
    assert call(server, "DELETE", "/online").status == 405

    after = scrape(server)
    assert after.value("realplexor_publishes_total") == 5
    assert after.value("realplexor_deliveries_total") == 3
    assert after.value("realplexor_delivered_bytes_total") == sum(answer_bytes)
    assert after.value("realplexor_waiting_listeners", line="wait", engine=engine, transport="longpoll") == 1
    assert after.value("realplexor_queued_channels") == 6           # a, q0..q3 and r
    assert after.value("realplexor_queued_messages") == 5
    assert after.value("realplexor_queued_bytes") == len('"to three"') + 4 * len('"0"')
    assert after.value("realplexor_requests_refused_total", line="in", status="400") == 5
    assert after.value("realplexor_requests_refused_total", line="in", status="405") == 1
    assert after.value("realplexor_requests_refused_total", line="wait", status="400") == 1
    assert after.value("process_resident_memory_bytes") > 10 << 20
    assert after.value("process_open_fds") >= 5
    assert after.families["realplexor_publishes"].type == "counter"
    assert after.families["realplexor_queued_bytes"].type == "gauge"
    polls[3].close()
    server.wait_until(lambda: scrape(server).value(
        "realplexor_connections", line="wait", engine=engine, transport="longpoll") == 0)


@pytest.mark.parametrize("engine", ["wsgi", "lean"])
def test_event_streams_and_websockets_are_counted_apart_from_long_polls(server_factory, cid, engine):
    from test_streams import Stream
    from test_websocket import Client

    server = server_factory(WAIT_ENGINE=engine, STREAM_TRANSPORTS=["eventsource", "websocket"])
    poll = server.listen(f"{cid}a")
    stream = Stream(server.wait_port, f"{cid}b")
    socket_client = Client(server.wait_port, f"identifier={cid}c")
    try:
        assert stream.headers()[":status"] == 200
        server.wait_until(lambda: len(server.online(cid)) == 3)
        now = scrape(server)
        for transport in ("longpoll", "eventsource", "websocket"):
            assert now.value("realplexor_connections", line="wait", engine=engine, transport=transport) == 1
            assert now.value("realplexor_waiting_listeners", line="wait", engine=engine, transport=transport) == 1
    finally:
        stream.close()
        socket_client.close()
        poll.close()


def test_refusals_before_a_request_is_whole_are_counted(server_factory):
    server = server_factory(IN_MAXLEN=1000, IN_TIMEOUT=0.3)
    assert server.in_http("a", "[" + "1," * 600 + "1]").status == 413
    assert call(server, "POST", "/publish", {"ids": ["a"], "data": "x" * 2000}).status == 413
    assert call(server, "POST", "/publish", headers="Transfer-Encoding: chunked\r\n").status == 411
    reply = server.in_raw(b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\n", half_close=False)
    assert reply.startswith(b"HTTP/1.0 408 ")
    now = scrape(server)
    assert now.value("realplexor_requests_refused_total", line="in", status="413") == 2
    assert now.value("realplexor_requests_refused_total", line="in", status="411") == 1
    assert now.value("realplexor_requests_refused_total", line="in", status="408") == 1


def test_the_event_loop_lag_is_measured(server_factory):
    server = server_factory()
    lag = server.wait_until(lambda: not math.isnan(value := scrape(server).value(
        "realplexor_event_loop_lag_seconds")) and [value])[0]
    assert 0 <= lag < 1


def test_loop_lag_is_how_late_the_timer_fired():
    now = [100.0]

    def sleep(seconds):
        now[0] += seconds + 0.25

    lag = LoopLag(interval=1.0, clock=lambda: now[0], sleep=sleep)
    assert math.isnan(lag.seconds)
    lag.run(rounds=2)
    assert lag.seconds == pytest.approx(0.25)


def test_metrics_off_is_a_404(server_factory):
    server = server_factory(METRICS=False)
    assert error(call(server, "GET", "/metrics"), 404) == "metrics are off here (METRICS = false)"
    assert call(server, "GET", "/ready").status == 200


def test_any_login_may_read_the_metrics_of_a_guarded_server(tmp_path):
    users = write_users_file(tmp_path / "users.htpasswd", {"carol": "c4rol"})
    server = start_server(write_config(tmp_path / "realplexor.toml", USERS_FILE=str(users)))
    try:
        assert call(server, "GET", "/metrics").status == 401
        assert call(server, "GET", "/metrics", login=("carol", "wrong")).status == 403
        assert scrape(server, login=("carol", "c4rol")).value("realplexor_publishes_total") == 0
    finally:
        server.stop()


def test_every_dashboard_panel_reads_metrics_the_server_exports(server_factory):
    names = scrape(server_factory()).names()
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [panel for panel in dashboard["panels"] if panel.get("type") != "row"]
    wanted = {"connections", "publishes", "deliveries", "refus", "lag", "memory"}
    titles = " ".join(panel["title"].lower() for panel in panels)
    assert all(word in titles for word in wanted), titles
    for panel in panels:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            used = set(re.findall(r"\b((?:realplexor|process)_[a-z_]+)\b", target["expr"]))
            assert used, target["expr"]
            assert used <= names, (panel["title"], used - names)
