"""Accepting connections, for real, on both engines: running out of file descriptors."""
from __future__ import annotations

import json
import re
import socket

import pytest

from conftest import TIMEOUT, start_server, write_config

OPEN_FILES = 48


@pytest.mark.parametrize("engine", ["wsgi", "lean"])
def test_out_of_files_pauses_accepting_and_resumes_when_some_are_free(tmp_path, cid, engine):
    server = start_server(write_config(tmp_path / "c.toml", WAIT_ENGINE=engine), open_files=OPEN_FILES)
    polls = []
    try:
        # More polls than the server has descriptors: the rest wait in the backlog.
        for _ in range(OPEN_FILES + 12):
            sock = socket.create_connection(("127.0.0.1", server.wait_port), timeout=TIMEOUT)
            sock.sendall(f"GET /?identifier={cid}a HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            polls.append(sock)
        server.output.wait_for(r"cannot accept connections: .*; pausing")
        for sock in polls[:30]:
            sock.close()
        waiting = polls[30:]
        server.wait_until(lambda: server.online(cid) == {f"{cid}a": len(waiting)})
        server.publish(f"{cid}a", '"still serving"')
        for sock in waiting:
            sock.settimeout(TIMEOUT)
            raw = b""
            while not raw.endswith(b"}]"):
                chunk = sock.recv(65536)
                assert chunk, raw
                raw += chunk
            assert json.loads(raw.partition(b"\r\n\r\n")[2][3:])[0]["data"] == "still serving"
        # A line when it began and one when it ended, however many pauses between
        # (each listening socket starves on its own: the IN line's too).
        server.output.wait_for(r"accepting connections again after [\d.]+ s \(\d+ pauses\)")
        assert len(re.findall("cannot accept connections", server.output.text())) <= 4
        assert "Traceback" not in server.output.text()
    finally:
        for sock in polls:
            sock.close()
        server.stop()
