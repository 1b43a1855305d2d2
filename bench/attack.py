"""Hostile clients: what a few ill-behaved clients cost a running server.

Each scenario starts a realplexor process (``server_process.py``), attacks
it over loopback and prints what it cost the server: resident memory,
descriptors, how long the event loop stalled, how many hostile
connections are still open. Every socket operation and every wait has a
timeout, and each scenario holds a bounded number of sockets.

    python attack.py huge-answer [--engine lean] [--server-tree ../old]
    python attack.py all --engine lean

Scenarios:

- ``huge-answer``: 30 messages of 100 KB queued on each of 20 channels,
  then 20 polls asking for all of them (cursor 0) that never read.
- ``wide-publish``: one listener on each of N channels and one publish
  to all N ids; then 5000 listeners of ``all`` and one publish to
  ``all`` and 19 999 other ids.
- ``ghost-polls``: K polls that each send one more byte and close.
- ``slow-requests``: WAIT requests and IN bodies sent a byte at a time,
  and polls that never read a large answer.
- ``many-channels``: P anonymous polls of 1000 ids each.
- ``in-flood``: publishes to 200 000 distinct ids, then 500 publishes of
  195 KB.

Stalls are measured from outside: a probe process sends a small
``ONLINE probe_`` request to the IN line every 10 ms, one at a time, and
the longest round trip while the attack runs is the longest time the
server's event loop did not get to it. With ``--server-tree PATH`` the
server under test is the realplexor package of another checkout (an
older version, e.g. ``git worktree add ../old d64a1bb``); options that
tree does not know are left out, and the figures say so.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import shlex
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import psutil

from crowd import FIRST_BYTES, CrowdClients, client_count
from idle_memory import park_all, settled_rss
from server_process import (IO_TIMEOUT, ServerProcess, config_options, raise_fd_limit,
                            read_to_eof)

# The old server's default; requests up to it need no option.
DEFAULT_IN_MAXLEN = 204800
PROBE_REQUEST = b"ONLINE probe_\n\n"
PROBE_INTERVAL = 0.01
PROBE_TIMEOUT = 120.0
# The probe runs this long before an attack, for its quiet round trip.
PROBE_BASELINE = 1.0
# A publish or a delivery to many listeners may take long on an old tree.
SLOW_TIMEOUT = 300.0
RSS_SAMPLE = 0.1
# Sockets one harness process may hold (client processes hold at most 5000 each).
MAX_SOCKETS = 15000

Row = tuple[str, str]


# -- the server under test ----------------------------------------------------


@dataclass
class Target:
    """Which server to attack: a WAIT engine and a source tree (None: this one)."""

    engine: str
    tree: Path | None
    known: frozenset[str]
    # options a scenario asked for that the tree does not know
    left_out: dict[str, object] = field(default_factory=dict)

    def server(self, options: dict, newer: dict | None = None) -> ServerProcess:
        """A server with ``options``, and those of ``newer`` that this tree knows.

        ``newer`` holds options that only some versions have; the others
        are noted in :attr:`left_out`.
        """
        chosen = {"WAIT_ENGINE": self.engine, **options}
        for name, value in (newer or {}).items():
            if name in self.known:
                chosen[name] = value
            else:
                self.left_out[name] = value
        return ServerProcess(tree=self.tree, **chosen)

    def describe(self) -> str:
        """The tree and its commit, and the engine."""
        where = self.tree or Path(__file__).resolve().parent.parent
        try:
            commit = subprocess.run(["git", "-C", str(where), "rev-parse", "--short", "HEAD"],
                                    capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            commit = ""
        name = "this tree" if self.tree is None else str(self.tree)
        return f"{name} ({commit or 'no commit'}), WAIT_ENGINE {self.engine}"


def server_descriptors(server: ServerProcess) -> int:
    """How many file descriptors the server holds."""
    return psutil.Process(server.pid).num_fds()


def server_peer_ports(server: ServerProcess) -> set[int]:
    """Client-side ports of the TCP connections the server holds open."""
    return {conn.raddr.port for conn in psutil.Process(server.pid).net_connections("tcp")
            if conn.raddr}


def peak_rss(server: ServerProcess, seconds: float) -> tuple[int, int]:
    """Sample the server's RSS for ``seconds``; the highest and the last reading."""
    deadline = time.monotonic() + seconds
    peak = last = server.rss()
    while time.monotonic() < deadline:
        time.sleep(RSS_SAMPLE)
        last = server.rss()
        peak = max(peak, last)
    return peak, last


def timed_command(server: ServerProcess, command: bytes) -> tuple[float, bytes]:
    """Seconds an IN-line command took, and its reply body."""
    started = time.monotonic()
    reply = server.in_request(command, timeout=SLOW_TIMEOUT)
    took = time.monotonic() - started
    head, _, body = reply.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.0 200"):
        raise RuntimeError(f"{command.split()[0].decode()} refused: {reply[:200]!r}")
    return took, body


def online_under(server: ServerProcess, prefix: str) -> tuple[int, int]:
    """Online channels whose id starts with ``prefix``, and their listeners in all."""
    counts = server.online()
    matching = [count for channel, count in counts.items() if channel.startswith(prefix)]
    return len(matching), sum(matching)


def publish(server: ServerProcess, ids: list[str], data: bytes) -> float:
    """Publish ``data`` to every id in one request; the round trip in seconds."""
    sent_at, _ = server.publish(",".join(ids), data, timeout=SLOW_TIMEOUT)
    return time.monotonic() - sent_at


def check_sockets(count: int, what: str) -> None:
    """Refuse a scenario that would hold more than MAX_SOCKETS sockets in this process."""
    if count > MAX_SOCKETS:
        raise SystemExit(f"{count} {what} would hold more than {MAX_SOCKETS} sockets in one process")


def json_string(size: int) -> bytes:
    """A JSON string of exactly ``size`` bytes."""
    return b'"' + b"x" * (size - 2) + b'"'


# -- raw WAIT-line clients ------------------------------------------------------


def connect(port: int, rcvbuf: int | None = None, timeout: float = IO_TIMEOUT) -> socket.socket:
    """A connection to 127.0.0.1:``port``; ``rcvbuf`` sets a small receive window first."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(timeout)
        sock.connect(("127.0.0.1", port))
    except OSError:
        sock.close()
        raise
    return sock


def poll_request(identifier: str, post: bool = False) -> bytes:
    """A close-delimited long poll: a GET, or a POST carrying the identifier in its body."""
    if not post:
        return f"GET /?identifier={identifier} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
    body = f"identifier={identifier}".encode()
    return (f"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Type: application/x-www-form-urlencoded\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def park_poll(port: int, identifier: str, post: bool = False) -> socket.socket:
    """A poll the server has parked (headers and first bytes read); its socket."""
    sock = connect(port)
    try:
        sock.sendall(poll_request(identifier, post))
        buf = b""
        deadline = time.monotonic() + IO_TIMEOUT
        while True:
            head_end = buf.find(b"\r\n\r\n")
            if head_end >= 0 and len(buf) >= head_end + 4 + len(FIRST_BYTES):
                break
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            chunk = sock.recv(4096)
            if not chunk:
                raise RuntimeError(f"poll closed before it was parked: {buf[:200]!r}")
            buf += chunk
        if not buf.startswith(b"HTTP/1.1 200") or buf[head_end + 4:] != FIRST_BYTES:
            raise RuntimeError(f"poll not parked: {buf[:200]!r}")
    except BaseException:
        sock.close()
        raise
    return sock


def read_answer(port: int, identifier: str) -> tuple[bytes, float]:
    """A poll read to its end: the body after the headers, and the seconds it took."""
    started = time.monotonic()
    with connect(port) as sock:
        sock.sendall(poll_request(identifier))
        reply = read_to_eof(sock, SLOW_TIMEOUT)
    took = time.monotonic() - started
    head, _, body = reply.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"poll refused: {reply[:200]!r}")
    return body.removeprefix(FIRST_BYTES), took


def close_all(socks: list[socket.socket]) -> None:
    """Close every socket in ``socks``."""
    for sock in socks:
        sock.close()
    socks.clear()


# -- the stall probe -------------------------------------------------------------


def _probe_run(port: int, stop, conn) -> None:
    """The probe process: one small ONLINE at a time, every PROBE_INTERVAL, until told to stop.

    Sends back ``[(sent_at, round trip, answered), ...]``.
    """
    samples = []
    while not stop.is_set():
        sent_at = time.monotonic()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=PROBE_TIMEOUT) as sock:
                sock.sendall(PROBE_REQUEST)
                sock.shutdown(socket.SHUT_WR)
                answered = read_to_eof(sock, PROBE_TIMEOUT).startswith(b"HTTP/1.0 200")
        except OSError:
            answered = False
        samples.append((sent_at, time.monotonic() - sent_at, answered))
        stop.wait(max(0.0, sent_at + PROBE_INTERVAL - time.monotonic()))
    conn.send(samples)


class StallProbe:
    """The probe in a process of its own, so the attack's clients cannot delay it.

    Use as a context manager; afterwards :meth:`window` sums up the
    round trips that overlapped any stretch of time.
    """

    def __init__(self, in_port: int):
        context = multiprocessing.get_context("fork")
        self._stop = context.Event()
        self._conn, child = context.Pipe(duplex=False)
        self._process = context.Process(target=_probe_run, args=(in_port, self._stop, child), daemon=True)
        self.samples: list[tuple[float, float, bool]] = []

    def __enter__(self) -> "StallProbe":
        self._process.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._conn.poll(PROBE_TIMEOUT + 10):
            self.samples = self._conn.recv()
        self._process.join(10)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(5)

    def window(self, start: float, end: float) -> dict:
        """Round trips of the probes in flight at any time between ``start`` and ``end``."""
        trips = [trip for sent_at, trip, _ in self.samples if sent_at <= end and sent_at + trip >= start]
        failed = sum(1 for sent_at, trip, ok in self.samples
                     if not ok and sent_at <= end and sent_at + trip >= start)
        if not trips:
            return {"count": 0, "median": 0.0, "max": 0.0, "failed": 0}
        return {"count": len(trips), "median": statistics.median(trips), "max": max(trips),
                "failed": failed}


def stall_text(probe: StallProbe, start: float, end: float) -> str:
    """The longest probe round trip over a window, with the median and the count."""
    seen = probe.window(start, end)
    text = f"{ms(seen['max'])} (median round trip {ms(seen['median'])}, {seen['count']} probes"
    if seen["failed"]:
        text += f", {seen['failed']} unanswered"
    return text + ")"


# -- formatting -------------------------------------------------------------------


def mib(size: float) -> str:
    return f"{size / 2**20:.1f} MiB"


def ms(seconds: float) -> str:
    if seconds < 0.01:
        return f"{seconds * 1000:.1f} ms"
    return f"{seconds * 1000:.0f} ms" if seconds < 10 else f"{seconds:.1f} s"


# -- scenarios ------------------------------------------------------------------------


def huge_answer(target: Target, args) -> list[Row]:
    """Polls asking for every queued message of many channels, that never read the answer.

    Each poll listens from cursor 0 to ``--channels`` channels holding
    ``--messages`` messages of ``--size`` bytes each, and sets a small
    receive window (``--rcvbuf``), so the kernel holds little of the
    answer for it. Reports the server's RSS before, at its peak and
    after ``--hold`` seconds, the longest stall meanwhile, and the size of
    one answer (read by one more poll, after the others closed).
    """
    check_sockets(args.polls, "polls")
    options = {"IN_MAXLEN": max(DEFAULT_IN_MAXLEN, args.size + 4096),
               "MAX_DATA_FOR_ID": max(30, args.messages), "WAIT_TIMEOUT": 3600}
    channels = [f"c{index}" for index in range(args.channels)]
    identifier = ",".join(f"0:{channel}" for channel in channels)
    data = json_string(args.size)
    socks: list[socket.socket] = []
    with target.server(options) as server:
        for _ in range(args.messages):
            for channel in channels:
                publish(server, [channel], data)
        before = settled_rss(server, 1.0)
        with StallProbe(server.in_port) as probe:
            time.sleep(PROBE_BASELINE)
            start = time.monotonic()
            try:
                for _ in range(args.polls):
                    socks.append(connect(server.wait_port, args.rcvbuf))
                    socks[-1].sendall(poll_request(identifier))
                peak, last = peak_rss(server, args.hold)
            finally:
                close_all(socks)
            end = time.monotonic()
        time.sleep(1.0)
        body, took = read_answer(server.wait_port, identifier)
    queued = args.channels * args.messages * args.size
    return [
        ("queued", f"{args.messages} x {args.size} bytes on each of {args.channels} channels "
                   f"({mib(queued)})"),
        ("hostile polls", f"{args.polls}, receive window {args.rcvbuf} bytes, held {args.hold:g} s"),
        ("RSS before", mib(before)),
        ("RSS peak while held", f"{mib(peak)} (+{mib(peak - before)})"),
        ("RSS at the end", f"{mib(last)} (+{mib(last - before)})"),
        ("longest stall", stall_text(probe, start, end)),
        ("one answer", f"{len(body)} bytes, {len(json.loads(body))} messages, read in {ms(took)}"),
    ]


def wide_publish(target: Target, args) -> list[Row]:
    """One publish to every listened channel at once.

    For each N of ``--sizes``: one poll on each of N channels, then one
    publish to all N ids. Then ``--all-listeners`` polls on ``all`` and one
    publish to ``all`` and ``--others`` more ids. Reports the publish's
    round trip, the time until every poll had its body, and the longest
    stall meanwhile.
    """
    rounds = [(f"{n} channels, a poll each", [f"w{index}" for index in range(n)],
               [f"w{index}" for index in range(n)]) for n in args.sizes]
    rounds.append((f"{args.all_listeners} polls of all, publish to all + {args.others} ids",
                   ["all"] * args.all_listeners, ["all"] + [f"o{index}" for index in range(args.others)]))
    longest = max(len(",".join(ids)) for _, _, ids in rounds)
    options = {"IN_MAXLEN": max(DEFAULT_IN_MAXLEN, longest + 4096), "WAIT_TIMEOUT": 3600}
    raise_fd_limit()
    biggest = max(len(polls) for _, polls, _ in rounds)
    measured = []
    with target.server(options) as server, \
            CrowdClients(server.wait_port, client_count(biggest, None)) as crowd:
        with StallProbe(server.in_port) as probe:
            for label, polls, ids in rounds:
                park_all(crowd, polls, SLOW_TIMEOUT)
                time.sleep(0.5)
                start = time.monotonic()
                round_trip = publish(server, ids, b'"wide"')
                arrived = crowd.call("await_bodies", [{"timeout": SLOW_TIMEOUT}] * len(crowd),
                                     SLOW_TIMEOUT + 10)
                last = max(max(result["arrived"], default=start) for result in arrived)
                measured.append((label, round_trip, last - start, start, last + 0.1))
                time.sleep(0.5)
    rows: list[Row] = []
    for label, round_trip, delivered, start, end in measured:
        rows.append((label, f"publish {ms(round_trip)}, all bodies {ms(delivered)}, "
                            f"longest stall {stall_text(probe, start, end)}"))
    return rows


def ghost_polls(target: Target, args) -> list[Row]:
    """Polls that send one byte more after their request, then close.

    For comparison the same number of polls close plainly first. After
    each batch: the server's descriptors (above what it held before) and
    the listeners ONLINE still counts on the batch's channels, at once
    and ``--settle`` seconds later (``OFFLINE_TIMEOUT`` is 1 s).
    """
    options = {"WAIT_TIMEOUT": 3600, "OFFLINE_TIMEOUT": 1}
    rows: list[Row] = []
    with target.server(options) as server:
        before = server_descriptors(server)
        rows.append(("server descriptors before", str(before)))
        for label, prefix, extra in (("plain close", "gp_", b""), ("one byte, then close", "gb_", b"x")):
            started = time.monotonic()
            for index in range(args.polls):
                sock = park_poll(server.wait_port, f"{prefix}{index}")
                if extra:
                    sock.sendall(extra)
                sock.close()
            took = time.monotonic() - started
            for when, pause in (("at once", 0.0), (f"after {args.settle:g} s", args.settle)):
                time.sleep(pause)
                channels, listeners = online_under(server, prefix)
                rows.append((f"{args.polls} polls, {label}: {when}",
                             f"+{server_descriptors(server) - before} descriptors, "
                             f"{listeners} listeners on {channels} online channels"))
            rows.append((f"{args.polls} polls, {label}: made in", ms(took)))
    return rows


def slow_requests(target: Target, args) -> list[Row]:
    """Connections that take forever: trickled requests and unread answers.

    ``--clients`` of each kind: WAIT requests sent one byte every
    ``--gap`` seconds, IN publishes whose body comes one byte every
    ``--gap`` seconds, and polls with a small receive window that never
    read an answer of ``--big-messages`` queued messages of 190 KB (the
    kernel takes a few MB of an answer off the server's hands; trees
    that cap an answer at WAIT_MAX_ANSWER get ``--max-answer`` if given).
    Reports how many of each the server still holds open (its own TCP
    connections, from psutil) at each of ``--checks`` seconds, next to the
    configured ``IN_TIMEOUT`` and ``WAIT_TIMEOUT``.
    """
    check_sockets(3 * args.clients, "slow clients")
    big_size = 190_000
    options = {"IN_TIMEOUT": args.in_timeout, "WAIT_TIMEOUT": args.wait_timeout,
               "MAX_DATA_FOR_ID": max(30, args.big_messages)}
    newer = {"WAIT_MAX_ANSWER": args.max_answer} if args.max_answer is not None else {}
    pad = "a" * int(max(args.checks) / args.gap + 100)
    kinds: dict[str, list[tuple[socket.socket, bytes]]] = {}
    with target.server(options, newer) as server:
        for _ in range(args.big_messages):
            publish(server, ["slowbig"], json_string(big_size))
        try:
            kinds["WAIT request, a byte at a time"] = [
                _trickled(server.wait_port, f"GET /?identifier=slow{index} HTTP/1.1\r\n"
                                            f"Host: 127.0.0.1\r\nX-Pad: {pad}".encode(), 1)
                for index in range(args.clients)]
            head = (f"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(pad)}\r\n"
                    f"X-Realplexor: identifier=slow\r\n\r\n").encode()
            kinds["IN body, a byte at a time"] = [
                _trickled(server.in_port, head + pad.encode(), len(head) + 1)
                for _ in range(args.clients)]
            kinds["WAIT answer never read"] = [
                _unread(server.wait_port, "0:slowbig", args.rcvbuf) for _ in range(args.clients)]
            counts = _count_open_over_time(server, kinds, args.checks, args.gap)
        finally:
            for socks in kinds.values():
                close_all([sock for sock, _ in socks])
    rows: list[Row] = [
        ("configured", f"IN_TIMEOUT {args.in_timeout:g} s, WAIT_TIMEOUT {args.wait_timeout:g} s; "
                       f"a byte every {args.gap:g} s"),
        ("queued for the unread polls", f"{args.big_messages} x {big_size} bytes"),
    ]
    for kind, socks in kinds.items():
        rows.append((f"{kind} ({len(socks)})", ", ".join(
            f"{open_count} open at {at:g} s" for at, open_count in counts[kind])))
    return rows


def _trickled(port: int, request: bytes, first: int) -> tuple[socket.socket, bytes]:
    """A connection that has sent the first ``first`` bytes of ``request``; the socket and the rest."""
    sock = connect(port)
    sock.sendall(request[:first])
    return sock, request[first:]


def _unread(port: int, identifier: str, rcvbuf: int) -> tuple[socket.socket, bytes]:
    """A poll with a small receive window that will never be read."""
    sock = connect(port, rcvbuf)
    sock.sendall(poll_request(identifier))
    return sock, b""


def _count_open_over_time(server: ServerProcess, kinds: dict, checks: list[float],
                          gap: float) -> dict[str, list[tuple[float, int]]]:
    """Trickle a byte every ``gap`` seconds on a thread; count each kind's open connections at ``checks``."""
    stop = threading.Event()
    trickling = [entry for socks in kinds.values() for entry in socks if entry[1]]
    ports = {kind: {sock.getsockname()[1] for sock, _ in socks} for kind, socks in kinds.items()}
    thread = threading.Thread(target=_trickle, args=(trickling, gap, stop), daemon=True)
    start = time.monotonic()
    thread.start()
    counts: dict[str, list[tuple[float, int]]] = {kind: [] for kind in kinds}
    try:
        for at in sorted(checks):
            time.sleep(max(0.0, start + at - time.monotonic()))
            held = server_peer_ports(server)
            for kind in kinds:
                counts[kind].append((at, len(ports[kind] & held)))
    finally:
        stop.set()
        thread.join(gap + 5)
    return counts


def _trickle(entries: list[tuple[socket.socket, bytes]], gap: float, stop: threading.Event) -> None:
    """Send each connection its next byte every ``gap`` seconds until ``stop``; drop those that fail."""
    sent = 0
    alive = list(entries)
    while alive and not stop.wait(gap):
        sent += 1
        still = []
        for sock, rest in alive:
            if sent > len(rest):
                continue
            try:
                sock.settimeout(1.0)
                sock.send(rest[sent - 1:sent])
                still.append((sock, rest))
            except OSError:
                pass
        alive = still


def many_channels(target: Target, args) -> list[Row]:
    """Anonymous polls, each listening to many channels nobody else uses.

    ``--polls`` polls of ``--ids`` ids each (sent as POST bodies, as a long
    identifier list does not fit a request line). Reports RSS before,
    with them parked and after they left (``OFFLINE_TIMEOUT`` plus a
    margin), and the time and size of STATS and of a full ONLINE.
    """
    check_sockets(args.polls, "polls")
    options = {"WAIT_TIMEOUT": 3600, "OFFLINE_TIMEOUT": args.offline_timeout,
               "WAIT_MAXLEN": max(5120, args.ids * 8 + 1024)}
    newer = {"WAIT_MAX_IDS": args.ids} if args.ids > 1000 else {}
    socks: list[socket.socket] = []
    with target.server(options, newer) as server:
        before = settled_rss(server, 1.0)
        started = time.monotonic()
        try:
            for poll in range(args.polls):
                ids = ",".join(f"m{poll * args.ids + index:x}" for index in range(args.ids))
                socks.append(park_poll(server.wait_port, ids, post=True))
            parked = time.monotonic() - started
            with_them = settled_rss(server, 1.0)
            stats_took, stats = timed_command(server, b"STATS\n\n")
            online_took, online = timed_command(server, b"ONLINE\n\n")
        finally:
            close_all(socks)
        time.sleep(args.offline_timeout + 1.5)
        left_online = len(server.online())
        after = settled_rss(server, 1.0)
    return [
        ("polls", f"{args.polls} x {args.ids} ids ({args.polls * args.ids} channels), parked in {ms(parked)}"),
        ("RSS before", mib(before)),
        ("RSS with them", f"{mib(with_them)} (+{mib(with_them - before)}, "
                          f"{(with_them - before) / (args.polls * args.ids):.0f} bytes per channel)"),
        ("RSS after they left", f"{mib(after)} ({left_online} channels still online)"),
        ("STATS", f"{len(stats)} bytes in {ms(stats_took)}"),
        ("ONLINE", f"{len(online.splitlines())} lines, {len(online)} bytes in {ms(online_took)}"),
    ]


def in_flood(target: Target, args) -> list[Row]:
    """Publishes that fill the server with queued messages.

    First ``--ids`` distinct ids in publishes of ``--per-request`` ids each,
    then ``--publishes`` publishes of ``--size`` bytes, each to a channel of
    its own. Reports RSS before and after each, the longest publish round
    trip, and what STATS says (channels, queued bytes where the tree
    counts them; ``--max-queue-mb`` is passed to trees that know it).
    """
    batch_len = len(",".join(f"f{index:x}" for index in range(args.ids - args.per_request, args.ids)))
    options = {"IN_MAXLEN": max(DEFAULT_IN_MAXLEN, batch_len + 4096, args.size + 4096)}
    newer = {"MAX_QUEUE_MB": args.max_queue_mb} if args.max_queue_mb is not None else {}
    rows: list[Row] = []
    with target.server(options, newer) as server:
        before = settled_rss(server, 1.0)
        rows.append(("RSS before", mib(before)))
        longest = 0.0
        for first in range(0, args.ids, args.per_request):
            ids = [f"f{index:x}" for index in range(first, min(first + args.per_request, args.ids))]
            longest = max(longest, publish(server, ids, b'"flood"'))
        after_ids = settled_rss(server, 1.0)
        rows.append((f"after {args.ids} ids in publishes of {args.per_request}",
                     f"RSS {mib(after_ids)} (+{mib(after_ids - before)}), longest publish {ms(longest)}; "
                     + _stats_summary(server)))
        data = json_string(args.size)
        longest = 0.0
        for index in range(args.publishes):
            longest = max(longest, publish(server, [f"big{index}"], data))
        after_big = settled_rss(server, 1.0)
        rows.append((f"after {args.publishes} publishes of {args.size} bytes",
                     f"RSS {mib(after_big)} (+{mib(after_big - after_ids)}), longest publish {ms(longest)}; "
                     + _stats_summary(server)))
    return rows


def _stats_summary(server: ServerProcess) -> str:
    """What STATS says about channels and queued bytes, and its size and time."""
    took, body = timed_command(server, b"STATS\n\n")
    lines = body.decode("utf-8", "replace").splitlines()
    said = {}
    for line in lines:
        name, colon, value = line.partition(": ")
        if colon and not line.startswith("["):
            said[name] = value
    queued = said.get("queued bytes", "not counted by this tree")
    dropped = said.get("queues dropped over MAX_QUEUE_MB")
    text = f"STATS: {said.get('channels', '?')} channels, queued bytes {queued}"
    if dropped is not None:
        text += f", queues dropped {dropped}"
    return text + f" ({len(body)} bytes in {ms(took)})"


# -- command line ---------------------------------------------------------------------


SCENARIOS: dict[str, Callable[[Target, argparse.Namespace], list[Row]]] = {
    "huge-answer": huge_answer,
    "wide-publish": wide_publish,
    "ghost-polls": ghost_polls,
    "slow-requests": slow_requests,
    "many-channels": many_channels,
    "in-flood": in_flood,
}


def _numbers(kind):
    return lambda text: [kind(part) for part in text.split(",") if part]


def build_parser() -> argparse.ArgumentParser:
    """The command line: a subcommand per scenario, or ``all``."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--engine", choices=["wsgi", "lean"], default="wsgi",
                        help="the server's WAIT_ENGINE (default wsgi)")
    common.add_argument("--server-tree", type=Path, default=None, metavar="PATH",
                        help="run the realplexor package of this source tree (default: this one)")
    common.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="scenario", required=True)
    add = lambda name, text: sub.add_parser(name, parents=[common], help=text)  # noqa: E731

    p = add("huge-answer", "polls of many full queues that never read")
    p.add_argument("--channels", type=int, default=20)
    p.add_argument("--messages", type=int, default=30, help="messages per channel (default 30)")
    p.add_argument("--size", type=int, default=100_000, help="bytes per message (default 100000)")
    p.add_argument("--polls", type=int, default=20)
    p.add_argument("--rcvbuf", type=int, default=4096, help="each poll's receive buffer (default 4096)")
    p.add_argument("--hold", type=float, default=15.0, help="seconds the polls stay open (default 15)")

    p = add("wide-publish", "one publish to many listened channels")
    p.add_argument("--sizes", type=_numbers(int), default=[1000, 4000, 8000],
                   help="channel counts, one poll each (default 1000,4000,8000); the server "
                        "needs a descriptor per poll, so stay below its open-file limit")
    p.add_argument("--all-listeners", type=int, default=5000)
    p.add_argument("--others", type=int, default=19_999, help="ids published to besides all")

    p = add("ghost-polls", "polls that send a byte more and close")
    p.add_argument("--polls", type=int, default=2000)
    p.add_argument("--settle", type=float, default=2.0)

    p = add("slow-requests", "trickled requests and unread answers")
    p.add_argument("--clients", type=int, default=20, help="connections of each kind (default 20)")
    p.add_argument("--gap", type=float, default=1.0, help="seconds between trickled bytes (default 1)")
    p.add_argument("--in-timeout", type=float, default=2.0)
    p.add_argument("--wait-timeout", type=float, default=2.0)
    p.add_argument("--checks", type=_numbers(float), default=[5.0, 35.0],
                   help="when to count open connections, in seconds (default 5,35)")
    p.add_argument("--big-messages", type=int, default=30,
                   help="190 KB messages queued for the unread polls (default 30)")
    p.add_argument("--rcvbuf", type=int, default=4096, help="the unread polls' receive buffer")
    p.add_argument("--max-answer", type=int, default=None,
                   help="WAIT_MAX_ANSWER, for trees that know it (default: theirs)")

    p = add("many-channels", "polls of a thousand ids each")
    p.add_argument("--polls", type=int, default=200)
    p.add_argument("--ids", type=int, default=1000)
    p.add_argument("--offline-timeout", type=float, default=2.0)

    p = add("in-flood", "publishes that fill the queues")
    p.add_argument("--ids", type=int, default=200_000)
    p.add_argument("--per-request", type=int, default=25_000)
    p.add_argument("--publishes", type=int, default=500)
    p.add_argument("--size", type=int, default=195_000)
    p.add_argument("--max-queue-mb", type=float, default=None,
                   help="MAX_QUEUE_MB, for trees that know it (default: theirs)")

    add("all", "every scenario with its defaults")
    return parser


def run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict:
    """Run the chosen scenario (or every one); print and return the figures."""
    raise_fd_limit()
    tree = args.server_tree.resolve() if args.server_tree else None
    target = Target(args.engine, tree, config_options(tree))
    if args.scenario == "all":
        common = ["--engine", args.engine] + (["--server-tree", str(tree)] if tree else [])
        runs = [parser.parse_args([name] + common) for name in SCENARIOS]
    else:
        runs = [args]
    print(f"# {shlex.join([Path(sys.argv[0]).name] + sys.argv[1:])}")
    print(f"# server: {target.describe()}")
    figures = {}
    for chosen in runs:
        started = time.monotonic()
        target.left_out.clear()
        rows = SCENARIOS[chosen.scenario](target, chosen)
        if target.left_out:
            rows.append(("left out (unknown to this tree)",
                         ", ".join(f"{name} = {value}" for name, value in target.left_out.items())))
        print(f"\n{chosen.scenario} ({time.monotonic() - started:.0f} s)")
        width = max(len(label) for label, _ in rows)
        for label, value in rows:
            print(f"  {label:<{width}}  {value}")
        sys.stdout.flush()
        figures[chosen.scenario] = dict(rows)
    return figures


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    figures = run(parser, args)
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    main()
