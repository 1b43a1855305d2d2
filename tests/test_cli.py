"""The ``realplexor`` command as a real process: start, serve, reload, stop."""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys

import pytest

from conftest import TIMEOUT, RunningServer, free_port, spawn, start_server, write_config


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


def test_verbosity_zero_is_silent(tmp_path, cid):
    # Nothing is logged, so the ports are chosen here and the pidfile says when it serves.
    wait_port, in_port, pidfile = free_port(), free_port(), tmp_path / "rpl.pid"
    config = write_config(tmp_path / "c.toml", VERBOSITY=0, WAIT_ADDR=[f"127.0.0.1:{wait_port}"],
                          IN_ADDR=[f"127.0.0.1:{in_port}"])
    process, output = spawn([sys.executable, "-m", "realplexor", "--config", str(config),
                             "--pidfile", str(pidfile)])
    server = RunningServer(process, output, wait_port, in_port, config)
    try:
        server.wait_until(lambda: process.poll() is not None or pidfile.exists())
        assert process.poll() is None, output.text()
        poll = server.listen(f"{cid}a")
        server.publish(f"{cid}a", '"quietly"')
        assert json.loads(poll.response().body[3:])[0]["data"] == "quietly"
        assert server.online(cid) == {f"{cid}a": 0}
        assert process.poll() is None
    finally:
        status = server.stop()
    assert status == 0
    # The output is read to its end once the process has exited: all of it is here.
    output.wait_closed()
    assert output.lines == []


def test_help():
    result = run_cli("--help")
    assert result.returncode == 0
    assert "--config" in result.stdout


def test_version():
    from realplexor import __version__

    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"realplexor {__version__}"


OLD_MAIN = """\
##
## Default configuration file. Do not modify it!
##
%CONFIG = (
    # After starting and opening ports, switch to this user and his group.
    SU_USER => "nobody",
    WAIT_TIMEOUT => 300,
    WAIT_MAXLEN => 1024 * 5,
    WAIT_ADDR => [
        '0.0.0.0:8088',
    ],
    IN_MAXLEN => 1024 * 200,
    IN_ADDR => [ '127.0.0.1:10010' ],
    ID_BINDINGS_SERVERS => [ '127.0.0.1:11211' ],
    HOOK_CHECK_VISIBILITY => undef,
    MAX_DATA_FOR_ID => 30,
    USERS_FILE => "dklab_realplexor.htpasswd",
    IFRAME_FILE => "dklab_realplexor.html",
    SCRIPT_FILE => "dklab_realplexor.js",
    JS_DEBUG => 1,
    VERBOSITY => 3,
);

return 1;
"""
# The site's override: free ports, and no user switch (the tests may run as root).
OLD_OVERRIDE = """\
$CONFIG{WAIT_ADDR} = [ "127.0.0.1:0" ];
$CONFIG{IN_ADDR} = [ '127.0.0.1:0' ];   # back ends on this host only
$CONFIG{SU_USER} = undef;
$CONFIG{MAX_DATA_FOR_ID} = 2;
$CONFIG{VERBOSITY} = 1;
"""


def test_convert_config_output_runs_a_server(tmp_path, cid):
    (tmp_path / "dklab_realplexor.conf").write_text(OLD_MAIN)
    (tmp_path / "local.conf").write_text(OLD_OVERRIDE)
    result = subprocess.run([sys.executable, "-m", "realplexor", "convert-config",
                             "dklab_realplexor.conf", "local.conf"],
                            capture_output=True, text=True, timeout=TIMEOUT, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert "# ID_BINDINGS_SERVERS = " in result.stdout
    site = tmp_path / "site"
    site.mkdir()
    (site / "realplexor.toml").write_text(result.stdout)
    # USERS_FILE stays relative, now to the TOML's folder: the old default file moves there.
    (site / "dklab_realplexor.htpasswd").write_text(":\n")
    server = start_server(site / "realplexor.toml")
    try:
        poll = server.listen(f"{cid}a")
        server.publish(f"{cid}a", '"converted"')
        assert json.loads(poll.response().body[3:])[0]["data"] == "converted"
        for n in range(3):
            server.publish(f"{cid}b", str(n))
        assert [p["data"] for p in json.loads(server.get(f"identifier=0:{cid}b").body[3:])] == [1, 2]
        script = server.get("identifier=SCRIPT")
        assert script.status == 200 and b"Dklab_Realplexor" in script.body
    finally:
        assert server.stop() == 0


@pytest.mark.parametrize("text, message", [
    ("%CONFIG = (\n  USERS_FILE => $ENV{HOME} . '/users',\n);\n",
     "old.conf line 2: the variable `$ENV` is not understood"),
    ("$CONFIG{WAIT_TIMEOUT} = 'soon';\n", "old.conf line 1: option WAIT_TIMEOUT must be a number"),
])
def test_convert_config_refusal_is_one_line_and_status_1(tmp_path, text, message):
    (tmp_path / "old.conf").write_text(text)
    result = subprocess.run([sys.executable, "-m", "realplexor", "convert-config", "old.conf"],
                            capture_output=True, text=True, timeout=TIMEOUT, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith(f"realplexor: {message}")
    assert len(result.stderr.strip().splitlines()) == 1


def test_convert_config_missing_file(tmp_path):
    result = run_cli("convert-config", str(tmp_path / "nope.conf"))
    assert result.returncode == 1
    assert result.stderr == f"realplexor: cannot read {tmp_path / 'nope.conf'}: No such file or directory\n"


def test_convert_config_needs_a_file_and_has_help():
    assert run_cli("convert-config").returncode == 2
    helped = run_cli("convert-config", "--help")
    assert helped.returncode == 0 and "OLD.conf" in helped.stdout
    assert "convert-config" in run_cli("--help").stdout
