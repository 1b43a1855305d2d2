"""The WAIT line under gunicorn's gevent worker, with the IN line in the same worker."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import ROOT, TIMEOUT, OutputReader, Response, RunningServer, spawn, write_config
from realplexor.config import Config

pytest.importorskip("gunicorn")
GUNICORN = [sys.executable, "-m", "gunicorn"]
CONTRIB_SETTINGS = "contrib/init/gunicorn.conf.py"
# Creating a venv and installing into it from pip's cache takes seconds;
# this bounds a stalled download.
INSTALL_TIMEOUT = 180


def start_gunicorn(config_path: Path, *args: str):
    process, output = spawn([*GUNICORN, "-k", "gevent", "-b", "127.0.0.1:0", *args, "wsgi:app"],
                            env={"REALPLEXOR_CONFIG": str(config_path)}, cwd=ROOT)
    return process, output


def answer_data(response: Response):
    """The data of the one message in a WAIT answer, chunked or not."""
    assert response.status == 200, response.raw
    body = response.body
    if response.headers.get("transfer-encoding") == "chunked":
        body = dechunk(body)
    parts = json.loads(body.strip())
    assert len(parts) == 1, parts
    return parts[0]["data"]


def test_gunicorn_serves_wait_line_and_worker_serves_in_line(tmp_path, cid):
    process, output = start_gunicorn(write_config(tmp_path / "c.toml"), "-w", "1")
    try:
        wait_port = int(output.wait_for(r"Listening at: http://127\.0\.0\.1:(\d+)").group(1))
        in_port = int(output.wait_for(r"IN line listening on 127\.0\.0\.1:(\d+)").group(1))
        server = RunningServer(process, output, wait_port, in_port, tmp_path / "c.toml")
        poll = server.listen(f"{cid}a")
        server.publish(f"{cid}a", '{"via": "gunicorn"}')
        assert answer_data(poll.response()) == {"via": "gunicorn"}
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


@pytest.mark.parametrize("settings", [[], ["-c", CONTRIB_SETTINGS]], ids=["gunicorn.conf.py", "contrib"])
def test_gunicorn_refuses_several_workers(tmp_path, settings):
    process, output = start_gunicorn(write_config(tmp_path / "c.toml"), *settings, "-w", "2")
    try:
        status = process.wait(TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    assert status != 0
    output.wait_for("refusing to start 2 gunicorn workers")


# The README's gunicorn section, run as written from the repository root in
# a venv of its own that holds only what its install command installs.

def readme_gunicorn_commands() -> tuple[list[str], list[str]]:
    """The shell commands of the README's gunicorn section: (install, run)."""
    readme = (ROOT / "README.md").read_text()
    heading = "\n## Run it under gunicorn\n"
    assert heading in readme, "README.md has no gunicorn section"
    section = readme.split(heading, 1)[1].split("\n## ", 1)[0]
    lines = []
    for block in re.findall(r"```sh\n(.*?)```", section, re.S):
        lines += [line.strip() for line in block.replace("\\\n", " ").splitlines() if line.strip()]
    install = [line for line in lines if "pip install" in line]
    run = [line for line in lines if "pip install" not in line]
    return install, run


README_INSTALL, README_RUN = readme_gunicorn_commands()


def as_tested(command: str, venv: Path, config: Path | None = None) -> str:
    """A README command with the test's venv, configuration and a free loopback port."""
    assert re.fullmatch(r"[\w/.-]+", str(venv)), venv
    command = re.sub(r"(?<![\w/])\.venv\b", str(venv), command)
    if config is not None:
        assert "REALPLEXOR_CONFIG=/etc/realplexor.toml " in command, command
        command = command.replace("/etc/realplexor.toml", str(config))
    return command.replace("0.0.0.0:8088", "127.0.0.1:0")


def shell_env(**extra: str) -> dict[str, str]:
    """This environment without anything that would point into the test venv or name a config."""
    env = {name: value for name, value in os.environ.items()
           if name not in {"REALPLEXOR_CONFIG", "REALPLEXOR_BIND", "VIRTUAL_ENV",
                           "PYTHONPATH", "PYTHONHOME", "PYTHONUSERBASE"}}
    return {**env, **extra}


def shell(command: str, env: dict[str, str]) -> subprocess.Popen:
    """``bash -c command`` in the repository root, in a process group of its own."""
    return subprocess.Popen(["bash", "-c", command], cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def end_group(process: subprocess.Popen) -> None:
    """SIGTERM the process's group, then SIGKILL whatever is left of it, and reap the process."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            pass
        try:
            process.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            pass


@contextmanager
def shell_server(command: str, env: dict[str, str]):
    """A long-running ``shell`` command and its output; its group is ended afterwards."""
    process = shell(command, env)
    output = OutputReader(process.stdout)
    try:
        yield process, output
    finally:
        end_group(process)


def test_readme_has_an_install_and_both_run_commands():
    assert README_INSTALL == ["python3 -m venv .venv && .venv/bin/pip install -e '.[gunicorn]'"]
    assert len(README_RUN) == 2, README_RUN
    assert any(" -b 0.0.0.0:8088 " in command for command in README_RUN), README_RUN
    assert any(f" -c {CONTRIB_SETTINGS} " in command for command in README_RUN), README_RUN


@pytest.fixture(scope="module")
def readme_venv(tmp_path_factory):
    """A fresh venv made by the README's install command: only the gunicorn extra in it."""
    venv = tmp_path_factory.mktemp("readme") / "venv"
    process = shell(as_tested(README_INSTALL[0], venv), shell_env())
    try:
        output, _ = process.communicate(timeout=INSTALL_TIMEOUT)
    except subprocess.TimeoutExpired:
        end_group(process)
        pytest.fail(f"the README's install command took over {INSTALL_TIMEOUT} s")
    assert process.returncode == 0, output.decode("utf-8", "replace")
    # It must not borrow from the test venv, whose test extras hid a missing dependency once.
    probe = subprocess.run([str(venv / "bin" / "python"), "-c", "import pytest"],
                           capture_output=True, timeout=TIMEOUT)
    assert probe.returncode != 0, "the README's venv sees the test venv's packages"
    return venv


@pytest.mark.parametrize("command", README_RUN,
                         ids=lambda command: "contrib" if CONTRIB_SETTINGS in command else "-b")
def test_readme_run_command_serves_a_long_poll_and_a_publish(readme_venv, tmp_path, cid, command):
    config = write_config(tmp_path / "realplexor.toml")
    # The contrib settings bind REALPLEXOR_BIND; the other command binds its -b.
    env = shell_env(REALPLEXOR_BIND="127.0.0.1:0")
    with shell_server(as_tested(command, readme_venv, config), env) as (process, output):
        wait_port = int(output.wait_for(r"Listening at: http://127\.0\.0\.1:(\d+)").group(1))
        in_port = int(output.wait_for(r"IN line listening on 127\.0\.0\.1:(\d+)").group(1))
        default_in_port = int(Config.IN_ADDR[0].rpartition(":")[2])
        assert in_port != default_in_port, "the worker did not read the configuration REALPLEXOR_CONFIG names"
        server = RunningServer(process, output, wait_port, in_port, config)
        # Connection: close, so the answer ends at once instead of at gunicorn's keep-alive timeout.
        poll = server.listen(f"{cid}a", headers="Connection: close\r\n")
        server.publish(f"{cid}a", '{"via": "the README"}')
        assert answer_data(poll.response()) == {"via": "the README"}
        poll.close()
