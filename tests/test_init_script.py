"""The SysV init script run for real, with temporary paths from a defaults file."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import free_port, ROOT, TIMEOUT, RunningServer

SCRIPT = ROOT / "contrib" / "init" / "realplexor"
pytestmark = pytest.mark.skipif(shutil.which("setsid") is None, reason="needs setsid (util-linux)")


class Service:
    """The init script pointed at temporary configs, pidfiles and logs."""

    def __init__(self, root: Path, names: list[str]):
        self.root = root
        self.ports: dict[str, tuple[int, int]] = {}
        configs = []
        for name in names:
            wait, inl = free_port(), free_port()
            self.ports[name] = (wait, inl)
            path = root / f"{name}.toml"
            path.write_text(f'WAIT_ADDR = ["127.0.0.1:{wait}"]\nIN_ADDR = ["127.0.0.1:{inl}"]\n'
                            "MAX_DATA_FOR_ID = 30\n")
            configs.append(str(path))
        daemon = root / "realplexor-daemon"
        daemon.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m realplexor "$@"\n')
        daemon.chmod(0o755)
        logger = root / "log-to-file"
        logger.write_text(f'#!/bin/sh\ncat >> "{root}/$1.log"\n')
        logger.chmod(0o755)
        self.defaults = root / "defaults"
        self.defaults.write_text(
            f'DAEMON="{daemon}"\nCONFIGS="{" ".join(configs)}"\n'
            f'PIDFILE_PREFIX="{root}/rpl"\nLOG_COMMAND="{logger}"\nSTOP_TIMEOUT=10\n')

    def run(self, action: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "REALPLEXOR_DEFAULTS": str(self.defaults), "PYTHONPATH": str(ROOT)}
        env.pop("CI", None)
        return subprocess.run(["bash", str(SCRIPT), action], capture_output=True, text=True,
                              timeout=30, env=env, cwd=self.root)

    def pidfile(self, name: str) -> Path:
        return self.root / f"rpl.{name}.pid"

    def pid(self, name: str) -> int:
        return int(self.pidfile(name).read_text())

    def server(self, name: str) -> RunningServer:
        wait, inl = self.ports[name]
        return RunningServer(None, None, wait, inl, self.root / f"{name}.toml")

    def log(self, name: str) -> str:
        path = self.root / f"realplexor-{name}.log"
        return path.read_text() if path.exists() else ""


@pytest.fixture
def service(tmp_path):
    svc = Service(tmp_path, ["main", "second"])
    yield svc
    svc.run("stop")


def wait_until(predicate, timeout=TIMEOUT):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met"
        time.sleep(0.05)


def test_start_status_publish_reload_stop(service, cid):
    started = service.run("start")
    assert started.returncode == 0, started.stderr
    assert "realplexor main: started" in started.stdout
    assert "realplexor second: started" in started.stdout
    assert service.run("status").returncode == 0

    server = service.server("main")
    poll = server.listen(f"{cid}a")
    server.publish(f"{cid}a", '"through the service"')
    assert json.loads(poll.response().body[3:])[0]["data"] == "through the service"

    config = service.root / "main.toml"
    config.write_text(config.read_text().replace("MAX_DATA_FOR_ID = 30", "MAX_DATA_FOR_ID = 1"))
    pid = service.pid("main")
    assert service.run("reload").returncode == 0
    wait_until(lambda: "configuration reloaded" in service.log("main"))
    for n in range(3):
        server.publish(f"{cid}b", str(n))
    assert [p["data"] for p in json.loads(server.get(f"identifier=0:{cid}b").body[3:])] == [2]
    assert service.pid("main") == pid

    stopped = service.run("stop")
    assert stopped.returncode == 0
    assert "realplexor main: stopped" in stopped.stdout
    assert not service.pidfile("main").exists()
    status = service.run("status")
    assert status.returncode == 3
    assert "realplexor main: stopped" in status.stdout


def test_double_start_is_refused(service):
    assert service.run("start").returncode == 0
    pid = service.pid("main")
    again = service.run("start")
    assert again.returncode == 0
    assert f"realplexor main: already running (pid {pid})" in again.stdout
    assert service.pid("main") == pid


def test_restart_waits_for_the_old_daemon(service):
    assert service.run("start").returncode == 0
    old = service.pid("main")
    restarted = service.run("restart")
    assert restarted.returncode == 0, restarted.stderr
    new = service.pid("main")
    assert new != old
    with pytest.raises(ProcessLookupError):
        os.kill(old, 0)


def test_stale_pidfile_is_reported_as_dead(service):
    dead = subprocess.Popen(["true"])
    dead.wait()
    service.pidfile("main").write_text(f"{dead.pid}\n")
    status = service.run("status")
    assert status.returncode == 1
    assert "realplexor main: dead, but pidfile" in status.stdout
    assert service.run("start").returncode == 0
    assert service.run("status").returncode == 0


def test_bad_config_is_not_started(service):
    (service.root / "main.toml").write_text("WAIT_TIMEOUT = 'x'\n")
    started = service.run("start")
    assert started.returncode == 1
    assert "bad configuration" in started.stderr
    assert "WAIT_TIMEOUT must be a number" in started.stderr


def test_usage(service):
    result = service.run("bogus")
    assert result.returncode == 2
    assert "Usage:" in result.stderr


def test_link_name_names_the_service(service):
    link = service.root / "S85rpl-site"
    link.symlink_to(SCRIPT)
    env = {**os.environ, "REALPLEXOR_DEFAULTS": str(service.defaults)}
    started = subprocess.run(["bash", str(link), "start"], capture_output=True, text=True,
                             timeout=30, env=env, cwd=service.root)
    try:
        assert started.returncode == 0, started.stderr
        assert "rpl-site main: started" in started.stdout
        wait_until(lambda: "realplexor started" in
                   (service.root / "rpl-site-main.log").read_text()
                   if (service.root / "rpl-site-main.log").exists() else False)
    finally:
        subprocess.run(["bash", str(link), "stop"], capture_output=True, timeout=30, env=env)
