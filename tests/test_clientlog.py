"""Clients' mistakes in the log: escaped, cut short, rate-limited, never ERROR."""
from __future__ import annotations

import logging
import math
import random
import re
import socket
import time
import uuid

import pytest

from conftest import parse_response, read_to_eof
from realplexor.clientlog import EXCERPT, LINES_PER_WINDOW, WINDOW, BadRequestLog, escape

PRINTABLE = re.compile(r"[ -~]*\Z")
SUMMARY = re.compile(r"(\d+) more bad requests suppressed in the last")
MAX_LINE = 300


# -- escape ------------------------------------------------------------------

def test_escape_keeps_printable_ascii_and_escapes_the_rest():
    assert escape(b"GET / HTTP/1.1") == "GET / HTTP/1.1"
    assert escape(b"a\r\nb\tc\x00\x1b[2J\x7f\xff") == "a\\r\\nb\\tc\\x00\\x1b[2J\\x7f\\xff"
    assert escape("caf\xe9 \u20ac \U0001f600") == "caf\\xe9 \\u20ac \\U0001f600"


def test_escape_cuts_long_input_and_says_so():
    assert escape(b"x" * 5000) == "x" * EXCERPT + "..."
    assert escape(b"x" * 10, limit=10) == "x" * 10
    assert escape(b"x" * 11, limit=10) == "x" * 10 + "..."


def test_escape_never_cuts_an_escape_in_half():
    rng = random.Random(7)
    alphabet = [chr(c) for c in range(0x300) if c != ord("\\")] + ["\u20ac", "\U0001f600"]
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 60)))
        limit = rng.randrange(1, 40)
        shown = escape(text, limit)
        assert PRINTABLE.match(shown), shown
        body = shown[:-3] if shown.endswith("...") else shown
        assert len(body) <= limit
        # Every backslash starts a whole escape.
        assert re.fullmatch(r"(?:[^\\]|\\[tnr]|\\x[0-9a-f]{2}|\\u[0-9a-f]{4}|\\U[0-9a-f]{8})*", body), shown


# -- BadRequestLog -------------------------------------------------------------

class Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines: list[tuple[int, str]] = []

    def emit(self, record):
        self.lines.append((record.levelno, record.getMessage()))


@pytest.fixture
def recorded():
    logger = logging.getLogger(f"test.clientlog.{uuid.uuid4().hex}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    records = Records()
    logger.addHandler(records)
    return logger, records


class FakeTime:
    def __init__(self):
        self.now = 100.0
        self.scheduled: list[tuple[float, object]] = []

    def later(self, delay, function):
        self.scheduled.append((delay, function))


def test_at_most_the_window_lines_then_one_summary(recorded):
    logger, records = recorded
    clock = FakeTime()
    log = BadRequestLog(logger, lines=3, window=1.0, clock=lambda: clock.now, later=clock.later)
    for n in range(10):
        log.log("bad %d", n)
        clock.now += 0.01
    assert records.lines == [(logging.INFO, "bad 0"), (logging.INFO, "bad 1"), (logging.INFO, "bad 2")]
    assert len(clock.scheduled) == 1 and clock.scheduled[0][0] == pytest.approx(0.97)
    clock.scheduled[0][1]()
    assert records.lines[-1] == (logging.INFO, "7 more bad requests suppressed in the last 1 s")
    clock.now += 1
    log.log("bad %d", 10)
    assert records.lines[-1] == (logging.INFO, "bad 10")
    assert len(records.lines) == 5


def test_a_new_window_summarises_the_last_one_first(recorded):
    logger, records = recorded
    clock = FakeTime()
    log = BadRequestLog(logger, lines=1, window=1.0, clock=lambda: clock.now, later=clock.later)
    log.log("one")
    log.log("two")
    clock.now += 1.5
    log.log("three")
    assert [line for _, line in records.lines] == [
        "one", "1 more bad requests suppressed in the last 1 s", "three"]
    clock.scheduled[0][1]()     # the timer, late: nothing left to say
    assert len(records.lines) == 3


def test_nothing_is_counted_when_the_level_is_off(recorded):
    logger, records = recorded
    logger.setLevel(logging.ERROR)
    clock = FakeTime()
    log = BadRequestLog(logger, lines=1, clock=lambda: clock.now, later=clock.later)
    for _ in range(5):
        log.log("bad")
    assert records.lines == [] and clock.scheduled == []


# -- a real server's log ---------------------------------------------------------

def throw(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        try:
            return read_to_eof(sock)
        except ConnectionResetError:
            return b""


def logged_since(server, seen: int) -> list[str]:
    """Lines logged since ``seen``, but for the server's start and the reload that marked their end."""
    return [line for line in server.settled_log()[seen:]
            if "configuration reloaded" not in line and "realplexor started" not in line]


def assert_tidy(lines: list[str]) -> None:
    for line in lines:
        assert " ERROR " not in line and "Traceback" not in line, line
        assert PRINTABLE.match(line), line
        assert len(line) <= MAX_LINE, line


JUNK = b"\x1b[2J\x00\x07GET\x08 /\x7f\xff junk\r\n\r\n"
_rng = random.Random(3)
LONG_GARBAGE = bytes(_rng.choice([c for c in range(1, 256) if c not in b" \r\n"])
                     for _ in range(5000)) + b"\r\n\r\n"


@pytest.mark.parametrize("engine", ["wsgi", "lean"])
@pytest.mark.parametrize("request_bytes", [JUNK, LONG_GARBAGE], ids=["junk", "long-garbage"])
def test_bad_wait_request_is_one_escaped_info_line(server_factory, engine, request_bytes):
    server = server_factory(WAIT_ENGINE=engine)
    seen = len(server.output.lines)
    assert parse_response(throw(server.wait_port, request_bytes)).status == 400
    lines = logged_since(server, seen)
    assert len(lines) <= 1, lines
    assert_tidy(lines)
    assert all(" INFO " in line for line in lines), lines


@pytest.mark.parametrize("request_bytes", [
    b"X-Realplexor: identifier=a\r\nContent-Length: \x1b[31m\x00\xff\r\n\r\n1",
    b"identifier=" + b"\x07@" * 2500 + b"\n\n1",
], ids=["junk", "long-garbage"])
def test_bad_in_request_is_one_escaped_info_line(server_factory, request_bytes):
    server = server_factory()
    seen = len(server.output.lines)
    assert parse_response(throw(server.in_port, request_bytes)).status == 400
    lines = logged_since(server, seen)
    assert len(lines) == 1, lines
    assert_tidy(lines)
    assert " INFO " in lines[0] and "\\x" in lines[0], lines


def flood(server, port: int, request: bytes, count: int = 500) -> None:
    """Send ``count`` bad requests; check the log stays small and loses no count."""
    seen = len(server.output.lines)
    start = time.monotonic()
    for n in range(count):
        throw(port, request % n)
    elapsed = time.monotonic() - start

    def accounted() -> int:
        lines = server.output.lines[seen:]
        suppressed = sum(int(m.group(1)) for m in map(SUMMARY.search, lines) if m)
        return suppressed + sum(" 400 " in line for line in lines)

    server.wait_until(lambda: accounted() >= count)
    lines = logged_since(server, seen)
    assert_tidy(lines)
    assert any(SUMMARY.search(line) for line in lines), lines
    windows = math.ceil(elapsed / WINDOW) + 1
    assert len(lines) <= windows * (LINES_PER_WINDOW + 2), (elapsed, lines)
    assert len(lines) < count / 5, lines
    assert accounted() == count


@pytest.mark.parametrize("engine", ["wsgi", "lean"])
def test_flood_of_bad_wait_requests_writes_few_lines(server_factory, engine):
    server = server_factory(WAIT_ENGINE=engine)
    flood(server, server.wait_port, b"\x00junk %d\r\n\r\n")


def test_flood_of_bad_in_requests_writes_few_lines(server_factory):
    server = server_factory()
    flood(server, server.in_port, b"identifier=a\n\nnot json %d")
