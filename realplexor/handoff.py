"""What the supervisor hands to each server it starts, and what it hears back.

The supervisor binds the listening sockets once and passes them to every
server process it starts, so that connections made while one server
replaces another wait in the listen backlog instead of being refused.
The server says on a pipe when it serves, and asks for a fresh process
by exiting with RESTART_STATUS.

The hand-off travels in one environment variable holding JSON::

    {"listeners": {"WAIT_ADDR": [["127.0.0.1:8088", 3]],   # option -> [(address, fd)]
                   "IN_ADDR": [["127.0.0.1:10010", 4]]},
     "ready_fd": 5}                                        # write end of the pipe
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import MutableMapping

ENV = "REALPLEXOR_HANDOFF"
# The exit status of a server that asks to be replaced (the memory guard fired).
RESTART_STATUS = 75
LINE_OPTIONS = ("WAIT_ADDR", "IN_ADDR")

# option -> [(configured address, inherited file descriptor), ...] in config order
Listeners = dict[str, list[tuple[str, int]]]


class HandoffError(Exception):
    """The hand-off variable is there but unusable."""


@dataclass(frozen=True)
class Handoff:
    """The listening sockets and the readiness pipe a supervised server inherits."""

    listeners: Listeners
    ready_fd: int

    def fds(self) -> list[int]:
        """Every descriptor the server process must inherit."""
        return [fd for pairs in self.listeners.values() for _, fd in pairs] + [self.ready_fd]

    def encode(self) -> str:
        """The value of the ENV variable."""
        return json.dumps({"listeners": self.listeners, "ready_fd": self.ready_fd})

    @classmethod
    def take_from(cls, environ: MutableMapping[str, str]) -> "Handoff | None":
        """The hand-off from ``environ`` (removed from it), or None when unsupervised."""
        raw = environ.pop(ENV, None)
        if raw is None:
            return None
        try:
            data = json.loads(raw)
            listeners = {option: [(str(addr), int(fd)) for addr, fd in data["listeners"][option]]
                         for option in LINE_OPTIONS}
            return cls(listeners, int(data["ready_fd"]))
        except (ValueError, TypeError, KeyError) as exc:
            raise HandoffError(f"{ENV} is not a hand-off from a realplexor supervisor: {exc}") from None

    def notify_ready(self) -> None:
        """Tell the supervisor this server serves (once; the pipe is closed after)."""
        try:
            os.write(self.ready_fd, b"1")
            os.close(self.ready_fd)
        except OSError:
            # The supervisor is gone; the kernel ends this process too.
            pass
