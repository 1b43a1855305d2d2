"""Process life for real: pidfile, --check-config, SU_USER, file limit, MAX_MEM_MB checks."""
from __future__ import annotations

import os
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import free_port, TIMEOUT, RunningServer, spawn, start_server, write_config


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "realplexor", *args],
                          capture_output=True, text=True, timeout=TIMEOUT)


def test_check_config_accepts_a_good_file(tmp_path):
    result = run_cli("--config", str(write_config(tmp_path / "c.toml")), "--check-config")
    assert result.returncode == 0
    assert "configuration OK" in result.stdout


def test_check_config_names_the_problem(tmp_path):
    bad = write_config(tmp_path / "c.toml", USERS_FILE="missing.htpasswd")
    result = run_cli("--config", str(bad), "--check-config")
    assert result.returncode == 1
    assert "cannot read USERS_FILE" in result.stderr
    bad.write_text("OFFLINE_TIMEOUT = -1\n")
    result = run_cli("--config", str(bad), "--check-config")
    assert (result.returncode, result.stderr.strip()) == (1, "realplexor: option OFFLINE_TIMEOUT must be at least 0, not -1.0")


@pytest.mark.parametrize("check", [True, False], ids=["check-config", "start"])
def test_max_mem_mb_below_an_idle_server_is_refused(tmp_path, check):
    config = write_config(tmp_path / "c.toml", MAX_MEM_MB=20)
    result = run_cli("--config", str(config), *(["--check-config"] if check else []))
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "realplexor: option MAX_MEM_MB must be 0 (off) or at least 64, not 20"]


def test_pidfile_written_after_binding_and_removed_on_exit(tmp_path):
    pidfile = tmp_path / "rpl.pid"
    process, output = spawn([sys.executable, "-m", "realplexor", "--config",
                             str(write_config(tmp_path / "c.toml")), "--pidfile", str(pidfile)])
    try:
        output.wait_for("realplexor started")
        assert pidfile.read_text().strip() == str(process.pid)
        again = run_cli("--config", str(write_config(tmp_path / "d.toml")), "--pidfile", str(pidfile))
        assert again.returncode == 1
        assert f"already running: pid {process.pid}" in again.stderr
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(TIMEOUT)
    assert not pidfile.exists()


def test_stale_pidfile_does_not_block_a_start(tmp_path):
    pidfile = tmp_path / "rpl.pid"
    dead = subprocess.Popen(["true"])
    dead.wait()
    pidfile.write_text(f"{dead.pid}\n")
    server = start_server_with(tmp_path, "--pidfile", str(pidfile))
    try:
        assert pidfile.read_text().strip() == str(server.process.pid)
    finally:
        server.stop()


def start_server_with(tmp_path: Path, *args: str) -> RunningServer:
    process, output = spawn([sys.executable, "-m", "realplexor", "--config",
                             str(write_config(tmp_path / "c.toml")), *args])
    wait = int(output.wait_for(r"WAIT line listening on [\d.]+:(\d+)").group(1))
    port = int(output.wait_for(r"IN line listening on [\d.]+:(\d+)").group(1))
    output.wait_for("realplexor started")
    return RunningServer(process, output, wait, port, tmp_path / "c.toml")


def test_start_logs_the_connection_capacity(tmp_path):
    server = start_server(write_config(tmp_path / "c.toml"))
    try:
        match = re.search(r"open-files limit (\d+): room for about (\d+) connections", server.output.text())
        assert int(match.group(1)) == resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    finally:
        server.stop()


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")
def test_su_user_drops_root_after_binding(tmp_path, cid):
    port = free_port()
    server = start_server(write_config(tmp_path / "c.toml", SU_USER="nobody",
                                       IN_ADDR=[f"127.0.0.1:{port}"]))
    try:
        server.output.wait_for("running as user nobody")
        status = Path(f"/proc/{server.process.pid}/status").read_text()
        uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
        assert uid_line.split()[1:] == [str(65534)] * 4
        assert server.in_http(f"{cid}a", "1").status == 200
    finally:
        server.stop()


def test_unknown_su_user_is_a_clear_error(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("SU_USER is only used when started as root")
    result = run_cli("--config", str(write_config(tmp_path / "c.toml", SU_USER="no_such_user_x")))
    assert result.returncode == 1
    assert "SU_USER 'no_such_user_x' is not a user" in result.stderr


def test_supervised_server_ends_when_its_supervisor_is_killed(tmp_path):
    config = write_config(tmp_path / "c.toml", MAX_MEM_MB=500)
    process, output = spawn([sys.executable, "-m", "realplexor", "--config", str(config)])
    try:
        child = int(output.wait_for(r"realplexor\[(\d+)\] INFO realplexor started").group(1))
        assert child != process.pid
    finally:
        process.kill()
        process.wait(TIMEOUT)
    deadline = time.monotonic() + TIMEOUT
    while Path(f"/proc/{child}").exists() and Path(f"/proc/{child}/stat").read_text().split()[2] != "Z":
        assert time.monotonic() < deadline, "the server outlived its supervisor"
        time.sleep(0.05)
