"""The IN line: back ends publish and ask for ONLINE, WATCH and STATS.

One connection carries one request. It is served as soon as it is
complete: when ``Content-Length`` body bytes have arrived, or when the
client closes its writing side, whichever comes first.
"""
from __future__ import annotations

import logging
import socket
from typing import Sequence

from .auth import Principal, Users
from .channels import ChannelState
from .config import VERBOSE, Config
from .protocol import (InRequest, ProtocolError, parse_in_request, render_error,
                       render_in_reply, render_online, render_watch)

log = logging.getLogger("realplexor.inline")

RECV_SIZE = 65536
# After an early reply: how long, and how much, to read before closing.
LINGER_SECONDS = 2.0
LINGER_BYTES = 16 * 1024 * 1024


class InLine:
    """Serves IN-line connections over a channel state and a users file."""

    def __init__(self, config: Config, state: ChannelState, users: Users):
        self.state = state
        self.reconfigure(config, users)

    def reconfigure(self, config: Config, users: Users) -> None:
        """Take on a new configuration (on reload)."""
        self.config = config
        self.users = users

    def handle(self, sock: socket.socket, address: tuple) -> None:
        """Read one request from ``sock``, serve it, reply and close."""
        try:
            reply, finished = self._read_and_serve(sock, address)
            sock.sendall(reply)
            if not finished:
                _close_gently(sock)
        except OSError as exc:
            log.debug("IN %s: connection lost: %s", _peer(address), exc)
        finally:
            sock.close()

    def _read_and_serve(self, sock: socket.socket, address: tuple) -> tuple[bytes, bool]:
        """The reply, and whether the client had finished sending (closed its side)."""
        config = self.config
        sock.settimeout(config.IN_TIMEOUT)
        buf = bytearray()
        while True:
            try:
                chunk = sock.recv(RECV_SIZE)
            except socket.timeout:
                log.info("IN %s: idle for IN_TIMEOUT, closed", _peer(address))
                return render_error(ProtocolError(
                    408, f"no complete request within IN_TIMEOUT ({config.IN_TIMEOUT:g} s); nothing done")), False
            buf += chunk
            if len(buf) > config.IN_MAXLEN:
                log.info("IN %s: request over IN_MAXLEN", _peer(address))
                return render_error(ProtocolError(
                    413, f"request longer than IN_MAXLEN ({config.IN_MAXLEN} bytes); nothing published")), False
            try:
                request = parse_in_request(buf, not chunk, config.IDENTIFIER)
            except ProtocolError as error:
                log.info("IN %s: %s %s", _peer(address), error.status, error.reason)
                return render_error(error), not chunk
            if request is not None:
                return self.serve(request, _peer(address)), not chunk

    def serve(self, request: InRequest, peer: str = "-") -> bytes:
        """Authenticate and carry out one parsed request; the reply bytes."""
        try:
            principal = self.users.authenticate(request.identifier.login,
                                                request.identifier.password)
            if request.command is None:
                return self._publish(principal, request, peer)
            log.log(VERBOSE, "IN %s: %s %s", peer, request.command, " ".join(request.args))
            if request.command == "ONLINE":
                return self._online(principal, request.args)
            if request.command == "WATCH":
                return self._watch(principal, request.args)
            return self._stats(principal)
        except ProtocolError as error:
            log.info("IN %s: %s %s", peer, error.status, error.reason)
            return render_error(error)

    def _publish(self, principal: Principal, request: InRequest, peer: str) -> bytes:
        targets = request.identifier.targets
        if not targets:
            raise ProtocolError(400, "no channel ids to publish to")
        allowed = [(item.id, item.cursor, item.cursor_text)
                   for item in targets if principal.may_touch(item.id)]
        if len(allowed) < len(targets):
            log.info("IN %s: login %s may not publish to %s; skipped", peer, principal.login,
                     ",".join(item.id for item in targets if not principal.may_touch(item.id)))
        if allowed:
            placed = self.state.publish(allowed, request.data, request.identifier.limiters)
            log.log(VERBOSE, "IN %s: published %d bytes to %s", peer, len(request.data),
                      ",".join(f"{c}@{t}" for c, t in placed))
        return render_in_reply(200)

    def _online(self, principal: Principal, args: Sequence[str]) -> bytes:
        prefixes = _scoped(principal, args)
        counts = self.state.online(prefixes) if prefixes is not None else []
        return render_in_reply(200, render_online(counts))

    def _watch(self, principal: Principal, args: Sequence[str]) -> bytes:
        if not args or not args[0].isdigit():
            position = self.state.position()
            return render_in_reply(200, render_watch([("FAKE", position, "FAKE")]))
        prefixes = _scoped(principal, args[1:])
        events = self.state.watch(int(args[0]), prefixes) if prefixes is not None else []
        return render_in_reply(200, render_watch(events))

    def _stats(self, principal: Principal) -> bytes:
        if principal.login is not None:
            raise ProtocolError(403, "STATS is not available to logged-in clients")
        return render_in_reply(200, self.state.stats())


def _scoped(principal: Principal, prefixes: Sequence[str]) -> Sequence[str] | None:
    """The id prefixes a client may query; None when it may see nothing.

    A logged-in client sees only ids under its own ``LOGIN_`` prefix, so
    its prefixes must lie within it, and no prefix means nothing at all.
    """
    if principal.login is None:
        return prefixes
    own = [p for p in prefixes if p.startswith(principal.prefix)]
    return own or None


def _close_gently(sock: socket.socket) -> None:
    """Let the client read the reply before the connection goes.

    Closing with unread input makes the kernel reset the connection, and
    the client may lose the reply (a 413 above all). Say we are done,
    then read and drop what still comes, for a little while.
    """
    sock.shutdown(socket.SHUT_WR)
    sock.settimeout(LINGER_SECONDS)
    drained = 0
    try:
        while drained < LINGER_BYTES:
            chunk = sock.recv(RECV_SIZE)
            if not chunk:
                return
            drained += len(chunk)
    except OSError:
        pass


def _peer(address: tuple) -> str:
    return f"{address[0]}:{address[1]}" if isinstance(address, tuple) else str(address)
