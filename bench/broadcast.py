"""One publish to N subscribers of one channel, then their reconnect storm.

Each round: every subscriber waits on the channel; one publish goes in
through the IN line; each client process stamps the time its polls'
bodies arrived (latency counts from just before the publish was sent).
Then every subscriber reconnects at once with the cursor it received,
and the round reports how long until all N are parked again (the
server answered headers and " \\r\\n" to each), confirmed with ONLINE.

    python bench/broadcast.py --n 10000 --rounds 3
    python bench/broadcast.py --n 10000 --rounds 5 --profile bench/out/profile

With ``--profile DIR`` py-spy records the server during each phase of
each round (``DIR/broadcast-R.raw``, ``DIR/storm-R.raw``, raw collapsed
stacks) and the top functions of each phase are printed at the end.
With ``--gc-trace`` each round also reports the time the server spent in
its garbage collector during each phase.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from crowd import BROWSER_HEADERS, CrowdClients, client_count, split
from gc_trace import read_log
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
    cpu = server.cpu_seconds()
    sent_at, _ = server.publish(CHANNEL, MESSAGE)
    replied = time.monotonic() - sent_at
    results = crowd.results("await_bodies", TIMEOUT + 10)
    cpu = server.cpu_seconds() - cpu
    gc_seconds = collector_seconds(server, sent_at, time.monotonic())
    latencies = [at - sent_at for result in results for at in result["arrived"]]
    cursors = [cursor for result in results for cursor in result["cursors"]]
    return {"p50": percentile(latencies, 0.50), "p99": percentile(latencies, 0.99),
            "all": max(latencies), "publish_reply": replied, "cursors": cursors,
            "deliver_cpu_us": 1e6 * cpu / len(latencies), "deliver_gc": gc_seconds}


def reconnect_storm(server: ServerProcess, crowd: CrowdClients, cursors: list[str]) -> dict:
    """Every subscriber reconnects at once from its cursor; time until all are parked."""
    start_at = time.monotonic() + STORM_DELAY
    cpu = server.cpu_seconds()
    times = park_subscribers(crowd, [f"{cursor}:{CHANNEL}" for cursor in cursors],
                             window=len(cursors), start_at=start_at)
    cpu = server.cpu_seconds() - cpu
    gc_seconds = collector_seconds(server, start_at, time.monotonic())
    online = expect_listeners(server, len(cursors))
    return {"repark": max(times["parked"]), "repark_p50": percentile(times["parked"], 0.5),
            "slow_connects": sum(1 for t in times["connect"] if t >= 1.0), "online": online,
            "park_cpu_us": 1e6 * cpu / len(cursors), "park_gc": gc_seconds}


def collector_seconds(server: ServerProcess, since: float, until: float) -> float | None:
    """Seconds the server's garbage collector ran in [since, until), if traced."""
    if server.gc_log is None:
        return None
    time.sleep(0.05)  # the log is line buffered; let the last line land
    return sum(seconds for _, seconds in read_log(str(server.gc_log), since, until).values())


@contextmanager
def profiled(server: ServerProcess, directory: Path | None, name: str):
    """Record the server with py-spy into ``directory/name.raw`` (if a directory is given)."""
    if directory is None:
        yield
        return
    recorder = Recorder(server.pid, directory / f"{name}.raw")
    try:
        yield
    finally:
        recorder.stop()


def run(n: int, rounds: int, clients: int | None, profile: Path | None,
        gc_log: Path | None) -> list[dict]:
    """Park ``n`` subscribers, then run ``rounds`` of publish and reconnect storm."""
    raise_fd_limit()
    with ServerProcess(gc_log=gc_log, **SERVER_OPTIONS) as server, \
            CrowdClients(server.wait_port, client_count(n, clients), BROWSER_HEADERS) as crowd:
        park_subscribers(crowd, [CHANNEL] * n, PARK_WINDOW, time.monotonic())
        expect_listeners(server, n)
        rows = []
        for number in range(1, rounds + 1):
            with profiled(server, profile, f"broadcast-{number}"):
                delivered = publish_once(server, crowd)
            with profiled(server, profile, f"storm-{number}"):
                storm = reconnect_storm(server, crowd, delivered.pop("cursors"))
            rows.append({"round": number, **delivered, **storm})
            print(format_round(rows[-1]), flush=True)
        return rows


def format_round(row: dict) -> str:
    """One round's figures on one line."""
    line = (f"round {row['round']}: p50 {1000 * row['p50']:.0f} ms, p99 {1000 * row['p99']:.0f} ms, "
            f"all received {1000 * row['all']:.0f} ms (publish reply {1000 * row['publish_reply']:.0f} ms, "
            f"server CPU {row['deliver_cpu_us']:.0f} us/subscriber); "
            f"storm: all parked {row['repark']:.2f} s (p50 {row['repark_p50']:.2f} s, "
            f"{row['slow_connects']:.0f} connects >= 1 s, server CPU {row['park_cpu_us']:.0f} us/poll), "
            f"ONLINE {row['online']:.0f}")
    if row.get("deliver_gc") is not None:
        line += (f"; server GC {1000 * row['deliver_gc']:.0f} ms in delivery, "
                 f"{1000 * row['park_gc']:.0f} ms in storm")
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1000, help="subscribers (default 1000)")
    parser.add_argument("--rounds", type=int, default=3, help="publish + storm rounds (default 3)")
    parser.add_argument("--clients", type=int, default=None,
                        help="client processes (default: one per 5000 subscribers)")
    parser.add_argument("--profile", type=Path, default=None, metavar="DIR",
                        help="record the server with py-spy per phase into DIR; print each top 15")
    parser.add_argument("--gc-trace", action="store_true",
                        help="run the server under gc_trace.py and report its collector time")
    parser.add_argument("--engine", choices=["wsgi", "lean"], default="wsgi",
                        help="the server's WAIT_ENGINE (default wsgi)")
    args = parser.parse_args()
    SERVER_OPTIONS["WAIT_ENGINE"] = args.engine
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    print(f"{args.n} subscribers, {args.rounds} rounds, load average "
          + " ".join(f"{x:.2f}" for x in os.getloadavg()), flush=True)
    with tempfile.TemporaryDirectory(prefix="realplexor-gc-") as tmp:
        gc_log = Path(tmp) / "gc.log" if args.gc_trace else None
        rows = run(args.n, args.rounds, args.clients, args.profile, gc_log)
    keys = ["p50", "p99", "all", "publish_reply", "deliver_cpu_us", "repark",
            "repark_p50", "slow_connects", "park_cpu_us", "online"]
    if args.gc_trace:
        keys += ["deliver_gc", "park_gc"]
    median = {key: statistics.median(row[key] for row in rows) for key in keys}
    print(format_round({"round": "median", **median}).replace("round median", "median"))
    if args.profile:
        for phase in ("broadcast", "storm"):
            print(f"\n== py-spy, {phase} phase, all rounds ==")
            print(summary(sorted(args.profile.glob(f"{phase}-*.raw")), 15), end="")


if __name__ == "__main__":
    main()
