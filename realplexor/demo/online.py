"""The online list: which chat channels browsers listen to, pushed to every page.

A thread asks the server ``ONLINE`` (with the sandbox's namespace) about
once a second and, when the answer changed, publishes the new list to the
reserved channel ``ONLINE_ID``, to which every page listens. Pages that
open later ask ``GET /api/online`` once for the current list.
"""
from __future__ import annotations

import logging
import threading
import time

from ..client import Realplexor, RealplexorError
from .messages import ONLINE_ID

log = logging.getLogger("realplexor.demo")


class OnlineList:
    """Follows the server's ONLINE answer and publishes each change.

    A browser's poll ends whenever a message reaches it, and the next one
    opens a few milliseconds later; an ONLINE taken in between would count
    that browser out of every channel it listens to. Each reading is
    therefore the highest count of a few samples taken close together,
    so those gaps do not show as changes (and do not make every page
    reconnect for nothing).
    """

    def __init__(self, client: Realplexor, interval: float = 1.0,
                 samples: int = 3, sample_gap: float = 0.05):
        self.client = client
        self.interval = interval
        self.samples = samples
        self.sample_gap = sample_gap
        self._lock = threading.Lock()
        # {"version": n, "channels": {name: listener count, ...}}; n grows by one per change
        self._snapshot: dict = {"version": 0, "channels": {}}
        self._published: dict[str, int] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def snapshot(self) -> dict:
        """The latest list as pages get it: ``{"version": n, "channels": {id: count}}``."""
        with self._lock:
            return {"version": self._snapshot["version"],
                    "channels": dict(self._snapshot["channels"])}

    def read(self) -> dict[str, int]:
        """Online chat channels and their listener counts, gaps between polls smoothed out."""
        counts: dict[str, int] = {}
        for sample in range(self.samples):
            if sample:
                time.sleep(self.sample_gap)
            for name, count in self.client.online_with_counters().items():
                if name != ONLINE_ID:
                    counts[name] = max(count, counts.get(name, 0))
        return dict(sorted(counts.items()))

    def refresh(self) -> bool:
        """Read the list once and publish it if it changed; whether it did."""
        channels = self.read()
        with self._lock:
            if channels != self._snapshot["channels"]:
                self._snapshot = {"version": self._snapshot["version"] + 1, "channels": channels}
            snapshot = {"version": self._snapshot["version"], "channels": dict(channels)}
        if channels == self._published:
            return False
        self.client.send(ONLINE_ID, snapshot)
        self._published = channels
        return True

    def start(self) -> None:
        """Follow the server on a daemon thread until stop()."""
        self._thread = threading.Thread(target=self._run, name="online-list", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        failing = False
        while not self._stop.is_set():
            try:
                self.refresh()
                if failing:
                    log.warning("Realplexor answers again; the online list is live")
                failing = False
            except (RealplexorError, OSError) as exc:
                if not failing:
                    log.warning("cannot follow the online list: %s", exc)
                failing = True
                self._published = None   # publish afresh once the server is back
            self._stop.wait(self.interval)
