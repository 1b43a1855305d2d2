"""Scaling out on the shared store: several server processes on one Redis.

Four parts, each runnable alone and bounded in time:

  rate       messages delivered per second to 2000 kept-alive polls on
             their own channels (as compare.py's rate run), with every
             message checked: none lost, none twice, in order;
  broadcast  one publish to N kept-alive polls of one channel: p50, p99
             and all-received latency, counted from just before the
             publish was sent;
  capacity   more parked polls than one process's open-file limit allows
             (60 000 over 4 processes), from client processes on several
             127.0.0.x source addresses: connections held, RSS per
             process and per connection, and one publish to them all;
  ops        Redis commands per publish and per poll, from redis-server's
             INFO commandstats before and after a known number of each.

rate and broadcast run three setups one after the other:

  memory   one process, the memory store (as before);
  redis-1  one process, BACKEND = Redis;
  redis-2  two processes, BACKEND = Redis, REUSE_PORT on one WAIT and one
           IN port: the kernel (SO_REUSEPORT) spreads the polls and the
           publishes over both.

Pinning (taskset, made for 2 cores): memory and redis-1 put the server
on CPU 0 and the load (the poll and publisher processes) on CPU 1, with
redis-server on CPU 1 too for redis-1; redis-2 puts one server on each
CPU and leaves redis-server and the load free to run on either. capacity
and ops pin nothing.

    python scaling.py rate [--setups memory,redis-1,redis-2] [--polls 2000] [--seconds 5]
    python scaling.py broadcast [--n 1000,5000] [--rounds 3]
    python scaling.py capacity [--n 60000] [--processes 4] [--sources 4]
    python scaling.py ops [--n 1000] [--publishes 1000]
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import multiprocessing
import os
import selectors
import signal
import socket
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from compare import Clients, _Crowd
from crowd import BROWSER_HEADERS, MAX_PER_CLIENT, CrowdClients, split
from pyspy_top import Recorder, summary
from server_process import RedisServer, ServerGroup, raise_fd_limit

TIMEOUT = 120.0
SERVER_OPTIONS = {"WAIT_TIMEOUT": 3600, "OFFLINE_TIMEOUT": 3600}
ALL_CPUS = frozenset(os.sched_getaffinity(0))


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def percentile(values: list[float], share: float) -> float:
    """The nearest-rank percentile (``share`` in 0..1) of ``values``."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(share * len(ordered)) - 1))]


# -- setups --------------------------------------------------------------------

@dataclass(frozen=True)
class Setup:
    """Which store, how many server processes, and where everything runs."""

    name: str
    processes: int
    redis: bool
    server_cpus: tuple[str, ...]
    redis_cpus: str | None          # None: not pinned
    load_cpus: frozenset[int] | None  # None: not pinned

    def pinning(self) -> str:
        servers = ", ".join(f"server {i + 1} on CPU {cpus}" for i, cpus in enumerate(self.server_cpus))
        redis = ""
        if self.redis:
            redis = f", redis-server on CPU {self.redis_cpus}" if self.redis_cpus else ", redis-server unpinned"
        load = ("load unpinned" if self.load_cpus is None
                else "load on CPU " + ",".join(map(str, sorted(self.load_cpus))))
        return f"{servers}{redis}, {load}"


SETUPS = {
    "memory": Setup("memory", 1, False, ("0",), None, frozenset({1})),
    "redis-1": Setup("redis-1", 1, True, ("0",), "1", frozenset({1})),
    "redis-2": Setup("redis-2", 2, True, ("0", "1"), None, None),
}


class Running:
    """A setup's redis-server (if any) and server processes, started; stops them all on exit."""

    def __init__(self, setup: Setup, engine: str, **options):
        self.setup = setup
        self.engine = engine
        self.options = {**SERVER_OPTIONS, "WAIT_ENGINE": engine, **options}
        self.redis: RedisServer | None = None
        self.group: ServerGroup | None = None
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> "Running":
        raise_fd_limit()
        try:
            options = dict(self.options)
            if self.setup.redis:
                self.redis = self._stack.enter_context(RedisServer(cpus=self.setup.redis_cpus))
                options["BACKEND"] = self.redis.url
            self.group = self._stack.enter_context(
                ServerGroup(self.setup.processes, list(self.setup.server_cpus), **options))
            os.sched_setaffinity(0, self.load_cpus)
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        os.sched_setaffinity(0, ALL_CPUS)
        self._stack.close()

    @property
    def load_cpus(self) -> set[int]:
        return set(self.setup.load_cpus or ALL_CPUS)

    def redis_cpu(self) -> float:
        return self.redis.cpu_seconds() if self.redis else 0.0


def wait_listeners(group: ServerGroup, channels: set[str], n: int, timeout: float = 30.0) -> None:
    """Until ONLINE counts ``n`` listeners on ``channels`` (the shared store reports counts each second)."""
    deadline = time.monotonic() + timeout
    while True:
        online = group.online()
        count = sum(online.get(channel, 0) for channel in channels)
        if count == n:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"ONLINE counts {count} listeners, expected {n}")
        time.sleep(0.1)


def polls_held(group: ServerGroup) -> list[int]:
    """Each process's established connections on the WAIT port."""
    return [sum(1 for conn in psutil.Process(server.pid).net_connections("tcp")
                if conn.laddr and conn.laddr.port == group.wait_port and conn.status == psutil.CONN_ESTABLISHED)
            for server in group.servers]


def process_cpu(pids: list[int]) -> float:
    return sum(sum(psutil.Process(pid).cpu_times()[:2]) for pid in pids)


# -- kept-alive polls that check what they get ----------------------------------

class CheckedCrowd(_Crowd):
    """compare.py's kept-alive polls, checking each message ``{"m": k}`` a poll gets.

    The publisher numbers the messages of a channel 1, 2, 3...; each poll
    must see each once and in order. ``duplicates`` counts numbers a poll
    saw again (or out of order), ``gaps`` the numbers it skipped.
    """

    def __init__(self, *args):
        super().__init__(*args)
        self.last: dict[int, int] = {}      # id(conn) -> last number seen
        self.duplicates = 0
        self.gaps = 0

    def _complete(self, conn, now: float) -> None:
        body = (b"".join(conn.chunks) if conn.chunks else conn.buf).strip()
        fresh = 0
        if body:
            for part in json.loads(body):
                data = part.get("data")
                if not isinstance(data, dict) or "m" not in data:
                    continue
                last = self.last.get(id(conn), 0)
                if data["m"] <= last:
                    self.duplicates += 1
                    continue
                self.gaps += data["m"] - last - 1
                self.last[id(conn)] = data["m"]
                fresh += 1
        super()._complete(conn, now)
        self.delivered += fresh - 1     # count messages, not answers

    def arrivals(self, timeout: float) -> dict:
        """Each poll's body arrival time, waiting at most ``timeout``; polls without one are counted."""
        try:
            self._pump(lambda: all(c.done_at for c in self.conns), timeout)
        except RuntimeError:
            pass
        arrived = [c.done_at for c in self.conns if c.done_at]
        return {"arrived": arrived, "missing": len(self.conns) - len(arrived)}

    def check(self) -> dict:
        """The last number each poll's channel got (the lowest, where several polls share one)."""
        last: dict[str, int] = {}
        for conn in self.conns:
            last[conn.channel] = min(last.get(conn.channel, 1 << 62), self.last.get(id(conn), 0))
        return {"last": last, "duplicates": self.duplicates, "gaps": self.gaps}


def open_polls(run: Running, channels: list[str]) -> tuple[Clients, list[int]]:
    """Kept-alive polls on ``channels``, all parked and counted by ONLINE; and how many each process holds."""
    group = run.group
    clients = Clients("rpl", group.wait_port, channels, True, cpus=run.load_cpus, crowd=CheckedCrowd)
    try:
        clients.ask("open", TIMEOUT, timeout=TIMEOUT + 60)
        wait_listeners(group, set(channels), len(channels))
        held = polls_held(group)
    except BaseException:
        clients.close()
        raise
    return clients, held


# -- publishers: processes with several publishes in flight ----------------------

def publish_request(channel: str, number: int) -> bytes:
    body = b'{"m":%d}' % number
    return (f"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n"
            f"X-Realplexor: identifier={channel}\r\n\r\n").encode() + body


def publish_for(port: int, channels: list[str], in_flight: int, seconds: float) -> dict:
    """Publish ``{"m": k}`` round-robin over ``channels`` for ``seconds``, ``in_flight`` at a time.

    One connection per publish. A channel's next publish waits for the
    reply to its last, so each channel's numbers go out in order.
    Returns the last number each channel got a 200 for, and the failures.
    """
    selector = selectors.DefaultSelector()
    idle = collections.deque(channels)
    published: dict[str, int] = {}
    failures: list[str] = []
    busy = 0
    end = time.monotonic() + seconds
    hard_end = end + TIMEOUT
    try:
        while busy or (idle and time.monotonic() < end):
            while idle and busy < in_flight and time.monotonic() < end:
                channel = idle.popleft()
                sock = socket.socket()
                sock.setblocking(False)
                sock.connect_ex(("127.0.0.1", port))
                number = published.get(channel, 0) + 1
                selector.register(sock, selectors.EVENT_WRITE, [channel, number, b""])
                busy += 1
            if time.monotonic() > hard_end:
                raise TimeoutError(f"{busy} publishes unanswered after {TIMEOUT} s")
            for key, events in selector.select(0.1):
                sock, state = key.fileobj, key.data
                if events & selectors.EVENT_WRITE:
                    error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if not error:
                        sock.send(publish_request(state[0], state[1]))   # under 200 bytes: one send
                        selector.modify(sock, selectors.EVENT_READ, state)
                        continue
                    reply = f"connect error {error}".encode()
                else:
                    try:
                        chunk = sock.recv(4096)
                    except ConnectionError as exc:
                        chunk, state[2] = b"", repr(exc).encode()
                    if chunk:
                        state[2] += chunk
                        continue
                    reply = state[2]
                selector.unregister(sock)
                sock.close()
                busy -= 1
                idle.append(state[0])
                if reply.startswith(b"HTTP/1.0 200"):
                    published[state[0]] = state[1]
                elif len(failures) < 5:
                    failures.append(reply[:120].decode("latin-1"))
                else:
                    failures.append("")
    finally:
        for key in list(selector.get_map().values()):
            key.fileobj.close()
        selector.close()
    return {"published": published, "failures": failures}


def _publisher_main(pipe, port: int, channels: list[str], in_flight: int, cpus: set[int]) -> None:
    os.sched_setaffinity(0, cpus)
    try:
        if not pipe.poll(TIMEOUT):
            return
        seconds = pipe.recv()
        pipe.send(publish_for(port, channels, in_flight, seconds))
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        pipe.send(RuntimeError(f"publisher: {exc!r}"))


class Publishers:
    """Publisher processes, each owning a share of the channels; a context manager."""

    def __init__(self, port: int, channels: list[str], processes: int, in_flight: int, cpus: set[int]):
        context = multiprocessing.get_context("fork")
        self.workers = []
        for part in split(channels, processes):
            parent, child = context.Pipe()
            process = context.Process(target=_publisher_main, args=(child, port, part, in_flight, cpus),
                                      daemon=True)
            process.start()
            self.workers.append((parent, process))

    def __enter__(self) -> "Publishers":
        return self

    def __exit__(self, *exc) -> None:
        for _, process in self.workers:
            process.join(5)
            if process.is_alive():
                process.kill()
                process.join(5)

    @property
    def pids(self) -> list[int]:
        return [process.pid for _, process in self.workers]

    def start(self, seconds: float) -> None:
        for pipe, _ in self.workers:
            pipe.send(seconds)

    def results(self, timeout: float) -> dict:
        published: dict[str, int] = {}
        failures: list[str] = []
        for pipe, _ in self.workers:
            if not pipe.poll(timeout):
                raise RuntimeError(f"a publisher did not finish within {timeout} s")
            result = pipe.recv()
            if isinstance(result, Exception):
                raise result
            published.update(result["published"])
            failures += result["failures"]
        return {"published": published, "failures": failures}


# -- rate -------------------------------------------------------------------------

def rate(setup: Setup, engine: str, polls: int, seconds: float, publishers: int, in_flight: int,
         profile: Path | None = None) -> dict:
    """Publisher processes round-robin over ``polls`` channels, one poll each; delivered per second.

    With ``profile`` (a directory), py-spy records each server process
    meanwhile, into ``rate-SETUP-I.raw``.
    """
    with Running(setup, engine) as run:
        group = run.group
        channels = [f"own{i}" for i in range(polls)]
        clients, held = open_polls(run, channels)
        try:
            with Publishers(group.in_port, channels, publishers, in_flight, run.load_cpus) as senders, \
                    contextlib.ExitStack() as recording:
                if profile is not None:
                    for index, server in enumerate(group.servers):
                        recorder = Recorder(server.pid, profile / f"rate-{setup.name}-{index + 1}.raw")
                        recording.callback(recorder.stop)
                load_pids = [process.pid for _, process in clients.pipes] + senders.pids
                cpu, redis_cpu, load_cpu = group.cpu_seconds(), run.redis_cpu(), process_cpu(load_pids)
                senders.start(seconds)
                delivered = sum(clients.ask("churn", seconds, timeout=seconds + 60))
                cpu = [after - b for after, b in zip(group.cpu_seconds(), cpu)]
                redis_cpu = run.redis_cpu() - redis_cpu
                load_cpu = process_cpu(load_pids) - load_cpu
                sent = senders.results(TIMEOUT)
            clients.ask("churn", 2.0, timeout=60)      # let the last messages arrive
            checks = clients.ask("check")
        finally:
            clients.close()
    published = sent["published"]
    last = {channel: number for check in checks for channel, number in check["last"].items()}
    lost = sum(number - last.get(channel, 0) for channel, number in published.items())
    return {"setup": setup.name, "pinning": setup.pinning(), "engine": engine, "polls": polls,
            "polls_per_process": held, "seconds": seconds, "publishers": publishers, "in_flight": in_flight,
            "delivered_per_s": delivered / seconds, "published": sum(published.values()),
            "server_cpu_share": [c / seconds for c in cpu], "redis_cpu_share": redis_cpu / seconds,
            "load_cpu_share": load_cpu / seconds,
            "server_cpu_us_per_message": 1e6 * sum(cpu) / max(1, delivered),
            "redis_cpu_us_per_message": 1e6 * redis_cpu / max(1, delivered),
            "lost": lost, "duplicates": sum(c["duplicates"] for c in checks),
            "gaps": sum(c["gaps"] for c in checks), "publish_failures": len(sent["failures"]),
            "first_failures": [f for f in sent["failures"] if f][:3]}


def format_rate(r: dict) -> str:
    cpu = " + ".join(f"{share:.0%}" for share in r["server_cpu_share"])
    return (f"rate      {r['setup']:8} {r['delivered_per_s']:7.0f} delivered/s  polls per process "
            f"{'/'.join(map(str, r['polls_per_process']))}  CPU: servers {cpu}, redis {r['redis_cpu_share']:.0%}, "
            f"load {r['load_cpu_share']:.0%}  per message: servers {r['server_cpu_us_per_message']:.0f} us, "
            f"redis {r['redis_cpu_us_per_message']:.0f} us  "
            f"lost {r['lost']}, duplicates {r['duplicates']}, gaps {r['gaps']}"
            + (f"  publish failures: {r['publish_failures']} {r['first_failures']}" if r["publish_failures"] else ""))


# -- broadcast ----------------------------------------------------------------------

CHANNEL = "bcast"


def broadcast(setup: Setup, engine: str, n: int, rounds: int) -> list[dict]:
    """``n`` kept-alive polls of one channel; per round one publish, its latencies, then a re-poll."""
    rows = []
    with Running(setup, engine) as run:
        group = run.group
        clients, held = open_polls(run, [CHANNEL] * n)
        try:
            for number in range(1, rounds + 1):
                time.sleep(0.5)
                cpu, redis_cpu = group.cpu_seconds(), run.redis_cpu()
                clients.tell("arrivals", 60.0)
                time.sleep(0.2)     # every client waits in its selector first
                sent_at, _ = group.publish(CHANNEL, b'{"m":%d}' % number)
                answers = clients.answers("arrivals", 90.0)
                cpu = [after - b for after, b in zip(group.cpu_seconds(), cpu)]
                redis_cpu = run.redis_cpu() - redis_cpu
                latencies = [1000 * (at - sent_at) for answer in answers for at in answer["arrived"]]
                missing = sum(answer["missing"] for answer in answers)
                rows.append({"setup": setup.name, "pinning": setup.pinning(), "engine": engine, "n": n,
                             "round": number, "polls_per_process": held,
                             "p50_ms": percentile(latencies, 0.5) if latencies else None,
                             "p99_ms": percentile(latencies, 0.99) if latencies else None,
                             "all_ms": max(latencies) if len(latencies) == n else None,
                             "received": len(latencies), "missing": missing,
                             "server_cpu_ms": [1000 * c for c in cpu], "redis_cpu_ms": 1000 * redis_cpu})
                print(format_broadcast(rows[-1]), flush=True)
                if number < rounds:
                    clients.ask("repoll", 60.0, timeout=90)
                    wait_listeners(group, {CHANNEL}, n)
            checks = clients.ask("check")
        finally:
            clients.close()
    duplicates = sum(check["duplicates"] for check in checks)
    if duplicates:
        print(f"broadcast {setup.name:8} n={n}: {duplicates} messages received twice", flush=True)
    for row in rows:
        row["duplicates"] = duplicates
    return rows


def format_broadcast(r: dict) -> str:
    def ms(value):
        return f"{value:6.1f}" if value is not None else "     -"

    cpu = " + ".join(f"{c:.0f}" for c in r["server_cpu_ms"])
    return (f"broadcast {r['setup']:8} n={r['n']:5} r{r['round']}  p50 {ms(r['p50_ms'])}  p99 {ms(r['p99_ms'])}  "
            f"all {ms(r['all_ms'])} ms  received {r['received']}/{r['n']}  polls per process "
            f"{'/'.join(map(str, r['polls_per_process']))}  CPU ms: servers {cpu}, redis {r['redis_cpu_ms']:.0f}")


def broadcast_medians(rows: list[dict]) -> list[dict]:
    out = []
    for key in dict.fromkeys((r["setup"], r["n"]) for r in rows):
        mine = [r for r in rows if (r["setup"], r["n"]) == key]
        median = dict(mine[0], round="median")
        for field in ("p50_ms", "p99_ms", "all_ms", "redis_cpu_ms"):
            values = [r[field] for r in mine if r[field] is not None]
            median[field] = statistics.median(values) if values else None
        median["received"] = min(r["received"] for r in mine)
        median["server_cpu_ms"] = [statistics.median(column) for column in zip(*(r["server_cpu_ms"] for r in mine))]
        out.append(median)
    return out


# -- capacity -------------------------------------------------------------------------

CAPACITY_CHANNEL = "everyone"
PARK_WINDOW = 500
WARMUP_PER_PROCESS = 200


def settled(read, settle: float):
    """The lowest of a few readings of ``read()`` (a list per process) after ``settle`` seconds."""
    time.sleep(settle)
    readings = []
    for _ in range(5):
        readings.append(read())
        time.sleep(0.2)
    return [min(column) for column in zip(*readings)]


def capacity(n: int, processes: int, clients: int, sources: int, engine: str, settle: float) -> dict:
    """``n`` parked polls of one channel over ``processes`` processes on one Redis; one publish to all."""
    raise_fd_limit()
    addresses = [f"127.0.0.{2 + i}" for i in range(sources)]
    names = [CAPACITY_CHANNEL] * n
    with RedisServer() as redis, \
            ServerGroup(processes, None, BACKEND=redis.url, **{**SERVER_OPTIONS, "WAIT_ENGINE": engine}) as group, \
            CrowdClients(group.wait_port, clients, BROWSER_HEADERS, addresses) as crowd:
        limits = [psutil.Process(server.pid).rlimit(psutil.RLIMIT_NOFILE)[0] for server in group.servers]
        # Warm up every process once, so first-use allocations are not counted per connection.
        started = time.monotonic()
        warmup = [CAPACITY_CHANNEL] * (WARMUP_PER_PROCESS * processes)
        crowd.call("park", [{"identifiers": part, "start_at": started, "window": PARK_WINDOW, "timeout": 60}
                            for part in split(warmup, len(crowd))], 70)
        crowd.call("close_all", [{}] * len(crowd), 30)
        rss_before = settled(group.rss, settle)
        started = time.monotonic()
        crowd.call("park", [{"identifiers": part, "start_at": started, "window": PARK_WINDOW, "timeout": 300}
                            for part in split(names, len(crowd))], 320)
        parked_in = time.monotonic() - started
        wait_listeners(group, {CAPACITY_CHANNEL}, n, timeout=60)
        rss_after = settled(group.rss, settle)
        fds_after = group.descriptors()
        held = polls_held(group)
        crowd.begin("await_bodies", [{"timeout": 60.0, "allow_missing": True}] * len(crowd))
        time.sleep(0.5)
        cpu = group.cpu_seconds()
        sent_at, _ = group.publish(CAPACITY_CHANNEL, b'{"m":1}')
        results = crowd.results("await_bodies", 90.0)
        cpu = [after - before for after, before in zip(group.cpu_seconds(), cpu)]
        redis_rss = redis.rss()
    latencies = [at - sent_at for result in results for at in result["arrived"]]
    return {"n": n, "processes": processes, "engine": engine, "clients": clients, "sources": addresses,
            "open_file_limit": limits, "parked_seconds": parked_in, "held": held, "held_total": sum(held),
            "descriptors": fds_after,
            "rss_before_mib": [b / 2**20 for b in rss_before], "rss_after_mib": [a / 2**20 for a in rss_after],
            "kb_per_connection": [(a - b) / max(1, h) / 1024 for a, b, h in zip(rss_after, rss_before, held)],
            "received": len(latencies), "missing": sum(result["missing"] for result in results),
            "p50_s": percentile(latencies, 0.5) if latencies else None,
            "p99_s": percentile(latencies, 0.99) if latencies else None,
            "all_s": max(latencies) if latencies else None,
            "delivery_cpu_s": cpu, "redis_rss_mib": redis_rss / 2**20}


def print_capacity(r: dict) -> None:
    print(f"capacity: {r['n']} polls of one channel over {r['processes']} processes ({r['engine']} engine), "
          f"from {r['clients']} client processes on {', '.join(r['sources'])}; parked in {r['parked_seconds']:.1f} s")
    for i, (limit, held, fds, before, after, kb) in enumerate(zip(
            r["open_file_limit"], r["held"], r["descriptors"], r["rss_before_mib"], r["rss_after_mib"],
            r["kb_per_connection"])):
        print(f"  process {i + 1}: open-file limit {limit}, {held} polls held ({fds} descriptors), "
              f"RSS {before:.1f} -> {after:.1f} MiB, {kb:.2f} KB per connection")
    total_before, total_after = sum(r["rss_before_mib"]), sum(r["rss_after_mib"])
    print(f"  total: {r['held_total']} polls held, RSS {total_before:.1f} -> {total_after:.1f} MiB, "
          f"{1024 * (total_after - total_before) / max(1, r['held_total']):.2f} KB per connection; "
          f"redis-server RSS {r['redis_rss_mib']:.1f} MiB")
    if r["all_s"] is not None:
        print(f"  one publish to all: received {r['received']}/{r['n']} (missing {r['missing']}), "
              f"p50 {r['p50_s']:.2f} s, p99 {r['p99_s']:.2f} s, all received {r['all_s']:.2f} s; "
              f"server CPU {' + '.join(f'{c:.2f}' for c in r['delivery_cpu_s'])} s")
    else:
        print(f"  one publish to all: received 0/{r['n']}")


# -- ops ------------------------------------------------------------------------------

class CallMeter:
    """Calls by command on a redis-server between two readings, less its background rate."""

    def __init__(self, redis: RedisServer):
        self.redis = redis
        self.background: dict[str, float] = {}

    def redis_cpu(self) -> float:
        """redis-server's own count of its CPU seconds (INFO cpu: finer than the kernel's ticks)."""
        info = self.redis.info("cpu")
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])

    def measure_background(self, seconds: float) -> dict[str, float]:
        """Calls per second while nothing happens (heartbeats, health checks)."""
        before, started = self.redis.command_calls(), time.monotonic()
        time.sleep(seconds)
        after, elapsed = self.redis.command_calls(), time.monotonic() - started
        self.background = {name: (after.get(name, 0) - before.get(name, 0)) / elapsed for name in after
                           if name != "info"}
        return self.background

    @contextlib.contextmanager
    def counting(self, out: dict):
        """Fills ``out`` with calls by command (background subtracted), seconds and redis CPU."""
        before, cpu, started = self.redis.command_calls(), self.redis_cpu(), time.monotonic()
        yield
        after, elapsed = self.redis.command_calls(), time.monotonic() - started
        out["seconds"] = elapsed
        out["redis_cpu"] = self.redis_cpu() - cpu
        out["calls"] = {name: after.get(name, 0) - before.get(name, 0) - self.background.get(name, 0.0) * elapsed
                        for name in after}


def per_unit(counted: dict, units: int, less: dict[str, float] | None = None) -> dict:
    # INFO is this meter's own reading.
    calls = {name: value / units - (less or {}).get(name, 0.0) for name, value in counted["calls"].items()
             if name != "info"}
    calls = {name: value for name, value in calls.items() if abs(value) >= 0.005}
    return {"units": units, "calls": dict(sorted(calls.items(), key=lambda item: -item[1])),
            "total": sum(calls.values()), "redis_cpu_us": 1e6 * counted["redis_cpu"] / units}


def ops(n: int, publishes: int, engine: str, background_seconds: float, settle: float) -> dict:
    """Redis calls per publish and per poll, each kind counted over a known number of them."""
    raise_fd_limit()
    clients = max(1, -(-n // MAX_PER_CLIENT))
    rows: dict[str, dict] = {}
    with RedisServer() as redis, \
            ServerGroup(1, None, BACKEND=redis.url, **{**SERVER_OPTIONS, "WAIT_ENGINE": engine}) as group, \
            CrowdClients(group.wait_port, clients, "") as crowd:
        meter = CallMeter(redis)
        time.sleep(2.0)      # the first heartbeats
        background = meter.measure_background(background_seconds)

        def park(identifiers: list[str]) -> None:
            now = time.monotonic()
            crowd.call("park", [{"identifiers": part, "start_at": now, "window": PARK_WINDOW, "timeout": 60}
                                for part in split(identifiers, len(crowd))], 70)

        def bodies() -> list[dict]:
            return crowd.call("await_bodies", [{"timeout": 60.0}] * len(crowd), 70)

        counted: dict = {}
        with meter.counting(counted):
            for _ in range(publishes):
                group.publish("one", b'{"m":1}')
        rows["publish to 1 channel"] = per_unit(counted, publishes)
        ten = ",".join(f"ten{i}" for i in range(10))
        with meter.counting(counted):
            for _ in range(publishes):
                group.publish(ten, b'{"m":1}')
        rows["publish to 10 channels at once"] = per_unit(counted, publishes)

        with meter.counting(counted):
            park([f"new{i}" for i in range(n)])
            time.sleep(settle)
        rows["new poll, no cursor, fresh channel"] = per_unit(counted, n)
        with meter.counting(counted):
            crowd.call("close_all", [{}] * len(crowd), 30)
            time.sleep(settle)
        rows["poll closed by its client (last listener of its channel)"] = per_unit(counted, n)

        park(["bc"] * n)
        wait_listeners(group, {"bc"}, n)
        with meter.counting(counted):
            group.publish("bc", b'{"m":1}')
            cursors = [cursor for result in bodies() for cursor in result["cursors"]]
            park([f"{cursor}:bc" for cursor in cursors])
            time.sleep(settle)
        rows["broadcast answer and re-poll with its cursor (less the publish)"] = per_unit(
            counted, n, {name: value / n for name, value in rows["publish to 1 channel"]["calls"].items()})
        crowd.call("close_all", [{}] * len(crowd), 30)

        old = redis.command("TIME")[0].decode() + ".0"
        batch = 100
        for start in range(0, n, batch):
            ids = ",".join(f"hist{i}" for i in range(start, min(n, start + batch)))
            for number in range(3):
                group.publish(ids, b'{"m":%d}' % (number + 1))
        for label in ("old cursor, 3 messages to read, channel not heard here yet",
                      "old cursor, 3 messages to read, channel heard here"):
            with meter.counting(counted):
                answers = crowd.call("fetch", [{"identifiers": part, "window": PARK_WINDOW, "timeout": 60}
                                               for part in split([f"{old}:hist{i}" for i in range(n)],
                                                                 len(crowd))], 70)
                time.sleep(settle)
            if sum(answer["answered"] for answer in answers) != n:
                raise RuntimeError(f"{label}: only {sum(a['answered'] for a in answers)} of {n} polls answered")
            rows[label] = per_unit(counted, n)
    return {"n": n, "publishes": publishes, "engine": engine,
            "background_per_s": {name: value for name, value in sorted(background.items()) if value >= 0.005},
            "rows": rows}


def print_ops(r: dict) -> None:
    print(f"ops: one process ({r['engine']} engine), {r['publishes']} publishes per kind, {r['n']} polls per kind")
    print("  background, calls per second: "
          + ", ".join(f"{name} {value:.2f}" for name, value in r["background_per_s"].items()))
    for label, row in r["rows"].items():
        print(f"  {label}: {row['total']:.2f} calls each (redis CPU {row['redis_cpu_us']:.1f} us)")
        print("      " + ", ".join(f"{name} {value:.2f}" for name, value in row["calls"].items()))


# -- main -------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parts = parser.add_subparsers(dest="part", required=True)

    def common(sub, setups: bool = True):
        sub.add_argument("--engine", choices=["wsgi", "lean"], default="lean",
                         help="the servers' WAIT_ENGINE (default lean)")
        sub.add_argument("--json", type=Path, default=None, help="also write the figures here")
        if setups:
            sub.add_argument("--setups", default="memory,redis-1,redis-2",
                             help="which of memory, redis-1, redis-2 (default all three)")

    sub = parts.add_parser("rate", help="messages delivered per second, polls on their own channels")
    common(sub)
    sub.add_argument("--polls", type=int, default=2000)
    sub.add_argument("--seconds", type=float, default=5.0)
    sub.add_argument("--publishers", type=int, default=2, help="publisher processes (default 2)")
    sub.add_argument("--in-flight", type=int, default=8, help="publishes in flight per publisher (default 8)")
    sub.add_argument("--profile", type=Path, default=None, metavar="DIR",
                     help="record each server with py-spy into DIR; print each setup's top 20")
    sub = parts.add_parser("broadcast", help="one publish to N polls of one channel")
    common(sub)
    sub.add_argument("--n", default="1000,5000", help="poll counts (default 1000,5000)")
    sub.add_argument("--rounds", type=int, default=3)
    sub = parts.add_parser("capacity", help="parked polls over several processes, one publish to all")
    common(sub, setups=False)
    sub.add_argument("--n", type=int, default=60000)
    sub.add_argument("--processes", type=int, default=4)
    sub.add_argument("--clients", type=int, default=None,
                     help=f"client processes (default one per {MAX_PER_CLIENT} polls)")
    sub.add_argument("--sources", type=int, default=4, help="source addresses 127.0.0.2... (default 4)")
    sub.add_argument("--settle", type=float, default=2.0)
    sub = parts.add_parser("ops", help="Redis calls per publish and per poll")
    common(sub, setups=False)
    sub.add_argument("--n", type=int, default=1000, help="polls of each kind (default 1000)")
    sub.add_argument("--publishes", type=int, default=1000, help="publishes of each kind (default 1000)")
    sub.add_argument("--background", type=float, default=5.0, help="seconds of idle counting (default 5)")
    sub.add_argument("--settle", type=float, default=0.5)
    args = parser.parse_args()
    # A SIGTERM unwinds like an error, so every process started here is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    print(f"{args.part}: load average {load_average()} at start", flush=True)
    out: dict = {"part": args.part, "load_average_start": os.getloadavg()}
    if args.part in ("rate", "broadcast"):
        setups = [SETUPS[name] for name in args.setups.split(",")]
        for setup in setups:
            print(f"setup {setup.name}: {setup.pinning()}", flush=True)
    if args.part == "rate":
        out["rows"] = []
        if args.profile:
            args.profile.mkdir(parents=True, exist_ok=True)
        for setup in setups:
            row = rate(setup, args.engine, args.polls, args.seconds, args.publishers, args.in_flight, args.profile)
            out["rows"].append(row)
            print(format_rate(row), flush=True)
        for setup in setups if args.profile else []:
            print(f"\n== py-spy, {setup.name}, every server process ==")
            print(summary(sorted(args.profile.glob(f"rate-{setup.name}-*.raw")), 20), end="")
    elif args.part == "broadcast":
        rows = []
        for n in [int(x) for x in args.n.split(",")]:
            for setup in setups:
                rows += broadcast(setup, args.engine, n, args.rounds)
        out["rows"] = rows
        out["medians"] = broadcast_medians(rows)
        for row in out["medians"]:
            print(format_broadcast(row).replace(" rmedian", " median"), flush=True)
    elif args.part == "capacity":
        clients = args.clients or max(1, -(-args.n // MAX_PER_CLIENT))
        if args.n / args.sources > 28000:
            raise SystemExit(f"--sources {args.sources} is too few: about 28000 polls per source address")
        out["result"] = capacity(args.n, args.processes, clients, args.sources, args.engine, args.settle)
        print_capacity(out["result"])
    elif args.part == "ops":
        out["result"] = ops(args.n, args.publishes, args.engine, args.background, args.settle)
        print_ops(out["result"])
    out["load_average_end"] = os.getloadavg()
    print(f"{args.part}: load average {load_average()} at end", flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
