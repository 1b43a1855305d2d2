"""Process life: signals, reload, pidfile, privileges, file limit, memory guard.

Signal handlers only queue the signal; the main greenlet handles each in
a short ``handle_*`` method.
"""
from __future__ import annotations

import ctypes
import gc
import logging
import os
import pwd
import resource
import signal
from collections import deque
from typing import Callable

import gevent
from gevent.event import Event

from .config import LOG_LEVELS, VERBOSE, Config, ConfigError, load_config
from .handoff import Handoff
from .server import Realplexor, StartError

log = logging.getLogger("realplexor")

_SIGNALS = {signal.SIGTERM: "term", signal.SIGINT: "int", signal.SIGHUP: "hup"}
# File descriptors the server needs besides its connections.
_SPARE_FILES = 64
MEMORY_CHECK_INTERVAL = 1.0
GC_THRESHOLDS = (50_000, 50, 100)
_PR_SET_PDEATHSIG = 1


class Restart(Exception):
    """The server asks to be started afresh (the memory guard fired)."""


def configure_logging(verbosity: int) -> None:
    """Log to stderr at the level VERBOSITY asks for (0 silent .. 3 chatty)."""
    logging.addLevelName(VERBOSE, "VERBOSE")
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(
            "%(asctime)s realplexor[%(process)d] %(levelname)s %(message)s"))
        root.addHandler(handler)
    root.setLevel(LOG_LEVELS[verbosity])


def tune_gc() -> None:
    """Keep the cyclic garbage collector from pausing under many waiting polls.

    Each parked poll is a handful of long-lived objects; with the default
    thresholds a broadcast to 10000 polls triggers full collections of
    100+ ms in the middle of the fan-out. Objects alive after start are
    frozen out of collection, and collections run far less often (cycles
    are rare here: requests are plain objects freed by reference counting).
    """
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def raise_file_limit() -> int:
    """Raise the soft open-files limit to the hard one; the limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-files limit from %d to %d: %s", soft, hard, exc)
    log.info("open-files limit %d: room for about %d connections", soft, max(soft - _SPARE_FILES, 0))
    return soft


def drop_privileges(user: str) -> None:
    """Become ``user`` when running as root (after the ports are bound)."""
    if not user or os.geteuid() != 0:
        return
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise StartError(f"SU_USER {user!r} is not a user on this system") from None
    try:
        os.setgroups([])
        os.initgroups(user, entry.pw_gid)
        os.setgid(entry.pw_gid)
        os.setuid(entry.pw_uid)
    except OSError as exc:
        raise StartError(f"cannot become SU_USER {user}: {exc}") from None
    log.info("running as user %s", user)


class PidFile:
    """A file holding this process's pid while it serves."""

    def __init__(self, path: str, pid: int | None = None):
        self.path = path
        self.pid = pid or os.getpid()

    def check_free(self) -> None:
        """StartError if the file names another live process."""
        try:
            with open(self.path) as fh:
                pid = int(fh.read().strip() or 0)
        except (OSError, ValueError):
            return
        if pid and pid != self.pid and _alive(pid):
            raise StartError(f"already running: pid {pid} in {self.path}")

    def write(self) -> None:
        """Write the pid (after binding)."""
        try:
            with open(self.path, "w") as fh:
                fh.write(f"{self.pid}\n")
        except OSError as exc:
            raise StartError(f"cannot write pidfile {self.path}: {exc.strerror}") from None

    def remove(self) -> None:
        """Remove the file if it still holds the pid written."""
        try:
            with open(self.path) as fh:
                if fh.read().strip() == str(self.pid):
                    os.unlink(self.path)
        except OSError:
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def end_with_parent() -> None:
    """Have the kernel send SIGTERM when the supervisor dies (Linux).

    A supervisor killed outright would otherwise leave its server running
    and holding the ports, and the next start would fail.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def resident_mb() -> float:
    """This process's resident memory in MB."""
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    return pages * resource.getpagesize() / (1024 * 1024)


class MemoryGuard:
    """Calls ``on_exceeded`` once when the process grows past ``limit_mb``.

    It runs in a supervised server: the supervisor starts a fresh one.
    """

    def __init__(self, limit_mb: int, on_exceeded: Callable[[float], None],
                 measure: Callable[[], float] = resident_mb):
        self.limit_mb = limit_mb
        self._on_exceeded = on_exceeded
        self._measure = measure
        self._greenlet = gevent.spawn(self._watch)

    def _watch(self) -> None:
        while True:
            gevent.sleep(MEMORY_CHECK_INTERVAL)
            used = self._measure()
            if used > self.limit_mb:
                self._on_exceeded(used)
                return

    def stop(self) -> None:
        """Stop watching."""
        self._greenlet.kill(block=False)


class Daemon:
    """One server process: start, serve until told to stop, reload on HUP.

    With a ``handoff`` it runs under the supervisor: it serves the sockets
    handed to it, says when it serves, ends with the supervisor, and
    watches MAX_MEM_MB. The supervisor keeps the pidfile then.
    """

    def __init__(self, config: Config, config_path: str | None = None,
                 pidfile: str | None = None, handoff: Handoff | None = None):
        self.config = config
        self.config_path = config_path
        self.handoff = handoff
        self.pidfile = PidFile(pidfile) if pidfile else None
        if self.pidfile:
            self.pidfile.check_free()
        self.server = Realplexor(config)
        self._signals: deque[str] = deque()
        self._wakeup = Event()

    def run(self) -> int:
        """Serve until SIGTERM or SIGINT; the exit status. Raises Restart."""
        if self.handoff:
            end_with_parent()
        # Handlers first: a signal that comes while binding is queued, not fatal.
        handlers = [gevent.signal_handler(signum, self._queue, name)
                    for signum, name in _SIGNALS.items()]
        guard = None
        started = False
        try:
            raise_file_limit()
            self.server.start(inherited=self.handoff.listeners if self.handoff else None)
            started = True
            tune_gc()
            if self.pidfile:
                self.pidfile.write()
            drop_privileges(self.config.SU_USER)
            if self.handoff and self.config.MAX_MEM_MB:
                guard = MemoryGuard(self.config.MAX_MEM_MB, self._memory_exceeded)
            if self.handoff:
                # Before the log line, so that a server killed right after
                # it still counts as one that served.
                self.handoff.notify_ready()
            log.info("realplexor started (pid %d)", os.getpid())
            while True:
                self._wakeup.wait()
                self._wakeup.clear()
                while self._signals:
                    if getattr(self, f"handle_{self._signals.popleft()}")():
                        return 0
        finally:
            if guard is not None:
                guard.stop()
            for handler in handlers:
                handler.cancel()
            self.server.stop()
            if self.pidfile:
                self.pidfile.remove()
            if started:
                log.info("realplexor stopped")

    def _queue(self, name: str) -> None:
        self._signals.append(name)
        self._wakeup.set()

    def _memory_exceeded(self, used_mb: float) -> None:
        log.warning("memory %.0f MB is over MAX_MEM_MB %d: restarting", used_mb, self.config.MAX_MEM_MB)
        self._queue("restart")

    def handle_term(self) -> bool:
        """SIGTERM: stop."""
        log.info("SIGTERM received, stopping")
        return True

    def handle_int(self) -> bool:
        """SIGINT (Ctrl-C): stop."""
        log.info("SIGINT received, stopping")
        return True

    def handle_restart(self) -> bool:
        """The memory guard fired: stop, and have the process started afresh."""
        raise Restart()

    def handle_hup(self) -> bool:
        """SIGHUP: re-read the configuration and take on what can change live."""
        try:
            config = load_config(self.config_path)
            pending = self.server.reload(config)
        except (ConfigError, StartError) as exc:
            log.error("reload failed, keeping the running configuration: %s", exc)
            return False
        configure_logging(config.VERBOSITY)
        self.config = self.server.config
        log.info("configuration reloaded from %s", self.config_path or "built-in defaults")
        if pending:
            log.warning("reload: %s changed but take effect only after a restart",
                        ", ".join(pending))
        return False
