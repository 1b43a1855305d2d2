"""How clients' mistakes reach the log: escaped, cut short, rate-limited.

A bad request is the client's fault, not the server's: it is logged at
INFO, never at ERROR. The client's bytes appear escaped (printable ASCII
only: no control characters, no line breaks) and cut to about
:data:`EXCERPT` characters. However many bad requests come, at most
:data:`LINES_PER_WINDOW` such lines are written per :data:`WINDOW`
seconds, then one line says how many more were left out.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

import gevent

EXCERPT = 150
LINES_PER_WINDOW = 10
WINDOW = 1.0

# Control characters (and DEL) as backslash escapes; str.translate leaves the rest.
_CONTROL = {code: f"\\x{code:02x}" for code in (*range(0x20), 0x7f)}
_CONTROL.update({ord("\t"): "\\t", ord("\n"): "\\n", ord("\r"): "\\r"})
# How long an escape is, by the letter after its backslash (\t, \n, \r: 2).
_ESCAPE_LEN = {"x": 4, "u": 6, "U": 10}


def escape(data: bytes | bytearray | str, limit: int = EXCERPT) -> str:
    """``data`` as printable ASCII, at most ``limit`` characters and "..." if cut.

    Bytes are read as Latin-1; control and non-ASCII characters become
    backslash escapes (``\\r``, ``\\x00``, ``\\xff``, ``\\u20ac``), never
    cut in half.
    """
    text = bytes(data).decode("latin-1") if isinstance(data, (bytes, bytearray)) else data
    # Escaping never shortens: the first ``limit`` characters are enough.
    shown = text[:limit].translate(_CONTROL).encode("ascii", "backslashreplace").decode("ascii")
    if len(shown) <= limit and len(text) <= limit:
        return shown
    shown = shown[:limit]
    last = shown.rfind("\\", max(len(shown) - 10, 0))
    if last >= 0 and last + _ESCAPE_LEN.get(shown[last + 1:last + 2], 2) > len(shown):
        shown = shown[:last]
    return shown + "..."


def peer(address: object) -> str:
    """A client's address as ``host:port``."""
    return f"{address[0]}:{address[1]}" if isinstance(address, tuple) else str(address or "-")


class BadRequestLog:
    """Writes lines about bad requests, at most ``lines`` per ``window`` seconds.

    The lines past that are counted, and one summary line at the end of
    the window says how many there were, so a flood of bad requests
    cannot fill the disk. ``later(delay, function)`` schedules the
    summary (a gevent timer by default); ``clock`` gives the time.
    """

    def __init__(self, logger: logging.Logger, lines: int = LINES_PER_WINDOW, window: float = WINDOW,
                 level: int = logging.INFO, clock: Callable[[], float] = time.monotonic,
                 later: Callable[[float, Callable[[], None]], object] = gevent.spawn_later):
        self._logger = logger
        self._lines = lines
        self._window = window
        self._level = level
        self._clock = clock
        self._later = later
        self._window_end = float("-inf")
        self._written = 0       # lines written in the current window
        self._suppressed = 0    # lines left out since the last summary

    def log(self, msg: str, *args: object) -> None:
        """Log ``msg % args``, unless this window's lines are spent.

        Client bytes in ``args`` must have gone through :func:`escape`.
        """
        if not self._logger.isEnabledFor(self._level):
            return
        now = self._clock()
        if now >= self._window_end:
            self.summarise()
            self._window_end = now + self._window
            self._written = 0
        if self._written < self._lines:
            self._written += 1
            self._logger.log(self._level, msg, *args)
            return
        if not self._suppressed:
            self._later(self._window_end - now, self.summarise)
        self._suppressed += 1

    def summarise(self) -> None:
        """Log how many lines were left out since the last summary, if any."""
        if self._suppressed:
            count, self._suppressed = self._suppressed, 0
            self._logger.log(self._level, "%d more bad requests suppressed in the last %g s",
                             count, self._window)


# One per process: the limit holds for both lines and every connection.
_bad_requests = BadRequestLog(logging.getLogger("realplexor.client"))


def bad_request(msg: str, *args: object) -> None:
    """Log a line about a client's bad request: at INFO, rate-limited.

    Pass the client's bytes through :func:`escape` first.
    """
    _bad_requests.log(msg, *args)
