"""Cursors: exact positions in a channel's history.

On the wire a cursor is ``DIGITS[.DIGITS]``. They are compared as exact
decimals: a float cannot tell two consecutive server cursors apart.
Server cursors are the Unix time with 14 fractional digits, strictly
increasing even when two publishes fall in the same nanosecond.
"""
from __future__ import annotations

import re
import time
from decimal import Decimal
from typing import Callable

FRACTION_DIGITS = 14
_SCALE = 10 ** FRACTION_DIGITS
_NS_TO_UNITS = 10 ** (FRACTION_DIGITS - 9)
CURSOR_RE = re.compile(r"\d+(?:\.\d+)?\Z")


def parse_cursor(text: str) -> Decimal | None:
    """The exact value of a wire cursor, or None if it is not one."""
    if not CURSOR_RE.match(text):
        return None
    return Decimal(text)


def format_units(units: int) -> str:
    """Render a count of 1e-14 seconds as a wire cursor."""
    whole, fraction = divmod(units, _SCALE)
    return f"{whole}.{fraction:0{FRACTION_DIGITS}d}"


class CursorClock:
    """Hands out strictly increasing server cursors from a wall clock."""

    __slots__ = ("_time_ns", "_last")

    def __init__(self, time_ns: Callable[[], int] = time.time_ns):
        self._time_ns = time_ns
        self._last = 0

    def next(self) -> tuple[Decimal, str]:
        """A fresh cursor, greater than every one handed out before."""
        units = self._time_ns() * _NS_TO_UNITS
        if units <= self._last:
            units = self._last + 1
        self._last = units
        text = format_units(units)
        return Decimal(text), text

    def now(self) -> Decimal:
        """The cursor of "now": not before any cursor handed out so far.

        Every later :meth:`next` is strictly greater, so a listener from
        "now" gets a publish made in the same nanosecond.
        """
        self._last = max(self._time_ns() * _NS_TO_UNITS, self._last)
        return Decimal(format_units(self._last))
