"""The lean WAIT engine's own paths, driven on purpose over real sockets.

Its rules are those of every WAIT engine (tests/test_wait.py runs them
on both); here is what only the lean engine does: a poll whose headers
cannot leave at once is finished by a greenlet, and a message published
meanwhile is held as pending and written after the headers.

The headers are made too large for the kernel's buffers through CORS:
an allowed origin is echoed in ``Access-Control-Allow-Origin``, and the
origin allowed here is megabytes long.
"""
from __future__ import annotations

import json

import pytest

from conftest import beyond_socket_buffers, read_answer, slow_reader, start_server, write_config

ORIGIN = "http://" + "o" * beyond_socket_buffers() + ".example"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = write_config(tmp_path_factory.mktemp("rpllean") / "realplexor.toml", WAIT_ENGINE="lean",
                        CORS_ORIGINS=[ORIGIN], WAIT_MAXLEN=2 * len(ORIGIN), WAIT_TIMEOUT=30)
    running = start_server(path)
    yield running
    running.stop()


@pytest.mark.parametrize("keep_alive", [True, False], ids=["kept alive", "close"])
def test_a_publish_landing_while_the_headers_are_written_follows_them(server, cid, keep_alive):
    connection = "Connection: keep-alive\r\n" if keep_alive else ""
    sock = slow_reader(server.wait_port)
    try:
        sock.sendall(f"GET /?identifier={cid}a HTTP/1.1\r\nHost: x\r\nOrigin: {ORIGIN}\r\n{connection}\r\n"
                     .encode())
        # Once the poll is registered its headers are on their way, and they
        # cannot all have left: this client has read nothing.
        server.wait_until(lambda: server.online(cid) == {f"{cid}a": 1})
        server.publish(f"{cid}a", '"during the headers"')
        assert server.online(cid) == {f"{cid}a": 0}
        head, body = read_answer(sock)
        assert f"\r\nAccess-Control-Allow-Origin: {ORIGIN}\r\n".encode() in head
        assert body.startswith(b" \r\n")
        assert [part["data"] for part in json.loads(body[3:])] == ["during the headers"]
        if keep_alive:
            # The connection goes on as usual: the next poll parks and is woken.
            cursor = json.loads(body[3:])[0]["ids"][f"{cid}a"]
            sock.sendall(f"GET /?identifier={cursor}:{cid}a HTTP/1.1\r\nHost: x\r\n{connection}\r\n".encode())
            server.wait_until(lambda: server.online(cid) == {f"{cid}a": 1})
            server.publish(f"{cid}a", '"next"')
            _, body = read_answer(sock)
            assert [part["data"] for part in json.loads(body[3:])] == ["next"]
    finally:
        sock.close()


def test_a_poll_whose_client_leaves_while_its_headers_are_written_is_forgotten(server, cid):
    sock = slow_reader(server.wait_port)
    sock.sendall(f"GET /?identifier={cid}a HTTP/1.1\r\nHost: x\r\nOrigin: {ORIGIN}\r\n\r\n".encode())
    server.wait_until(lambda: server.online(cid) == {f"{cid}a": 1})
    sock.close()
    server.wait_until(lambda: server.online(cid) == {f"{cid}a": 0})
    # A publish now finds no one, and the server goes on serving.
    server.publish(f"{cid}a", '"nobody"')
    poll = server.listen(f"{cid}b")
    server.publish(f"{cid}b", '"still serving"')
    assert json.loads(poll.response().body[3:])[0]["data"] == "still serving"
