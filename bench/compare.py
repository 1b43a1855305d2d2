"""Realplexor's WAIT engines against nginx + nchan, side by side, one run.

Every server kind runs pinned to CPU 0 (taskset); the client processes
that hold the long polls and the publisher are pinned to CPU 1. The
polls are browser-like kept-alive HTTP/1.1 requests: Realplexor answers
them chunked and keeps the connection, nchan's long-poll subscriber
keeps it too (the next poll carries If-Modified-Since / If-None-Match).

Scenarios, for each kind:
  memory     server RSS per idle poll at N parked polls;
  broadcast  one publish to N polls of one channel: p50, p99 and
             all-received latency, server CPU for the round;
  repark     every poll asks again at once: time until the server itself
             counts all N waiting again (Realplexor: ONLINE; nchan: its status);
  rate       2000 polls on their own channels, publishers round-robin:
             messages delivered per second;
  fan-out    (--fan-out N) N polls of one channel, publishers as fast as
             they can: messages delivered per second.

Transports (--transports poll,sse,ws): each scenario with kept-alive long
polls, event streams (EventSource) or WebSockets, on the kinds that serve
them (nchan, lean, wsgi). Streams are held by streamload, a C program in
this directory (bench/streamload.c, built with gcc on first use, or
STREAMLOAD=PATH): one connection per subscriber for the whole run.

Kinds: nchan, lean, wsgi, lean-close / wsgi-close (polls without
keep-alive), gunicorn (the WAIT line under gunicorn's gevent worker,
which parses requests with its own parser), and floor: bench/floor_server.py, which makes only the
system calls the protocol needs, in a bare epoll loop, as a bound for
any Python server (re-park and rate only).

    python compare.py                     # everything (several minutes)
    python compare.py --kinds lean,nchan --broadcast 1000 --memory 1000

Realplexor's own switches: --no-metrics runs it with METRICS = false;
--scrape S has a thread GET /metrics every S seconds while it serves, as
Prometheus would; --publish-via json publishes with POST /publish (the
JSON API) instead of the old protocol's POST /.
    python compare.py --load c ...        # cometload, the C load generator, as clients
    python compare.py --load c --kinds nchan,lean,wsgi --transports poll,sse,ws \
        --memory 0 --broadcast 10000 --fan-out 1000  # long polls against streams
    python compare.py --profile DIR ...   # py-spy of Realplexor in broadcasts and the rate run

A kept-alive Realplexor poll gets its headers with its answer, as nchan's
does: the server's own count says when polls wait, for every kind.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import multiprocessing
import os
import selectors
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from pyspy_top import Recorder, summary
from server_process import ServerProcess, raise_fd_limit, read_to_eof

SERVER_CPU, LOAD_CPU = "0", 1
PER_CLIENT = 4800
IO_TIMEOUT = 30.0
HERE = Path(__file__).resolve().parent
# cometload, the C load generator (--load c): its path, or found on PATH.
COMETLOAD = os.environ.get("COMETLOAD") or shutil.which("cometload") or "cometload"
CLIENTS = "python"
PROFILE: Path | None = None
SERVER_TREE: Path | None = None
FIRST = b" \r\n"


# -- the servers ---------------------------------------------------------------


def online_listeners(in_port: int) -> int:
    """Listeners waiting now, by the server's own ONLINE counts."""
    with socket.create_connection(("127.0.0.1", in_port), timeout=IO_TIMEOUT) as sock:
        sock.sendall(b"ONLINE\n\n")
        body = read_to_eof(sock).partition(b"\r\n\r\n")[2]
    return sum(int(line.split()[1]) for line in body.decode().splitlines())


def stop_process(process: subprocess.Popen) -> None:
    """Terminate ``process`` (a server's master), killing it after 10 s."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()

class Nginx:
    """nginx with nchan on a free port, pinned to the server CPU."""

    name = "nchan"

    def __init__(self) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="nchan-bench-")
        self.port = _free_port()
        conf = Path(self._tmp.name) / "nginx.conf"
        conf.write_text((HERE / "nchan.conf").read_text()
                        .replace("@PREFIX@", self._tmp.name).replace("@PORT@", str(self.port)))
        self.master = subprocess.Popen(
            ["taskset", "-c", SERVER_CPU, "nginx", "-c", str(conf), "-p", self._tmp.name],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _wait_for_port(self.port)
        self.wait_port = self.port

    def processes(self) -> list[psutil.Process]:
        master = psutil.Process(self.master.pid)
        return [master] + master.children()

    def worker_rss(self) -> int:
        return sum(p.memory_info().rss for p in self.processes()[1:])

    def rss(self) -> int:
        return sum(p.memory_info().rss for p in self.processes())

    def cpu_seconds(self) -> float:
        return sum(sum(p.cpu_times()[:2]) for p in self.processes())

    def publish(self, channel: str, data: bytes) -> float:
        request = (f"POST /pub/{channel} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\n"
                   "Connection: close\r\n\r\n").encode() + data
        return _send_request(self.port, request, (b"HTTP/1.1 201", b"HTTP/1.1 202"))

    def waiting(self) -> int:
        with socket.create_connection(("127.0.0.1", self.port), timeout=IO_TIMEOUT) as sock:
            sock.sendall(b"GET /nchan_status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            body = read_to_eof(sock).partition(b"\r\n\r\n")[2].decode()
        return next(int(line.split(":")[1]) for line in body.splitlines() if line.startswith("subscribers"))

    def first_request(self, channel: str) -> bytes:
        return f"GET /sub/{channel} HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n\r\n".encode()

    def stop(self) -> None:
        stop_process(self.master)
        self._tmp.cleanup()


class FloorServer:
    """bench/floor_server.py: the system calls of the protocol and nothing else."""

    name = "floor"
    keep_alive = True

    def __init__(self) -> None:
        self.wait_port, self.in_port = _free_port(), _free_port()
        self.process = subprocess.Popen(
            ["taskset", "-c", SERVER_CPU, sys.executable, str(HERE / "floor_server.py"),
             str(self.wait_port), str(self.in_port)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        _wait_for_port(self.in_port)

    def rss(self) -> int:
        return psutil.Process(self.process.pid).memory_info().rss

    worker_rss = rss

    def cpu_seconds(self) -> float:
        return sum(psutil.Process(self.process.pid).cpu_times()[:2])

    def publish(self, channel: str, data: bytes) -> float:
        return Realplexor.publish(self, channel, data)

    def waiting(self) -> int:
        return online_listeners(self.in_port)

    def stop(self) -> None:
        self.process.kill()
        self.process.wait(10)


class Realplexor:
    """A Realplexor server with one WAIT engine, pinned to the server CPU.

    ``options`` (from the command line): ``metrics`` (bool), ``scrape``
    (seconds between GET /metrics, 0 for none), ``publish_via`` ("old" or "json").
    """

    def __init__(self, engine: str, keep_alive: bool = True, options: dict | None = None) -> None:
        options = options or {}
        self.name = engine if keep_alive else f"{engine} (close)"
        self.keep_alive = keep_alive
        self.json_publish = options.get("publish_via") == "json"
        extra = {} if options.get("metrics", True) else {"METRICS": False}
        self.server = ServerProcess(cpus=SERVER_CPU, tree=SERVER_TREE, WAIT_ENGINE=engine, WAIT_TIMEOUT=3600,
                                    OFFLINE_TIMEOUT=3600, **extra)
        self.server.start()
        self.wait_port, self.in_port = self.server.wait_port, self.server.in_port
        self._scraping = threading.Event()
        self.scrapes = 0
        if options.get("scrape"):
            threading.Thread(target=self._scrape, args=(options["scrape"],), daemon=True).start()

    def _scrape(self, interval: float) -> None:
        request = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
        while not self._scraping.wait(interval):
            _send_request(self.in_port, request, (b"HTTP/1.0 200",))
            self.scrapes += 1

    def rss(self) -> int:
        return self.server.rss()

    worker_rss = rss

    def cpu_seconds(self) -> float:
        return self.server.cpu_seconds()

    def publish(self, channel: str, data: bytes) -> float:
        if self.json_publish:
            body = b'{"ids":["%s"],"data":%s}' % (channel.encode(), data)
            request = (f"POST /publish HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
                       f"\r\n").encode() + body
        else:
            request = (f"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\n"
                       f"X-Realplexor: identifier={channel}\r\n\r\n").encode() + data
        return _send_request(self.in_port, request, (b"HTTP/1.0 200",))

    def waiting(self) -> int:
        return sum(self.server.online().values())

    def first_request(self, channel: str) -> bytes:
        connection = "Connection: keep-alive\r\n" if self.keep_alive else ""
        return f"GET /?identifier={channel} HTTP/1.1\r\nHost: x\r\n{connection}\r\n".encode()

    def stop(self) -> None:
        self._scraping.set()
        self.server.stop()


class Gunicorn(Realplexor):
    """Realplexor's WAIT line under gunicorn's gevent worker (gunicorn parses the requests).

    One worker, pinned to the server CPU with its master; the worker
    serves the IN line too. Memory and CPU are the worker's.
    """

    def __init__(self) -> None:  # pylint: disable=super-init-not-called
        self.name = "gunicorn"
        self.keep_alive = True
        self._tmp = tempfile.TemporaryDirectory(prefix="gunicorn-bench-")
        self.wait_port, self.in_port = _free_port(), _free_port()
        config = Path(self._tmp.name) / "realplexor.toml"
        config.write_text(f'IN_ADDR = ["127.0.0.1:{self.in_port}"]\nVERBOSITY = 1\n'
                          "WAIT_TIMEOUT = 3600\nOFFLINE_TIMEOUT = 3600\n")
        tree = SERVER_TREE or HERE.parent
        env = {**os.environ, "REALPLEXOR_CONFIG": str(config),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(tree), os.environ.get("PYTHONPATH")]))}
        self.master = subprocess.Popen(
            ["taskset", "-c", SERVER_CPU, sys.executable, "-m", "gunicorn", "-k", "gevent", "-w", "1",
             "-b", f"127.0.0.1:{self.wait_port}", "--backlog", "4096", "--worker-connections", "30000", "wsgi:app"],
            cwd=tree, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_for_port(self.in_port)
        _wait_for_port(self.wait_port)

    def _worker(self) -> psutil.Process:
        return psutil.Process(self.master.pid).children()[0]

    def rss(self) -> int:
        return self._worker().memory_info().rss

    worker_rss = rss

    def cpu_seconds(self) -> float:
        return sum(self._worker().cpu_times()[:2])

    def waiting(self) -> int:
        return online_listeners(self.in_port)

    def stop(self) -> None:
        stop_process(self.master)
        self._tmp.cleanup()


def _send_request(port: int, request: bytes, ok: tuple[bytes, ...]) -> float:
    with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as sock:
        sent_at = time.monotonic()
        sock.sendall(request)
        reply = read_to_eof(sock)
    if not reply.startswith(ok):
        raise RuntimeError(f"publish refused: {reply[:200]!r}")
    return sent_at


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_port(port: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


# -- the client side: one selector per process, many kept-alive polls ---------

class Conn:
    """One poll connection and the response being read on it."""

    __slots__ = ("sock", "channel", "kind", "buf", "head", "chunked", "length", "chunks",
                 "parked_at", "done_at", "next_headers", "reconnect")

    def __init__(self, channel: str, kind: str):
        self.channel, self.kind = channel, kind
        self.sock = None
        self.next_headers = ""
        self.reset()

    def reset(self) -> None:
        self.buf, self.head, self.chunks = b"", None, []
        self.chunked, self.length = False, None
        self.parked_at = self.done_at = 0.0
        self.reconnect = False


class Clients:
    """The client processes (pinned to the load CPU), driven over pipes.

    ``cpus`` pins them elsewhere (a set of CPU numbers); ``crowd`` is the
    class each process drives (a subclass of :class:`_Crowd` may check
    what it reads).
    """

    def __init__(self, kind: str, port: int, channels: list[str], keep_alive: bool,
                 cpus: set[int] | None = None, crowd: type | None = None):
        self.pipes = []
        for start in range(0, len(channels), PER_CLIENT):
            parent, child = multiprocessing.Pipe()
            process = multiprocessing.Process(
                target=_client_main, args=(child, kind, port, channels[start:start + PER_CLIENT], keep_alive,
                                           cpus, crowd),
                daemon=True)
            process.start()
            self.pipes.append((parent, process))

    def ask(self, *command, timeout: float = 120.0) -> list:
        self.tell(*command)
        return self.answers(command[0], timeout)

    def tell(self, *command) -> None:
        """Start ``command`` in every client process; collect with :meth:`answers`."""
        for pipe, _ in self.pipes:
            pipe.send(command)

    def answers(self, command: str, timeout: float = 120.0) -> list:
        answers = []
        for pipe, _ in self.pipes:
            if not pipe.poll(timeout):
                raise RuntimeError(f"client did not answer {command!r} in {timeout}s")
            answer = pipe.recv()
            if isinstance(answer, Exception):
                raise answer
            answers.append(answer)
        return answers

    def close(self) -> None:
        for pipe, process in self.pipes:
            try:
                pipe.send(("quit",))
            except OSError:
                pass
            process.join(5)
            if process.is_alive():
                process.kill()


class CometClients:
    """The same crowd of kept-alive polls held by cometload, the C load generator.

    Python clients take about as long to read a broadcast as the fastest
    servers take to write it; cometload does not. It re-polls as soon as
    it has a message, as browsers do, so ``repoll`` is what it does anyway
    and the scenarios time the whole cycle. Bodies carry ``m`` (the round)
    and ``t`` (the publish time, CLOCK_MONOTONIC like ``time.monotonic``);
    cometload records each delivery's latency from ``t``.
    """

    def __init__(self, kind: str, port: int, channels: list[str], keep_alive: bool):
        self._records = tempfile.NamedTemporaryFile(prefix="cometload-", suffix=".bin", delete=False)
        self._read = 0
        self._t: dict[int, float] = {}
        self.n_expected = len(channels)
        command = ["taskset", "-c", str(LOAD_CPU), *self._command(kind, port, channels, keep_alive)]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.DEVNULL, text=True, bufsize=1)

    def _command(self, kind: str, port: int, channels: list[str], keep_alive: bool) -> list[str]:
        command = [COMETLOAD, "sub", "--proto", "nchan" if kind == "nchan" else "rpl", "--port", str(port),
                   "--conns", str(len(channels)), "--records", self._records.name, "--max-time", "3600"]
        if kind == "nchan":
            command += ["--path", "/sub/"]
        if len(set(channels)) == 1:
            command += ["--shared", channels[0], "--no-own"]
        else:
            command += ["--prefix", channels[0].rstrip("0123456789")]
        if keep_alive:
            command.append("--keepalive")
        return command

    def status(self, command: str = "s") -> dict:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return json.loads(self.process.stdout.readline())

    def published(self, round_: int, t: float) -> None:
        """Round ``round_``'s body was published with ``t`` in it."""
        self._t[round_] = t

    def ask(self, command: str, *args, timeout: float = 120.0) -> list:
        if command == "open":
            return [0]
        if command == "bodies":
            return [self._bodies(args[0])]
        if command == "churn":
            seconds = args[0]
            before = self.status()["msgs"]
            time.sleep(seconds)
            return [self.status()["msgs"] - before]
        raise ValueError(command)

    def tell(self, command: str, *args) -> None:
        """``repoll``: cometload re-polls by itself."""

    def answers(self, command: str, timeout: float = 120.0) -> list:
        return [0]

    def _bodies(self, timeout: float) -> list[float]:
        """Delivery times (``time.monotonic``) of the last round's bodies, once all are in."""
        round_ = max(self._t)
        deadline = time.monotonic() + timeout
        while True:
            self.status("w")
            with open(self._records.name, "rb") as fh:
                fh.seek(self._read)
                data = fh.read()
            got = [(index, msg, latency) for index, msg, latency in struct.iter_unpack("<IIq", data[:len(data) // 16 * 16])]
            mine = [latency for _, msg, latency in got if msg == round_]
            if len(mine) >= self.n_expected:
                self._read += len(data) // 16 * 16
                return [self._t[round_] + latency / 1e9 for latency in mine]
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(mine)} bodies of round {round_}")
            time.sleep(0.02)

    def fewest_received(self) -> int:
        """The fewest distinct messages any one subscriber has received so far."""
        self.status("w")
        got: dict[int, set[int]] = {index: set() for index in range(self.n_expected)}
        with open(self._records.name, "rb") as fh:
            data = fh.read()
        for index, msg, _ in struct.iter_unpack("<IIq", data[:len(data) // 16 * 16]):
            got[index].add(msg)
        return min(len(msgs) for msgs in got.values())

    def close(self) -> None:
        try:
            self.process.stdin.close()
            self.process.wait(10)
        except (OSError, subprocess.TimeoutExpired):
            self.process.kill()
        Path(self._records.name).unlink(missing_ok=True)


class StreamClients(CometClients):
    """Event-stream or WebSocket subscribers held by streamload (bench/streamload.c).

    Each keeps one connection for the whole run and gets every message on
    it; the records and commands are cometload's, so the scenarios read
    them the same way.
    """

    def __init__(self, kind: str, port: int, channels: list[str], transport: str):
        self.transport = transport
        super().__init__(kind, port, channels, keep_alive=True)

    def _command(self, kind: str, port: int, channels: list[str], keep_alive: bool) -> list[str]:
        command = [streamload(), "--transport", self.transport, "--proto", "nchan" if kind == "nchan" else "rpl",
                   "--port", str(port), "--conns", str(len(channels)), "--records", self._records.name]
        if len(set(channels)) == 1:
            return command + ["--shared", channels[0]]
        return command + ["--prefix", channels[0].rstrip("0123456789")]


@functools.cache
def streamload() -> str:
    """The streamload binary: STREAMLOAD=PATH, or bench/streamload.c built once per run with gcc."""
    if os.environ.get("STREAMLOAD"):
        return os.environ["STREAMLOAD"]
    target = Path(tempfile.mkdtemp(prefix="streamload-")) / "streamload"
    subprocess.run(["gcc", "-O2", "-o", str(target), str(HERE / "streamload.c")], check=True)
    return str(target)


def _client_main(pipe, kind: str, port: int, channels: list[str], keep_alive: bool,
                 cpus: set[int] | None = None, crowd_class: type | None = None) -> None:
    os.sched_setaffinity(0, cpus or {LOAD_CPU})
    raise_fd_limit()
    crowd = (crowd_class or _Crowd)(kind, port, channels, keep_alive)
    while True:
        command = pipe.recv()
        if command[0] == "quit":
            crowd.close()
            return
        try:
            pipe.send(getattr(crowd, command[0])(*command[1:]))
        except Exception as exc:  # noqa: BLE001 - reported to the parent
            pipe.send(RuntimeError(f"{command[0]}: {exc!r}"))


class _Crowd:
    def __init__(self, kind: str, port: int, channels: list[str], keep_alive: bool):
        self.kind, self.port, self.keep_alive = kind, port, keep_alive
        self.conns = [Conn(channel, kind) for channel in channels]
        self.selector = selectors.DefaultSelector()
        self.delivered = 0

    def _request(self, conn: Conn) -> bytes:
        if self.kind == "nchan":
            return (f"GET /sub/{conn.channel} HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n"
                    f"{conn.next_headers}\r\n").encode()
        keep = "Connection: keep-alive\r\n" if self.keep_alive else ""
        return (f"GET /?identifier={conn.next_headers}{conn.channel} HTTP/1.1\r\nHost: x\r\n"
                f"{keep}\r\n").encode()

    def _send(self, conn: Conn) -> None:
        if conn.sock is None or conn.reconnect:
            if conn.sock is not None:
                self.selector.unregister(conn.sock)
                conn.sock.close()
            conn.sock = socket.create_connection(("127.0.0.1", self.port), timeout=IO_TIMEOUT)
            conn.sock.setblocking(False)
            self.selector.register(conn.sock, selectors.EVENT_READ, conn)
        conn.reset()
        conn.sock.send(self._request(conn))

    def _pump(self, done, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() > deadline:
                raise RuntimeError("timed out waiting for the server")
            for key, _ in self.selector.select(0.5):
                self._read(key.data)

    def _read(self, conn: Conn) -> None:
        try:
            data = conn.sock.recv(65536)
        except BlockingIOError:
            return
        now = time.monotonic()
        if not data:
            if conn.head is not None and not conn.chunked and conn.length is None:
                self._complete(conn, now)
            conn.reconnect = True
            return
        conn.buf += data
        self._parse(conn, now)

    def _parse(self, conn: Conn, now: float) -> None:
        if conn.head is None:
            head, sep, rest = conn.buf.partition(b"\r\n\r\n")
            if not sep:
                return
            conn.head, conn.buf = head.decode("latin-1"), rest
            lower = conn.head.lower()
            conn.chunked = "transfer-encoding: chunked" in lower
            for line in lower.split("\r\n"):
                if line.startswith("content-length:"):
                    conn.length = int(line.split(":")[1])
            if not conn.chunked and conn.length is None and conn.buf.startswith(FIRST):
                conn.parked_at = now
        if conn.chunked:
            while True:
                size_line, sep, rest = conn.buf.partition(b"\r\n")
                if not sep:
                    return
                size = int(size_line, 16)
                if len(rest) < size + 2:
                    return
                conn.buf = rest[size + 2:]
                if size == 0:
                    self._complete(conn, now)
                    return
                conn.chunks.append(rest[:size])
                if conn.kind != "nchan" and len(conn.chunks) == 1 and rest[:size] == FIRST:
                    conn.parked_at = now
        elif conn.length is not None and len(conn.buf) >= conn.length:
            conn.chunks, conn.buf = [conn.buf[:conn.length]], conn.buf[conn.length:]
            self._complete(conn, now)

    def _complete(self, conn: Conn, now: float) -> None:
        conn.done_at = now
        body = b"".join(conn.chunks) if conn.chunks else conn.buf
        if conn.kind == "nchan":
            headers = {name.lower(): value for name, _, value in
                       (line.partition(": ") for line in conn.head.split("\r\n")[1:])}
            conn.next_headers = (f"If-Modified-Since: {headers.get('last-modified', '')}\r\n"
                                 f"If-None-Match: {headers.get('etag', '')}\r\n")
        else:
            text = body.strip()
            if text:
                conn.next_headers = json.loads(text)[-1]["ids"][conn.channel] + ":"
        self.delivered += 1
        if conn.kind != "nchan" and not conn.chunked:
            conn.reconnect = True

    # commands from the parent

    def open(self, timeout: float) -> int:
        for conn in self.conns:
            self._send(conn)
        return self.await_parked(timeout)

    def await_parked(self, timeout: float) -> int:
        # A kept-alive poll (nchan's, or Realplexor's) gets its headers with
        # its answer: the server's own count says when it waits.
        if self.kind != "nchan" and not self.keep_alive:
            self._pump(lambda: all(c.parked_at for c in self.conns), timeout)
        return len(self.conns)

    def bodies(self, timeout: float) -> list[float]:
        self._pump(lambda: all(c.done_at for c in self.conns), timeout)
        return [c.done_at for c in self.conns]

    def repoll(self, timeout: float) -> float:
        started = time.monotonic()
        for conn in self.conns:
            self._send(conn)
        self.await_parked(timeout)
        return max((c.parked_at for c in self.conns), default=started)

    def churn(self, seconds: float) -> int:
        """Re-poll after every message for ``seconds``; messages received."""
        self.delivered = 0
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for key, _ in self.selector.select(0.1):
                conn = key.data
                self._read(conn)
                if conn.done_at:
                    self._send(conn)
        return self.delivered

    def close(self) -> None:
        for conn in self.conns:
            if conn.sock is not None:
                conn.sock.close()


# -- scenarios -----------------------------------------------------------------

# The kinds that serve event streams and WebSockets (gunicorn refuses them).
STREAM_KINDS = ("nchan", "lean", "wsgi")
# Realplexor's switches from the command line (see Realplexor).
REALPLEXOR_OPTIONS: dict = {}


def make_server(kind: str):
    if kind == "nchan":
        return Nginx()
    if kind == "floor":
        return FloorServer()
    if kind == "gunicorn":
        return Gunicorn()
    engine, _, mode = kind.partition("-")
    return Realplexor(engine, keep_alive=mode != "close", options=REALPLEXOR_OPTIONS)


def make_clients(kind: str, port: int, channels: list[str], keep_alive: bool, transport: str = "poll"):
    """The subscribers: long polls held by Python processes or by cometload
    (``--load c``), or event streams / WebSockets (``transport`` "sse" or
    "ws") held by streamload."""
    if transport != "poll":
        return StreamClients(kind, port, channels, transport)
    if CLIENTS == "c":
        return CometClients(kind, port, channels, keep_alive)
    return Clients(kind, port, channels, keep_alive)


@contextlib.contextmanager
def profiled(server, name: str):
    """py-spy records a Realplexor server into PROFILE/name.raw (with ``--profile``)."""
    if PROFILE is None or not isinstance(server, Realplexor):
        yield
        return
    path = PROFILE / f"{name}.raw"
    pid = server._worker().pid if isinstance(server, Gunicorn) else server.server.pid
    recorder = Recorder(pid, path)
    try:
        yield
    finally:
        recorder.stop()
        print(f"\n== py-spy, {name} ==\n{summary([path], 15)}", end="", flush=True)


def client_kind(kind: str) -> str:
    return "nchan" if kind == "nchan" else "rpl"


def wait_count(server, n: int, timeout: float = 120.0) -> float:
    """Time until the server itself counts ``n`` waiting polls."""
    deadline = time.monotonic() + timeout
    while server.waiting() < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {server.waiting()} of {n} polls waiting")
        time.sleep(0.01)
    return time.monotonic()


def memory(kind: str, n: int, transport: str = "poll") -> dict:
    server = make_server(kind)
    clients = None
    try:
        time.sleep(1)
        before = server.worker_rss()
        clients = make_clients(client_kind(kind), server.wait_port, ["idle"] * n,
                               getattr(server, "keep_alive", True), transport)
        clients.ask("open", 120.0, timeout=180)
        # nginx may drop a handful of 19000 polls at its connection limit.
        wait_count(server, int(n * 0.998))
        time.sleep(2)
        after = server.worker_rss()
        waiting = server.waiting()
        return {"kind": kind, "transport": transport, "n": n, "waiting": waiting, "rss_before_mb": before / 2**20,
                "rss_after_mb": after / 2**20, "kb_per_poll": (after - before) / waiting / 1024}
    finally:
        if clients:
            clients.close()
        server.stop()


def broadcast(kind: str, n: int, rounds: int, transport: str = "poll") -> list[dict]:
    server = make_server(kind)
    clients = None
    try:
        clients = make_clients(client_kind(kind), server.wait_port, ["bcast"] * n,
                               getattr(server, "keep_alive", True), transport)
        clients.ask("open", 120.0, timeout=180)
        wait_count(server, n)
        with profiled(server, f"broadcast-{kind}-{transport}-{n}"):
            return [{**r, "transport": transport} for r in _broadcast_rounds(server, clients, kind, n, rounds)]
    finally:
        if clients:
            clients.close()
        server.stop()


def _broadcast_rounds(server, clients, kind: str, n: int, rounds: int) -> list[dict]:
    results = []
    for round_ in range(rounds):
        time.sleep(0.5)
        cpu = server.cpu_seconds()
        body = {"m": round_, "t": int(time.monotonic() * 1e6)}
        sent_at = server.publish("bcast", json.dumps(body).encode())
        if isinstance(clients, CometClients):
            clients.published(round_, sent_at)
        done = sorted(t for times in clients.ask("bodies", 60.0) for t in times)
        cpu_round = server.cpu_seconds() - cpu
        latencies = [(t - sent_at) * 1000 for t in done]
        # Re-park: every client asks again at once and reads what comes,
        # while the server's own count says when all N wait again.
        cpu = server.cpu_seconds()
        repark_start = time.monotonic()
        clients.tell("repoll", 60.0)
        parked = wait_count(server, n)
        clients.answers("repoll", 60.0)
        results.append({"kind": kind, "n": n, "round": round_ + 1,
                        "p50_ms": statistics.median(latencies),
                        "p99_ms": latencies[int(len(latencies) * 0.99) - 1],
                        "all_ms": latencies[-1], "cpu_ms": cpu_round * 1000,
                        "repark_s": parked - repark_start, "cycle_s": parked - sent_at,
                        "repark_cpu_ms": (server.cpu_seconds() - cpu) * 1000})
    return results


class _CometPublisher(threading.Thread):
    """cometload pub, as fast as it can: round-robin over the ``own`` channels,
    or always to the channel ``fixed``."""

    def __init__(self, kind: str, server, n: int, seconds: float, par: int, fixed: str | None = None):
        super().__init__(daemon=True)
        port = server.port if kind == "nchan" else server.in_port
        targets = ["--fixed", fixed] if fixed else ["--prefix", "own", "--chan-n", str(n)]
        self.command = ["taskset", "-c", str(LOAD_CPU), COMETLOAD, "pub", "--proto",
                        "nchan" if kind == "nchan" else "rpl", "--port", str(port), *targets,
                        "--par", str(par), "--duration", str(seconds)]
        if kind == "nchan":
            self.command += ["--path", "/pub/"]
        self.ok = 0

    def run(self) -> None:
        out = subprocess.run(self.command, capture_output=True, text=True, timeout=600).stdout
        self.ok = json.loads(out.strip().splitlines()[-1])["ok"]


def rate(kind: str, n: int, seconds: float, publishers: int, transport: str = "poll",
         fan_out: bool = False) -> dict:
    """Messages delivered per second while publishers go as fast as they can:
    to ``n`` subscribers on their own channels (round-robin), or, with
    ``fan_out``, to ``n`` subscribers of one channel."""
    server = make_server(kind)
    clients = None
    try:
        channels = ["fan"] * n if fan_out else [f"own{i}" for i in range(n)]
        clients = make_clients(client_kind(kind), server.wait_port, channels,
                               getattr(server, "keep_alive", True), transport)
        clients.ask("open", 120.0, timeout=180)
        wait_count(server, n)
        stop = threading.Event()
        published = [0] * publishers

        def publish_loop(index: int) -> None:
            i = index
            while not stop.is_set():
                server.publish(channels[i % n], b'{"m":1}')
                published[index] += 1
                i += publishers

        if CLIENTS == "c":
            # cometload publishes too: Python threads cannot keep a fast server busy.
            threads = [_CometPublisher(kind, server, n, seconds + 1, publishers, "fan" if fan_out else None)]
        else:
            threads = [threading.Thread(target=publish_loop, args=(i,), daemon=True) for i in range(publishers)]
        for thread in threads:
            thread.start()
        with profiled(server, f"rate-{kind}"):
            cpu = server.cpu_seconds()
            delivered = sum(clients.ask("churn", seconds, timeout=seconds + 60))
            cpu = server.cpu_seconds() - cpu
        stop.set()
        for thread in threads:
            thread.join(10)
        fewest = None
        if CLIENTS == "c":
            published[0] = threads[0].ok * seconds / (seconds + 1)
            if fan_out:
                time.sleep(2)   # what is still on its way
                fewest = {"fewest_received": clients.fewest_received(), "of_published": threads[0].ok}
        closed = clients.status()["closed"] if isinstance(clients, StreamClients) else 0
        return {"kind": kind, "transport": transport, "fan_out": fan_out, "n": n,
                "delivered_per_s": delivered / seconds,
                "published_per_s": sum(published) / seconds,
                "server_cpu_share": cpu / seconds, "streams_closed": closed, **(fewest or {})}
    finally:
        if clients:
            clients.close()
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", default="nchan,lean,wsgi,lean-close,floor",
                        help="server kinds: nchan, lean, wsgi, lean-close / wsgi-close (no keep-alive), "
                             "and floor (bench/floor_server.py: the protocol's system calls only)")
    parser.add_argument("--memory", default="1000,10000,19000", help="idle poll counts")
    parser.add_argument("--broadcast", default="1000,5000,10000", help="subscriber counts")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rate-polls", type=int, default=2000)
    parser.add_argument("--rate-seconds", type=float, default=5.0)
    parser.add_argument("--publishers", type=int, default=4)
    parser.add_argument("--fan-out", type=int, default=0, metavar="N",
                        help="also N subscribers of one channel, publishers as fast as they can (0: skip)")
    parser.add_argument("--transports", default="poll",
                        help="poll (kept-alive long polls), sse (event streams), ws (WebSockets): "
                             "streams are held by streamload (bench/streamload.c, built with gcc) "
                             "on the kinds that serve them: " + ", ".join(STREAM_KINDS))
    parser.add_argument("--json", type=Path, default=None, help="also write all results here")
    parser.add_argument("--no-metrics", action="store_true", help="Realplexor with METRICS = false")
    parser.add_argument("--scrape", type=float, default=0.0, metavar="S",
                        help="GET Realplexor's /metrics every S seconds while it serves (0: never)")
    parser.add_argument("--publish-via", choices=["old", "json"], default="old",
                        help="publish with the old protocol (POST /) or the JSON API (POST /publish)")
    parser.add_argument("--load", choices=["python", "c"], default="python",
                        help="the polls' clients (and the rate run's publisher): Python processes, or "
                             "cometload, the C load generator (COMETLOAD=PATH or on PATH)")
    parser.add_argument("--profile", type=Path, default=None, metavar="DIR",
                        help="record Realplexor servers with py-spy during broadcasts and the rate run")
    parser.add_argument("--server-tree", type=Path, default=None, metavar="PATH",
                        help="run the realplexor package of another source tree (an older version)")
    args = parser.parse_args()
    REALPLEXOR_OPTIONS.update(metrics=not args.no_metrics, scrape=args.scrape, publish_via=args.publish_via)
    global CLIENTS, PROFILE, SERVER_TREE  # noqa: PLW0603 - set once, before any scenario
    CLIENTS, PROFILE, SERVER_TREE = args.load, args.profile, args.server_tree
    if PROFILE:
        PROFILE.mkdir(parents=True, exist_ok=True)
    raise_fd_limit()
    os.sched_setaffinity(0, {LOAD_CPU})   # the publisher and this driver: the load CPU
    if "nchan" in args.kinds and not shutil.which("nginx"):
        sys.exit("nginx is not installed: apt-get install -y nginx-light libnginx-mod-nchan")
    kinds = args.kinds.split(",")

    def attempt(scenario, *scenario_args):
        try:
            return scenario(*scenario_args)
        except Exception as exc:  # noqa: BLE001 - one failed scenario must not end the run
            print(f"FAILED   {scenario.__name__}{scenario_args}: {exc}", flush=True)
            return None

    transports = args.transports.split(",")
    unknown = set(transports) - {"poll", "sse", "ws"}
    if unknown:
        parser.error(f"--transports: unknown {', '.join(sorted(unknown))}; known: poll, sse, ws")
    combos = [(kind, transport) for transport in transports for kind in kinds
              if transport == "poll" or kind in STREAM_KINDS]
    out = {"load_average": os.getloadavg(), "memory": [], "broadcast": [], "rate": []}
    for n in [int(x) for x in args.memory.split(",") if int(x or 0)]:
        for kind, transport in combos:
            if kind.endswith("close") or kind == "floor":   # the floor keeps no state worth weighing
                continue
            result = attempt(memory, kind, n, transport)
            if result:
                out["memory"].append(result)
                print(f"memory   {kind:11} {transport:5} n={n:6}  {result['kb_per_poll']:6.2f} KB/listener "
                      f"({result['waiting']} waiting)", flush=True)
    for n in [int(x) for x in args.broadcast.split(",") if int(x or 0)]:
        for kind, transport in combos:
            rounds = attempt(broadcast, kind, n, args.rounds, transport) or []
            out["broadcast"].extend(rounds)
            for r in rounds:
                # A stream does not re-park: the next message comes on the same connection.
                repark = (f"  repark {r['repark_s']:.3f} s cycle {r['cycle_s']:.3f} s (cpu {r['repark_cpu_ms']:.0f} ms)"
                          if transport == "poll" else "")
                print(f"bcast    {kind:11} {transport:5} n={n:6} r{r['round']}  p50 {r['p50_ms']:7.1f}  "
                      f"p99 {r['p99_ms']:7.1f}  all {r['all_ms']:7.1f} ms  cpu {r['cpu_ms']:7.1f} ms{repark}",
                      flush=True)
    rates = [(args.rate_polls, False), (args.fan_out, True)]
    for n, fan_out in [(n, fan_out) for n, fan_out in rates if n]:
        for kind, transport in combos:
            if kind.endswith("close"):
                continue
            result = attempt(rate, kind, n, args.rate_seconds, args.publishers, transport, fan_out)
            if not result:
                continue
            out["rate"].append(result)
            closed = f", {result['streams_closed']} streams closed" if result["streams_closed"] else ""
            if "fewest_received" in result:
                closed += (f"; every subscriber got at least {result['fewest_received']} "
                           f"of the {result['of_published']} published")
            print(f"{'fan-out' if fan_out else 'rate':8} {kind:11} {transport:5} n={n:6}  "
                  f"{result['delivered_per_s']:8.0f} delivered/s  ({result['published_per_s']:.0f} published/s, "
                  f"server CPU {result['server_cpu_share']:.0%}{closed})", flush=True)
    out["load_average_end"] = os.getloadavg()
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
