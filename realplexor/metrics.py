"""Metrics in the Prometheus text format, for ``GET /metrics`` on the IN line.

Nothing is counted through prometheus_client on the hot path: the
channel state and the engines keep plain integers (listeners, queued
bytes, publishes, open connections...) that they need or that cost one
addition, and :class:`ServerCollector` reads them when a scrape comes.
Each server has its own registry, so two servers in one process (the
tests) never share a figure. Process figures (memory, CPU, open files)
come from prometheus_client's ProcessCollector in that same registry.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Iterable, Iterator, Protocol

import gevent
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from .channels import ChannelState


#: The Content-Type of a scrape's answer.
CONTENT_TYPE = CONTENT_TYPE_LATEST
LAG_INTERVAL = 1.0


class Refusals:
    """Requests refused, counted by line and HTTP status (plain integers).

    ``{(line, status): count}``: line is ``"wait"`` or ``"in"``.
    """

    __slots__ = ("counts",)

    def __init__(self) -> None:
        self.counts: dict[tuple[str, int], int] = {}

    def count(self, line: str, status: int) -> None:
        """Count one request of ``line`` refused with ``status``."""
        key = (line, status)
        self.counts[key] = self.counts.get(key, 0) + 1


class LoopLag:
    """How late a timer fires: the event loop's lag, measured in a greenlet.

    Every ``interval`` seconds it sleeps ``interval`` and notes by how
    much more than that the sleep took: a callback that holds the loop
    (a big STATS, a slow hash) makes the timer fire late. ``seconds`` is
    NaN until the first measure.
    """

    def __init__(self, interval: float = LAG_INTERVAL, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = gevent.sleep):
        self.interval = interval
        self.seconds = math.nan
        self._clock = clock
        self._sleep = sleep
        self._greenlet: gevent.Greenlet | None = None

    def start(self) -> None:
        """Begin measuring."""
        self._greenlet = gevent.spawn(self.run)

    def stop(self) -> None:
        """Stop measuring."""
        if self._greenlet is not None:
            self._greenlet.kill(block=False)
            self._greenlet = None

    def run(self, rounds: int | None = None) -> None:
        """Measure ``rounds`` times (for ever when None)."""
        while rounds is None or rounds > 0:
            start = self._clock()
            self._sleep(self.interval)
            self.seconds = max(self._clock() - start - self.interval, 0.0)
            if rounds is not None:
                rounds -= 1


class Lines(Protocol):
    """What the collector reads of the running server besides its state."""

    state: ChannelState
    refusals: Refusals

    def connection_counts(self) -> Iterable[tuple[str, str, str, int]]:
        """Open connections: ``(line, engine, transport, count)``."""

    def listener_counts(self, listeners: int) -> Iterable[tuple[str, str, str, int]]:
        """The state's ``listeners`` waiting now: ``(line, engine, transport, count)``."""


class ServerCollector:
    """Reads a server's figures at scrape time (a prometheus_client collector)."""

    def __init__(self, lines: Lines, lag: LoopLag):
        self._lines = lines
        self._lag = lag

    def collect(self) -> Iterator[Metric]:
        """Every figure of the server, as metric families."""
        lines = self._lines
        counts = lines.state.counts()
        labels = ["line", "engine", "transport"]

        connections = GaugeMetricFamily("realplexor_connections", "Open client connections.", labels=labels)
        for line, engine, transport, count in lines.connection_counts():
            connections.add_metric([line, engine, transport], count)
        yield connections
        waiting = GaugeMetricFamily("realplexor_waiting_listeners",
                                    "Listeners waiting for a message: long polls parked, event streams "
                                    "and WebSockets listening.", labels=labels)
        for line, engine, transport, count in lines.listener_counts(counts.listeners):
            waiting.add_metric([line, engine, transport], count)
        yield waiting

        yield GaugeMetricFamily("realplexor_channels", "Channels with listeners in this process.",
                                value=counts.channels)
        yield GaugeMetricFamily("realplexor_online_channels",
                                "Channels online (listened now, or within OFFLINE_TIMEOUT of their last listener).",
                                value=counts.online)
        yield GaugeMetricFamily("realplexor_queued_channels", "Channels with queued messages.",
                                value=counts.queued_channels)
        yield GaugeMetricFamily("realplexor_queued_messages",
                                "Messages queued (one publish to several channels counts once).",
                                value=counts.queued_messages)
        yield GaugeMetricFamily("realplexor_queued_bytes", "Bytes of queued message data (each message once).",
                                value=counts.queued_bytes)

        yield CounterMetricFamily("realplexor_publishes", "Publishes carried out.", value=counts.publishes)
        yield CounterMetricFamily("realplexor_deliveries",
                                  "Answers with messages handed to waiting requests, or given at once from the queues.",
                                  value=counts.deliveries)
        yield CounterMetricFamily("realplexor_delivered_bytes", "Body bytes of those answers.",
                                  value=counts.delivered_bytes)
        yield CounterMetricFamily("realplexor_queues_dropped",
                                  "Channel queues emptied because all queued data passed MAX_QUEUE_MB.",
                                  value=counts.queues_dropped)

        refused = CounterMetricFamily("realplexor_requests_refused",
                                      "Requests answered with an error, by line and HTTP status.",
                                      labels=["line", "status"])
        for (line, status), count in sorted(lines.refusals.counts.items()):
            refused.add_metric([line, str(status)], count)
        yield refused

        yield GaugeMetricFamily("realplexor_event_loop_lag_seconds",
                                f"How late a {self._lag.interval:g} s timer fired last (NaN before the first).",
                                value=self._lag.seconds)


class Metrics:
    """A server's metrics: its own registry, the loop-lag timer, the exposition."""

    def __init__(self, lines: Lines):
        self.lag = LoopLag()
        self.registry = CollectorRegistry()
        self.registry.register(ServerCollector(lines, self.lag))
        ProcessCollector(registry=self.registry)

    def start(self) -> None:
        """Begin measuring the loop's lag."""
        self.lag.start()

    def stop(self) -> None:
        """Stop measuring."""
        self.lag.stop()

    def render(self) -> bytes:
        """Every metric in the Prometheus text format (a scrape's body)."""
        return generate_latest(self.registry)
