"""The IFRAME and SCRIPT pages served on the WAIT line.

Both files are read once (and again on reload), ``$NAME`` placeholders
replaced by configuration values, and served with cache headers.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from email.utils import formatdate

from .config import Config

_PLACEHOLDER_RE = re.compile(r"\$([A-Z][A-Z0-9_]*)")
CACHE_SECONDS = 365 * 24 * 3600


@dataclass(frozen=True)
class Page:
    """A ready-to-send static page."""

    body: bytes
    headers: tuple[tuple[str, str], ...]
    last_modified: str


def substitute(text: str, values: dict[str, str]) -> str:
    """Replace each ``$NAME`` that names a known value; leave others alone."""
    return _PLACEHOLDER_RE.sub(lambda m: values.get(m.group(1), m.group(0)), text)


def load_page(path: str, content_type: str, config: Config,
              extra_headers: tuple[tuple[str, str], ...] = ()) -> Page:
    """Read ``path`` and prepare it for serving; OSError if unreadable."""
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    mtime = os.stat(path).st_mtime
    body = substitute(text, config.substitutions()).encode(config.CHARSET, "replace")
    last_modified = formatdate(mtime, usegmt=True)
    headers = (("Content-Type", content_type),
               ("Content-Length", str(len(body))),
               ("Last-Modified", last_modified),
               ("Expires", formatdate(mtime + CACHE_SECONDS, usegmt=True)),
               ("Cache-Control", f"public, max-age={CACHE_SECONDS}")) + extra_headers
    return Page(body, headers, last_modified)


def load_pages(config: Config) -> dict[str, Page]:
    """The IFRAME and SCRIPT pages of ``config``, keyed by ``IFRAME``/``SCRIPT``."""
    return {
        "IFRAME": load_page(config.IFRAME_FILE, f"text/html; charset={config.CHARSET}", config,
                            # Lets the old document.domain bridge work in current browsers.
                            (("Origin-Agent-Cluster", "?0"),)),
        "SCRIPT": load_page(config.SCRIPT_FILE, f"text/javascript; charset={config.CHARSET}", config),
    }
