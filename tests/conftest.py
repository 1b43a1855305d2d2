"""Shared fixtures: real servers on free ports, and wire-level clients.

Every socket read here has a timeout, so a broken server fails a test
instead of hanging the suite.
"""
from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 10
_LISTENING_RE = re.compile(r"(WAIT|IN) line listening on ([\d.]+):(\d+)")


def toml_value(value) -> str:
    """A Python value as TOML (enough for Realplexor's options)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_config(path: Path, **options) -> Path:
    """Write a TOML config with free ports unless the options name them."""
    options.setdefault("WAIT_ADDR", ["127.0.0.1:0"])
    options.setdefault("IN_ADDR", ["127.0.0.1:0"])
    options.setdefault("VERBOSITY", 1)
    # Long polls only, unless a test asks for event streams: the long-poll
    # tests (the browser's above all) keep testing long polls.
    options.setdefault("STREAM_TRANSPORTS", [])
    path.write_text("".join(f"{k} = {toml_value(v)}\n" for k, v in options.items()))
    return path


class OutputReader:
    """Collects a process's output lines on a thread, for waiting on them."""

    def __init__(self, stream):
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream) -> None:
        for raw in stream:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.lines.append(line)
            self._queue.put(line)
        self._queue.put(None)

    def wait_for(self, pattern: str, timeout: float = TIMEOUT) -> re.Match:
        """The first new line matching ``pattern``; fails after ``timeout``."""
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no line matching {pattern!r}; output:\n" + "\n".join(self.lines))
            try:
                line = self._queue.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError(f"process ended before {pattern!r}; output:\n" + "\n".join(self.lines))
            match = regex.search(line)
            if match:
                return match

    def text(self) -> str:
        return "\n".join(self.lines)

    def wait_closed(self, timeout: float = TIMEOUT) -> None:
        """Wait until the stream has ended, so ``lines`` holds all of it; fails after ``timeout``."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise AssertionError("output still open; so far:\n" + self.text())


@dataclass
class Response:
    """An HTTP response as read off the wire."""

    status: int
    headers: dict[str, str]
    body: bytes
    raw: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8")


def parse_response(raw: bytes) -> Response:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1]) if lines and lines[0].startswith("HTTP/") else 0
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Response(status, headers, body, raw)


def read_to_eof(sock: socket.socket, timeout: float = TIMEOUT) -> bytes:
    """Everything the peer sends until it closes; fails after ``timeout``."""
    sock.settimeout(timeout)
    chunks = []
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def slow_reader(port: int) -> socket.socket:
    """A client socket with the smallest receive buffer the kernel allows (set before connecting).

    For a client that does not read: an answer larger than
    :func:`beyond_socket_buffers` cannot leave the server at once.
    """
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(TIMEOUT)
    sock.connect(("127.0.0.1", port))
    return sock


def beyond_socket_buffers() -> int:
    """Bytes that a server's send buffer and a :func:`slow_reader`'s receive buffer cannot hold together."""
    try:
        with open("/proc/sys/net/ipv4/tcp_wmem") as fh:
            send_buffer_max = int(fh.read().split()[2])
    except (OSError, ValueError, IndexError):
        send_buffer_max = 4 << 20
    return max(6_000_000, send_buffer_max * 3 // 2)


def read_answer(sock: socket.socket, timeout: float = TIMEOUT) -> tuple[bytes, bytes]:
    """One HTTP answer as (head, body): by its Content-Length, to its last chunk (de-chunked), or to end of file."""
    sock.settimeout(timeout)
    buf = bytearray()
    head = None
    searched = 0      # the end of the head is looked for in new bytes only: heads can be megabytes
    while True:
        if head is None and buf.find(b"\r\n\r\n", searched) >= 0:
            start = buf.find(b"\r\n\r\n", searched) + 4
            head = parse_response(bytes(buf[:start]))
        searched = max(len(buf) - 3, 0)
        if head is not None:
            length = head.headers.get("content-length")
            if length is not None and len(buf) - start >= int(length):
                return bytes(buf[:start - 4]), bytes(buf[start:start + int(length)])
            if "chunked" in head.headers.get("transfer-encoding", "") and buf.endswith(b"\r\n0\r\n\r\n"):
                return bytes(buf[:start - 4]), _dechunked(bytes(buf[start:]))
        chunk = sock.recv(1 << 20)
        if not chunk:
            head_bytes, _, body = bytes(buf).partition(b"\r\n\r\n")
            return head_bytes, body
        buf += chunk


def _dechunked(body: bytes) -> bytes:
    whole, at = bytearray(), 0
    while True:
        end = body.index(b"\r\n", at)
        size = int(body[at:end], 16)
        if size == 0:
            return bytes(whole)
        whole += body[end + 2:end + 2 + size]
        at = end + 2 + size + 2


class LongPoll:
    """A browser-like WAIT request on a real socket."""

    def __init__(self, port: int, request: bytes):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        self.sock.sendall(request)
        self._buf = b""

    def headers_arrived(self, timeout: float = TIMEOUT) -> bytes:
        """Read until the header block and the first body bytes are in."""
        self.sock.settimeout(timeout)
        while b"\r\n\r\n" not in self._buf or len(self._buf.partition(b"\r\n\r\n")[2]) < 3:
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            self._buf += chunk
        return self._buf

    def response(self, timeout: float = TIMEOUT) -> Response:
        """The whole response, read to end of file."""
        return parse_response(self._buf + read_to_eof(self.sock, timeout))

    def has_ended(self, wait: float = 0.3) -> bool:
        """Whether the server sent more than the headers and first bytes within ``wait``."""
        self.headers_arrived()
        if len(self._buf.partition(b"\r\n\r\n")[2]) > 3:
            return True
        self.sock.settimeout(wait)
        try:
            chunk = self.sock.recv(65536)
        except socket.timeout:
            return False
        self._buf += chunk
        return True

    def close(self) -> None:
        self.sock.close()


@dataclass
class RunningServer:
    """A realplexor process on free ports, with wire-level helpers."""

    process: subprocess.Popen
    output: OutputReader
    wait_port: int
    in_port: int
    config_path: Path
    polls: list[LongPoll] = field(default_factory=list)

    def in_raw(self, data: bytes, half_close: bool = True, timeout: float = TIMEOUT) -> bytes:
        """Send raw bytes to the IN line and read the reply to end of file."""
        with socket.create_connection(("127.0.0.1", self.in_port), timeout=timeout) as sock:
            sock.sendall(data)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
            return read_to_eof(sock, timeout)

    def in_http(self, identifier: str, body: bytes | str, half_close: bool = True) -> Response:
        """An IN request as the PHP client sends it."""
        if isinstance(body, str):
            body = body.encode()
        request = (f"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n"
                   f"X-Realplexor: identifier={identifier}\r\n\r\n").encode() + body
        return parse_response(self.in_raw(request, half_close))

    def publish(self, identifier: str, data: str) -> Response:
        """Publish JSON text ``data``; asserts it was accepted."""
        response = self.in_http(identifier, data)
        assert response.status == 200, response.raw
        return response

    def command(self, line: str, identifier: str = "") -> Response:
        """Run an IN-line command as the PHP client does (command as body)."""
        return self.in_http(identifier, line + "\n")

    def online(self, prefix: str = "") -> dict[str, int]:
        """ONLINE as a dict of id to listener count."""
        body = self.command(f"ONLINE {prefix}".strip()).text
        return {line.split()[0]: int(line.split()[1]) for line in body.splitlines()}

    def poll(self, query: str, method: str = "GET", headers: str = "", body: bytes = b"",
             version: str = "HTTP/1.1") -> LongPoll:
        """Open a WAIT request (``query`` after ``/?``)."""
        extra = f"Content-Length: {len(body)}\r\n" if method == "POST" else ""
        request = (f"{method} /?{query} {version}\r\nHost: 127.0.0.1:{self.wait_port}\r\n"
                   f"{headers}{extra}\r\n").encode() + body
        poll = LongPoll(self.wait_port, request)
        self.polls.append(poll)
        return poll

    def listen(self, identifier: str, **kwargs) -> LongPoll:
        """Open a long poll for ``identifier`` and wait until the server parked it."""
        poll = self.poll(f"identifier={identifier}&ncrnd=1", **kwargs)
        poll.headers_arrived()
        return poll

    def get(self, query: str, headers: str = "", method: str = "GET") -> Response:
        """A WAIT request expected to be answered at once."""
        return self.poll(query, method=method, headers=headers).response()

    def wait_until(self, predicate, timeout: float = TIMEOUT, interval: float = 0.05):
        """Poll ``predicate`` until it returns a true value; fail after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"condition not met within {timeout}s (last: {value!r})")
            time.sleep(interval)

    def holds_until(self, predicate, until: float, interval: float = 0.05) -> None:
        """Check ``predicate`` again and again until the monotonic time ``until``; fail if it is ever false.

        Only answers that came back before ``until`` count: each was
        taken earlier still, so a slow check cannot fail the test.
        """
        while True:
            value = predicate()
            if time.monotonic() >= until:
                return
            assert value, f"condition stopped holding {until - time.monotonic():.2f}s early (got {value!r})"
            time.sleep(interval)

    def settled_log(self) -> list[str]:
        """The server's output, once everything it logged before this call is in.

        A reload logs a line after whatever came before it; its arrival
        marks the point.
        """
        def reloads() -> int:
            return sum("configuration reloaded" in line for line in self.output.lines)

        before = reloads()
        self.process.send_signal(signal.SIGHUP)
        self.wait_until(lambda: reloads() > before)
        return list(self.output.lines)

    def stop(self) -> int:
        """SIGTERM the server and return its exit status."""
        for poll in self.polls:
            poll.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(TIMEOUT)
        return self.process.returncode


def spawn(args: list[str], env: dict | None = None, cwd: Path = ROOT) -> tuple[subprocess.Popen, OutputReader]:
    """Start a process with its stderr and stdout merged and read on a thread."""
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               cwd=cwd, env={**os.environ, **(env or {})})
    return process, OutputReader(process.stdout)


def start_server(config_path: Path, open_files: int | None = None) -> RunningServer:
    """Run ``python -m realplexor --config`` and wait until both lines listen.

    With ``open_files`` the server runs under that hard limit of open files.
    """
    args = [sys.executable, "-m", "realplexor", "--config", str(config_path)]
    if open_files is not None:
        args = [sys.executable, "-c", "import os, resource, sys; "
                f"resource.setrlimit(resource.RLIMIT_NOFILE, ({open_files}, {open_files})); "
                "os.execv(sys.executable, sys.argv[1:])", *args]
    process, output = spawn(args)
    ports = {}
    try:
        while len(ports) < 2:
            match = output.wait_for(_LISTENING_RE.pattern)
            ports[match.group(1)] = int(match.group(3))
    except AssertionError:
        process.kill()
        raise
    return RunningServer(process, output, ports["WAIT"], ports["IN"], config_path)


@pytest.fixture
def server_factory(tmp_path):
    """Start servers with given options; all are stopped after the test."""
    started: list[RunningServer] = []

    def factory(**options) -> RunningServer:
        path = write_config(tmp_path / f"realplexor{len(started)}.toml", **options)
        server = start_server(path)
        started.append(server)
        return server

    yield factory
    for server in started:
        server.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server with default options (short timeouts) shared by a test module."""
    path = write_config(tmp_path_factory.mktemp("rpl") / "realplexor.toml",
                        OFFLINE_TIMEOUT=1, WAIT_TIMEOUT=30)
    running = start_server(path)
    yield running
    running.stop()


@pytest.fixture
def cid():
    """A channel id prefix unique to the test, so tests sharing a server stay apart."""
    return "t" + uuid.uuid4().hex[:10] + "_"


def write_users_file(path: Path, users: dict[str, str], anonymous: bool = False) -> Path:
    """An htpasswd users file with bcrypt hashes; a ``:`` line if ``anonymous``."""
    from passlib.apache import HtpasswdFile

    file = HtpasswdFile(default_scheme="bcrypt")
    for login, password in users.items():
        file.set_password(login, password)
    text = file.to_string().decode()
    path.write_text(text + (":\n" if anonymous else ""))
    return path


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    """A server whose USERS_FILE knows ``alice:secret`` and no guests."""
    base = tmp_path_factory.mktemp("rplauth")
    users = write_users_file(base / "users.htpasswd", {"alice": "secret"})
    running = start_server(write_config(base / "realplexor.toml", USERS_FILE=str(users),
                                        OFFLINE_TIMEOUT=1, WAIT_TIMEOUT=30))
    yield running
    running.stop()


class FakeInLine:
    """A stand-in IN line that records requests and answers each with canned bytes.

    A request counts as complete at its ``Content-Length`` or at end of
    input. ``reply=None`` never answers (the connection stays open until
    the client gives up).
    """

    def __init__(self, reply: bytes | None, port: int = 0, tls=None):
        self.reply = reply
        self.tls = tls
        self.requests: list[bytes] = []
        self.listener = socket.create_server(("127.0.0.1", port))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except (socket.timeout, OSError):
                continue
            try:
                conn.settimeout(TIMEOUT)
                if self.tls is not None:
                    conn = self.tls.wrap_socket(conn, server_side=True)
                self.requests.append(self._read_request(conn))
                if self.reply is None:
                    self._stop.wait(TIMEOUT)
                else:
                    conn.sendall(self.reply)
            except OSError:
                pass
            finally:
                conn.close()

    @staticmethod
    def _read_request(conn: socket.socket) -> bytes:
        buf = b""
        while True:
            head, sep, body = buf.partition(b"\r\n\r\n")
            if sep:
                match = re.search(rb"content-length: *(\d+)", head, re.I)
                if match and len(body) >= int(match.group(1)):
                    return buf
            chunk = conn.recv(65536)
            if not chunk:
                return buf
            buf += chunk

    def close(self) -> None:
        self._stop.set()
        self.listener.close()
        self._thread.join(TIMEOUT)


@pytest.fixture
def fake_in_line():
    """Start FakeInLine servers: ``fake_in_line(reply_bytes, port=0, tls=None)``."""
    started: list[FakeInLine] = []

    def factory(reply: bytes | None, port: int = 0, tls=None) -> FakeInLine:
        fake = FakeInLine(reply, port, tls)
        started.append(fake)
        return fake

    yield factory
    for fake in started:
        fake.close()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (for refused connections)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1 and localhost: (cert path, key path)."""
    base = tmp_path_factory.mktemp("tls")
    cert, key = base / "cert.pem", base / "key.pem"
    try:
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                        "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
                        "-keyout", str(key), "-out", str(cert)],
                       check=True, capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"cannot make a test certificate with openssl: {exc}")
    return cert, key


@pytest.fixture
def port_443(tls_files, fake_in_line):
    """A TLS FakeInLine on 127.0.0.1:443 answering ONLINE with one line; skips if 443 is unavailable."""
    import ssl

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*tls_files)
    reply = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 11\r\n\r\nsecure_a 1\n"
    try:
        return fake_in_line(reply, port=443, tls=context)
    except OSError as exc:
        pytest.skip(f"cannot listen on 127.0.0.1:443: {exc}")


def wait_parts(response: Response) -> list:
    """The JSON parts of a WAIT answer (after the leading space); [] for a timeout."""
    import json

    assert response.status == 200, response.raw
    assert response.body.startswith(b" \r\n"), response.body[:20]
    rest = response.body[3:]
    return json.loads(rest) if rest.strip() else []


CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
BROWSER_WAIT_MS = 10_000


@pytest.fixture(scope="session")
def browser():
    """Headless Chromium (Debian's, or the CHROMIUM variable) driven by Playwright."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (install Debian's chromium or set CHROMIUM)")
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="Playwright for Python is not installed (pip install playwright)")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS,
                                              timeout=BROWSER_WAIT_MS * 3)
        yield chromium
        chromium.close()


class RedisServer:
    """A real redis-server (Debian's package) on a free loopback port, for the shared store."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self) -> "RedisServer":
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + TIMEOUT
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(64).startswith(b"+PONG"):
                        return self
            except OSError:
                pass
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise AssertionError(f"redis-server did not start on port {self.port}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(TIMEOUT)


@pytest.fixture(scope="session")
def redis_server():
    """One redis-server for the session; tests keep apart by channel prefix (``cid``)."""
    import shutil

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (Debian: redis-server)")
    server = RedisServer().start()
    yield server
    server.stop()


# -- a stream served in this process ------------------------------------------------

def wait_in_loop(done, timeout: float = TIMEOUT) -> None:
    """Let gevent's loop run until ``done()`` is true; fail after ``timeout`` seconds."""
    import gevent

    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(f"not done within {timeout} s")
        gevent.sleep(0.001)


@contextlib.contextmanager
def stream_in_process(state, config, channels: list[str], stream_class=None, listeners: int = 1):
    """A stream (an EventStream, or ``stream_class``) of ``channels`` from now, served
    by a greenlet of this process on one end of a socketpair. Yields it and the
    client's end (non-blocking) once ``state`` counts ``listeners`` waiting."""
    import gevent

    from realplexor.streams import EventStream

    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.setblocking(False)
    stream = (stream_class or EventStream)(ours, state, config, dict.fromkeys(channels), dict.fromkeys(channels))
    runner = gevent.spawn(stream.run, b"")
    try:
        wait_in_loop(lambda: state.listener_count() >= listeners)
        yield stream, theirs
    finally:
        stream.close("done")
        runner.join(TIMEOUT)
        ours.close()
        theirs.close()


def received_in_loop(sock: socket.socket, enough, settle: float = 0.0) -> bytes:
    """What a non-blocking ``sock`` receives while gevent's loop runs, until
    ``enough(received)``, and for ``settle`` seconds more."""
    import gevent

    received = bytearray()

    def read() -> None:
        try:
            received.extend(sock.recv(65536))
        except BlockingIOError:
            pass

    def done() -> bool:
        read()
        return enough(bytes(received))

    wait_in_loop(done)
    if settle:
        gevent.sleep(settle)
        read()
    return bytes(received)


def event_parts(received: bytes) -> list[dict]:
    """The parts of an event stream's ``data:`` lines."""
    return [json.loads(line[len(b"data: "):]) for line in received.splitlines() if line.startswith(b"data: ")]
