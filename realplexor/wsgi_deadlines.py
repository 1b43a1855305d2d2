"""The WSGI engine's deadlines, swept together instead of timed one by one.

A kept-alive poll used to start up to four ``gevent.Timeout`` objects per
request (the request must arrive, the poll's WAIT_TIMEOUT, its answer
must be taken, the next request must begin), each with a libev timer
started and stopped: about 2 us and 300 bytes apiece. Every kind of
deadline has one fixed length, so the order they are set in is the order
they come due (:class:`~realplexor.deadlines.Deadlines`: O(1) to set and
cancel), and one sweeper every :data:`SWEEP_INTERVAL` seconds ends the
due ones, as on the lean engine. A deadline may so run out up to that
much late.
"""
from __future__ import annotations

import time
from typing import Protocol

from gevent import getcurrent
from gevent.hub import get_hub

from .deadlines import Deadlines
from .eventloop import Sweeper

SWEEP_INTERVAL = 0.25


class RequestTimedOut(BaseException):
    """Raised in a handler's greenlet: the request did not arrive whole in time.

    A BaseException, so that pywsgi's handling of broken requests does
    not take it for one.
    """


class AnswerNotTaken(BaseException):
    """Raised in a handler's greenlet: the client did not take an answer in time."""


class IdleTooLong(BaseException):
    """Raised in a handler's greenlet: a kept-alive connection's next request did not begin in time."""


class _Entered:
    """One greenlet inside one section with a deadline; ``greenlet`` is None once it has left."""

    __slots__ = ("greenlet",)

    def __init__(self, greenlet) -> None:
        self.greenlet = greenlet


class Expiry:
    """One kind of deadline: ``exception`` is thrown into a greenlet still inside its section in time.

    ``entered = expiry.enter(seconds)``, then ``expiry.leave(entered)`` in
    a ``finally``. The exception is thrown from the event loop, as a
    ``gevent.Timeout`` would throw it, and only while the greenlet has
    not left.
    """

    __slots__ = ("_due", "_exception")

    def __init__(self, exception: type[BaseException]):
        # entered sections -> when they run out
        self._due: Deadlines[_Entered] = Deadlines()
        self._exception = exception

    def enter(self, seconds: float) -> _Entered:
        entered = _Entered(getcurrent())
        self._due.set(entered, time.monotonic() + seconds)
        return entered

    def leave(self, entered: _Entered) -> None:
        entered.greenlet = None
        self._due.cancel(entered)

    def sweep(self, now: float) -> None:
        due = list(self._due.pop_due(now))
        if due:
            run_callback = get_hub().loop.run_callback
            for entered in due:
                run_callback(self._throw, entered)

    def _throw(self, entered: _Entered) -> None:
        greenlet, entered.greenlet = entered.greenlet, None
        if greenlet is not None and not greenlet.dead:
            greenlet.throw(self._exception())

    def __len__(self) -> int:
        return len(self._due)


class Expirable(Protocol):
    """A parked poll, as its WAIT_TIMEOUT sees it."""

    def expire(self) -> None: ...


class ConnectionDeadlines:
    """Every deadline of the WSGI engine's connections, and their sweeper.

    The sweeper starts with the first deadline set (in the thread of the
    event loop that serves the connections).
    """

    def __init__(self) -> None:
        self.request = Expiry(RequestTimedOut)
        self.write = Expiry(AnswerNotTaken)
        self.idle = Expiry(IdleTooLong)
        # parked polls -> when WAIT_TIMEOUT ends their wait
        self.polls: Deadlines[Expirable] = Deadlines()
        self._sweeper: Sweeper | None = None

    def start(self) -> None:
        """Begin sweeping (once; later calls do nothing)."""
        if self._sweeper is None:
            self._sweeper = Sweeper(self._sweep, SWEEP_INTERVAL, "WSGI WAIT engine")
            self._sweeper.start()

    def stop(self) -> None:
        """Stop sweeping."""
        if self._sweeper is not None:
            self._sweeper.stop()
            self._sweeper = None

    def _sweep(self, now: float) -> None:
        self.request.sweep(now)
        self.write.sweep(now)
        self.idle.sweep(now)
        for poll in list(self.polls.pop_due(now)):
            poll.expire()
