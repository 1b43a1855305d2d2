"""The IN line: back ends publish and ask for ONLINE, WATCH and STATS.

Requests whose request line names one of the HTTP routes (health,
readiness, metrics, the JSON API) are read as HTTP and served by
:mod:`realplexor.routes`; every other request keeps the old protocol.

One connection carries one request. It is served as soon as it is
complete: when ``Content-Length`` body bytes have arrived, or when the
client closes its writing side, whichever comes first. Connections are
served from event-loop callbacks (see :mod:`realplexor.eventloop`), so
a publish costs no greenlet.
"""
from __future__ import annotations

import logging
import socket
import time
from typing import Sequence

import gevent

from .auth import PasswordChecks, Principal, Users
from .channels import ChannelState
from .store import StoreDown
from .clientlog import bad_request, escape, peer
from .config import VERBOSE, Config
from .deadlines import Deadlines
from .eventloop import (LINGER_BYTES, LINGER_SECONDS, READ, Acceptor, Sweeper, between_turns,
                        close_connection, lend, linger, peer_closed, sendall_within)
from .inhttp import HttpRequest, is_route, parse_http_request, render_api_error
from .metrics import Refusals
from .protocol import (MAX_NUMBER_DIGITS, InRequest, InRequestBuffer, ProtocolError,
                       parse_in_request, render_error, render_in_reply, render_online,
                       render_watch)
from .routes import Later, Probes, Routes

log = logging.getLogger("realplexor.inline")

RECV_SIZE = 65536
SWEEP_INTERVAL = 0.25
_OK = render_in_reply(200)


class InLine:
    """What each IN-line request gets, over a channel state and a users file.

    Requests in the old protocol are served here; those whose request
    line names one of the HTTP routes (``GET /metrics``, ``POST
    /publish``...) go to :class:`Routes`. ``probes`` tell the monitoring
    routes how the server is; ``refusals`` count the requests refused.
    """

    def __init__(self, config: Config, state: ChannelState, users: Users,
                 probes: Probes | None = None, refusals: Refusals | None = None):
        self.state = state
        self.refusals = refusals if refusals is not None else Refusals()
        self._checks = PasswordChecks()
        self.routes = Routes(state, self._checks, probes or Probes(state.ready), self.refusals)
        self.reconfigure(config, users)

    def reconfigure(self, config: Config, users: Users) -> None:
        """Take on a new configuration (on reload)."""
        self.config = config
        self.users = users

    def parse(self, data: bytes, eof: bool) -> InRequest | HttpRequest | None:
        """The request in the bytes received so far: see :func:`parse_in_request`."""
        if is_route(data):
            return parse_http_request(data, eof)
        return parse_in_request(data, eof, self.config.IDENTIFIER)

    def refusal(self, error: ProtocolError, data: bytes | bytearray) -> bytes:
        """Count a request refused before it could be served, and render the reply to ``data``."""
        self.refusals.count("in", error.status)
        return render_api_error(error) if is_route(data) else render_error(error)

    def serve(self, request: InRequest | HttpRequest, address: object = "-") -> bytes | Later:
        """Authenticate and carry out one parsed request; the reply bytes.

        Work that would hold the event loop up is handed back as a
        :data:`Later`, to be called in a greenlet: a password to check
        against its hash (milliseconds of CPU), or an ONLINE or STATS
        answer over many channels (done in steps, letting others run).
        """
        if isinstance(request, HttpRequest):
            return self.routes.serve(request, self.users, address)
        try:
            principal = self.users.known(request.identifier.login, request.identifier.password)
        except ProtocolError as error:
            return self._refused(error, address)
        if principal is None:
            return lambda: self._serve_after_check(request, address)
        return self._serve_as(principal, request, address)

    def _serve_after_check(self, request: InRequest, address: object) -> bytes:
        """Check the request's password in a worker thread, then serve it (blocks the greenlet)."""
        try:
            principal = self._checks.check(self.users, request.identifier.login, request.identifier.password)
        except ProtocolError as error:
            return self._refused(error, address)
        reply = self._serve_as(principal, request, address)
        return reply if isinstance(reply, bytes) else reply()

    def _serve_as(self, principal: Principal, request: InRequest, address: object) -> bytes | Later:
        if self.state.blocking:
            # A shared store: every command waits for it, in a greenlet.
            return lambda: self._carry_out_waiting(principal, request, address)
        return self._carry_out(principal, request, address)

    def _carry_out_waiting(self, principal: Principal, request: InRequest, address: object) -> bytes:
        try:
            reply = self._carry_out(principal, request, address)
            return reply if isinstance(reply, bytes) else reply()
        except StoreDown as exc:
            return self._refused(ProtocolError(503, f"{exc}; nothing done, try again"), address)

    def _carry_out(self, principal: Principal, request: InRequest, address: object) -> bytes | Later:
        try:
            if request.command is None:
                return self._publish(principal, request, address)
            log.log(VERBOSE, "IN %s: %s %s", peer(address), request.command, escape(" ".join(request.args)))
            if request.command == "ONLINE":
                return self._online(principal, request.args)
            if request.command == "WATCH":
                return self._watch(principal, request.args)
            return self._stats(principal)
        except ProtocolError as error:
            return self._refused(error, address)

    def _refused(self, error: ProtocolError, address: object) -> bytes:
        self.refusals.count("in", error.status)
        bad_request("IN %s: %s %s", peer(address), error.status, escape(error.reason))
        return render_error(error)

    def _publish(self, principal: Principal, request: InRequest, address: object) -> bytes:
        targets = request.identifier.targets
        if not targets:
            raise ProtocolError(400, "no channel ids to publish to")
        allowed = [(item.id, item.cursor, item.cursor_text)
                   for item in targets if principal.may_touch(item.id)]
        if not allowed:
            raise ProtocolError(403, f"login {principal.login} may publish only to ids starting with "
                                     f"{principal.prefix}; nothing published")
        if len(allowed) < len(targets):
            bad_request("IN %s: login %s may not publish to %s; skipped", peer(address), principal.login,
                        ",".join(item.id for item in targets if not principal.may_touch(item.id)))
        placed = self.state.publish(allowed, request.data, request.identifier.limiters)
        if log.isEnabledFor(VERBOSE):
            log.log(VERBOSE, "IN %s: published %d bytes to %s", peer(address), len(request.data),
                    ",".join(f"{c}@{t}" for c, t in placed))
        return _OK

    def _online(self, principal: Principal, args: Sequence[str]) -> bytes | Later:
        prefixes = principal.scoped(args)
        if prefixes is None:
            return render_in_reply(200, "")
        steps = self.state.online_steps(prefixes)
        return lambda: render_in_reply(200, "".join(render_online(part) for part in between_turns(steps)))

    def _watch(self, principal: Principal, args: Sequence[str]) -> bytes:
        after = _position(args[0]) if args else None
        if after is None:
            position = self.state.position()
            return render_in_reply(200, render_watch([("FAKE", position, "FAKE")]))
        prefixes = principal.scoped(args[1:])
        events = self.state.watch(after, prefixes) if prefixes is not None else []
        return render_in_reply(200, render_watch(events))

    def _stats(self, principal: Principal) -> bytes | Later:
        if principal.login is not None:
            raise ProtocolError(403, "STATS is not available to logged-in clients")
        steps = self.state.stats_steps()
        return lambda: render_in_reply(200, "".join(between_turns(steps)))


class _Connection:
    """One IN-line connection being read, answered or closed."""

    __slots__ = ("sock", "address", "watcher", "buf", "drained")

    def __init__(self, sock: socket.socket, address: object):
        self.sock = sock
        self.address = address
        self.watcher = None       # made only if the request does not come whole at once
        self.buf: InRequestBuffer | None = None
        self.drained = 0


class InServer:
    """Serves the IN line from event-loop callbacks: no greenlet per request.

    A request is read as its bytes come, served by :class:`InLine` and
    answered; the connection is then closed at once if the client has
    nothing more to send. After an early reply (an error before the
    request was read whole), the connection lingers, reading and
    dropping input, so that the client reads the reply instead of a reset.
    """

    engine = "eventloop"
    transport = "http"

    def __init__(self, listener: socket.socket, line: InLine):
        self.line = line
        self.open_connections = 0
        self._acceptor = Acceptor(listener, self._accepted)
        self.address = self._acceptor.address
        self._loop = gevent.get_hub().loop
        # connections with a partial request -> when IN_TIMEOUT ends them
        self._reading: Deadlines[_Connection] = Deadlines()
        # connections closing after an early reply -> when they are closed anyway
        self._lingering: Deadlines[_Connection] = Deadlines()
        self._sweeper = Sweeper(self._sweep, SWEEP_INTERVAL, "IN line")

    def start(self) -> None:
        """Begin serving."""
        self._acceptor.start()
        self._sweeper.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop accepting and close every open connection."""
        self._acceptor.close()
        self._sweeper.stop()
        for conn in [*self._reading, *self._lingering]:
            self._close(conn)

    @property
    def accepting(self) -> bool:
        """Whether the line takes new connections (not paused for want of descriptors)."""
        return self._acceptor.accepting

    # -- reading ---------------------------------------------------------------

    def _accepted(self, sock: socket.socket, address: object) -> None:
        self.open_connections += 1
        self._read(_Connection(sock, address))

    def _read(self, conn: _Connection) -> None:
        try:
            chunk = conn.sock.recv(RECV_SIZE)
        except BlockingIOError:
            self._wait_for_more(conn)
            return
        except OSError as exc:
            log.debug("IN %s: connection lost: %s", peer(conn.address), exc)
            self._close(conn)
            return
        eof = not chunk
        config = self.line.config
        if conn.buf is None:
            data, worth = chunk, True      # the first read: usually the whole request
        else:
            conn.buf.add(chunk)
            data, worth = conn.buf.data, conn.buf.worth_parsing(eof)
        if len(data) > config.IN_MAXLEN:
            bad_request("IN %s: 413 request over IN_MAXLEN", peer(conn.address))
            self._answer(conn, self.line.refusal(ProtocolError(
                413, f"request longer than IN_MAXLEN ({config.IN_MAXLEN} bytes); nothing published"), data),
                eof, early=True)
            return
        try:
            request = self.line.parse(data, eof) if worth else None
        except ProtocolError as error:
            bad_request("IN %s: %s %s", peer(conn.address), error.status, escape(error.reason))
            self._answer(conn, self.line.refusal(error, data), eof, early=True)
            return
        if request is None:
            if eof:     # cannot happen: a request that ended is complete or refused
                self._close(conn)
                return
            if conn.buf is None:
                conn.buf = InRequestBuffer()
                conn.buf.add(chunk)
            self._wait_for_more(conn)
            return
        reply = self.line.serve(request, conn.address)
        if isinstance(reply, bytes):
            self._answer(conn, reply, eof, early=False)
        else:
            self._answer_later(conn, reply, eof)

    def _answer_later(self, conn: _Connection, later: Later, eof: bool) -> None:
        if conn.watcher is not None:
            self._reading.cancel(conn)
            conn.watcher.stop()
        gevent.spawn(lambda: self._answer(conn, later(), eof, early=False))

    def _wait_for_more(self, conn: _Connection) -> None:
        if conn.watcher is None:
            conn.watcher = self._loop.io(conn.sock.fileno(), READ)
            conn.watcher.start(self._read, conn)
            # IN_TIMEOUT bounds the whole request, not each wait for a piece.
            self._reading.set(conn, time.monotonic() + self.line.config.IN_TIMEOUT)

    # -- answering and closing ---------------------------------------------------

    def _answer(self, conn: _Connection, reply: bytes, eof: bool, early: bool) -> None:
        """Send ``reply``, then close (lingering first after an early one)."""
        if conn.watcher is not None:
            self._reading.cancel(conn)
            conn.watcher.stop()
        conn.buf = None
        try:
            sent = conn.sock.send(reply)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            log.debug("IN %s: connection lost: %s", peer(conn.address), exc)
            self._close(conn)
            return
        if sent < len(reply):
            gevent.spawn(self._answer_in_greenlet, conn, reply[sent:], eof)
        elif eof or (not early and peer_closed(conn.sock) is not False):
            # Nothing unread: closing sends a plain FIN, and the reply arrives.
            self._close(conn)
        else:
            self._linger(conn)

    def _answer_in_greenlet(self, conn: _Connection, rest: bytes, eof: bool) -> None:
        """A reply the socket could not take at once: finish it blocking."""
        sock = lend(conn.sock, None)
        conn.sock = None
        try:
            sendall_within(sock, rest, self.line.config.WRITE_TIMEOUT)
            if not eof:
                linger(sock)
        except OSError as exc:
            log.debug("IN %s: connection lost: %s", peer(conn.address), exc)
        finally:
            sock.close()
            self._close(conn)

    def _linger(self, conn: _Connection) -> None:
        # Closing with unread input makes the kernel reset the connection,
        # and the client may lose the reply (a 413 above all). Say we are
        # done, then read and drop what still comes, for a little while.
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(conn)
            return
        if conn.watcher is None:
            conn.watcher = self._loop.io(conn.sock.fileno(), READ)
        conn.watcher.start(self._drain, conn)
        self._lingering.set(conn, time.monotonic() + LINGER_SECONDS)

    def _drain(self, conn: _Connection) -> None:
        try:
            while conn.drained < LINGER_BYTES:
                chunk = conn.sock.recv(RECV_SIZE)
                if not chunk:
                    break
                conn.drained += len(chunk)
        except BlockingIOError:
            return
        except OSError:
            pass
        self._close(conn)

    def _close(self, conn: _Connection) -> None:
        # Called exactly once per connection accepted.
        self.open_connections -= 1
        if conn.watcher is not None:     # only a connection that waited has deadlines
            self._reading.cancel(conn)
            self._lingering.cancel(conn)
        close_connection(conn)

    def _sweep(self, now: float) -> None:
        for conn in self._reading.pop_due(now):
            bad_request("IN %s: 408 idle for IN_TIMEOUT, closed", peer(conn.address))
            self._answer(conn, self.line.refusal(ProtocolError(
                408, f"no complete request within IN_TIMEOUT ({self.line.config.IN_TIMEOUT:g} s); "
                     "nothing done"), conn.buf.data if conn.buf is not None else b""), eof=False, early=True)
        for conn in self._lingering.pop_due(now):
            self._close(conn)


def _position(text: str) -> int | None:
    """WATCH's position, or None when ``text`` names none.

    Like the old server, every false value (0 above all, which an old
    watcher's loop starts from) and anything but ASCII digits of a sane
    length mean "no position": the answer is then the current one.
    """
    if text.isascii() and text.isdigit() and len(text) <= MAX_NUMBER_DIGITS:
        return int(text) or None
    return None
