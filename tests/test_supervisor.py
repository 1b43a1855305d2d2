"""The supervisor for real: restarts, held sockets, back-off, start failures, stop."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import (TIMEOUT, LongPoll, RunningServer, parse_response, read_to_eof, spawn,
                      wait_parts, write_config)
from realplexor.handoff import RESTART_STATUS
from realplexor.supervisor import Backoff, describe_exit, exit_status

STARTED = r"realplexor\[(\d+)\] INFO realplexor started"


def start_supervised(tmp_path: Path, *args: str, **options) -> RunningServer:
    """A realplexor under its supervisor (MAX_MEM_MB set), once its first server serves."""
    options.setdefault("MAX_MEM_MB", 500)
    config = write_config(tmp_path / "c.toml", **options)
    process, output = spawn([sys.executable, "-m", "realplexor", "--config", str(config), *args])
    try:
        wait = int(output.wait_for(r"WAIT line listening on [\d.]+:(\d+)").group(1))
        port = int(output.wait_for(r"IN line listening on [\d.]+:(\d+)").group(1))
    except AssertionError:
        process.kill()
        raise
    return RunningServer(process, output, wait, port, config)


def server_pid(server: RunningServer) -> int:
    """The pid of the next server to say it serves."""
    return int(server.output.wait_for(STARTED).group(1))


def wait_dead(pid: int) -> None:
    """Wait until ``pid`` has ended (gone or a zombie): its sockets are closed then."""
    deadline = time.monotonic() + TIMEOUT
    stat = Path(f"/proc/{pid}/stat")
    while True:
        try:
            if stat.read_text().split()[2] == "Z":
                return
        except (FileNotFoundError, ProcessLookupError):
            return
        assert time.monotonic() < deadline, f"process {pid} did not end"
        time.sleep(0.01)


def wait_for_pidfile(pidfile: Path, pid: int) -> None:
    """Wait until ``pidfile`` names ``pid`` (the supervisor writes it once a server serves)."""
    deadline = time.monotonic() + TIMEOUT
    while not (pidfile.exists() and pidfile.read_text().strip() == str(pid)):
        assert time.monotonic() < deadline, f"{pidfile} does not name {pid}"
        time.sleep(0.01)


def publish_request(identifier: str, body: str) -> bytes:
    return (f"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n"
            f"X-Realplexor: identifier={identifier}\r\n\r\n{body}").encode()


def connect_while_restarting(server: RunningServer, cid: str) -> tuple[LongPoll, socket.socket]:
    """A WAIT poll and an IN publish sent while no server runs; connecting must work."""
    poll = LongPoll(server.wait_port, f"GET /?identifier={cid}wait&ncrnd=1 HTTP/1.1\r\n"
                                      f"Host: 127.0.0.1\r\n\r\n".encode())
    server.polls.append(poll)
    publish = socket.create_connection(("127.0.0.1", server.in_port), timeout=TIMEOUT)
    publish.sendall(publish_request(f"{cid}early", '"sent during the restart"'))
    publish.shutdown(socket.SHUT_WR)
    return poll, publish


def assert_served_by_the_new_server(server: RunningServer, cid: str, poll: LongPoll,
                                    publish: socket.socket) -> None:
    """The requests from ``connect_while_restarting`` get their answers."""
    with publish:
        assert parse_response(read_to_eof(publish)).status == 200
    poll.headers_arrived()
    server.publish(f"{cid}wait", '"after the restart"')
    assert [part["data"] for part in wait_parts(poll.response())] == ["after the restart"]
    early = wait_parts(server.get(f"identifier=0:{cid}early"))
    assert [part["data"] for part in early] == ["sent during the restart"]


def restart_lines(server: RunningServer) -> list[str]:
    return [line.split(" WARNING ", 1)[1] for line in server.output.lines
            if " WARNING server " in line]


@pytest.mark.parametrize("engine", ["wsgi", "lean"])
def test_killed_server_is_replaced_and_no_connection_is_refused(tmp_path, cid, engine):
    server = start_supervised(tmp_path, WAIT_ENGINE=engine)
    try:
        first = server_pid(server)
        os.kill(first, signal.SIGKILL)
        wait_dead(first)
        poll, publish = connect_while_restarting(server, cid)
        server.output.wait_for(rf"server {first} was killed by SIGKILL; starting a fresh one$")
        assert server_pid(server) != first
        assert_served_by_the_new_server(server, cid, poll, publish)
    finally:
        assert server.stop() == 0


def test_max_mem_mb_restarts_a_fresh_server(tmp_path, cid):
    pidfile = tmp_path / "rpl.pid"
    server = start_supervised(tmp_path, "--pidfile", str(pidfile), MAX_MEM_MB=90,
                              MAX_DATA_FOR_ID=1000, IN_MAXLEN=3_000_000)
    try:
        first = server_pid(server)
        wait_for_pidfile(pidfile, server.process.pid)
        big = '"' + "x" * 2_000_000 + '"'
        for _ in range(40):
            if any("over MAX_MEM_MB" in line for line in server.output.lines):
                break
            try:
                server.in_http(f"{cid}big", big)
            except OSError:  # the server closed it on its way out
                break
        server.output.wait_for(r"memory \d+ MB is over MAX_MEM_MB 90: restarting")
        wait_dead(first)
        poll, publish = connect_while_restarting(server, cid)
        server.output.wait_for(rf"server {first} exited over MAX_MEM_MB; starting a fresh one$")
        assert server_pid(server) != first
        assert pidfile.read_text().strip() == str(server.process.pid)
        assert_served_by_the_new_server(server, cid, poll, publish)
    finally:
        assert server.stop() == 0
    assert not pidfile.exists()


def test_repeated_deaths_back_off(tmp_path, cid):
    server = start_supervised(tmp_path)
    try:
        pids = []
        for _ in range(4):
            pids.append(server_pid(server))
            os.kill(pids[-1], signal.SIGKILL)
        server_pid(server)
        assert restart_lines(server) == [
            f"server {pids[0]} was killed by SIGKILL; starting a fresh one",
            f"server {pids[1]} was killed by SIGKILL; starting a fresh one in 0.5 s",
            f"server {pids[2]} was killed by SIGKILL; starting a fresh one in 1 s",
            f"server {pids[3]} was killed by SIGKILL; starting a fresh one in 2 s",
        ]
        poll = server.listen(f"{cid}a")
        server.publish(f"{cid}a", '"still serving"')
        assert [part["data"] for part in wait_parts(poll.response())] == ["still serving"]
    finally:
        assert server.stop() == 0


def test_a_first_server_that_cannot_start_ends_the_supervisor(tmp_path):
    config = write_config(tmp_path / "c.toml", MAX_MEM_MB=500, USERS_FILE=str(tmp_path / "none"))
    result = subprocess.run([sys.executable, "-m", "realplexor", "--config", str(config)],
                            capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if " INFO " not in line]
    assert len(errors) == 1 and errors[0].startswith("realplexor: cannot read USERS_FILE"), errors


def test_a_port_in_use_is_one_line_from_the_supervisor(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = write_config(tmp_path / "c.toml", MAX_MEM_MB=500, IN_ADDR=[f"127.0.0.1:{port}"])
        result = subprocess.run([sys.executable, "-m", "realplexor", "--config", str(config)],
                                capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"realplexor: cannot listen on IN_ADDR 127.0.0.1:{port}: Address already in use"]


def test_a_later_start_failure_is_retried_with_back_off(tmp_path, cid):
    users = tmp_path / "users.htpasswd"
    users.write_text(":\n")
    server = start_supervised(tmp_path, USERS_FILE=str(users))
    try:
        first = server_pid(server)
        users.rename(tmp_path / "gone")
        os.kill(first, signal.SIGKILL)
        failed = server.output.wait_for(
            r"server (\d+) exited with status 1 before it served; starting a fresh one in 0.5 s$")
        poll, publish = connect_while_restarting(server, cid)
        (tmp_path / "gone").rename(users)
        assert server_pid(server) != int(failed.group(1))
        assert_served_by_the_new_server(server, cid, poll, publish)
        assert restart_lines(server)[0] == f"server {first} was killed by SIGKILL; starting a fresh one"
    finally:
        assert server.stop() == 0


def test_sigterm_between_servers_stops_with_status_0(tmp_path):
    users = tmp_path / "users.htpasswd"
    users.write_text(":\n")
    server = start_supervised(tmp_path, USERS_FILE=str(users))
    first = server_pid(server)
    users.unlink()
    os.kill(first, signal.SIGKILL)
    # Each failed start doubles the delay; SIGTERM must not wait for the next try.
    server.output.wait_for(r"before it served; starting a fresh one in 1 s$")
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(TIMEOUT) == 0


def test_sigterm_stops_server_and_supervisor(tmp_path):
    pidfile = tmp_path / "rpl.pid"
    server = start_supervised(tmp_path, "--pidfile", str(pidfile))
    child = server_pid(server)
    wait_for_pidfile(pidfile, server.process.pid)
    assert server.stop() == 0
    assert not pidfile.exists()
    wait_dead(child)
    assert not Path(f"/proc/{child}").exists(), "the server was not reaped"
    for port in (server.wait_port, server.in_port):
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT).close()
    assert " WARNING " not in server.output.text()


def test_sighup_reaches_the_server(tmp_path, cid):
    server = start_supervised(tmp_path, MAX_DATA_FOR_ID=30)
    try:
        server_pid(server)
        server.config_path.write_text(server.config_path.read_text()
                                      .replace("MAX_DATA_FOR_ID = 30", "MAX_DATA_FOR_ID = 2"))
        server.process.send_signal(signal.SIGHUP)
        server.output.wait_for("configuration reloaded")
        for n in range(4):
            server.publish(f"{cid}a", str(n))
        assert [part["data"] for part in wait_parts(server.get(f"identifier=0:{cid}a"))] == [2, 3]
    finally:
        assert server.stop() == 0


def test_sighup_while_a_server_starts_reaches_it_once_it_serves(tmp_path):
    server = start_supervised(tmp_path)
    try:
        first = server_pid(server)
        os.kill(first, signal.SIGKILL)
        server.output.wait_for("starting a fresh one")
        # The new server may not handle signals yet: SIGHUP would kill it.
        server.process.send_signal(signal.SIGHUP)
        server_pid(server)
        server.output.wait_for("configuration reloaded")
        assert len(restart_lines(server)) == 1
    finally:
        assert server.stop() == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")
def test_each_fresh_server_drops_to_su_user_on_the_held_sockets(tmp_path, cid):
    server = start_supervised(tmp_path, SU_USER="nobody")
    try:
        first = server_pid(server)
        os.kill(first, signal.SIGKILL)
        server.output.wait_for("running as user nobody")
        second = server_pid(server)
        status = Path(f"/proc/{second}/status").read_text()
        uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
        assert uid_line.split()[1:] == [str(65534)] * 4
        assert server.in_http(f"{cid}a", "1").status == 200
    finally:
        assert server.stop() == 0


def test_changed_addresses_wait_for_a_full_restart(tmp_path):
    server = start_supervised(tmp_path)
    try:
        first = server_pid(server)
        server.config_path.write_text(server.config_path.read_text()
                                      .replace('IN_ADDR = ["127.0.0.1:0"]', 'IN_ADDR = ["127.0.0.1:1"]'))
        os.kill(first, signal.SIGKILL)
        server.output.wait_for(r"IN_ADDR changed but takes effect only once realplexor is stopped "
                               r"and started; serving 127\.0\.0\.1:0")
        server.output.wait_for(rf"IN line listening on 127\.0\.0\.1:{server.in_port}$")
        server_pid(server)
        assert server.command("ONLINE").status == 200
    finally:
        assert server.stop() == 0


def test_backoff_doubles_to_a_cap_and_resets_after_a_healthy_run():
    backoff = Backoff(first=0.5, cap=4, healthy_after=10)
    assert [backoff.delay(0.1) for _ in range(6)] == [0, 0.5, 1, 2, 4, 4]
    assert backoff.delay(10) == 0
    assert backoff.delay(9.9) == 0.5
    delays = [backoff.delay(0) for _ in range(1000)]
    assert delays[:2] == [1, 2] and set(delays[2:]) == {4}


@pytest.mark.parametrize("status, text", [
    (RESTART_STATUS, "exited over MAX_MEM_MB"),
    (-signal.SIGKILL, "was killed by SIGKILL"),
    (-signal.SIGSEGV, "was killed by SIGSEGV"),
    (3, "exited with status 3"),
])
def test_describe_exit(status, text):
    assert describe_exit(status) == text


def test_exit_status_is_the_shells():
    assert (exit_status(1), exit_status(-signal.SIGKILL)) == (1, 137)

