"""Process life: run until a signal says stop, reload on SIGHUP, drop root.

Signal handlers only queue the signal; the main greenlet handles each in
a short ``handle_*`` method.
"""
from __future__ import annotations

import logging
import os
import pwd
import signal
from collections import deque

import gevent
from gevent.event import Event

from .config import Config, ConfigError, load_config
from .server import Realplexor, StartError

log = logging.getLogger("realplexor")

VERBOSE = 15
_LEVELS = {0: logging.ERROR, 1: logging.INFO, 2: VERBOSE, 3: logging.DEBUG}
_SIGNALS = {signal.SIGTERM: "term", signal.SIGINT: "int", signal.SIGHUP: "hup"}


def configure_logging(verbosity: int) -> None:
    """Log to stderr at the level VERBOSITY asks for (0 silent .. 3 chatty)."""
    logging.addLevelName(VERBOSE, "VERBOSE")
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(
            "%(asctime)s realplexor[%(process)d] %(levelname)s %(message)s"))
        root.addHandler(handler)
    root.setLevel(_LEVELS[verbosity])


def drop_privileges(user: str) -> None:
    """Become ``user`` when running as root (after the ports are bound)."""
    if not user or os.geteuid() != 0:
        return
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise StartError(f"SU_USER {user!r} is not a user on this system") from None
    os.setgroups([])
    os.initgroups(user, entry.pw_gid)
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)
    log.info("running as user %s", user)


class Daemon:
    """One server process: start, serve until told to stop, reload on HUP."""

    def __init__(self, config: Config, config_path: str | None = None):
        self.config = config
        self.config_path = config_path
        self.server = Realplexor(config)
        self._signals: deque[str] = deque()
        self._wakeup = Event()

    def run(self) -> int:
        """Serve until SIGTERM or SIGINT; the exit status."""
        # Handlers first: a signal that comes while binding is queued, not fatal.
        handlers = [gevent.signal_handler(signum, self._queue, name)
                    for signum, name in _SIGNALS.items()]
        try:
            self.server.start()
            try:
                drop_privileges(self.config.SU_USER)
            except OSError as exc:
                raise StartError(f"cannot become SU_USER {self.config.SU_USER}: {exc}") from None
            log.info("realplexor started (pid %d)", os.getpid())
            while True:
                self._wakeup.wait()
                self._wakeup.clear()
                while self._signals:
                    if getattr(self, f"handle_{self._signals.popleft()}")():
                        return 0
        finally:
            for handler in handlers:
                handler.cancel()
            self.server.stop()
            log.info("realplexor stopped")

    def _queue(self, name: str) -> None:
        self._signals.append(name)
        self._wakeup.set()

    def handle_term(self) -> bool:
        """SIGTERM: stop."""
        log.info("SIGTERM received, stopping")
        return True

    def handle_int(self) -> bool:
        """SIGINT (Ctrl-C): stop."""
        log.info("SIGINT received, stopping")
        return True

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
