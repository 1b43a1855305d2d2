"""The supervisor: holds the listening sockets and keeps one server serving on them.

Used when MAX_MEM_MB is set. The supervisor binds every WAIT_ADDR and
IN_ADDR once (as root when started as root, so privileged ports work and
each server can drop to SU_USER) and starts the server as a child
process that inherits those sockets (see ``handoff``). When the server
dies without being asked to, a fresh one is started on the same sockets:
connections made meanwhile wait in the listen backlog and are served by
the new process.

Signal handlers only queue the signal; ``signal.set_wakeup_fd`` wakes the
main loop, which handles each signal in a short ``handle_*`` method,
notes when the server serves, reaps it and starts the next one.
"""
from __future__ import annotations

import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections import deque

from .config import Config, ConfigError, parse_address
from .handoff import ENV, LINE_OPTIONS, RESTART_STATUS, Handoff, Listeners
from .lifecycle import PidFile
from .server import StartError, bind_listener

log = logging.getLogger("realplexor")

_SIGNALS = {signal.SIGTERM: "term", signal.SIGINT: "int", signal.SIGHUP: "hup",
            signal.SIGCHLD: "chld"}
# A server still running this long after SIGTERM is killed.
STOP_TIMEOUT = 10.0
# The loop wakes at least this often even if no signal reaches it.
_MAX_SLEEP = 1.0
# How a server told to stop may end without that being an error.
_STOPPED = (0, -signal.SIGTERM, -signal.SIGINT, -signal.SIGKILL)


class Backoff:
    """The delay before each restart: none for the first, then doubling to a cap.

    With the defaults: 0, 0.5, 1, 2, 4, 8, 16, 30, 30 ... seconds. A server
    that served ``healthy_after`` seconds before it died starts the
    sequence afresh, so only deaths in quick succession are slowed down.
    """

    def __init__(self, first: float = 0.5, cap: float = 30.0, healthy_after: float = 10.0):
        self.first = first
        self.cap = cap
        self.healthy_after = healthy_after
        self._repeats = 0

    def delay(self, served_for: float) -> float:
        """Seconds to wait before replacing a server that served ``served_for`` seconds."""
        if served_for >= self.healthy_after:
            self._repeats = 0
        repeats = self._repeats
        self._repeats = min(repeats + 1, 64)
        return 0.0 if repeats == 0 else min(self.first * 2 ** (repeats - 1), self.cap)


def describe_exit(status: int) -> str:
    """How a server process ended, from its ``Popen.returncode``."""
    if status == RESTART_STATUS:
        return "exited over MAX_MEM_MB"
    if status < 0:
        try:
            name = signal.Signals(-status).name
        except ValueError:
            name = f"signal {-status}"
        return f"was killed by {name}"
    return f"exited with status {status}"


def exit_status(status: int) -> int:
    """A child's ``Popen.returncode`` as a shell would report it (128 + signal)."""
    return status if status >= 0 else 128 - status


def bind_all(config: Config) -> dict[str, list[tuple[str, socket.socket]]]:
    """Bind every WAIT_ADDR and IN_ADDR; StartError naming the first that fails."""
    held: dict[str, list[tuple[str, socket.socket]]] = {option: [] for option in LINE_OPTIONS}
    try:
        for option in LINE_OPTIONS:
            for addr in getattr(config, option):
                try:
                    held[option].append((addr, bind_listener(*parse_address(addr, option), config.REUSE_PORT)))
                except ConfigError as exc:
                    raise StartError(str(exc)) from None
                except OSError as exc:
                    raise StartError(f"cannot listen on {option} {addr}: {exc.strerror or exc}") from None
    except StartError:
        close_all(held)
        raise
    return held


def close_all(held: dict[str, list[tuple[str, socket.socket]]]) -> None:
    """Close sockets from ``bind_all``."""
    for pairs in held.values():
        for _, sock in pairs:
            sock.close()


class ServerProcess:
    """One server process started on the held sockets; it says when it serves."""

    def __init__(self, argv: list[str], listeners: Listeners):
        ready_r, ready_w = os.pipe()
        handoff = Handoff(listeners, ready_w)
        try:
            self.popen = subprocess.Popen([sys.executable, "-m", "realplexor", *argv],
                                          env={**os.environ, ENV: handoff.encode()},
                                          pass_fds=handoff.fds())
        except BaseException:
            os.close(ready_r)
            raise
        finally:
            os.close(ready_w)
        self.pid = self.popen.pid
        # The read end until the server's word (or its death) is read, then None.
        self.ready_fd: int | None = ready_r
        self.ready_at: float | None = None

    def read_ready(self) -> bool:
        """Read the readiness pipe once it is readable; True if the server now serves."""
        if self.ready_fd is None:
            return False
        word = os.read(self.ready_fd, 1)
        self.close()
        if word:
            self.ready_at = time.monotonic()
        return bool(word)

    def served_for(self) -> float:
        """Seconds since the server said it serves (0 if it never did)."""
        return time.monotonic() - self.ready_at if self.ready_at is not None else 0.0

    def poll(self) -> int | None:
        """The exit status once the process has ended (reaping it), else None."""
        return self.popen.poll()

    def signal(self, signum: int) -> None:
        """Send ``signum`` if the process still runs."""
        if self.popen.poll() is None:
            self.popen.send_signal(signum)

    def close(self) -> None:
        """Close the readiness pipe."""
        if self.ready_fd is not None:
            os.close(self.ready_fd)
            self.ready_fd = None


class Supervisor:
    """Holds the listening sockets and keeps one server process serving on them.

    - A server that dies without being asked to (any non-zero exit status,
      RESTART_STATUS from the memory guard included, or death by any
      signal) is replaced on the same sockets, after the Backoff delay,
      with one log line naming the cause.
    - If the first server exits with an error before it serves (an
      unreadable USERS_FILE, an unknown SU_USER...), the supervisor gives
      up with that status: nothing was ever served. A later server that
      fails to start (a configuration broken since) is retried with the
      back-off, as is one killed by a signal.
    - A server that exits with status 0 was stopped on purpose (SIGTERM sent
      to it directly): the supervisor stops too.
    - SIGTERM and SIGINT stop the server, then the supervisor (status 0);
      SIGHUP is passed on to the server once it serves.
    - The pidfile names the supervisor, written once the first server serves.
    """

    def __init__(self, config: Config, argv: list[str], pidfile: str | None = None,
                 backoff: Backoff | None = None):
        self.config = config
        self.argv = argv
        self.pidfile = PidFile(pidfile) if pidfile else None
        self.backoff = backoff or Backoff()
        self._sockets: dict[str, list[tuple[str, socket.socket]]] = {}
        self._signals: deque[str] = deque()
        self._server: ServerProcess | None = None
        self._served = False
        self._stopping = False
        self._hup_pending = False
        self._restart_at: float | None = None
        self._stop_deadline: float | None = None
        self._wake_r = self._wake_w = -1

    def run(self) -> int:
        """Supervise until told to stop (0) or until the first server fails to start (its status)."""
        if self.pidfile:
            self.pidfile.check_free()
        self._sockets = bind_all(self.config)
        previous = self._install_signals()
        try:
            log.info("supervisor started (pid %d): a fresh server replaces one that dies",
                     os.getpid())
            self._start_server()
            while True:
                self._sleep()
                status = self._step()
                if status is not None:
                    return status
        finally:
            if self._server is not None:
                self._server.signal(signal.SIGTERM)
                self._server.close()
            self._restore_signals(previous)
            close_all(self._sockets)
            if self.pidfile:
                self.pidfile.remove()

    # -- the loop --------------------------------------------------------------

    def _sleep(self) -> None:
        now = time.monotonic()
        timeout = _MAX_SLEEP
        for due in (self._restart_at, self._stop_deadline):
            if due is not None:
                timeout = min(timeout, max(due - now, 0.0))
        watched = [self._wake_r]
        if self._server is not None and self._server.ready_fd is not None:
            watched.append(self._server.ready_fd)
        readable, _, _ = select.select(watched, [], [], timeout)
        if self._wake_r in readable:
            self._drain_wakeup()
        if self._server is not None and self._server.ready_fd in readable:
            self._read_ready(self._server)

    def _step(self) -> int | None:
        """Handle what woke the loop; the exit status once the supervisor is done."""
        while self._signals:
            getattr(self, f"handle_{self._signals.popleft()}")()
        if self._server is not None:
            status = self._server.poll()
            if status is not None:
                done = self._server_ended(self._server, status)
                if done is not None:
                    return done
            elif self._stop_deadline is not None and time.monotonic() >= self._stop_deadline:
                log.warning("server %d did not stop within %g s; killing it",
                            self._server.pid, STOP_TIMEOUT)
                self._server.signal(signal.SIGKILL)
                self._stop_deadline = None
        if self._server is None:
            if self._stopping:
                return 0
            if self._restart_at is not None and time.monotonic() >= self._restart_at:
                self._start_server()
        return None

    def _start_server(self) -> None:
        self._restart_at = None
        listeners = {option: [(addr, sock.fileno()) for addr, sock in pairs]
                     for option, pairs in self._sockets.items()}
        try:
            self._server = ServerProcess(self.argv, listeners)
        except OSError as exc:
            if not self._served:
                raise StartError(f"cannot start the server process: {exc.strerror or exc}") from None
            delay = max(self.backoff.delay(0.0), self.backoff.first)
            log.error("cannot start a server process: %s; trying again in %g s",
                      exc.strerror or exc, delay)
            self._restart_at = time.monotonic() + delay

    def _read_ready(self, server: ServerProcess) -> None:
        if not server.read_ready():
            return
        if not self._served:
            self._served = True
            if self.pidfile:
                self.pidfile.write()
        if self._hup_pending:
            self._hup_pending = False
            server.signal(signal.SIGHUP)

    def _server_ended(self, server: ServerProcess, status: int) -> int | None:
        """Decide what a server's end means; the supervisor's exit status when it is done."""
        # The process is gone, so reading its pipe cannot block: a word written
        # just before it died still counts.
        self._read_ready(server)
        server.close()
        self._server = None
        if self._stopping:
            return 0 if status in _STOPPED else exit_status(status)
        if status == 0:
            log.info("server %d stopped on its own; stopping too", server.pid)
            return 0
        served = server.ready_at is not None
        if not served and not self._served and status > 0:
            # Status 1 comes with the server's own line saying why.
            if status != 1:
                log.error("server %d %s before it served; giving up", server.pid, describe_exit(status))
            return status
        delay = self.backoff.delay(server.served_for())
        log.warning("server %d %s%s; starting a fresh one%s", server.pid, describe_exit(status),
                    "" if served else " before it served", f" in {delay:g} s" if delay else "")
        self._restart_at = time.monotonic() + delay
        return None

    # -- signals ---------------------------------------------------------------

    def _install_signals(self) -> tuple[int, dict]:
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        previous_fd = signal.set_wakeup_fd(self._wake_w)
        handlers = {signum: signal.signal(signum, self._queue) for signum in _SIGNALS}
        return previous_fd, handlers

    def _restore_signals(self, previous: tuple[int, dict]) -> None:
        previous_fd, handlers = previous
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        signal.set_wakeup_fd(previous_fd)
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _queue(self, signum: int, _frame) -> None:
        self._signals.append(_SIGNALS[signum])

    def _drain_wakeup(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def handle_term(self) -> None:
        """SIGTERM: stop the server, then the supervisor."""
        self._stop(signal.SIGTERM)

    def handle_int(self) -> None:
        """SIGINT (Ctrl-C): stop the server, then the supervisor."""
        self._stop(signal.SIGINT)

    def handle_hup(self) -> None:
        """SIGHUP: have the server reload its configuration."""
        if self._server is None:
            log.info("SIGHUP received between servers: the next one reads the configuration afresh")
        elif self._server.ready_at is None:
            # Sent now it could kill a server not yet handling signals.
            self._hup_pending = True
        else:
            self._server.signal(signal.SIGHUP)

    def handle_chld(self) -> None:
        """SIGCHLD: nothing to do here; every turn of the loop reaps the server."""

    def _stop(self, signum: int) -> None:
        log.info("%s received, stopping", signal.Signals(signum).name)
        self._stopping = True
        self._restart_at = None
        if self._server is not None:
            self._server.signal(signum)
            if self._stop_deadline is None:
                self._stop_deadline = time.monotonic() + STOP_TIMEOUT
