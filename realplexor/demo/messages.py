"""What the sandbox's post form may send, checked before anything is published.

The page checks the same rules first, for a quick answer; the back end
checks again, since anyone can POST to it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

#: A channel name as Realplexor takes it (without the namespace).
NAME_RE = re.compile(r"[A-Za-z0-9_]+\Z")
#: The channel the back end publishes the online list to; not for chat.
ONLINE_ID = "online_list"
#: Channels a page opens when its URL names none.
DEFAULT_IDS = ("Alpha", "Beta", "RuTvit")

MAX_NAME = 64
MAX_IDS = 20
MAX_TEXT = 1000
MAX_AUTHOR = 40


class BadInput(ValueError):
    """Input the sandbox refuses; the message says what to fix, for a person."""


@dataclass(frozen=True)
class Post:
    """One message to publish: the channels (without namespace) and the data."""

    ids: tuple[str, ...]
    data: Any


def check_name(name: str) -> str:
    """``name`` if it can be a chat channel; else BadInput naming the problem."""
    if not NAME_RE.match(name):
        raise BadInput(f"invalid channel name {name!r}: use letters, digits and _ only")
    if len(name) > MAX_NAME:
        raise BadInput(f"channel name {name[:20]}... is too long (at most {MAX_NAME} characters)")
    if name == ONLINE_ID:
        raise BadInput(f"{ONLINE_ID} is reserved for the online list; pick another name")
    return name


def parse_ids(value: Any) -> tuple[str, ...]:
    """Channel names from ``"Alpha, Beta"`` or ``["Alpha", "Beta"]``, in order, once each."""
    if isinstance(value, str):
        items = value.split(",")
    elif isinstance(value, list) and all(isinstance(item, str) for item in value):
        items = value
    else:
        raise BadInput("ids must be channel names separated by commas")
    names = [check_name(item.strip()) for item in items if item.strip()]
    if not names:
        raise BadInput("name at least one channel to send to")
    unique = tuple(dict.fromkeys(names))
    if len(unique) > MAX_IDS:
        raise BadInput(f"too many channels: at most {MAX_IDS} in one message")
    return unique


def parse_post(payload: Any, now: datetime | None = None) -> Post:
    """Check the form's JSON ``{ids, text, structured, author}``; the Post to publish.

    A plain message is ``{author, text}``, which pages show as a chat
    line; a structured one is ``{author, text, sent_at, to}``, which pages
    show as a tree. Both name their author.
    """
    if not isinstance(payload, dict):
        raise BadInput("send a JSON object: {\"ids\": ..., \"text\": ...}")
    ids = parse_ids(payload.get("ids", ""))
    text = payload.get("text", "")
    if not isinstance(text, str) or not text.strip():
        raise BadInput("write a message first: the text is empty")
    text = text.strip()
    if len(text) > MAX_TEXT:
        raise BadInput(f"the message is too long: at most {MAX_TEXT} characters")
    structured = payload.get("structured", False)
    if not isinstance(structured, bool):
        raise BadInput("structured must be true or false")
    author = _author(payload.get("author", ""))
    if not structured:
        return Post(ids, {"author": author, "text": text})
    sent_at = (now or datetime.now(timezone.utc)).isoformat(timespec="seconds")
    return Post(ids, {"author": author, "text": text, "sent_at": sent_at, "to": list(ids)})


def _author(value: Any) -> str:
    if not isinstance(value, str):
        raise BadInput("author must be a name")
    author = value.strip() or "guest"
    if len(author) > MAX_AUTHOR:
        raise BadInput(f"the name is too long: at most {MAX_AUTHOR} characters")
    return author
