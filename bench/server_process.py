"""The server under test: a realplexor process on free loopback ports.

The benchmarks start ``python -m realplexor --config FILE`` with a small
TOML configuration, learn the ports it bound from its log, and talk to it
over raw sockets. Every socket operation has a timeout.
"""
from __future__ import annotations

import collections
import os
import re
import resource
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
