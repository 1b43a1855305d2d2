"""The JSON API's requests and answers, without I/O.

    POST /publish   {"ids": ["Alpha", "Beta"] | {"Alpha": "CURSOR" | null, ...},
                     "data": ANY JSON, "limit_to": ["ID", ...]}
                    -> {"ids": {"Alpha": "CURSOR", ...}[, "skipped": ["ID", ...]]}
    GET /online?prefix=P[&prefix=Q...]      -> {"online": {"Alpha": 2, ...}}
    GET /watch?pos=N[&prefix=P...]          -> {"events": [{"event": "online", "pos": 12, "id": "Alpha"}, ...],
                                                "pos": 12}

The same ids, cursors and rules as the old protocol, stricter about
input: an id or a cursor that does not match is a 400 naming it, never
silently dropped.
"""
from __future__ import annotations

import re
from decimal import Decimal
from typing import Iterable, NamedTuple, Sequence
from urllib.parse import parse_qsl

import simplejson

from .inhttp import ApiError
from .protocol import MAX_NUMBER_DIGITS

_ID_RE = re.compile(r"[A-Za-z0-9_]+\Z")
_CURSOR_RE = re.compile(r"\d+(?:\.\d+)?\Z")
_PUBLISH_FIELDS = ("ids", "data", "limit_to")
# Query parameters one request may carry: prefixes are few in practice.
MAX_QUERY_FIELDS = 1000


class Publish(NamedTuple):
    """A checked publish: targets ``(id, cursor, cursor text)``, the data as JSON text, limiters."""

    targets: tuple[tuple[str, Decimal | None, str | None], ...]
    data: bytes
    limiters: frozenset[str]


def parse_publish(body: bytes) -> Publish:
    """Check a ``POST /publish`` body; ApiError 400 naming what is wrong."""
    request = _json_object(body)
    unknown = sorted(set(request) - set(_PUBLISH_FIELDS))
    if unknown:
        raise ApiError(400, f"unknown field {unknown[0]!r}: a publish takes {', '.join(_PUBLISH_FIELDS)}")
    if "data" not in request:
        raise ApiError(400, "data is missing: give any JSON value (null too)")
    targets = _targets(request.get("ids"))
    limit_to = request.get("limit_to")
    if limit_to is None:
        limiters: frozenset[str] = frozenset()
    elif isinstance(limit_to, list):
        limiters = frozenset(_checked_id(item, "limit_to") for item in limit_to)
    else:
        raise ApiError(400, "limit_to must be a list of channel ids")
    return Publish(targets, _as_json(request["data"]), limiters)


def _json_object(body: bytes) -> dict:
    try:
        # Numbers are kept as decimals: exact, however long.
        value = simplejson.loads(body.decode("utf-8"), use_decimal=True, parse_int=Decimal)
    except UnicodeDecodeError:
        raise ApiError(400, "the body is not valid UTF-8; nothing published") from None
    except RecursionError:
        raise ApiError(400, "the body nests arrays or objects too deeply; nothing published") from None
    except ValueError as exc:
        raise ApiError(400, f"the body is not valid JSON ({exc}); nothing published") from None
    if not isinstance(value, dict):
        raise ApiError(400, "the body must be a JSON object: {\"ids\": [...], \"data\": ...}")
    return value


def _targets(ids: object) -> tuple[tuple[str, Decimal | None, str | None], ...]:
    if isinstance(ids, list):
        targets = tuple((_checked_id(item, "ids"), None, None) for item in ids)
    elif isinstance(ids, dict):
        targets = tuple((_checked_id(channel_id, "ids"), *_cursor(channel_id, cursor))
                        for channel_id, cursor in ids.items())
    elif ids is None:
        raise ApiError(400, "ids is missing: a list of channel ids, or an object of id to cursor (or null)")
    else:
        raise ApiError(400, "ids must be a list of channel ids, or an object of id to cursor (or null)")
    if not targets:
        raise ApiError(400, "ids is empty: name at least one channel id")
    return targets


def _checked_id(value: object, field: str) -> str:
    if not isinstance(value, str) or not _ID_RE.match(value):
        raise ApiError(400, f"{field}: {_shown(value)} is not a channel id ([A-Za-z0-9_]+)")
    return value


def _cursor(channel_id: str, value: object) -> tuple[Decimal | None, str | None]:
    if value is None:
        return None, None
    if not isinstance(value, str) or not _CURSOR_RE.match(value):
        raise ApiError(400, f"ids: the cursor of {channel_id} must be a string of DIGITS[.DIGITS] or null, "
                            f"not {_shown(value)}")
    return Decimal(value), value


def _as_json(data: object) -> bytes:
    """``data`` as compact JSON text, as it is inserted into the answers."""
    try:
        return simplejson.dumps(data, separators=(",", ":"), ensure_ascii=False, use_decimal=True).encode("utf-8")
    except UnicodeEncodeError:
        # A lone surrogate escape ("\ud800") has no UTF-8: keep it escaped.
        return simplejson.dumps(data, separators=(",", ":"), use_decimal=True).encode("ascii")
    except RecursionError:
        raise ApiError(400, "data nests arrays or objects too deeply; nothing published") from None


def _shown(value: object) -> str:
    """A client's value for a reason: JSON, cut short."""
    text = simplejson.dumps(value, use_decimal=True) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _query(query: str, names: Sequence[str]) -> dict[str, list[str]]:
    """The query's parameters by name; ApiError 400 for another name."""
    try:
        pairs = parse_qsl(query, keep_blank_values=True, max_num_fields=MAX_QUERY_FIELDS, errors="strict")
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"malformed query string: {exc}") from None
    found: dict[str, list[str]] = {name: [] for name in names}
    for name, value in pairs:
        if name not in found:
            raise ApiError(400, f"unknown parameter {_shown(name)}: this route takes {', '.join(names)}")
        found[name].append(value)
    return found


def _prefixes(values: Iterable[str]) -> list[str]:
    prefixes = list(values)
    for prefix in prefixes:
        if not _ID_RE.match(prefix):
            raise ApiError(400, f"prefix {_shown(prefix)} is not the start of a channel id ([A-Za-z0-9_]+)")
    return prefixes


def parse_online(query: str) -> list[str]:
    """The prefixes of ``GET /online`` (none: every channel)."""
    return _prefixes(_query(query, ("prefix",))["prefix"])


def parse_watch(query: str) -> tuple[int | None, list[str]]:
    """The position (None for none, or 0) and the prefixes of ``GET /watch``."""
    found = _query(query, ("pos", "prefix"))
    if len(found["pos"]) > 1:
        raise ApiError(400, "pos is given more than once")
    position = None
    if found["pos"]:
        text = found["pos"][0]
        if not (text.isascii() and text.isdigit() and len(text) <= MAX_NUMBER_DIGITS):
            raise ApiError(400, f"pos must be a whole number of at most {MAX_NUMBER_DIGITS} digits, "
                                f"not {_shown(text)}")
        position = int(text) or None
    return position, _prefixes(found["prefix"])


def published(placed: Iterable[tuple[str, str]], skipped: Sequence[str] = ()) -> dict:
    """The answer to a publish: each channel's cursor, and the ids the login may not touch."""
    answer: dict[str, object] = {"ids": dict(placed)}
    if skipped:
        answer["skipped"] = list(skipped)
    return answer


def online(counts: Iterable[tuple[str, int]]) -> dict:
    """The answer to ``GET /online``."""
    return {"online": dict(counts)}


def watch(events: Iterable[tuple[str, int, str]], position: int) -> dict:
    """The answer to ``GET /watch``: the events, and the position to ask from next."""
    return {"events": [{"event": event, "pos": pos, "id": channel_id} for event, pos, channel_id in events],
            "pos": position}
