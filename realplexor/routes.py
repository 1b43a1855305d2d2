"""The IN line's HTTP routes: health, readiness, metrics and the JSON API.

    GET  /health    200 "ok": the process serves. No credentials.
    GET  /ready     200 "ready", or 503 "not ready: REASON": every line
                    accepts and the channel state can take work. No credentials.
    GET  /metrics   the Prometheus text format (404 with METRICS = false).
    POST /publish, GET /online, GET /watch: the JSON API (see jsonapi.py).

Who may ask follows the rest of the IN line: where USERS_FILE lets guests
in (a ``:`` line) no credentials are needed; otherwise HTTP Basic
authorization with a USERS_FILE login, whose password is checked off the
event loop like a ``LOGIN:PASSWORD@`` one. Any login may read /metrics
(totals only, no ids); on the JSON API a login touches only ``LOGIN_`` ids.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

from .auth import GUEST, PasswordChecks, Principal, Users
from .channels import ChannelState
from .clientlog import bad_request, escape, peer
from .config import VERBOSE
from .eventloop import between_turns
from .inhttp import (ApiError, HttpRequest, basic_credentials, check_method, render_api_error, render_json,
                     render_reply, render_text, unauthorized)
from .jsonapi import online, parse_online, parse_publish, parse_watch, published, watch
from .metrics import CONTENT_TYPE, Refusals
from .protocol import ProtocolError

log = logging.getLogger("realplexor.inline")

#: A reply still to be made, by calling it in a greenlet.
Later = Callable[[], bytes]
_PUBLIC = frozenset({"/health", "/ready"})


@dataclass(frozen=True)
class Probes:
    """What the monitoring routes read of the running server.

    ``not_ready`` names why the server cannot take work (None: it can);
    ``metrics`` renders a scrape, None when METRICS is off.
    """

    not_ready: Callable[[], str | None]
    metrics: Callable[[], bytes] | None = None


class Routes:
    """Serves each route's request over the channel state."""

    def __init__(self, state: ChannelState, checks: PasswordChecks, probes: Probes, refusals: Refusals):
        self.state = state
        self.probes = probes
        self._checks = checks
        self._refusals = refusals

    def serve(self, request: HttpRequest, users: Users, address: object = "-") -> bytes | Later:
        """The reply to ``request``, or a :data:`Later` when a password must be checked first."""
        head_only = request.method == "HEAD"
        log.log(VERBOSE, "IN %s: %s %s", peer(address), request.method, request.path)
        try:
            check_method(request)
            if request.method == "POST" and "content-length" not in request.headers:
                raise ApiError(411, "a POST needs a Content-Length")
            if request.path in _PUBLIC:
                return self._probe(request.path, head_only)
            if request.path == "/metrics" and self.probes.metrics is None:
                raise ApiError(404, "metrics are off here (METRICS = false)")
            credentials = basic_credentials(request)
            principal = self._known(users, credentials)
        except ProtocolError as error:
            return self.refused(error, address, head_only)
        if principal is None:
            return lambda: self._serve_after_check(request, users, credentials, address)
        return self._serve_as(principal, request, address)

    def refused(self, error: ProtocolError, address: object, head_only: bool = False) -> bytes:
        """Count, log and render a refusal as ``{"error": ...}``."""
        self._refusals.count("in", error.status)
        bad_request("IN %s: %s %s", peer(address), error.status, escape(error.reason))
        return render_api_error(error, head_only)

    def _probe(self, path: str, head_only: bool) -> bytes:
        if path == "/health":
            return render_text(200, "ok", head_only)
        reason = self.probes.not_ready()
        if reason is None:
            return render_text(200, "ready", head_only)
        return render_text(503, f"not ready: {reason}", head_only)

    @staticmethod
    def _known(users: Users, credentials: tuple[str, str] | None) -> Principal | None:
        if credentials is None:
            if not users.anonymous:
                raise unauthorized()
            return GUEST
        return users.known(*credentials)

    def _serve_after_check(self, request: HttpRequest, users: Users, credentials: tuple[str, str],
                           address: object) -> bytes:
        """Check the password in a worker thread, then serve (blocks the greenlet)."""
        try:
            principal = self._checks.check(users, *credentials)
        except ProtocolError as error:
            return self.refused(error, address, request.method == "HEAD")
        reply = self._serve_as(principal, request, address)
        return reply if isinstance(reply, bytes) else reply()

    def _serve_as(self, principal: Principal, request: HttpRequest, address: object) -> bytes | Later:
        head_only = request.method == "HEAD"
        try:
            if request.path == "/metrics":
                return render_reply(200, self.probes.metrics(), CONTENT_TYPE, head_only=head_only)
            if request.path == "/publish":
                return self._publish(principal, request.body, address)
            if request.path == "/online":
                return self._online(principal, parse_online(request.query), head_only)
            return self._watch(principal, *parse_watch(request.query), head_only)
        except ProtocolError as error:
            return self.refused(error, address, head_only)

    def _publish(self, principal: Principal, body: bytes, address: object) -> bytes:
        publish = parse_publish(body)
        allowed = [target for target in publish.targets if principal.may_touch(target[0])]
        if not allowed:
            raise ApiError(403, f"login {principal.login} may publish only to ids starting with "
                                f"{principal.prefix}; nothing published")
        skipped = [target[0] for target in publish.targets if not principal.may_touch(target[0])]
        if skipped:
            bad_request("IN %s: login %s may not publish to %s; skipped", peer(address), principal.login,
                        ",".join(skipped))
        placed = self.state.publish(allowed, publish.data, publish.limiters)
        return render_json(200, published(placed, skipped))

    def _online(self, principal: Principal, prefixes: list[str], head_only: bool) -> bytes | Later:
        scoped = principal.scoped(prefixes)
        if scoped is None:
            return render_json(200, online(()), head_only=head_only)
        steps = self.state.online_steps(scoped)
        return lambda: render_json(200, online(pair for part in between_turns(steps) for pair in part),
                                   head_only=head_only)

    def _watch(self, principal: Principal, position: int | None, prefixes: list[str],
               head_only: bool) -> bytes:
        scoped = principal.scoped(prefixes)
        events = self.state.watch(position, scoped) if position is not None and scoped is not None else []
        return render_json(200, watch(events, self.state.position()), head_only=head_only)
