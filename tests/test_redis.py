"""Several server processes sharing channels through a real redis-server."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from decimal import Decimal

import pytest

from conftest import ROOT, TIMEOUT, RedisServer, RunningServer, spawn, wait_parts, \
    event_parts, received_in_loop, stream_in_process, write_config, write_users_file

pytest.importorskip("redis")

SHARED = {"OFFLINE_TIMEOUT": 1, "WAIT_TIMEOUT": 30, "PROCESS_TIMEOUT": 2}


@pytest.fixture
def pair(server_factory, redis_server):
    """Two servers on one Redis, on both WAIT engines."""
    return (server_factory(BACKEND=redis_server.url, WAIT_ENGINE="wsgi", **SHARED),
            server_factory(BACKEND=redis_server.url, WAIT_ENGINE="lean", **SHARED))


def datas(poll) -> list:
    return [part["data"] for part in wait_parts(poll.response())]


def test_a_publish_through_one_reaches_polls_on_both(pair, cid):
    one, two = pair
    polls = [two.listen(f"{cid}a"), one.listen(f"{cid}a")]
    one.wait_until(lambda: one.online(cid) == {f"{cid}a": 2})
    response = one.publish(f"{cid}a", '{"via": "one"}')
    assert response.status == 200
    for poll in polls:
        assert datas(poll) == [{"via": "one"}]


def test_one_publish_to_several_channels_is_one_part_on_the_other_process(pair, cid):
    one, two = pair
    poll = two.listen(f"{cid}a,{cid}b")
    one.wait_until(lambda: len(one.online(cid)) == 2)
    one.publish(f"{cid}a,{cid}b,{cid}c", '"all"')
    parts = wait_parts(poll.response())
    assert len(parts) == 1 and sorted(parts[0]["ids"]) == [f"{cid}a", f"{cid}b"]
    assert parts[0]["ids"][f"{cid}a"] == parts[0]["ids"][f"{cid}b"]


def test_cursors_are_strictly_ordered_across_processes_under_concurrent_publishes(server_factory, redis_server,
                                                                                  cid):
    one, two = (server_factory(BACKEND=redis_server.url, MAX_DATA_FOR_ID=200, **SHARED) for _ in range(2))
    sent: dict[str, list[str]] = {"one": [], "two": []}

    def publish_from(name, server):
        for n in range(40):
            server.publish(f"{cid}a", json.dumps(f"{name}{n:02d}"))
            sent[name].append(f"{name}{n:02d}")

    threads = [threading.Thread(target=publish_from, args=item) for item in (("one", one), ("two", two))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT * 3)
    parts = wait_parts(one.get(f"identifier=0:{cid}a"))
    cursors = [Decimal(part["ids"][f"{cid}a"]) for part in parts]
    assert len(parts) == 80 and cursors == sorted(set(cursors))
    got = [part["data"] for part in parts]
    for name in ("one", "two"):
        assert [data for data in got if data.startswith(name)] == sent[name]


def test_a_poll_moving_to_the_other_process_loses_and_repeats_nothing(pair, cid):
    one, two = pair
    for n in range(3):
        one.publish(f"{cid}a", json.dumps(n))
    first = wait_parts(one.get(f"identifier=0:{cid}a"))
    assert [part["data"] for part in first] == [0, 1, 2]
    cursor = first[-1]["ids"][f"{cid}a"]
    poll = two.poll(f"identifier={cursor}:{cid}a")
    two.publish(f"{cid}a", "3")
    assert datas(poll) == [3]
    one.publish(f"{cid}a", "4")
    again = wait_parts(two.get(f"identifier={cursor}:{cid}a"))
    assert [part["data"] for part in again] == [3, 4]


def test_limiters_and_logins_hold_across_processes(server_factory, redis_server, tmp_path, cid):
    users = write_users_file(tmp_path / "users.htpasswd", {"bob": "pw"})
    one, two = (server_factory(BACKEND=redis_server.url, USERS_FILE=str(users), **SHARED) for _ in range(2))
    friend = two.listen(f"bob_{cid}x,bob_{cid}friends")
    stranger = two.listen(f"bob_{cid}x")
    one.wait_until(lambda: f"bob_{cid}x 2\n" in one.command(f"ONLINE bob_{cid}", "bob:pw@").text)
    assert one.in_http(f"bob:pw@bob_{cid}x,*bob_{cid}friends", '"friends only"').status == 200
    assert one.in_http(f"bob:pw@{cid}x", '"not bob\'s"').status == 403
    assert datas(friend) == ["friends only"]
    assert not stranger.has_ended(0.3)


def test_online_and_watch_see_the_whole_cluster(pair, cid):
    one, two = pair
    start = int(one.command("WATCH").text.split()[1].split(":")[0])
    poll = two.listen(f"{cid}a")
    one.wait_until(lambda: one.online(cid) == {f"{cid}a": 1})
    events = one.command(f"WATCH {start} {cid}").text.splitlines()
    assert [(line.split()[0], line.split(":")[1]) for line in events] == [("online", f"{cid}a")]
    assert int(events[0].split()[1].split(":")[0]) > start
    poll.close()
    # Offline once OFFLINE_TIMEOUT (1 s) has passed since the last listener anywhere left.
    one.wait_until(lambda: one.online(cid) == {}, timeout=10)
    events = two.command(f"WATCH {start} {cid}").text.splitlines()
    assert [line.split()[0] for line in events] == ["offline"]


def test_a_killed_process_stops_counting_within_process_timeout(server_factory, redis_server, cid):
    one, two = (server_factory(BACKEND=redis_server.url, **SHARED) for _ in range(2))
    two.listen(f"{cid}a")
    one.wait_until(lambda: one.online(cid) == {f"{cid}a": 1})
    two.process.send_signal(signal.SIGKILL)
    two.process.wait(TIMEOUT)
    # PROCESS_TIMEOUT 2 s, then the next heartbeat, then OFFLINE_TIMEOUT 1 s.
    one.wait_until(lambda: one.online(cid) == {}, timeout=10)


def test_history_survives_restarting_every_process(server_factory, redis_server, cid):
    first = server_factory(BACKEND=redis_server.url, **SHARED)
    first.publish(f"{cid}a", '"kept"')
    assert first.stop() == 0
    later = server_factory(BACKEND=redis_server.url, **SHARED)
    assert [part["data"] for part in wait_parts(later.get(f"identifier=0:{cid}a"))] == ["kept"]


def test_redis_down_is_a_503_polls_wait_and_all_recovers(server_factory, cid):
    redis = RedisServer().start()
    try:
        one, two = (server_factory(BACKEND=redis.url, **SHARED) for _ in range(2))
        poll = two.listen(f"{cid}a")
        one.wait_until(lambda: one.online(cid) == {f"{cid}a": 1})
        redis.stop()
        refused = one.in_http(f"{cid}a", '"lost?"')
        assert refused.status == 503 and "shared store unreachable" in refused.text
        assert not poll.has_ended(0.5)
        # A load balancer asking /ready hears it, and /health still says the process serves.
        one.wait_until(lambda: one.in_raw(b"GET /ready HTTP/1.1\r\nHost: x\r\n\r\n").startswith(b"HTTP/1.0 503"))
        assert one.in_raw(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").startswith(b"HTTP/1.0 200")
        redis.start()
        two.output.wait_for("reachable again", timeout=20)
        one.wait_until(lambda: one.in_raw(b"GET /ready HTTP/1.1\r\nHost: x\r\n\r\n").startswith(b"HTTP/1.0 200"))

        def delivered():
            response = one.in_http(f"{cid}a", '"after"')
            return response.status == 200 and poll.has_ended(0.5)

        one.wait_until(delivered, timeout=20)
        assert datas(poll) == ["after"]
    finally:
        redis.stop()


def test_start_with_an_unreachable_redis_is_one_line_and_status_1(tmp_path):
    from conftest import free_port

    config = write_config(tmp_path / "c.toml", BACKEND=f"redis://127.0.0.1:{free_port()}/0")
    result = subprocess.run([sys.executable, "-m", "realplexor", "--config", str(config)],
                            capture_output=True, text=True, timeout=TIMEOUT * 2)
    assert result.returncode == 1
    assert "cannot use BACKEND redis://" in result.stderr and "shared store unreachable" in result.stderr
    assert "Traceback" not in result.stderr


def test_gunicorn_with_two_workers_serves_a_poll_and_a_publish(redis_server, tmp_path, cid):
    in_port = __import__("conftest").free_port()
    config = write_config(tmp_path / "c.toml", BACKEND=redis_server.url, REUSE_PORT=True,
                          IN_ADDR=[f"127.0.0.1:{in_port}"], **SHARED)
    process, output = spawn([sys.executable, "-m", "gunicorn", "-k", "gevent", "-w", "2", "-b", "127.0.0.1:0",
                             "wsgi:app"], env={"REALPLEXOR_CONFIG": str(config)}, cwd=ROOT)
    try:
        wait_port = int(output.wait_for(r"Listening at: http://127\.0\.0\.1:(\d+)").group(1))
        output.wait_for(r"IN line listening on 127\.0\.0\.1")
        output.wait_for(r"IN line listening on 127\.0\.0\.1")
        server = RunningServer(process, output, wait_port, in_port, config)
        poll = server.poll(f"identifier={cid}a", headers="Connection: close\r\n")
        server.wait_until(lambda: server.online(cid) == {f"{cid}a": 1})
        server.publish(f"{cid}a", '"through gunicorn"')
        response = poll.response()
        assert response.status == 200 and b'"through gunicorn"' in response.body
    finally:
        process.terminate()
        process.wait(TIMEOUT)


def test_standalone_processes_share_their_ports_with_reuse_port(server_factory, redis_server, cid):
    from conftest import LongPoll, free_port

    wait_port, in_port = free_port(), free_port()
    shared = dict(BACKEND=redis_server.url, REUSE_PORT=True, WAIT_ADDR=[f"127.0.0.1:{wait_port}"],
                  IN_ADDR=[f"127.0.0.1:{in_port}"], **SHARED)
    one, two = server_factory(**shared), server_factory(**shared)
    assert one.wait_port == two.wait_port == wait_port
    polls = [LongPoll(wait_port, f"GET /?identifier={cid}a HTTP/1.1\r\nHost: x\r\n\r\n".encode())
             for _ in range(20)]
    try:
        one.wait_until(lambda: one.online(cid) == {f"{cid}a": 20})
        one.publish(f"{cid}a", '"to all"')
        for poll in polls:
            assert datas(poll) == ["to all"]
    finally:
        for poll in polls:
            poll.close()


def test_a_burst_of_polls_reading_history_gets_it_all(server_factory, redis_server, cid):
    import redis

    server = server_factory(BACKEND=redis_server.url, **SHARED)
    channels = [f"{cid}{n}" for n in range(300)]
    batches = [",".join(channels[start:start + 100]) for start in range(0, len(channels), 100)]
    # Listened to once, so this process hears them and knows their newest cursor.
    listeners = [server.listen(batch) for batch in batches]
    server.wait_until(lambda: len(server.online(cid)) == len(channels))
    for batch in batches:
        server.publish(batch, '"old"')
    for poll in listeners:
        assert datas(poll) == ["old"]
    # Polls that missed "old" read it from the queues; Redis holds their reads
    # for a moment, so they all wait for it at the same time.
    with redis.Redis.from_url(redis_server.url) as client:
        client.client_pause(1500, all=True)
    polls = [server.poll(f"identifier=0:{channel}") for channel in channels]
    for poll in polls:
        poll.headers_arrived()
    with redis.Redis.from_url(redis_server.url) as client:
        client.ping()                              # answered once the pause is over
    for batch in batches:
        server.publish(batch, '"new"')
    missed = [channel for channel, poll in zip(channels, polls) if "old" not in datas(poll)]
    assert missed == []


def test_a_poll_answered_from_history_leaves_no_subscription_behind(server_factory, redis_server, cid):
    import redis

    server = server_factory(BACKEND=redis_server.url, **SHARED)
    server.publish(f"{cid}a", '"old"')
    assert datas(server.poll(f"identifier=0:{cid}a")) == ["old"]
    # Like a channel whose last listener left: let go after OFFLINE_TIMEOUT (1 s here).
    with redis.Redis.from_url(redis_server.url) as client:
        server.wait_until(lambda: not client.pubsub_channels(f"rpl:c:{cid}*"), timeout=10, interval=0.2)


def test_a_poll_whose_history_read_timed_out_gets_it_once_redis_answers(server_factory, redis_server, cid):
    import redis

    # Commands give up after a second (the URL's socket_timeout).
    server = server_factory(BACKEND=redis_server.url + "?socket_timeout=1", **SHARED)
    heard = server.listen(f"{cid}a")
    server.wait_until(lambda: server.online(cid) == {f"{cid}a": 1})
    server.publish(f"{cid}a", '"old"')
    assert datas(heard) == ["old"]
    # Redis holds every command longer than the store's socket timeout.
    with redis.Redis.from_url(redis_server.url) as client:
        client.client_pause(1500, all=True)
        poll = server.poll(f"identifier=0:{cid}a")
        poll.headers_arrived()
        client.ping()                              # answered once the pause is over
    server.output.wait_for("a poll waits without its history")
    server.wait_until(lambda: server.in_http(f"{cid}a", '"new"').status == 200, timeout=20)
    assert datas(poll)[0] == "old"


def test_an_event_stream_on_one_process_hears_the_other_and_resumes_on_it(server_factory, redis_server, cid):
    from test_streams import Stream

    one, two = (server_factory(BACKEND=redis_server.url, STREAM_TRANSPORTS=["eventsource"], **SHARED)
                for _ in range(2))
    stream = Stream(two.wait_port, f"{cid}a")
    assert stream.headers()[":status"] == 200
    one.wait_until(lambda: one.online(cid) == {f"{cid}a": 1})
    one.publish(f"{cid}a", '"first"')
    event_id, part = stream.event()
    assert part["data"] == "first"
    stream.close()
    one.publish(f"{cid}a", '"while away"')
    again = Stream(one.wait_port, f"{cid}a", headers=f"Last-Event-ID: {event_id}\r\n")
    try:
        assert again.event()[1]["data"] == "while away"
    finally:
        again.close()


def test_an_event_stream_that_comes_back_behind_the_shared_queue_is_told_of_the_cut(redis_server, cid):
    """Five publishes while the stream's greenlet is held up after the first, with
    room for two in Redis: it gets the first, then a cut up to the third, then the last two."""
    import gevent

    from realplexor.config import validate
    from realplexor.redis_channels import RedisChannels
    from realplexor.server import channel_settings
    from realplexor.streams import EventStream

    class HeldUp(EventStream):
        """A stream whose greenlet is busy elsewhere for a while after its first message."""

        taken = 0

        def _take(self, body, done):
            super()._take(body, done)
            HeldUp.taken += 1
            if HeldUp.taken == 1:
                gevent.sleep(0.5)

    config = validate({"MAX_DATA_FOR_ID": 2})
    state = RedisChannels(channel_settings(config), redis_server.url)
    state.start()
    channel = f"{cid}a"
    try:
        with stream_in_process(state, config, [channel], HeldUp) as (_, theirs):
            cursors = [state.publish([(channel, None, None)], b"%d" % n)[0][1] for n in range(1, 6)]
            parts = event_parts(received_in_loop(theirs, lambda got: got.count(b"\n\n") >= 4))
    finally:
        state.stop()
    assert parts == [{"ids": {channel: cursors[0]}, "data": 1},
                     {"ids": {channel: cursors[2]}, "reset": True},
                     {"ids": {channel: cursors[3]}, "data": 4},
                     {"ids": {channel: cursors[4]}, "data": 5}]
