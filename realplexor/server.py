"""The Realplexor server: the WAIT and IN lines over one channel state."""
from __future__ import annotations

import dataclasses
import logging
import socket
from typing import Iterator

import gevent
import gevent.socket
from gevent.pywsgi import WSGIServer

from .auth import Users
from .channels import ChannelState, MemoryChannels, Settings, event_log_len
from .store import StoreDown
from .config import RESTART_ONLY, Config, ConfigError, parse_address
from .handoff import Listeners
from .inline import InLine, InServer
from .metrics import Metrics, Refusals
from .pages import load_pages
from .routes import Probes
from .wait import WaitLine
from .wait_lean import LeanWaitServer
from .wait_wsgi import WaitApp
from .wsgi_server import LongPollHandler, WaitServer

log = logging.getLogger("realplexor")

HOUSEKEEPING_INTERVAL = 0.2
# The kernel caps it at net.core.somaxconn; a reconnect storm after a
# broadcast to many polls fills a small queue at once.
LISTEN_BACKLOG = 65535
DEFER_ACCEPT_SECONDS = 10


class StartError(Exception):
    """The server cannot start: a port in use, an unreadable file..."""


def bind_listener(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    """A plain bound, listening socket with a large backlog.

    With ``reuse_port`` several processes may listen on the same port
    (Linux's SO_REUSEPORT spreads the connections among them).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(LISTEN_BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


def listen_socket(host: str, port: int, defer_accept: bool = False,
                  fd: int | None = None, reuse_port: bool = False) -> gevent.socket.socket:
    """A listening socket for a line: bound here, or the inherited ``fd``.

    With ``defer_accept`` (Linux) a connection is accepted only once its
    request bytes have arrived, so no greenlet waits on an empty socket.
    """
    if fd is None:
        fd = bind_listener(host, port, reuse_port).detach()
    sock = gevent.socket.socket(fileno=fd)
    try:
        if hasattr(socket, "TCP_DEFER_ACCEPT"):
            # Set either way: an inherited socket keeps what the last server set.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT,
                            DEFER_ACCEPT_SECONDS if defer_accept else 0)
    except OSError:
        sock.close()
        raise
    return sock


def make_state(config: Config) -> ChannelState:
    """The channel state BACKEND names: this process's memory, or a shared Redis."""
    if config.BACKEND == "memory":
        return MemoryChannels(channel_settings(config))
    from .redis_channels import RedisChannels   # needs the redis extra
    return RedisChannels(channel_settings(config), config.BACKEND)


def channel_settings(config: Config) -> Settings:
    """The channel state's tunables from the configuration."""
    return Settings(max_data_for_id=config.MAX_DATA_FOR_ID,
                    clean_id_after=config.CLEAN_ID_AFTER,
                    offline_timeout=config.OFFLINE_TIMEOUT,
                    event_log_len=event_log_len(config.EVENT_CHAIN_LEN),
                    max_answer=config.WAIT_MAX_ANSWER,
                    max_queue_bytes=int(config.MAX_QUEUE_MB * (1 << 20)),
                    process_timeout=config.PROCESS_TIMEOUT)


def load_users(config: Config) -> Users:
    """Read USERS_FILE, as a StartError when it cannot be read."""
    try:
        return Users.load(config.USERS_FILE)
    except (OSError, ValueError) as exc:
        raise StartError(f"cannot read USERS_FILE {config.USERS_FILE}: {exc}") from None


def _load_pages(config: Config):
    try:
        return load_pages(config)
    except OSError as exc:
        raise StartError(f"cannot read page file {exc.filename}: {exc.strerror}") from None


class Realplexor:
    """Both lines and the channel state they share, started and stopped together."""

    def __init__(self, config: Config, state: ChannelState | None = None):
        self.config = config
        self.state = state if state is not None else make_state(config)
        self.refusals = Refusals()
        self.metrics = Metrics(self) if config.METRICS else None
        self.wait_line = WaitLine(config, _load_pages(config), self.refusals)
        self.wait_app = WaitApp(self.wait_line, self.state)
        probes = Probes(self.not_ready, self.metrics.render if self.metrics is not None else None)
        self.in_line = InLine(config, self.state, load_users(config), probes, self.refusals)
        self.wait_servers: list[WSGIServer] = []
        self.in_servers: list[InServer] = []
        self._serves_wait_line = True
        self._housekeeper: gevent.Greenlet | None = None

    def start(self, wait_line: bool = True, inherited: Listeners | None = None) -> None:
        """Listen on every WAIT_ADDR (unless ``wait_line`` is False) and IN_ADDR, and serve.

        With ``inherited`` (from a supervisor) the server serves those
        sockets instead of binding its own.
        """
        self._serves_wait_line = wait_line
        try:
            self.state.start()
        except StoreDown as exc:
            raise StartError(f"cannot use BACKEND {self.config.BACKEND}: {exc}") from None
        try:
            if wait_line:
                for addr, fd in self._listeners("WAIT_ADDR", inherited):
                    self.wait_servers.append(self._bind("WAIT_ADDR", addr, self._wait_server, fd))
            for addr, fd in self._listeners("IN_ADDR", inherited):
                self.in_servers.append(self._bind("IN_ADDR", addr, lambda listener: InServer(
                    listener, self.in_line), fd))
        except StartError:
            self.stop()
            raise
        self._housekeeper = gevent.spawn(self._housekeep)
        if self.metrics is not None:
            self.metrics.start()

    def not_ready(self) -> str | None:
        """Why the server cannot take work now (a line not accepting, the state), or None."""
        if not self.in_servers:
            return "not serving"
        for line, servers in (("WAIT", self.wait_servers), ("IN", self.in_servers)):
            if not all(server.accepting for server in servers):
                return f"the {line} line is not accepting connections (out of file descriptors)"
        return self.state.ready()

    def connection_counts(self) -> Iterator[tuple[str, str, str, int]]:
        """Open connections of each line this server runs: ``(line, engine, transport, count)``."""
        totals: dict[tuple[str, str, str], int] = {}
        for server in self.wait_servers:
            for transport, count in server.transport_counts().items():
                key = ("wait", server.engine, transport)
                totals[key] = totals.get(key, 0) + count
        for server in self.in_servers:
            key = ("in", server.engine, server.transport)
            totals[key] = totals.get(key, 0) + server.open_connections
        for (line, engine, transport), count in totals.items():
            yield line, engine, transport, count

    def listener_counts(self, listeners: int) -> Iterator[tuple[str, str, str, int]]:
        """The state's ``listeners`` waiting now, by ``(line, engine, transport, count)``:
        streams with a round waiting, and long polls (gunicorn's WSGI worker's, if it serves them)."""
        engine = self.config.WAIT_ENGINE if self._serves_wait_line else "gunicorn"
        streams = {"eventsource": 0, "websocket": 0}
        for server in self.wait_servers:
            for stream in server.streams:
                if stream.listening:
                    streams[stream.transport] += 1
        yield "wait", engine, "longpoll", max(0, listeners - sum(streams.values()))
        for transport, count in streams.items():
            yield "wait", engine, transport, count

    def _listeners(self, option: str, inherited: Listeners | None) -> list[tuple[str, int | None]]:
        configured = getattr(self.config, option)
        if inherited is None:
            return [(addr, None) for addr in configured]
        held = inherited[option]
        if tuple(addr for addr, _ in held) != configured:
            # The supervisor bound its sockets once, from the configuration it started with.
            log.warning("%s changed but takes effect only once realplexor is stopped and started; "
                        "serving %s", option, ", ".join(addr for addr, _ in held))
        return held

    def _wait_server(self, listener):
        if self.config.WAIT_ENGINE == "lean":
            return LeanWaitServer(listener, self.wait_line, self.state)
        return WaitServer(listener, self.wait_app, handler_class=LongPollHandler, log=None,
                          error_log=logging.getLogger("realplexor.wsgi"))

    def _bind(self, option: str, addr: str, make, fd: int | None = None):
        try:
            # Deferred accept suits the lean engine, which reads the request in
            # the accept callback; under the WSGI engine a burst of thousands of
            # connects left some unaccepted for over a minute, so it is not used.
            defer = option == "WAIT_ADDR" and self.config.WAIT_ENGINE == "lean"
            server = make(listen_socket(*parse_address(addr, option), defer_accept=defer, fd=fd,
                                        reuse_port=self.config.REUSE_PORT))
            server.start()
        except ConfigError as exc:
            raise StartError(str(exc)) from None
        except OSError as exc:
            raise StartError(f"cannot listen on {option} {addr}: {exc.strerror or exc}") from None
        line = "WAIT" if option == "WAIT_ADDR" else "IN"
        log.info("%s line listening on %s:%d", line, *server.address[:2])
        return server

    def _housekeep(self) -> None:
        while True:
            gevent.sleep(HOUSEKEEPING_INTERVAL)
            try:
                self.state.expire()
            except Exception:  # noqa: BLE001 - housekeeping must outlive a bug
                log.exception("housekeeping failed")

    def reload(self, config: Config) -> list[str]:
        """Take on ``config`` where possible; the options that need a restart."""
        pages = _load_pages(config)
        users = load_users(config)
        pending = [name for name in config.changed_from(self.config) if name in RESTART_ONLY]
        # Keep the running values of what cannot change now, so a later
        # reload still reports them as pending.
        config = dataclasses.replace(config, **{name: getattr(self.config, name) for name in pending})
        self.state.reconfigure(channel_settings(config))
        self.wait_line.reconfigure(config, pages)
        for server in self.wait_servers:
            if isinstance(server, LeanWaitServer):
                server.reconfigure()
        self.in_line.reconfigure(config, users)
        self.config = config
        return pending

    def stop(self, timeout: float = 1) -> None:
        """Close the listening sockets and end open connections."""
        if self._housekeeper is not None:
            self._housekeeper.kill(block=False)
            self._housekeeper = None
        if self.metrics is not None:
            self.metrics.stop()
        for server in self.wait_servers + self.in_servers:
            server.stop(timeout=timeout)
        self.wait_servers, self.in_servers = [], []
        self.state.stop()
