"""The IN line over real sockets: publish, commands, authentication, limits."""
from __future__ import annotations

import base64
import hashlib
import json
import re
import signal
import socket
import threading
import time

import pytest

from conftest import TIMEOUT, beyond_socket_buffers, parse_response, read_to_eof, slow_reader

USERS = """\
bob:$2y$05$KxGwGY8qwZGoK7BTXhDjPON/DUwMBHOcxpLnNCb//pX7wtf7jeJ8i
amy:$apr1$wu1P8jqo$f3GYrxWX63f8Xmm1R3lGB1
sam:{SHA}SWVtHJrD5tYpeJJDcU+phEGgXjU=
cat:HnXrABH.5HjFk
"""
PASSWORDS = {"bob": "secretB", "amy": "secretM", "sam": "secretS", "cat": "secretC"}
SHA1_OF_NEW = base64.b64encode(hashlib.sha1(b"newpass").digest()).decode()   # htpasswd -s: "newpass"


def received(poll) -> list:
    response = poll.response()
    assert response.status == 200, response.raw
    return json.loads(response.body[3:])


@pytest.fixture(scope="module")
def users_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("users") / "users.htpasswd"
    path.write_text(USERS)
    return path


@pytest.fixture
def guarded(server_factory, users_file):
    """A server whose users file has logins and no anonymous entry."""
    return server_factory(USERS_FILE=str(users_file), OFFLINE_TIMEOUT=30)


def test_publish_reply_is_http_200_with_content_length(server, cid):
    response = server.in_http(f"{cid}a", '"x"')
    assert response.raw.startswith(b"HTTP/1.0 200 OK\r\n")
    assert int(response.headers["content-length"]) == len(response.body)


def test_publish_is_processed_when_content_length_arrives_without_half_close(server, cid):
    poll = server.listen(f"{cid}a")
    response = server.in_http(f"{cid}a", '{"n": 1}', half_close=False)
    assert response.status == 200
    assert received(poll)[0]["data"] == {"n": 1}


def test_raw_header_only_form(server, cid):
    poll = server.listen(f"{cid}a")
    reply = server.in_raw(f'X-Realplexor: identifier={cid}a\r\n\r\n"raw"'.encode())
    assert parse_response(reply).status == 200
    assert received(poll)[0]["data"] == "raw"


def test_bare_identifier_form(server, cid):
    poll = server.listen(f"{cid}a")
    server.in_raw(f'identifier={cid}a\n\n"bare"'.encode())
    assert received(poll)[0]["data"] == "bare"


def test_data_is_inserted_as_is(server, cid):
    poll = server.listen(f"{cid}a")
    data = '{"text": "hello \\u00e9", "list": [1, 2.5, null, true], "nested": {"a": {"b": "c"}}}'
    server.publish(f"{cid}a", data)
    response = poll.response()
    assert data.encode() in response.body
    assert json.loads(response.body[3:])[0]["data"]["nested"] == {"a": {"b": "c"}}


def test_one_fresh_cursor_shared_by_all_channels_of_a_publish(server, cid):
    server.publish(f"{cid}a,{cid}b,{cid}c", '"x"')
    body = json.loads(server.get(f"identifier=0:{cid}a,0:{cid}b,0:{cid}c").body[3:])
    assert len(set(body[0]["ids"].values())) == 1


def test_publish_with_per_channel_cursors(server, cid):
    server.publish(f"10:{cid}a,20:{cid}b", '"x"')
    body = json.loads(server.get(f"identifier=0:{cid}a,0:{cid}b").body[3:])
    assert body[0]["ids"] == {f"{cid}a": "10", f"{cid}b": "20"}


@pytest.mark.parametrize("data", ['{"a":', "hello", "NaN", '"a" "b"',
                                  '1]}, {"ids": {"x": "9"}, "data": 1'])
def test_invalid_json_is_a_400_and_publishes_nothing(server, cid, data):
    poll = server.listen(f"{cid}a")
    response = server.in_http(f"{cid}a", data)
    assert response.status == 400
    assert b"not valid JSON" in response.body
    assert len(response.body.strip().splitlines()) == 1
    assert not poll.has_ended(0.2)
    server.publish(f"{cid}a", '"good"')
    assert [p["data"] for p in received(poll)] == ["good"]


@pytest.mark.parametrize("data", ["[" * 2000 + "]" * 2000], ids=["deep"])
def test_json_too_big_for_python_is_a_400_and_publishes_nothing(server, cid, data):
    poll = server.listen(f"{cid}a")
    response = server.in_http(f"{cid}a", data)
    assert response.status == 400, response.raw
    assert len(response.body.strip().splitlines()) == 1
    assert not poll.has_ended(0.2)


def test_invalid_utf8_is_a_400(server, cid):
    response = server.in_http(f"{cid}a", b'"\xff\xfe"')
    assert response.status == 400
    assert b"UTF-8" in response.body


def test_empty_body_publishes_nothing(server, cid):
    response = server.in_http(f"{cid}a", "")
    assert response.status == 400
    assert b"no data" in response.body


def test_publish_without_ids_is_a_400(server):
    response = server.in_http("", '"x"')
    assert response.status == 400
    assert b"no channel ids" in response.body


def test_request_ending_before_content_length_publishes_nothing(server, cid):
    poll = server.listen(f"{cid}a")
    request = (f"POST / HTTP/1.1\r\nContent-Length: 50\r\nX-Realplexor: identifier={cid}a"
               f'\r\n\r\n"short"').encode()
    response = parse_response(server.in_raw(request, half_close=True))
    assert response.status == 400
    assert b"nothing published" in response.body
    assert not poll.has_ended(0.3)


def test_connection_reset_before_content_length_publishes_nothing(server, cid):
    poll = server.listen(f"{cid}a")
    sock = socket.create_connection(("127.0.0.1", server.in_port), timeout=5)
    sock.sendall(f'POST / HTTP/1.1\r\nContent-Length: 50\r\nX-Realplexor: identifier={cid}a\r\n\r\n"sh'.encode())
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()
    assert not poll.has_ended(0.4)
    server.publish(f"{cid}a", '"after"')
    assert [p["data"] for p in received(poll)] == ["after"]


def test_request_over_in_maxlen_is_a_413(server_factory, cid):
    small = server_factory(IN_MAXLEN=1000)
    poll = small.listen(f"{cid}a")
    # Far more than fits a socket buffer: the reason must still arrive, not a reset.
    data = '"' + "x" * 3_000_000 + '"'
    response = small.in_http(f"{cid}a", data, half_close=False)
    assert response.status == 413
    assert b"IN_MAXLEN" in response.body
    assert not poll.has_ended(0.3)


def test_idle_connection_is_closed_after_in_timeout(server_factory, cid):
    quick = server_factory(IN_TIMEOUT=0.5)
    with socket.create_connection(("127.0.0.1", quick.in_port), timeout=5) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nContent-Length: 10\r\n")
        started = time.monotonic()
        response = parse_response(read_to_eof(sock, timeout=5))
    assert response.status == 408
    assert time.monotonic() - started < 4
    assert b"IN_TIMEOUT" in response.body


def test_online_lists_listened_channels_with_counts(server, cid):
    polls = [server.listen(f"{cid}b,{cid}a"), server.listen(f"{cid}a")]
    body = server.command(f"ONLINE {cid}").text
    assert body == f"{cid}a 2\n{cid}b 1\n"
    for poll in polls:
        poll.close()


def test_online_filters_by_several_prefixes(server, cid):
    polls = [server.listen(f"{cid}x1,{cid}y1,{cid}z1")]
    body = server.command(f"ONLINE {cid}x {cid}z").text
    assert body == f"{cid}x1 1\n{cid}z1 1\n"
    polls[0].close()


@pytest.mark.parametrize("form", ["ONLINE {p}\n\n", "online {p}\n", "ONLINE {p}",
                                  "ONLINE {p}\r\n\r\n"])
def test_command_at_the_start(server, cid, form):
    poll = server.listen(f"{cid}a")
    reply = parse_response(server.in_raw(form.format(p=cid).encode()))
    assert reply.status == 200
    assert reply.headers["content-type"] == "text/plain"
    assert reply.text == f"{cid}a 1\n"
    poll.close()


def test_command_at_the_start_is_answered_on_blank_line_without_half_close(server, cid):
    reply = parse_response(server.in_raw(f"ONLINE {cid}\n\n".encode(), half_close=False))
    assert reply.status == 200


def test_watch_without_position_names_the_current_one(server):
    body = server.command("WATCH").text
    event, rest = body.split()
    pos, fake = rest.split(":")
    assert event == "FAKE" and fake == "FAKE" and pos.isdigit()
    assert body.count("\n") == 1


@pytest.mark.parametrize("position", [b"\xb2", b"9" * 5000], ids=["superscript", "huge"])
def test_watch_with_a_position_that_is_no_number_names_the_current_one(server, position):
    reply = parse_response(server.in_raw(b"WATCH " + position + b"\n\n"))
    assert reply.status == 200
    assert reply.text.startswith("FAKE ") and reply.text.count("\n") == 1


@pytest.mark.parametrize("command", [b"WATCH", b"WATCH 0", b"WATCH 000", b"WATCH  ", b"WATCH 0 abc_",
                                     b"WATCH abc", b"WATCH 1.5", b"WATCH -3"],
                         ids=["missing", "zero", "zeros", "empty", "zero-with-prefix", "word", "fraction",
                              "negative"])
def test_watch_without_a_true_position_names_the_current_one(server, command):
    reply = parse_response(server.in_raw(command + b"\n\n"))
    assert reply.status == 200
    event, rest = reply.text.split()
    pos, fake = rest.split(":")
    assert (event, fake) == ("FAKE", "FAKE") and int(pos) >= 10
    assert reply.text.count("\n") == 1


def test_huge_content_length_is_a_400(server, cid):
    head = f"POST / HTTP/1.1\r\nX-Realplexor: identifier={cid}a\r\nContent-Length: ".encode()
    reply = parse_response(server.in_raw(head + b"9" * 5000 + b"\r\n\r\n1"))
    assert reply.status == 400 and b"Content-Length" in reply.body


def test_watch_reports_online_and_offline_each_id_once(server, cid):
    start = server.command("WATCH").text.split()[1].split(":")[0]
    poll = server.listen(f"{cid}a,{cid}b")
    events = server.command(f"WATCH {start} {cid}").text.splitlines()
    assert [(e.split()[0], e.split(":")[1]) for e in events] == [("online", f"{cid}a"), ("online", f"{cid}b")]
    positions = [int(e.split()[1].split(":")[0]) for e in events]
    assert positions == sorted(positions) and positions[0] > int(start)
    poll.close()
    # OFFLINE_TIMEOUT is 1 s on the shared server: each id then appears once, offline.
    server.wait_until(lambda: server.online(cid) == {}, timeout=5)
    events = server.command(f"WATCH {start} {cid}").text.splitlines()
    assert sorted((e.split()[0], e.split(":")[1]) for e in events) == [("offline", f"{cid}a"), ("offline", f"{cid}b")]
    later = server.command(f"WATCH {max(int(e.split()[1].split(':')[0]) for e in events)} {cid}").text
    assert later == ""


def test_stats_is_a_readable_dump(server, cid):
    server.publish(f"{cid}a", '"x"')
    body = server.command("STATS").text
    assert "listeners:" in body and f"[{cid}a]" in body


def test_queue_keeps_max_data_for_id_newest(server_factory, cid):
    small = server_factory(MAX_DATA_FOR_ID=3)
    for n in range(5):
        small.publish(f"{cid}a", str(n))
    body = json.loads(small.get(f"identifier=0:{cid}a").body[3:])
    assert [p["data"] for p in body] == [2, 3, 4]


def test_queue_is_emptied_after_clean_id_after(server_factory, cid):
    quick = server_factory(CLEAN_ID_AFTER=0.5)
    quick.publish(f"{cid}a", '"old"')
    assert json.loads(quick.get(f"identifier=0:{cid}a").body[3:])
    time.sleep(0.8)
    quick.publish(f"{cid}b", '"keeps b"')
    poll = quick.poll(f"identifier=0:{cid}a")
    assert not poll.has_ended(0.4)
    assert json.loads(quick.get(f"identifier=0:{cid}b").body[3:])[0]["data"] == "keeps b"


# -- authentication ------------------------------------------------------

@pytest.mark.parametrize("login", sorted(PASSWORDS))
def test_every_htpasswd_hash_format_logs_in(guarded, login):
    response = guarded.in_http(f"{login}:{PASSWORDS[login]}@{login}_a", '"x"')
    assert response.status == 200, response.body


def test_unknown_login_is_a_403(guarded):
    response = guarded.in_http("eve:x@eve_a", '"x"')
    assert (response.status, response.text) == (403, "unknown login: eve\n")


def test_wrong_password_is_a_403(guarded):
    response = guarded.in_http("bob:wrong@bob_a", '"x"')
    assert (response.status, response.text) == (403, "invalid password for login: bob\n")


@pytest.mark.parametrize("password", ["secretB" + "x" * 80, "secret\x00B"], ids=["long", "nul"])
def test_password_the_hash_cannot_take_is_a_403(guarded, password):
    response = guarded.in_http(f"bob:{password}@bob_a", '"x"')
    assert (response.status, response.text) == (403, "invalid password for login: bob\n")


def test_wrong_password_is_a_403_after_the_right_one_was_accepted(guarded):
    for _ in range(3):
        assert guarded.in_http("bob:secretB@bob_a", '"x"').status == 200
    response = guarded.in_http("bob:secretB2@bob_a", '"x"')
    assert (response.status, response.text) == (403, "invalid password for login: bob\n")


def test_changed_password_takes_effect_on_reload(server_factory, tmp_path):
    users = tmp_path / "users"
    users.write_text(USERS)
    guarded = server_factory(USERS_FILE=str(users))
    assert guarded.in_http("amy:secretM@amy_a", '"x"').status == 200
    users.write_text(USERS.replace("amy:", "old:") + "amy:{SHA}" + SHA1_OF_NEW + "\n")
    guarded.process.send_signal(signal.SIGHUP)
    guarded.output.wait_for("configuration reloaded")
    assert guarded.in_http("amy:secretM@amy_a", '"x"').status == 403
    assert guarded.in_http("amy:newpass@amy_a", '"x"').status == 200


def test_guest_without_anonymous_entry_is_a_403(guarded, cid):
    for response in (guarded.in_http(f"{cid}a", '"x"'), guarded.command("ONLINE")):
        assert (response.status, response.text) == (403, "access denied for guest user\n")
    reply = parse_response(guarded.in_raw(b"STATS\n\n"))
    assert reply.status == 403


def test_anonymous_entry_lets_guests_in(server_factory, tmp_path, cid):
    users = tmp_path / "users"
    users.write_text(":\n" + USERS)
    open_server = server_factory(USERS_FILE=str(users))
    assert open_server.in_http(f"{cid}a", '"x"').status == 200
    assert open_server.in_http("bob:secretB@bob_a", '"x"').status == 200


def test_logged_in_client_publishes_only_under_its_prefix(guarded):
    mine = guarded.listen("bob_news")
    other = guarded.listen("amy_news")
    response = guarded.in_http("bob:secretB@bob_news,amy_news", '"hi"')
    assert response.status == 200
    assert received(mine)[0]["ids"] == {"bob_news": received_cursor(guarded, "bob_news")}
    assert not other.has_ended(0.3)


def received_cursor(server, channel):
    return json.loads(server.get(f"identifier=0:{channel}").body[3:])[-1]["ids"][channel]


def test_logged_in_online_and_watch_see_only_their_prefix(guarded):
    polls = [guarded.listen("bob_a,amy_a,bob_b")]
    online = guarded.command("ONLINE bob_", "bob:secretB@").text
    assert online == "bob_a 1\nbob_b 1\n"
    assert guarded.command("ONLINE amy_", "bob:secretB@").text == ""
    assert guarded.command("ONLINE", "bob:secretB@").text == ""
    assert guarded.command("ONLINE bob_ amy_", "bob:secretB@").text == "bob_a 1\nbob_b 1\n"
    watch = guarded.command("WATCH 1 bob_", "bob:secretB@").text
    assert sorted(line.split(":")[1] for line in watch.splitlines()) == ["bob_a", "bob_b"]
    assert guarded.command("WATCH 1", "bob:secretB@").text == ""
    assert guarded.command("WATCH 1 amy_", "bob:secretB@").text == ""
    polls[0].close()


def test_stats_is_refused_to_logged_in_clients(guarded):
    response = guarded.command("STATS", "bob:secretB@")
    assert response.status == 403
    assert b"STATS" in response.body


def test_malformed_credentials_are_a_400(server, cid):
    response = server.in_http(f"bad-login:pw@{cid}a", '"x"')
    assert response.status == 400
    assert b"credentials" in response.body


def test_custom_identifier_word(server_factory, cid):
    custom = server_factory(IDENTIFIER="ident")
    poll = custom.poll(f"ident={cid}a")
    poll.headers_arrived()
    request = f'POST / HTTP/1.1\r\nContent-Length: 3\r\nX-Realplexor: ident={cid}a\r\n\r\n"x"'.encode()
    assert parse_response(custom.in_raw(request)).status == 200
    assert received(poll)[0]["data"] == "x"


def test_publish_sent_in_many_small_pieces_is_served(server, cid):
    poll = server.listen(f"{cid}a")
    data = json.dumps({"text": "x" * 300}).encode()
    request = (f"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\n"
               f"X-Realplexor: identifier={cid}a\r\n\r\n").encode() + data
    with socket.create_connection(("127.0.0.1", server.in_port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for start in range(0, len(request), 7):
            sock.sendall(request[start:start + 7])
            time.sleep(0.001)
        reply = parse_response(read_to_eof(sock))
    assert reply.status == 200
    assert received(poll)[0]["data"] == {"text": "x" * 300}


def test_a_fresh_servers_positions_start_at_10_and_keep_three_chains(server_factory, cid):
    fresh = server_factory(EVENT_CHAIN_LEN=3)
    assert fresh.command("WATCH 0").text == "FAKE 10:FAKE\n"
    channels = [f"{cid}c{n}" for n in range(20)]
    fresh.listen(",".join(channels))
    fresh.wait_until(lambda: len(fresh.online(cid)) == 20)
    assert fresh.command("WATCH").text == "FAKE 30:FAKE\n"
    # Three chains of EVENT_CHAIN_LEN + 1 events: at least the newest twelve, oldest first.
    lines = fresh.command("WATCH 1").text.splitlines()
    listed = [(line.split()[0], int(line.split()[1].split(":")[0]), line.split(":")[1]) for line in lines]
    assert listed[-12:] == [("online", 11 + n, channels[n]) for n in range(8, 20)]
    assert [pos for _, pos, _ in listed] == sorted(pos for _, pos, _ in listed)


def test_queued_data_past_max_queue_mb_drops_the_least_recently_published_channels(server_factory, cid):
    server = server_factory(MAX_QUEUE_MB=0.01)        # 10485 bytes
    data = json.dumps("x" * 998)                        # 1000 bytes
    for n in range(30):
        server.publish(f"{cid}c{n}", data)
    stats = server.command("STATS").text
    queued = int(re.search(r"queued bytes: (\d+)", stats).group(1))
    assert queued <= 10485 and "queues dropped over MAX_QUEUE_MB: 20" in stats
    old = server.poll(f"identifier=0:{cid}c0")
    assert not old.has_ended(0.3)
    assert json.loads(server.get(f"identifier=0:{cid}c29").body[3:])[0]["data"] == "x" * 998
    assert len(re.findall("passed MAX_QUEUE_MB", server.output.text())) == 1


def test_password_checks_leave_the_event_loop_serving_others(server_factory, tmp_path, cid):
    from conftest import write_users_file

    users = write_users_file(tmp_path / "users.htpasswd", {"slow": "right"}, anonymous=True)
    assert "$12$" in users.read_text()        # a cost-12 bcrypt hash: a check takes a while
    server = server_factory(USERS_FILE=str(users))
    finished: list[str] = []

    def wrong_password(n: int) -> None:
        reply = server.in_http(f"slow:wrong{n}@slow_a", '"x"')
        finished.append(f"wrong {reply.status}")

    hammering = [threading.Thread(target=wrong_password, args=(n,)) for n in range(4)]
    for thread in hammering:
        thread.start()
    server.wait_until(lambda: "SENT" if all(t.is_alive() for t in hammering) else None, timeout=5)
    reply = server.in_http("", "ONLINE\n")
    finished.append(f"guest {reply.status}")
    for thread in hammering:
        thread.join(TIMEOUT)
    # The guest's command is answered while the four checks still run.
    assert finished[0] == "guest 200"
    assert sorted(finished[1:]) == ["wrong 403"] * 4
    assert server.in_http("slow:right@slow_a", '"x"').status == 200


def test_a_long_number_is_valid_json_and_published(server, cid):
    poll = server.listen(f"{cid}a")
    assert server.in_http(f"{cid}a", "1" * 5000).status == 200
    assert poll.response().body.endswith(b'"data":' + b"1" * 5000 + b"}]")


@pytest.mark.parametrize("pieces", [1, 2], ids=["whole", "in-two-packets"])
def test_json_nested_too_deep_is_a_400_at_once(server, cid, pieces):
    body = b"[" * 100_000 + b"]" * 100_000
    head = (f"POST / HTTP/1.1\r\nContent-Length: {len(body)}\r\n"
            f"X-Realplexor: identifier={cid}a\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", server.in_port), timeout=TIMEOUT) as sock:
        if pieces == 2:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(head + body[:1000])
            sock.sendall(body[1000:])
        else:
            sock.sendall(head + body)
        reply = parse_response(read_to_eof(sock, timeout=5))
    assert reply.status == 400 and b"too deeply" in reply.body
    assert "Traceback" not in server.output.text()


def test_a_publish_with_every_target_outside_the_login_is_a_403(guarded):
    other = guarded.listen("amy_news")
    response = guarded.in_http("bob:secretB@amy_news,bobby_x", '"hi"')
    assert response.status == 403 and "bob_" in response.text and "nothing published" in response.text
    assert not other.has_ended(0.3)


@pytest.mark.parametrize("headers, status, reason", [
    ("Content-Length: 3\r\nContent-Length: 4\r\n", 400, b"disagree"),
    ("Content-Length: 3\r\nTransfer-Encoding: chunked\r\n", 400, b"Transfer-Encoding"),
    ("Transfer-Encoding: chunked\r\n", 411, b"Content-Length"),
], ids=["two-lengths", "length-and-chunked", "chunked-only"])
def test_ambiguous_or_chunked_in_bodies_are_refused_at_once(server, cid, headers, status, reason):
    head = f"POST / HTTP/1.1\r\nX-Realplexor: identifier={cid}a\r\n{headers}\r\n".encode()
    with socket.create_connection(("127.0.0.1", server.in_port), timeout=TIMEOUT) as sock:
        sock.sendall(head + b"3\r\n\"x\"\r\n")      # no half-close: the answer must not wait for one
        reply = parse_response(read_to_eof(sock, timeout=5))
    assert reply.status == status and reason in reply.body


def test_the_same_content_length_twice_is_taken(server, cid):
    poll = server.listen(f"{cid}a")
    head = f"POST / HTTP/1.1\r\nX-Realplexor: identifier={cid}a\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n"
    assert parse_response(server.in_raw(head.encode() + b'"x"')).status == 200
    assert json.loads(poll.response().body[3:])[0]["data"] == "x"


def test_in_timeout_bounds_the_whole_request_however_it_trickles(server_factory, cid):
    server = server_factory(IN_TIMEOUT=1)
    body = b'"' + b"x" * 100 + b'"'
    head = f"POST / HTTP/1.1\r\nContent-Length: {len(body)}\r\nX-Realplexor: identifier={cid}a\r\n\r\n"
    with socket.create_connection(("127.0.0.1", server.in_port), timeout=TIMEOUT) as sock:
        sock.sendall(head.encode())
        sock.settimeout(0.3)
        started, reply = time.monotonic(), b""
        for byte in body:
            try:
                sock.sendall(bytes([byte]))            # a byte at a time, each well within IN_TIMEOUT
                reply = sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                break
            if reply:
                break
    assert parse_response(reply).status == 408


def test_online_over_many_channels_lets_other_clients_be_served_meanwhile(server_factory, cid):
    server = server_factory(WAIT_MAXLEN=20000)
    for n in range(100):          # 100 000 online channels
        ids = ",".join(f"{cid}{n}_{k}" for k in range(1000))
        server.poll("", method="POST", body=f"identifier={ids}".encode()).headers_arrived()
    server.listen(f"{cid}small")
    with socket.create_connection(("127.0.0.1", server.in_port), timeout=TIMEOUT) as big:
        big.sendall(f"ONLINE {cid}\n\n".encode())
        big.shutdown(socket.SHUT_WR)
        # Asked after the big one, answered while the big one is still being made.
        assert server.command(f"ONLINE {cid}small").text == f"{cid}small 1\n"
        big.setblocking(False)
        with pytest.raises(BlockingIOError):
            big.recv(1, socket.MSG_PEEK)
        reply = parse_response(read_to_eof(big))
    assert len(reply.text.splitlines()) == 100_001


@pytest.mark.parametrize("command", ["ONLINE", "STATS"])
def test_a_reply_larger_than_the_socket_buffers_reaches_a_late_reader_whole(server_factory, cid, command):
    size = beyond_socket_buffers()
    server = server_factory(WAIT_MAXLEN=2 * size)
    # Six online channels with ids so long that ONLINE and STATS (which names them) pass the size.
    ids = [f"{cid}big{n}_" + "x" * (size // 6) for n in range(6)]
    server.poll("", method="POST", body=f"identifier={','.join(ids)}".encode()).headers_arrived()
    sock = slow_reader(server.in_port)
    try:
        sock.sendall(f"{command} {cid}big\n\n".encode() if command == "ONLINE" else b"STATS\n\n")
        sock.shutdown(socket.SHUT_WR)
        # The reply cannot all leave while this client reads nothing; others are served meanwhile.
        poll = server.listen(f"{cid}small")
        server.publish(f"{cid}small", '"meanwhile"')
        assert received(poll)[0]["data"] == "meanwhile"
        assert server.command(f"ONLINE {cid}small").text == f"{cid}small 0\n"
        reply = parse_response(read_to_eof(sock))
    finally:
        sock.close()
    assert reply.status == 200 and int(reply.headers["content-length"]) == len(reply.body) > size
    if command == "ONLINE":
        assert reply.text == "".join(f"{channel} 1\n" for channel in sorted(ids))
    else:
        assert all(f"[{channel}] online=yes listeners=1 queued=0" in reply.text for channel in ids)
