"""The hand-off from supervisor to server: its variable, its pipe, its sockets."""
from __future__ import annotations

import os
import socket

import pytest

from realplexor.handoff import ENV, Handoff, HandoffError
from realplexor.server import bind_listener, listen_socket


def test_a_handoff_travels_in_one_variable_taken_once():
    handoff = Handoff({"WAIT_ADDR": [("[::1]:8088", 3), ("127.0.0.1:0", 4)],
                       "IN_ADDR": [("127.0.0.1:10010", 5)]}, 6)
    environ = {ENV: handoff.encode(), "OTHER": "x"}
    assert Handoff.take_from(environ) == handoff
    assert environ == {"OTHER": "x"}
    assert Handoff.take_from(environ) is None
    assert handoff.fds() == [3, 4, 5, 6]


@pytest.mark.parametrize("raw", ["1", "{}", '{"listeners": {"WAIT_ADDR": []}, "ready_fd": 3}', "{"])
def test_a_broken_handoff_is_one_clear_error(raw):
    with pytest.raises(HandoffError, match=f"^{ENV} is not a hand-off from a realplexor supervisor"):
        Handoff.take_from({ENV: raw})


def test_notify_ready_writes_once_and_closes_the_pipe():
    read_end, write_end = os.pipe()
    try:
        Handoff({"WAIT_ADDR": [], "IN_ADDR": []}, write_end).notify_ready()
        assert os.read(read_end, 10) == b"1"
        assert os.read(read_end, 10) == b""
    finally:
        os.close(read_end)


@pytest.mark.skipif(not hasattr(socket, "TCP_DEFER_ACCEPT"), reason="Linux only")
def test_an_inherited_socket_gets_deferred_accept_set_either_way():
    held = bind_listener("127.0.0.1", 0)
    try:
        adopted = listen_socket("127.0.0.1", 0, defer_accept=True, fd=os.dup(held.fileno()))
        assert adopted.getsockname() == held.getsockname()
        adopted.close()
        assert held.getsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT) > 0
        listen_socket("127.0.0.1", 0, defer_accept=False, fd=os.dup(held.fileno())).close()
        assert held.getsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT) == 0
        with socket.create_connection(held.getsockname(), timeout=5):
            pass  # the held socket still listens after the adopted copies closed
    finally:
        held.close()
