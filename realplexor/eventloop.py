"""Serving connections from the event loop's callbacks.

The lean WAIT engine and the IN line do their work in callbacks of the
gevent hub's loop, on non-blocking standard sockets, instead of in a
greenlet per connection: a connection that has nothing to do costs no
stack and no switch. What they share lives here: accepting from a
listening socket, lending a connection to a greenlet for the rare work
that must wait (a write the socket cannot take at once), and a sweeper
that runs timeouts.
"""
from __future__ import annotations

import _socket
import errno
import logging
import socket
import sys
import time
from typing import Callable, Iterator, TypeVar

import gevent
import gevent.socket
from gevent.hub import get_hub

from .clientlog import peer

log = logging.getLogger("realplexor")
T = TypeVar("T")

READ = 1
# Connections accepted per wake-up of the listening socket: enough to
# drain a reconnect storm quickly, few enough not to starve other work.
ACCEPT_BATCH = 64
# After running out of file descriptors, how long to stop accepting.
ACCEPT_PAUSE = 0.1
# After an early answer: how long, and how much, to read before closing.
LINGER_SECONDS = 2.0
LINGER_BYTES = 16 * 1024 * 1024
_OUT_OF_FILES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
_PEEK_FLAGS = socket.MSG_PEEK | socket.MSG_DONTWAIT


class Starvation:
    """Running out of file descriptors, logged once when it begins and once when it ends."""

    def __init__(self, what: str):
        self._what = what
        self._since: float | None = None
        self._pauses = 0

    @property
    def active(self) -> bool:
        """Whether accepting is failing for want of descriptors now."""
        return self._since is not None

    def paused(self, exc: OSError) -> None:
        """An accept failed for want of descriptors; accepting pauses for ACCEPT_PAUSE."""
        if self._since is None:
            self._since = time.monotonic()
            log.error("%s: cannot accept connections: %s; pausing %g s at a time until it can "
                      "(waiting connections stay in the backlog)", self._what, exc.strerror, ACCEPT_PAUSE)
        self._pauses += 1

    def fed(self) -> None:
        """An accept worked again."""
        log.warning("%s: accepting connections again after %.1f s (%d pauses)",
                    self._what, time.monotonic() - self._since, self._pauses)
        self._since = None
        self._pauses = 0


def out_of_files(exc: OSError) -> bool:
    """Whether ``exc`` says the process or system has no descriptor (or memory) to spare."""
    return exc.errno in _OUT_OF_FILES


class Acceptor:
    """Accepts connections on a listening socket from a loop callback.

    Each connection goes to ``on_connection(sock, address)`` as a
    non-blocking standard socket (with ``TCP_NODELAY``, for TCP); the
    callback runs in the loop and must not block.
    """

    def __init__(self, listener: socket.socket, on_connection: Callable[[socket.socket, object], None]):
        self.socket = socket.socket(listener.family, listener.type, listener.proto,
                                    fileno=listener.detach())
        self.socket.setblocking(False)
        self.address = self.socket.getsockname()
        self._on_connection = on_connection
        self._loop = get_hub().loop
        self._watcher = self._loop.io(self.socket.fileno(), READ)
        tcp = self.socket.family in (socket.AF_INET, socket.AF_INET6)
        if tcp:
            # A poll's headers and its body go out in two writes; with Nagle
            # the body may wait 40 ms for the client's delayed ACK. Linux
            # hands the option on to accepted sockets; elsewhere set it on each.
            self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._nodelay_each = tcp and not sys.platform.startswith("linux")
        self._pause = None
        self._starvation = Starvation(peer(self.address))
        self._open = False

    @property
    def accepting(self) -> bool:
        """Whether it takes connections: started, not closed, and its last accept did not fail
        for want of descriptors."""
        return self._open and not self._starvation.active

    def start(self) -> None:
        """Begin accepting."""
        self._open = True
        self._watcher.start(self._accept_ready)

    def close(self) -> None:
        """Stop accepting and close the listening socket."""
        self._open = False
        self._watcher.stop()
        self._watcher.close()
        if self._pause is not None:
            self._pause.close()
        self.socket.close()

    def _accept_ready(self) -> None:
        accept = self.socket._accept
        family, kind, proto = self.socket.family, self.socket.type, self.socket.proto
        on_connection = self._on_connection
        for _ in range(ACCEPT_BATCH):
            try:
                fd, address = accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if out_of_files(exc):
                    self._pause_accepting(exc)
                return
            if self._starvation.active:
                self._starvation.fed()
            # The C socket: its calls skip the Python layer of socket.socket.
            sock = _socket.socket(family, kind, proto, fd)
            try:
                sock.setblocking(False)
                if self._nodelay_each:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                on_connection(sock, address)
            except Exception:  # noqa: BLE001 - one connection's bug must not stop the accepting
                log.exception("serving a new connection failed")
                sock.close()

    def _pause_accepting(self, exc: OSError) -> None:
        # The listening socket stays readable: without a pause the loop
        # would spin on it until a descriptor is free again.
        self._starvation.paused(exc)
        self._watcher.stop()
        self._pause = self._loop.timer(ACCEPT_PAUSE)
        self._pause.start(self._resume_accepting)

    def _resume_accepting(self) -> None:
        self._pause.close()
        self._pause = None
        self._watcher.start(self._accept_ready)


def peer_closed(raw) -> bool | None:
    """True if the peer has closed, False if it sent data, None if nothing yet.

    ``raw`` is a standard (not gevent) socket: the peek never waits.
    """
    try:
        return raw.recv(1, _PEEK_FLAGS) == b""
    except BlockingIOError:
        return None
    except OSError:
        return True


def recv_or_gone(raw, size: int) -> bytes | None:
    """What the client sent (at most ``size`` bytes), b"" if it left, None if nothing came yet.

    ``raw`` is a non-blocking socket; a broken connection counts as gone.
    """
    try:
        return raw.recv(size)
    except BlockingIOError:
        return None
    except OSError:
        return b""


def close_connection(conn) -> None:
    """Close a served connection's read watcher and socket (either may be gone)."""
    if conn.watcher is not None:
        conn.watcher.stop()
        conn.watcher.close()
        conn.watcher = None
    if conn.sock is not None:
        conn.sock.close()
        conn.sock = None


def lend(sock: socket.socket, timeout: float) -> gevent.socket.socket:
    """The connection as a blocking gevent socket, for a greenlet; ``sock`` is spent."""
    lent = gevent.socket.socket(sock.family, sock.type, sock.proto, fileno=sock.detach())
    lent.settimeout(timeout)
    return lent


def take_back(lent: gevent.socket.socket) -> _socket.socket:
    """The connection back from a greenlet, as a non-blocking standard socket."""
    sock = _socket.socket(lent.family, lent.type, lent.proto, lent.detach())
    sock.setblocking(False)
    return sock


def sendall_within(lent: gevent.socket.socket, data: bytes, seconds: float) -> None:
    """Send ``data`` in a greenlet, giving up (TimeoutError) after ``seconds`` in all.

    A socket timeout bounds each send alone: a client that takes one byte
    at a time would hold the connection for ever.
    """
    lent.settimeout(None)
    with gevent.Timeout(seconds, TimeoutError(f"answer not taken within {seconds:g} s")):
        lent.sendall(data)


def linger(lent: gevent.socket.socket) -> None:
    """Say we are done, then read and drop what the client still sends (in a greenlet).

    Closing with unread input makes the kernel reset the connection, and
    the client may lose the answer just sent (a 413 above all). Reads
    stop at end of input, after LINGER_BYTES, or LINGER_SECONDS in all.
    """
    try:
        lent.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + LINGER_SECONDS
        drained = 0
        while drained < LINGER_BYTES:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            lent.settimeout(left)
            chunk = lent.recv(65536)
            if not chunk:
                return
            drained += len(chunk)
    except OSError:
        pass


class Sweeper:
    """Calls ``sweep(now)`` every ``interval`` seconds in a greenlet of its own."""

    def __init__(self, sweep: Callable[[float], None], interval: float, what: str):
        self._sweep = sweep
        self._interval = interval
        self._what = what
        self._greenlet: gevent.Greenlet | None = None

    def start(self) -> None:
        """Begin sweeping."""
        self._greenlet = gevent.spawn(self._run)

    def stop(self) -> None:
        """Stop sweeping."""
        if self._greenlet is not None:
            self._greenlet.kill(block=False)
            self._greenlet = None

    def _run(self) -> None:
        while True:
            gevent.sleep(self._interval)
            try:
                self._sweep(time.monotonic())
            except Exception:  # noqa: BLE001 - the sweeper must outlive a bug
                log.exception("%s: sweeping timeouts failed", self._what)


def between_turns(steps: Iterator[T]) -> Iterator[T]:
    """The items of ``steps``, letting the event loop serve others between them (in a greenlet)."""
    for item in steps:
        yield item
        gevent.sleep(0)
