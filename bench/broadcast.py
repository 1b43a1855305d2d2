"""One publish to N subscribers of one channel, then their reconnect storm.

Each round: every subscriber waits on the channel; one publish goes in
through the IN line; each client process stamps the time its polls'
bodies arrived (latency counts from just before the publish was sent).
Then every subscriber reconnects at once with the cursor it received,
and the round reports how long until all N are parked again (the
server answered headers and " \\r\\n" to each), confirmed with ONLINE.

    python bench/broadcast.py --n 10000 --rounds 3
    python bench/broadcast.py --n 10000 --rounds 5 --profile out/broadcast.raw
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

from crowd import BROWSER_HEADERS, CrowdClients, client_count, split
from pyspy_top import Recorder, summary
from server_process import ServerProcess, raise_fd_limit

CHANNEL = "bench_broadcast"
MESSAGE = b'{"n":1}'
SERVER_OPTIONS = {"WAIT_TIMEOUT": 3600, "OFFLINE_TIMEOUT": 3600}
PARK_WINDOW = 500
STORM_DELAY = 0.3
TIMEOUT = 60.0


def percentile(values: list[float], share: float) -> float:
    """The nearest-rank percentile (``share`` in 0..1) of ``values``."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(share * len(ordered)) - 1))]


def expect_listeners(server: ServerProcess, n: int) -> int:
    """The channel's listener count from ONLINE; fails unless it is ``n``."""
    count = server.online().get(CHANNEL, 0)
    if count != n:
        raise RuntimeError(f"ONLINE counts {count} listeners on {CHANNEL}, expected {n}")
    return count


def park_subscribers(crowd: CrowdClients, identifiers: list[str], window: int,
                     start_at: float) -> dict:
    """Park one poll per identifier over the clients; connect and park times after ``start_at``."""
    results = crowd.call("park", [{"identifiers": part, "start_at": start_at, "window": window,
                                   "timeout": TIMEOUT}
                                  for part in split(identifiers, len(crowd))], TIMEOUT + 10)
    return {key: [t for result in results for t in result[key]] for key in ("connect", "parked")}


def publish_once(server: ServerProcess, crowd: CrowdClients) -> dict:
    """Publish one message while every client waits for its bodies."""
    crowd.begin("await_bodies", [{"timeout": TIMEOUT}] * len(crowd))
    time.sleep(0.2)  # let every client block in its selector first
    sent_at, _ = server.publish(CHANNEL, MESSAGE)
    replied = time.monotonic() - sent_at
    results = crowd.results("await_bodies", TIMEOUT + 10)
    latencies = [at - sent_at for result in results for at in result["arrived"]]
    cursors = [cursor for result in results for cursor in result["cursors"]]
    return {"p50": percentile(latencies, 0.50), "p99": percentile(latencies, 0.99),
            "all": max(latencies), "publish_reply": replied, "cursors": cursors}


def reconnect_storm(server: ServerProcess, crowd: CrowdClients, cursors: list[str]) -> dict:
    """Every subscriber reconnects at once from its cursor; time until all are parked."""
    start_at = time.monotonic() + STORM_DELAY
    times = park_subscribers(crowd, [f"{cursor}:{CHANNEL}" for cursor in cursors],
                             window=len(cursors), start_at=start_at)
    online = expect_listeners(server, len(cursors))
    return {"repark": max(times["parked"]), "repark_p50": percentile(times["parked"], 0.5),
            "slow_connects": sum(1 for t in times["connect"] if t >= 1.0), "online": online}


def run(n: int, rounds: int, clients: int | None, profile: Path | None) -> list[dict]:
    """Park ``n`` subscribers, then run ``rounds`` of publish and reconnect storm."""
    raise_fd_limit()
    with ServerProcess(**SERVER_OPTIONS) as server, \
            CrowdClients(server.wait_port, client_count(n, clients), BROWSER_HEADERS) as crowd:
        park_subscribers(crowd, [CHANNEL] * n, PARK_WINDOW, time.monotonic())
        expect_listeners(server, n)
        recorder = Recorder(server.pid, profile) if profile else None
        rows = []
        try:
            for number in range(1, rounds + 1):
                delivered = publish_once(server, crowd)
                storm = reconnect_storm(server, crowd, delivered.pop("cursors"))
                rows.append({"round": number, **delivered, **storm})
                print(format_round(rows[-1]), flush=True)
        finally:
            if recorder is not None:
                recorder.stop()
        return rows


def format_round(row: dict) -> str:
    return (f"round {row['round']}: p50 {1000 * row['p50']:.0f} ms, p99 {1000 * row['p99']:.0f} ms, "
            f"all received {1000 * row['all']:.0f} ms (publish reply {1000 * row['publish_reply']:.0f} ms); "
            f"storm: all parked {row['repark']:.2f} s (p50 {row['repark_p50']:.2f} s, "
            f"{row['slow_connects']} connects >= 1 s), ONLINE {row['online']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1000, help="subscribers (default 1000)")
    parser.add_argument("--rounds", type=int, default=3, help="publish + storm rounds (default 3)")
    parser.add_argument("--clients", type=int, default=None,
                        help="client processes (default: one per 5000 subscribers)")
    parser.add_argument("--profile", type=Path, default=None, metavar="FILE",
                        help="record the server with py-spy into FILE (raw) and print its top 15")
    args = parser.parse_args()
    if args.profile:
        args.profile.parent.mkdir(parents=True, exist_ok=True)
    print(f"{args.n} subscribers, {args.rounds} rounds, load average "
          + " ".join(f"{x:.2f}" for x in os.getloadavg()), flush=True)
    rows = run(args.n, args.rounds, args.clients, args.profile)
    median = {key: statistics.median(row[key] for row in rows)
              for key in ("p50", "p99", "all", "publish_reply", "repark", "repark_p50",
                          "slow_connects", "online")}
    print(format_round({"round": "median", **median}).replace("round median", "median"))
    if args.profile:
        print()
        print(summary(args.profile, 15), end="")


if __name__ == "__main__":
    main()
