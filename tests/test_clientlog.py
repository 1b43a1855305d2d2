"""Clients' mistakes in the log: escaped, cut short, rate-limited, never ERROR."""
from __future__ import annotations

import logging
import random
import re
import uuid

import pytest

from realplexor.clientlog import EXCERPT, BadRequestLog, escape

PRINTABLE = re.compile(r"[ -~]*\Z")


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
