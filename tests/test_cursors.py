"""Cursor parsing and generation."""
from decimal import Decimal

from realplexor.cursors import CursorClock, format_units, parse_cursor


def test_parse_cursor_is_exact():
    a, b = parse_cursor("1732486800.12345678901234"), parse_cursor("1732486800.12345678901235")
    assert a < b
    assert float(str(a)) == float(str(b))  # a double could not tell them apart
    assert parse_cursor("5") == Decimal(5)


def test_parse_cursor_rejects_non_cursors():
    for text in ("", "1.", ".5", "-1", "1e5", "abc", "1.2.3"):
        assert parse_cursor(text) is None


def test_clock_is_strictly_increasing_when_time_stands_still():
    clock = CursorClock(lambda: 1_732_486_800_123_456_789)
    cursors = [clock.next() for _ in range(3)]
    assert [text for _, text in cursors] == [
        "1732486800.12345678900000", "1732486800.12345678900001", "1732486800.12345678900002"]
    assert clock.now() == cursors[-1][0]


def test_clock_never_goes_back_when_time_does():
    times = iter([2_000_000_000_000_000_000, 1_000_000_000_000_000_000])
    clock = CursorClock(lambda: next(times))
    first, second = clock.next()[0], clock.next()[0]
    assert second > first


def test_format_units():
    assert format_units(1) == "0.00000000000001"
