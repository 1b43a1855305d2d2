"""The lean WAIT engine: a waiting poll holds no greenlet.

A greenlet reads and answers a request. When the request has to wait, the
greenlet parks the connection and ends: a waiting poll is then its socket,
a :class:`LeanPoll` and a read watcher (to notice a client that leaves).
The publisher's fan-out writes the prebuilt body straight to each socket
and closes it, or keeps it for the browser's next poll.

Connection states, each a few fields of :class:`LeanPoll`:

    reading  --(must wait)-->  parked  --(body, timeout)-->  closed
       ^                          |
       |                  (kept alive)
       +------ idle <-------------+   (a watcher waits for the next request)
"""
from __future__ import annotations

import logging
import socket
import time
from decimal import Decimal

import gevent
import gevent.socket
import httptools
from gevent.hub import get_hub
from gevent.server import StreamServer

from .channels import ChannelState
from .deadlines import Deadlines
from .protocol import ProtocolError
from .wait import FIRST_BYTES, Reply, WaitLine, error_reply, peer_closed, wants_keep_alive

log = logging.getLogger("realplexor.wait")

READ_SIZE = 8192
# Bytes a request may carry besides what WAIT_MAXLEN counts (headers).
MAX_HEAD_BYTES = 16384
# Seconds a client may take to send its request.
REQUEST_TIMEOUT = 30.0
# Seconds a kept-alive connection may sit idle between polls.
KEEPALIVE_IDLE = 30.0
SWEEP_INTERVAL = 0.25
_LAST_CHUNK = b"0\r\n\r\n"
_READ = 1


class _Request:
    """httptools callbacks: collects one request."""

    __slots__ = ("url", "headers", "body", "complete")

    def __init__(self) -> None:
        self.url = b""
        self.headers: dict[str, str] = {}
        self.body = b""
        self.complete = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.complete = True


class LeanPoll:
    """One connection of the lean engine, and the listener it registers."""

    __slots__ = ("cursors", "engine", "keep_alive", "sock", "watcher", "pending")

    def __init__(self, cursors: dict[str, Decimal | None], engine: "LeanWaitServer", keep_alive: bool):
        self.cursors = cursors
        self.engine = engine
        self.keep_alive = keep_alive
        self.sock: socket.socket | None = None      # set once parked
        self.watcher = None
        self.pending: bytes | None = None           # a body that came while still setting up

    def deliver(self, body: bytes) -> None:
        """Called by the channel state: write the body out now."""
        self.engine.deliver(self, body)


class LeanWaitServer(StreamServer):
    """Serves the WAIT line with a greenlet per request, none per waiting poll."""

    def __init__(self, listener, line: WaitLine, state: ChannelState, **kwargs):
        super().__init__(listener, **kwargs)
        self.line = line
        self.state = state
        self._loop = get_hub().loop
        # parked polls -> when WAIT_TIMEOUT ends their wait
        self._parked: Deadlines[LeanPoll] = Deadlines()
        # kept-alive connections between polls -> when they are closed
        self._idle: Deadlines[LeanPoll] = Deadlines()
        self._heads: dict[tuple, bytes] = {}
        self._framed_for: bytes | None = None
        self._framed = b""
        self._sweeper: gevent.Greenlet | None = None

    # -- life ----------------------------------------------------------------

    def start(self) -> None:
        super().start()
        self._sweeper = gevent.spawn(self._sweep_forever)

    def stop(self, timeout=None) -> None:
        if self._sweeper is not None:
            self._sweeper.kill(block=False)
        for poll in list(self._parked):
            self.state.unlisten(poll)
            self._close(poll)
        for poll in list(self._idle):
            self._close(poll)
        self._parked.clear()
        self._idle.clear()
        super().stop(timeout)

    # -- reading and answering (in a greenlet) ------------------------------

    def handle(self, sock, address) -> None:
        """StreamServer's per-connection entry; the server closes ``sock`` after."""
        try:
            self._serve(sock)
        except OSError as exc:
            log.debug("WAIT %s: connection lost: %s", address[0], exc)

    def _serve(self, sock) -> None:
        sock.settimeout(REQUEST_TIMEOUT)
        while True:
            request, version = self._read_request(sock)
            if request is None:
                return
            method = version[0]
            result = self.line.answer(method, request.url.decode("latin-1"),
                                      request.headers.get, lambda limit: request.body[:limit])
            if isinstance(result, Reply):
                sock.sendall(_render_reply(result))
                return
            keep_alive = wants_keep_alive(version[1], request.headers.get("connection"))
            poll = LeanPoll(result.listened(), self, keep_alive)
            body = self.state.listen(poll)
            head = self._head(request.headers.get("origin"), keep_alive)
            if body is not None:
                sock.sendall(head + self._frame(FIRST_BYTES + body, keep_alive, last=True))
                if keep_alive:
                    continue
                return
            sock.sendall(head + (b"3\r\n \r\n\r\n" if keep_alive else FIRST_BYTES))
            if poll.pending is not None:
                # Delivered while the headers were going out.
                sock.sendall(self._frame(poll.pending, keep_alive, last=True))
                if keep_alive:
                    continue
                return
            self._park(poll, sock)
            return

    def _read_request(self, sock) -> tuple[_Request | None, tuple[str, str]]:
        request = _Request()
        parser = httptools.HttpRequestParser(request)
        limit = self.line.config.WAIT_MAXLEN + MAX_HEAD_BYTES
        received = 0
        while not request.complete:
            try:
                data = sock.recv(READ_SIZE)
            except OSError:
                return None, ("", "")
            if not data:
                return None, ("", "")
            received += len(data)
            try:
                if received > limit:
                    raise ProtocolError(413, f"request longer than WAIT_MAXLEN "
                                             f"({self.line.config.WAIT_MAXLEN} bytes) plus headers")
                parser.feed_data(data)
            except ProtocolError as error:
                self._refuse(sock, error)
                return None, ("", "")
            except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
                self._refuse(sock, ProtocolError(400, f"malformed HTTP request: {exc or 'upgrade'}"))
                return None, ("", "")
        return request, (parser.get_method().decode("latin-1"), parser.get_http_version())

    def _refuse(self, sock, error: ProtocolError) -> None:
        try:
            sock.sendall(_render_reply(error_reply(error)))
        except OSError:
            pass

    def _head(self, origin: str | None, keep_alive: bool) -> bytes:
        key = (origin, keep_alive)
        head = self._heads.get(key)
        if head is None:
            headers = self.line.poll_headers(origin) + (
                (("Connection", "keep-alive"), ("Transfer-Encoding", "chunked")) if keep_alive
                else (("Connection", "close"),))
            head = _render_head("200 OK", headers)
            if len(self._heads) > 64:   # many distinct origins: do not grow without end
                self._heads.clear()
            self._heads[key] = head
        return head

    def reconfigure(self) -> None:
        """Forget cached headers after a reload."""
        self._heads.clear()

    # -- parking and waking (no greenlet) -----------------------------------

    def _park(self, poll: LeanPoll, sock) -> None:
        raw = socket.socket(fileno=sock.detach())
        raw.setblocking(False)
        poll.sock = raw
        poll.watcher = self._loop.io(raw.fileno(), _READ)
        poll.watcher.start(self._on_parked_readable, poll)
        self._parked.set(poll, time.monotonic() + self.line.config.WAIT_TIMEOUT)

    def deliver(self, poll: LeanPoll, body: bytes) -> None:
        """Write ``body`` to a parked poll, then close it or keep it for the next poll."""
        if poll.sock is None:
            poll.pending = body
            return
        self._parked.cancel(poll)
        poll.watcher.stop()
        if poll.keep_alive:
            if body is not self._framed_for:
                # Every listener of a publish gets the same body: frame it once.
                self._framed_for, self._framed = body, self._frame(body, True, last=True)
            data = self._framed
        else:
            data = body
        self._write_then_finish(poll, data)

    def _write_then_finish(self, poll: LeanPoll, data: bytes) -> None:
        try:
            sent = poll.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._close(poll)
            return
        if sent < len(data):
            gevent.spawn(self._resume_in_greenlet, poll, data[sent:])
        else:
            self._finish(poll)

    def _resume_in_greenlet(self, poll: LeanPoll, unsent: bytes = b"") -> None:
        """Take a connection back into a greenlet: finish writing, serve the next poll."""
        poll.watcher.close()
        sock = gevent.socket.socket(fileno=poll.sock.detach())
        poll.sock = None
        try:
            sock.settimeout(REQUEST_TIMEOUT)
            if unsent:
                sock.sendall(unsent)
            if poll.keep_alive:
                self._serve(sock)
        except OSError:
            pass
        finally:
            sock.close()

    def _finish(self, poll: LeanPoll) -> None:
        if not poll.keep_alive:
            self._close(poll)
            return
        poll.cursors = {}
        poll.pending = None
        poll.watcher.start(self._on_idle_readable, poll)
        self._idle.set(poll, time.monotonic() + KEEPALIVE_IDLE)

    def _on_parked_readable(self, poll: LeanPoll) -> None:
        gone = peer_closed(poll.sock)
        if gone is None:
            return
        poll.watcher.stop()
        if gone:
            self._parked.cancel(poll)
            self.state.unlisten(poll)
            self._close(poll)

    def _on_idle_readable(self, poll: LeanPoll) -> None:
        poll.watcher.stop()
        self._idle.cancel(poll)
        gevent.spawn(self._resume_in_greenlet, poll)

    def _close(self, poll: LeanPoll) -> None:
        if poll.watcher is not None:
            poll.watcher.stop()
            poll.watcher.close()
        if poll.sock is not None:
            poll.sock.close()
            poll.sock = None

    # -- timeouts ------------------------------------------------------------

    def _sweep_forever(self) -> None:
        while True:
            gevent.sleep(SWEEP_INTERVAL)
            try:
                self._sweep(time.monotonic())
            except Exception:  # noqa: BLE001 - the sweeper must outlive a bug
                log.exception("lean WAIT engine: sweeping timeouts failed")

    def _sweep(self, now: float) -> None:
        for poll in self._parked.pop_due(now):
            self.state.unlisten(poll)
            poll.watcher.stop()
            if poll.keep_alive:
                self._write_then_finish(poll, _LAST_CHUNK)
            else:
                self._close(poll)
        for poll in self._idle.pop_due(now):
            self._close(poll)

    @staticmethod
    def _frame(data: bytes, keep_alive: bool, last: bool) -> bytes:
        if not keep_alive:
            return data
        return b"%x\r\n%s\r\n%s" % (len(data), data, _LAST_CHUNK if last else b"")


def _render_head(status: str, headers) -> bytes:
    lines = [f"HTTP/1.1 {status}"] + [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _render_reply(reply: Reply) -> bytes:
    return _render_head(reply.status, reply.headers) + reply.body
