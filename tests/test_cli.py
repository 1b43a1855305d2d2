"""The ``realplexor`` command as a real process: start, serve, reload, stop."""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys

import pytest

from conftest import TIMEOUT, spawn, start_server, write_config


def run_cli(*args, timeout=TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "realplexor", *args],
                          capture_output=True, text=True, timeout=timeout)


def test_cli_serves_both_lines_and_stops_on_sigterm(tmp_path, cid):
    server = start_server(write_config(tmp_path / "c.toml"))
    try:
        poll = server.listen(f"{cid}a")
        server.publish(f"{cid}a", '"via cli"')
        assert json.loads(poll.response().body[3:])[0]["data"] == "via cli"
        assert "WAIT line listening on 127.0.0.1:" in server.output.text()
    finally:
        status = server.stop()
    assert status == 0
    server.output.wait_for("realplexor stopped")


def test_cli_stops_on_sigint(tmp_path):
    server = start_server(write_config(tmp_path / "c.toml"))
    server.process.send_signal(signal.SIGINT)
    assert server.process.wait(TIMEOUT) == 0
    assert "Traceback" not in server.output.text()


def test_port_in_use_is_one_clear_line_and_status_1(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_cli("--config", str(write_config(tmp_path / "c.toml", IN_ADDR=[f"127.0.0.1:{port}"])))
    assert result.returncode == 1
    assert f"cannot listen on IN_ADDR 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr
    # It never started, so it never stopped either.
    assert "stopped" not in result.stderr


@pytest.mark.parametrize("content, message", [
    ("WAIT_TIMEOUT = 'x'\n", "WAIT_TIMEOUT must be a number"),
    ("NOPE = 1\n", "unknown option 'NOPE'"),
    ("WAIT_TIMOUT = 1\n", "unknown option 'WAIT_TIMOUT'; did you mean WAIT_TIMEOUT?"),
    ("[[[\n", "not valid TOML"),
])
def test_bad_config_is_one_clear_line_and_status_1(tmp_path, content, message):
    path = tmp_path / "bad.toml"
    path.write_text(content)
    result = run_cli("--config", str(path))
    assert result.returncode == 1
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_missing_config_file(tmp_path):
    result = run_cli("--config", str(tmp_path / "nope.toml"))
    assert result.returncode == 1
    assert "cannot read config file" in result.stderr


def test_unreadable_users_file(tmp_path):
    result = run_cli("--config", str(write_config(tmp_path / "c.toml", USERS_FILE=str(tmp_path / "none"))))
    assert result.returncode == 1
    assert "cannot read USERS_FILE" in result.stderr


def test_sighup_reloads_and_reports_restart_only_options(tmp_path, cid):
    path = write_config(tmp_path / "c.toml", MAX_DATA_FOR_ID=30)
    server = start_server(path)
    try:
        path.write_text(path.read_text().replace("MAX_DATA_FOR_ID = 30", "MAX_DATA_FOR_ID = 2")
                        .replace('IN_ADDR = ["127.0.0.1:0"]', 'IN_ADDR = ["127.0.0.1:1"]'))
        server.process.send_signal(signal.SIGHUP)
        server.output.wait_for("configuration reloaded")
        server.output.wait_for("IN_ADDR changed but take effect only after a restart")
        for n in range(4):
            server.publish(f"{cid}a", str(n))
        body = json.loads(server.get(f"identifier=0:{cid}a").body[3:])
        assert [p["data"] for p in body] == [2, 3]
        path.write_text("WAIT_TIMEOUT = 'broken'\n")
        server.process.send_signal(signal.SIGHUP)
        server.output.wait_for("reload failed, keeping the running configuration: .*WAIT_TIMEOUT")
        assert server.in_http(f"{cid}a", "1").status == 200
    finally:
        assert server.stop() == 0


def test_verbosity_zero_is_silent(tmp_path):
    process, output = spawn([sys.executable, "-m", "realplexor", "--config",
                             str(write_config(tmp_path / "c.toml", VERBOSITY=0))])
    try:
        with pytest.raises(AssertionError):
            output.wait_for("listening", timeout=1.5)
    finally:
        process.terminate()
        process.wait(TIMEOUT)


def test_help():
    result = run_cli("--help")
    assert result.returncode == 0
    assert "--config" in result.stdout


def test_version():
    from realplexor import __version__

    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"realplexor {__version__}"
