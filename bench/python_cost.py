"""The lean engine's and the IN line's own Python work, without the kernel.

Runs the real LeanWaitServer and InServer in this process on stand-in
sockets that take every write at once and hand over prepared requests,
so that only the interpreter's work is timed: parsing, the channel
state, rendering, watchers and deadlines. Two cases:

  rate       N polls on their own channels: per publish (from its bytes
             to the body handed to the waiting socket) and per re-park
             (from the next request's bytes to the poll parked again);
             per publish again through the JSON API (POST /publish);
  broadcast  N polls of one channel: per re-park after a broadcast, when
             every poll asks with the same identifier.

    python python_cost.py [--n 2000] [--rounds 10] [--profile]
"""
from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server_process import raise_fd_limit  # noqa: E402

from realplexor.auth import Users  # noqa: E402
from realplexor.channels import MemoryChannels  # noqa: E402
from realplexor.config import load_config  # noqa: E402
from realplexor.inline import InLine, InServer  # noqa: E402
from realplexor.pages import load_pages  # noqa: E402
from realplexor.server import channel_settings, listen_socket  # noqa: E402
from realplexor.wait import WaitLine  # noqa: E402
from realplexor.wait_lean import LeanPoll, LeanWaitServer  # noqa: E402

POLL = b"GET /?identifier=%s&ncrnd=%d HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n\r\n"
PUBLISH = (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 7\r\n"
           b"X-Realplexor: identifier=%s\r\n\r\n{\"m\":1}")
JSON_BODY = b'{"ids":["%s"],"data":{"m":1}}'
PUBLISH_JSON = b"POST /publish HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"


class StandIn:
    """A connected socket as the servers use it, with no kernel behind it.

    Each one owns a real (unconnected) socket only so that event-loop
    watchers have a descriptor of their own.
    """

    def __init__(self, request: bytes = b""):
        self.pending = request
        self.sent: list[bytes] = []
        self._fd = socket.socket()

    def recv(self, size: int, flags: int = 0) -> bytes:
        data, self.pending = self.pending, b""
        if not data:
            raise BlockingIOError
        return data

    def send(self, data: bytes) -> int:
        self.sent.append(data)
        return len(data)

    def sendmsg(self, buffers) -> int:
        self.sent.extend(buffers)
        return sum(len(buffer) for buffer in buffers)

    def fileno(self) -> int:
        return self._fd.fileno()

    def shutdown(self, how: int) -> None:
        pass

    def close(self) -> None:
        self._fd.close()


class Servers:
    """The lean WAIT engine and the IN line over one channel state, default settings."""

    def __init__(self) -> None:
        config = load_config(None)
        self.state = MemoryChannels(channel_settings(config))
        self.wait = LeanWaitServer(listen_socket("127.0.0.1", 0),
                                   WaitLine(config, load_pages(config)), self.state)
        self.inline = InServer(listen_socket("127.0.0.1", 0), InLine(config, self.state, Users(":\n")))

    def park(self, channel: str, number: int) -> LeanPoll:
        poll = LeanPoll(self.wait, StandIn(POLL % (channel.encode(), number)),
                        time.monotonic() + self.wait.line.config.WAIT_REQUEST_TIMEOUT)
        self.wait._read_now(poll)
        return poll

    def publish(self, channel: str, json_api: bool = False) -> None:
        if json_api:
            body = JSON_BODY % channel.encode()
            request = PUBLISH_JSON % (len(body), body)
        else:
            request = PUBLISH % channel.encode()
        self.inline._accepted(StandIn(request), ("127.0.0.1", 1))

    def ask_again(self, poll: LeanPoll, channel: str, number: int) -> None:
        """Queue the poll's next request, from the cursor of the body it got."""
        framed = poll.sock.sent[-1]
        body = framed[framed.index(b"[{"):framed.rindex(b"}]") + 2]
        cursor = json.loads(body)[0]["ids"][channel]
        poll.sock.sent.clear()
        poll.sock.pending = POLL % (f"{cursor}:{channel}".encode(), number)

    def repark(self, polls: list[LeanPoll], channels: list[str]) -> float:
        """Seconds for every answered poll to ask again and be parked."""
        for i, (poll, channel) in enumerate(zip(polls, channels)):
            self.ask_again(poll, channel, i)
        started = time.perf_counter()
        for poll in polls:
            self.wait._on_readable(poll)
        return time.perf_counter() - started

    @staticmethod
    def close(polls: list[LeanPoll]) -> None:
        """Free the stand-ins' descriptors."""
        for poll in polls:
            poll.sock.close()


def rate_case(servers: Servers, n: int, rounds: int, json_api: bool = False) -> tuple[float, float]:
    """Microseconds per publish and per re-park, polls on their own channels."""
    channels = [f"own{i}" for i in range(n)]
    polls = [servers.park(channel, i) for i, channel in enumerate(channels)]
    publish = repark = 0.0
    for _ in range(rounds):
        started = time.perf_counter()
        for channel in channels:
            servers.publish(channel, json_api)
        publish += time.perf_counter() - started
        repark += servers.repark(polls, channels)
    servers.close(polls)
    return publish / rounds / n * 1e6, repark / rounds / n * 1e6


def broadcast_case(servers: Servers, n: int, rounds: int) -> float:
    """Microseconds per re-park after a broadcast to ``n`` polls of one channel."""
    polls = [servers.park("bcast", i) for i in range(n)]
    repark = 0.0
    for _ in range(rounds):
        servers.publish("bcast")
        repark += servers.repark(polls, ["bcast"] * n)
    servers.close(polls)
    return repark / rounds / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--profile", action="store_true", help="also print cProfile's top 25 (rate case)")
    args = parser.parse_args()
    raise_fd_limit()    # a descriptor per stand-in socket
    rate_case(Servers(), args.n, 2)     # warm up
    publish, repark = rate_case(Servers(), args.n, args.rounds)
    print(f"rate       per publish {publish:6.2f} us   per re-park {repark:6.2f} us")
    publish, _ = rate_case(Servers(), args.n, args.rounds, json_api=True)
    print(f"rate       per publish {publish:6.2f} us   through the JSON API (POST /publish)")
    shared = broadcast_case(Servers(), args.n, args.rounds)
    print(f"broadcast  per re-park {shared:6.2f} us (every poll with the same identifier)")
    if args.profile:
        profile = cProfile.Profile()
        profile.runcall(rate_case, Servers(), args.n, 3)
        pstats.Stats(profile).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
