"""The server under test: a realplexor process on free loopback ports.

The benchmarks start ``python -m realplexor --config FILE`` with a small
TOML configuration, learn the ports it bound from its log, and talk to it
over raw sockets. Every socket operation has a timeout.

For the shared store, :class:`RedisServer` runs a redis-server on a free
port and :class:`ServerGroup` runs several realplexor processes on one
WAIT and one IN port (``REUSE_PORT``) sharing it as their ``BACKEND``.
"""
from __future__ import annotations

import collections
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

START_TIMEOUT = 20.0
IO_TIMEOUT = 30.0
_LISTENING_RE = re.compile(r"(WAIT|IN) line listening on ([\d.]+):(\d+)")
_REPO = Path(__file__).resolve().parent.parent


def raise_fd_limit() -> int:
    """Raise this process's open-file limit to its hard limit; the new limit.

    Child processes inherit it, so call it before starting the server.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return soft


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def read_to_eof(sock: socket.socket, timeout: float = IO_TIMEOUT) -> bytes:
    """Everything the peer sends until it closes (at most ``timeout`` seconds)."""
    deadline = time.monotonic() + timeout
    chunks = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no end of reply within {timeout}s")
        sock.settimeout(left)
        chunk = sock.recv(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def tree_environment(tree: Path | None) -> dict[str, str] | None:
    """The environment that makes ``python -m realplexor`` import ``tree``'s package.

    None (this process's environment) for this repository's own tree.
    """
    if tree is None:
        return None
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tree), env.get("PYTHONPATH")]))
    env["PYTHONDONTWRITEBYTECODE"] = "1"   # leave the other checkout as it is
    return env


def config_options(tree: Path | None = None) -> frozenset[str]:
    """The configuration options that the realplexor of ``tree`` (default: this one) knows."""
    script = ("import dataclasses, realplexor.config as c; "
              "print(' '.join(f.name for f in dataclasses.fields(c.Config)))")
    names = subprocess.run([sys.executable, "-c", script], cwd=tree or _REPO, env=tree_environment(tree),
                           capture_output=True, text=True, timeout=START_TIMEOUT, check=True).stdout
    return frozenset(names.split())


class ServerProcess:
    """One realplexor process, started with ``options`` on 127.0.0.1 free ports.

    Use it as a context manager: the process is stopped (SIGTERM, then
    SIGKILL) on exit. Its log is drained on a thread, and the last lines
    are kept for error messages. With ``gc_log`` the server runs under
    ``gc_trace.py``, which logs its garbage collections to that file.
    With ``tree`` the server is the realplexor package of that source
    tree (another checkout), run from it with it first on ``PYTHONPATH``.
    """

    def __init__(self, gc_log: Path | None = None, cpus: str | None = None,
                 tree: Path | None = None, **options):
        self.gc_log = gc_log
        self.cpus = cpus
        self.tree = tree
        self.options = {"WAIT_ADDR": ["127.0.0.1:0"], "IN_ADDR": ["127.0.0.1:0"],
                        "VERBOSITY": 1, **options}
        self.process: subprocess.Popen | None = None
        self.wait_port = 0
        self.in_port = 0
        self.log_tail: collections.deque[str] = collections.deque(maxlen=50)
        self._ports: dict[str, int] = {}
        self._ports_found = threading.Event()
        self._tmp = tempfile.TemporaryDirectory(prefix="realplexor-bench-")

    def __enter__(self) -> "ServerProcess":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        return self.process.pid

    def start(self) -> None:
        """Write the configuration, start the process and wait for both lines."""
        config = Path(self._tmp.name) / "realplexor.toml"
        config.write_text("".join(f"{k} = {_toml(v)}\n" for k, v in self.options.items()))
        if self.gc_log is None:
            command = [sys.executable, "-m", "realplexor"]
        else:
            command = [sys.executable, str(Path(__file__).with_name("gc_trace.py")), str(self.gc_log)]
        if self.cpus is not None:
            command = ["taskset", "-c", self.cpus] + command
        self.process = subprocess.Popen(
            command + ["--config", str(config)],
            cwd=self.tree or _REPO, env=tree_environment(self.tree), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE)
        threading.Thread(target=self._drain_log, daemon=True).start()
        if not self._ports_found.wait(START_TIMEOUT):
            self.stop()
            raise RuntimeError("server did not start; log:\n" + "\n".join(self.log_tail))
        self.wait_port, self.in_port = self._ports["WAIT"], self._ports["IN"]

    def _drain_log(self) -> None:
        for raw in self.process.stderr:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.log_tail.append(line)
            match = _LISTENING_RE.search(line)
            if match:
                self._ports[match.group(1)] = int(match.group(3))
                if len(self._ports) == 2:
                    self._ports_found.set()

    def stop(self) -> None:
        """Stop the process (SIGTERM, then SIGKILL after a few seconds)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._tmp.cleanup()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def rss(self) -> int:
        """The server's resident set size in bytes."""
        return psutil.Process(self.pid).memory_info().rss

    def cpu_seconds(self) -> float:
        """CPU time (user and system) the server has used so far."""
        times = psutil.Process(self.pid).cpu_times()
        return times.user + times.system

    def in_request(self, data: bytes, timeout: float = IO_TIMEOUT) -> bytes:
        """Send raw bytes to the IN line, half-close, and read the reply."""
        with socket.create_connection(("127.0.0.1", self.in_port), timeout=timeout) as sock:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            return read_to_eof(sock, timeout)

    def publish(self, channel: str, data: bytes, timeout: float = IO_TIMEOUT) -> tuple[float, bytes]:
        """Publish JSON ``data`` to ``channel`` as the PHP client does.

        Returns the monotonic time just before the request was sent, and
        the reply.
        """
        request = (f"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(data)}\r\n"
                   f"X-Realplexor: identifier={channel}\r\n\r\n").encode() + data
        with socket.create_connection(("127.0.0.1", self.in_port), timeout=timeout) as sock:
            sent_at = time.monotonic()
            sock.sendall(request)
            sock.shutdown(socket.SHUT_WR)
            reply = read_to_eof(sock, timeout)
        if not reply.startswith(b"HTTP/1.0 200"):
            raise RuntimeError(f"publish refused: {reply[:200]!r}")
        return sent_at, reply

    def online(self) -> dict[str, int]:
        """The ONLINE command: listener count of each online channel."""
        reply = self.in_request(b"ONLINE\n\n")
        head, _, body = reply.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.0 200"):
            raise RuntimeError(f"ONLINE refused: {reply[:200]!r}")
        counts = {}
        for line in body.decode().splitlines():
            channel, _, count = line.partition(" ")
            counts[channel] = int(count)
        return counts


def free_port() -> int:
    """A TCP port free on 127.0.0.1 just now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _resp_command(*args: str | bytes | int) -> bytes:
    parts = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        parts.append(f"${len(data)}\r\n".encode() + data + b"\r\n")
    return b"".join(parts)


class _RespReader:
    """Reads RESP2 replies off a socket (enough for INFO, TIME, PUBSUB and friends)."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = b""

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("redis-server closed the connection")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _exactly(self, size: int) -> bytes:
        while len(self.buf) < size + 2:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("redis-server closed the connection")
            self.buf += chunk
        data, self.buf = self.buf[:size], self.buf[size + 2:]
        return data

    def reply(self):
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RuntimeError(f"redis-server: {rest.decode()}")
        if kind == b":":
            return int(rest)
        if kind == b"$":
            return None if int(rest) < 0 else self._exactly(int(rest))
        if kind == b"*":
            return None if int(rest) < 0 else [self.reply() for _ in range(int(rest))]
        raise RuntimeError(f"unexpected reply from redis-server: {line[:80]!r}")


class RedisServer:
    """A redis-server on a free 127.0.0.1 port, without persistence; a context manager.

    ``cpus`` pins it with taskset. :meth:`command` sends one command on a
    fresh connection (with a timeout) and returns the decoded reply.
    """

    def __init__(self, cpus: str | None = None):
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is not installed (Debian: apt-get install -y redis-server)")
        self.cpus = cpus
        self.port = 0
        self.process: subprocess.Popen | None = None
        self.log_tail: collections.deque[str] = collections.deque(maxlen=50)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        return self.process.pid

    def __enter__(self) -> "RedisServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        """Start on a free port and wait until it answers PING."""
        self.port = free_port()
        command = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                   "--appendonly", "no", "--protected-mode", "no", "--maxclients", "10000"]
        if self.cpus is not None:
            command = ["taskset", "-c", self.cpus] + command
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT)
        threading.Thread(target=self._drain_log, daemon=True).start()
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                if self.command("PING", timeout=1.0) == "PONG":
                    return
            except (OSError, RuntimeError):
                pass
            if time.monotonic() > deadline or self.process.poll() is not None:
                self.stop()
                raise RuntimeError(f"redis-server did not start on port {self.port}; log:\n"
                                   + "\n".join(self.log_tail))
            time.sleep(0.05)

    def _drain_log(self) -> None:
        for raw in self.process.stdout:
            self.log_tail.append(raw.decode("utf-8", "replace").rstrip("\n"))

    def stop(self) -> None:
        """Stop it (SIGTERM, then SIGKILL after a few seconds)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def command(self, *args: str | bytes | int, timeout: float = IO_TIMEOUT):
        """One command on a fresh connection; its reply (bulk strings as bytes)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as sock:
            sock.sendall(_resp_command(*args))
            return _RespReader(sock).reply()

    def info(self, section: str) -> dict[str, str]:
        """INFO ``section`` as a dict of its ``name:value`` lines."""
        text = self.command("INFO", section).decode()
        fields = {}
        for line in text.splitlines():
            name, sep, value = line.partition(":")
            if sep and not name.startswith("#"):
                fields[name] = value
        return fields

    def command_calls(self) -> dict[str, int]:
        """Calls of each command so far (INFO commandstats), e.g. ``{"evalsha": 12, "rpush": 30}``."""
        calls = {}
        for name, value in self.info("commandstats").items():
            stats = dict(item.split("=", 1) for item in value.split(","))
            calls[name[len("cmdstat_"):]] = int(stats["calls"])
        return calls

    def cpu_seconds(self) -> float:
        """CPU time (user and system) redis-server has used so far."""
        times = psutil.Process(self.pid).cpu_times()
        return times.user + times.system

    def rss(self) -> int:
        return psutil.Process(self.pid).memory_info().rss


class ServerGroup:
    """``count`` realplexor processes on one WAIT and one IN port, with REUSE_PORT.

    The first process binds free ports; the others bind the same ones, so
    the kernel spreads new connections among them (SO_REUSEPORT). With
    a shared ``BACKEND`` in ``options`` they serve the same channels.
    ``cpus`` gives each process its taskset CPU list (None: not pinned).
    Use it as a context manager: every process is stopped on exit.
    """

    def __init__(self, count: int, cpus: list[str | None] | None = None, **options):
        if count < 1:
            raise ValueError("a group needs at least one process")
        self.cpus = list(cpus) if cpus is not None else [None] * count
        if len(self.cpus) != count:
            raise ValueError(f"{count} processes but {len(self.cpus)} CPU lists")
        self.options = {"REUSE_PORT": count > 1, **options}
        self.servers: list[ServerProcess] = []
        self.wait_port = self.in_port = 0

    def __enter__(self) -> "ServerGroup":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __len__(self) -> int:
        return len(self.servers)

    def start(self) -> None:
        try:
            first = ServerProcess(cpus=self.cpus[0], **self.options)
            self.servers.append(first)
            first.start()
            self.wait_port, self.in_port = first.wait_port, first.in_port
            for cpus in self.cpus[1:]:
                server = ServerProcess(cpus=cpus, **{**self.options,
                                                     "WAIT_ADDR": [f"127.0.0.1:{self.wait_port}"],
                                                     "IN_ADDR": [f"127.0.0.1:{self.in_port}"]})
                self.servers.append(server)
                server.start()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for server in self.servers:
            server.stop()

    def alive(self) -> bool:
        return all(server.alive() for server in self.servers)

    @property
    def first(self) -> ServerProcess:
        return self.servers[0]

    def rss(self) -> list[int]:
        """Each process's RSS in bytes."""
        return [server.rss() for server in self.servers]

    def cpu_seconds(self) -> list[float]:
        """Each process's CPU time so far."""
        return [server.cpu_seconds() for server in self.servers]

    def descriptors(self) -> list[int]:
        """Each process's open file descriptors."""
        return [psutil.Process(server.pid).num_fds() for server in self.servers]

    def publish(self, channel: str, data: bytes, timeout: float = IO_TIMEOUT) -> tuple[float, bytes]:
        """Publish through the shared IN port (whichever process the kernel picks)."""
        return self.first.publish(channel, data, timeout)

    def online(self) -> dict[str, int]:
        """ONLINE through the shared IN port."""
        return self.first.online()
