"""The WAIT line under gunicorn's gevent worker, with the IN line in the same worker."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, TIMEOUT, RunningServer, spawn, write_config

pytest.importorskip("gunicorn")
GUNICORN = [sys.executable, "-m", "gunicorn"]


def start_gunicorn(config_path: Path, *args: str):
    process, output = spawn([*GUNICORN, "-k", "gevent", "-b", "127.0.0.1:0", *args, "wsgi:app"],
                            env={"REALPLEXOR_CONFIG": str(config_path)}, cwd=ROOT)
    return process, output


def test_gunicorn_serves_wait_line_and_worker_serves_in_line(tmp_path, cid):
    process, output = start_gunicorn(write_config(tmp_path / "c.toml"), "-w", "1")
    try:
        wait_port = int(output.wait_for(r"Listening at: http://127\.0\.0\.1:(\d+)").group(1))
        in_port = int(output.wait_for(r"IN line listening on 127\.0\.0\.1:(\d+)").group(1))
        server = RunningServer(process, output, wait_port, in_port, tmp_path / "c.toml")
        poll = server.listen(f"{cid}a")
        server.publish(f"{cid}a", '{"via": "gunicorn"}')
        response = poll.response()
        assert response.status == 200
        body = response.body
        if response.headers.get("transfer-encoding") == "chunked":
            body = dechunk(body)
        assert json.loads(body.strip())[0]["data"] == {"via": "gunicorn"}
        assert server.online(cid) == {f"{cid}a": 0}
    finally:
        process.terminate()
        process.wait(TIMEOUT)


def dechunk(body: bytes) -> bytes:
    out = b""
    while body:
        size, _, rest = body.partition(b"\r\n")
        length = int(size, 16)
        if length == 0:
            break
        out += rest[:length]
        body = rest[length + 2:]
    return out


def test_gunicorn_refuses_several_workers(tmp_path):
    process, output = start_gunicorn(write_config(tmp_path / "c.toml"), "-w", "2")
    try:
        status = process.wait(TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    assert status != 0
    output.wait_for("refusing to start 2 gunicorn workers")
