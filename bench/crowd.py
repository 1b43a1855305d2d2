"""A crowd of browsers: many WAIT-line long polls from a few client processes.

Each client process runs a :class:`Crowd`: non-blocking sockets on one
selector. A poll is *parked* once the server's headers and the first
body bytes (one space and CRLF) have arrived; its *body* has arrived
once the JSON array after them is complete. The parent process drives
the clients through :class:`CrowdClients`, one pipe per client, and
gets back ``time.monotonic()`` stamps, which are comparable across
processes on Linux (CLOCK_MONOTONIC).
"""
from __future__ import annotations

import errno
import json
import multiprocessing
import selectors
import socket
import time
from dataclasses import dataclass, field

from server_process import raise_fd_limit

MAX_PER_CLIENT = 5000
FIRST_BYTES = b" \r\n"
# Linux: pick the source port at connect, not at bind (the socket module may not name it).
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
BROWSER_HEADERS = (
    "User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0\r\n"
    "Accept: */*\r\nAccept-Language: en-US,en;q=0.5\r\nAccept-Encoding: gzip, deflate\r\n"
    "Referer: http://example.com/chat/room.html\r\n")
# No "Connection: keep-alive": these polls are answered close-delimited and
# each reconnect is a new connection; compare.py measures kept-alive polls.


def wait_request(identifier: str, serial: int, headers: str) -> bytes:
    """The GET a browser sends to long-poll ``identifier``."""
    return (f"GET /?identifier={identifier}&ncrnd={serial} HTTP/1.1\r\n"
            f"Host: 127.0.0.1\r\n{headers}\r\n").encode()


@dataclass
class Poll:
    """One long poll's socket, bytes and times."""

    identifier: str
    sock: socket.socket
    request: bytes
    started: float
    buf: bytearray = field(default_factory=bytearray)
    connected: float = 0.0
    parked: float = 0.0
    body_at: float = 0.0
    body: bytes = b""
    ended: bool = False


def _body_after_headers(buf: bytearray) -> bytes | None:
    """The bytes after the header block and the first body bytes, once parked."""
    head_end = buf.find(b"\r\n\r\n")
    if head_end < 0 or len(buf) < head_end + 4 + len(FIRST_BYTES):
        return None
    if not buf.startswith(b"HTTP/1.1 200") and not buf.startswith(b"HTTP/1.0 200"):
        raise RuntimeError(f"long poll refused: {bytes(buf[:120])!r}")
    return bytes(buf[head_end + 4 + len(FIRST_BYTES):])


def cursor_of(body: bytes, channel: str) -> str:
    """The cursor that a WAIT body names for ``channel``."""
    return json.loads(body)[-1]["ids"][channel]


class Crowd:
    """Long polls of one client process, driven by one selector."""

    def __init__(self, port: int, headers: str = BROWSER_HEADERS, source: str | None = None):
        self.port = port
        self.headers = headers
        self.source = source
        self.polls: list[Poll] = []
        self.selector = selectors.DefaultSelector()
        self._serial = 0

    def park(self, identifiers: list[str], start_at: float, window: int, timeout: float) -> dict:
        """Open one long poll per identifier, at most ``window`` in flight.

        Waits until ``start_at`` (monotonic), then connects. Returns the
        connect and park times, each as seconds after ``start_at``.
        """
        self.close_all()
        while time.monotonic() < start_at:
            time.sleep(min(0.005, max(0.0, start_at - time.monotonic())))
        deadline = time.monotonic() + timeout
        pending = list(reversed(identifiers))
        in_flight = 0
        parked = 0
        while parked < len(identifiers):
            while pending and in_flight < window:
                self._open(pending.pop())
                in_flight += 1
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{parked}/{len(identifiers)} polls parked within {timeout}s")
            for key, events in self.selector.select(min(left, 1.0)):
                now = time.monotonic()
                if self._advance_parking(key.data, events, now):
                    in_flight -= 1
                    parked += 1
        return {"connect": [p.connected - start_at for p in self.polls],
                "parked": [p.parked - start_at for p in self.polls]}

    def _open(self, identifier: str) -> None:
        self._serial += 1
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        if self.source is not None:
            # A source address of its own: another 28k ephemeral ports towards the same server port.
            sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((self.source, 0))
        poll = Poll(identifier, sock, wait_request(identifier, self._serial, self.headers),
                    time.monotonic())
        code = sock.connect_ex(("127.0.0.1", self.port))
        if code not in (0, errno.EINPROGRESS):
            raise OSError(code, f"connect: {errno.errorcode.get(code, code)}")
        self.selector.register(sock, selectors.EVENT_WRITE, poll)
        self.polls.append(poll)

    def _advance_parking(self, poll: Poll, events: int, now: float) -> bool:
        """One step of connecting and parking; True when ``poll`` just parked."""
        if not poll.connected:
            error = poll.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if error:
                raise OSError(error, f"connect: {errno.errorcode.get(error, error)}")
            poll.connected = now
            poll.sock.send(poll.request)  # a few hundred bytes: one send
            self.selector.modify(poll.sock, selectors.EVENT_READ, poll)
            return False
        chunk = poll.sock.recv(65536)
        if not chunk:
            raise RuntimeError(f"server closed a poll before parking it: {bytes(poll.buf)!r}")
        poll.buf += chunk
        if _body_after_headers(poll.buf) is None:
            return False
        poll.parked = now
        return True

    def await_bodies(self, timeout: float, allow_missing: bool = False) -> dict:
        """Wait until every parked poll has its body and the server closed it.

        Returns each body's arrival time and the cursor it names for the
        poll's channel. With ``allow_missing``, polls still without a body
        after ``timeout`` are left out instead of failing, and ``missing``
        counts them.
        """
        deadline = time.monotonic() + timeout
        open_polls = sum(1 for p in self.polls if not p.ended)
        while open_polls:
            left = deadline - time.monotonic()
            if left <= 0 and allow_missing:
                arrived = [p for p in self.polls if p.body_at]
                return {"arrived": [p.body_at for p in arrived],
                        "cursors": [cursor_of(p.body, p.identifier.rpartition(":")[2]) for p in arrived],
                        "missing": len(self.polls) - len(arrived)}
            if left <= 0:
                raise TimeoutError(f"{open_polls} polls without a body after {timeout}s")
            for key, _ in self.selector.select(min(left, 1.0)):
                now = time.monotonic()
                if self._advance_body(key.data, now):
                    open_polls -= 1
        return {"arrived": [p.body_at for p in self.polls],
                "cursors": [cursor_of(p.body, p.identifier.rpartition(":")[2])
                            for p in self.polls], "missing": 0}

    def fetch(self, identifiers: list[str], window: int, timeout: float) -> dict:
        """Polls the server answers at once (from its history): each read to its end.

        At most ``window`` in flight. Returns how many ended with a body
        (``answered``) and each one's end, in seconds after the start.
        """
        self.close_all()
        started = time.monotonic()
        deadline = started + timeout
        pending = list(reversed(identifiers))
        in_flight = answered = 0
        ended = []
        while len(ended) < len(identifiers):
            while pending and in_flight < window:
                self._open(pending.pop())
                in_flight += 1
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{len(ended)}/{len(identifiers)} polls answered within {timeout}s")
            for key, events in self.selector.select(min(left, 1.0)):
                poll, now = key.data, time.monotonic()
                if not poll.connected:
                    self._advance_parking(poll, events, now)
                    continue
                chunk = poll.sock.recv(65536)
                if chunk:
                    poll.buf += chunk
                    continue
                body = _body_after_headers(poll.buf)
                if body:
                    json.loads(body)
                    answered += 1
                self.selector.unregister(poll.sock)
                poll.sock.close()
                poll.ended = True
                in_flight -= 1
                ended.append(now - started)
        return {"answered": answered, "ended": ended}

    def _advance_body(self, poll: Poll, now: float) -> bool:
        """Read what arrived for ``poll``; True when the server closed it."""
        chunk = poll.sock.recv(65536)
        if chunk:
            poll.buf += chunk
            if not poll.body_at and poll.buf.endswith(b"]"):
                body = _body_after_headers(poll.buf)
                try:
                    json.loads(body)
                except ValueError:
                    return False
                poll.body, poll.body_at = body, now
            return False
        if not poll.body_at:
            raise RuntimeError(f"poll closed without a body: {bytes(poll.buf[-200:])!r}")
        self.selector.unregister(poll.sock)
        poll.sock.close()
        poll.ended = True
        return True

    def close_all(self) -> None:
        """Close every socket of the crowd."""
        for poll in self.polls:
            if not poll.ended:
                self.selector.unregister(poll.sock)
                poll.sock.close()
        self.polls = []


def _serve(conn, port: int, headers: str, source: str | None = None) -> None:
    """A client process: run the parent's commands on one Crowd until told to stop."""
    raise_fd_limit()
    crowd = Crowd(port, headers, source)
    try:
        while True:
            if not conn.poll(3600):
                return
            name, kwargs = conn.recv()
            if name == "stop":
                return
            try:
                conn.send(("ok", getattr(crowd, name)(**kwargs)))
            except Exception as exc:  # noqa: BLE001 - reported to the parent
                conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        crowd.close_all()


class CrowdClients:
    """The parent's handle on several client processes, each with a Crowd.

    With ``sources`` (addresses such as 127.0.0.2), client ``i`` connects
    from ``sources[i % len(sources)]``: each source address has its own
    ephemeral ports, so more than about 28000 polls can reach one port.
    """

    def __init__(self, port: int, clients: int, headers: str = BROWSER_HEADERS,
                 sources: list[str] | None = None):
        context = multiprocessing.get_context("fork")
        self._conns = []
        self._procs = []
        for index in range(clients):
            parent, child = context.Pipe()
            source = sources[index % len(sources)] if sources else None
            proc = context.Process(target=_serve, args=(child, port, headers, source), daemon=True)
            proc.start()
            self._conns.append(parent)
            self._procs.append(proc)

    def __enter__(self) -> "CrowdClients":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __len__(self) -> int:
        return len(self._conns)

    def call(self, name: str, per_client: list[dict], timeout: float) -> list:
        """Run ``name`` on every client at once, with its own keyword arguments."""
        self.begin(name, per_client)
        return self.results(name, timeout)

    def begin(self, name: str, per_client: list[dict]) -> None:
        """Start ``name`` on every client; collect with :meth:`results`."""
        for conn, kwargs in zip(self._conns, per_client):
            conn.send((name, kwargs))

    def results(self, name: str, timeout: float) -> list:
        """Each client's result of the ``name`` started by :meth:`begin`."""
        results = []
        deadline = time.monotonic() + timeout
        for conn in self._conns:
            if not conn.poll(max(0.0, deadline - time.monotonic())):
                raise TimeoutError(f"a client did not finish {name} within {timeout}s")
            status, value = conn.recv()
            if status != "ok":
                raise RuntimeError(f"client failed in {name}: {value}")
            results.append(value)
        return results

    def stop(self) -> None:
        """Ask every client to close its sockets and exit; kill the late ones."""
        for conn in self._conns:
            try:
                conn.send(("stop", {}))
            except OSError:
                pass
        for proc in self._procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        self._conns, self._procs = [], []


def split(items: list, parts: int) -> list[list]:
    """``items`` in ``parts`` nearly equal consecutive slices."""
    size, extra = divmod(len(items), parts)
    slices, start = [], 0
    for index in range(parts):
        end = start + size + (1 if index < extra else 0)
        slices.append(items[start:end])
        start = end
    return slices


def client_count(n: int, asked: int | None) -> int:
    """How many client processes ``n`` polls need (at most MAX_PER_CLIENT each)."""
    needed = -(-n // MAX_PER_CLIENT)
    if asked is None:
        return max(1, needed)
    if asked < needed:
        raise SystemExit(f"--clients {asked} is too few: at most {MAX_PER_CLIENT} polls per client")
    return asked
