"""Server memory per idle long poll.

Starts a realplexor process, opens N long polls that wait on the WAIT
line (spread over client processes), and reports the server's resident
memory before and after, and the difference per connection.

    python bench/idle_memory.py --n 10000 --channels 1
    python bench/idle_memory.py --n 10000 --channels each
"""
from __future__ import annotations

import argparse
import time

from crowd import BROWSER_HEADERS, CrowdClients, client_count, split
from server_process import ServerProcess, raise_fd_limit

SERVER_OPTIONS = {"WAIT_TIMEOUT": 3600, "OFFLINE_TIMEOUT": 3600}
WARMUP_POLLS = 200
PARK_WINDOW = 500


def channel_names(n: int, channels: str) -> list[str]:
    """The channel each of ``n`` polls listens to: ``channels`` distinct ones, or one each."""
    distinct = n if channels == "each" else int(channels)
    if distinct < 1:
        raise SystemExit("--channels must be a positive number or 'each'")
    return [f"bench_{index % distinct}" for index in range(n)]


def settled_rss(server: ServerProcess, settle: float) -> int:
    """The server's RSS after ``settle`` seconds of quiet (lowest of a few reads)."""
    time.sleep(settle)
    readings = []
    for _ in range(5):
        readings.append(server.rss())
        time.sleep(0.2)
    return min(readings)


def park_all(clients: CrowdClients, names: list[str], timeout: float) -> float:
    """Park one poll per name, spread over the clients; the seconds it took."""
    started = time.monotonic()
    clients.call("park", [{"identifiers": part, "start_at": started, "window": PARK_WINDOW,
                           "timeout": timeout} for part in split(names, len(clients))],
                 timeout + 10)
    return time.monotonic() - started


def measure(n: int, channels: str, clients: int | None, settle: float, headers: str) -> dict:
    """Open ``n`` idle polls on a fresh server; its RSS before and after."""
    raise_fd_limit()
    names = channel_names(n, channels)
    with ServerProcess(**SERVER_OPTIONS) as server, \
            CrowdClients(server.wait_port, client_count(n, clients), headers) as crowd:
        # Warm up once, so first-use allocations are not counted per connection.
        park_all(crowd, channel_names(WARMUP_POLLS, channels), 60)
        crowd.call("close_all", [{}] * len(crowd), 30)
        before = settled_rss(server, settle)
        took = park_all(crowd, names, 120)
        after = settled_rss(server, settle)
        online = server.online()
        listening = sum(online.get(name, 0) for name in set(names))
        if listening != n:
            raise RuntimeError(f"ONLINE counts {listening} listeners, expected {n}")
        return {"n": n, "channels": len(set(names)), "clients": len(crowd),
                "rss_before": before, "rss_after": after, "park_seconds": took,
                "kb_per_conn": (after - before) / n / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1000, help="idle long polls (default 1000)")
    parser.add_argument("--channels", default="1",
                        help="distinct channels the polls listen to, or 'each' (default 1)")
    parser.add_argument("--clients", type=int, default=None,
                        help="client processes (default: one per 5000 polls)")
    parser.add_argument("--settle", type=float, default=2.0,
                        help="seconds of quiet before reading RSS (default 2)")
    parser.add_argument("--minimal-headers", action="store_true",
                        help="send only the request line and Host, not a browser's headers")
    parser.add_argument("--engine", choices=["wsgi", "lean"], default="wsgi",
                        help="the server's WAIT_ENGINE (default wsgi)")
    args = parser.parse_args()
    SERVER_OPTIONS["WAIT_ENGINE"] = args.engine
    result = measure(args.n, args.channels, args.clients, args.settle,
                     "" if args.minimal_headers else BROWSER_HEADERS)
    print(f"idle polls:      {result['n']} on {result['channels']} channel(s), "
          f"{result['clients']} client process(es), parked in {result['park_seconds']:.2f} s")
    print(f"server RSS:      {result['rss_before'] / 2**20:.1f} MiB before, "
          f"{result['rss_after'] / 2**20:.1f} MiB after")
    print(f"per connection:  {result['kb_per_conn']:.2f} KB")


if __name__ == "__main__":
    main()
