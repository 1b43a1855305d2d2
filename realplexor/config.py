"""Configuration: read once from a TOML file, validated, then passed in.

Keys are the option names of the Realplexor protocol (``WAIT_ADDR``,
``WAIT_TIMEOUT``, ...), case-insensitive. Every option has a default, so
the server runs with no file at all.
"""
from __future__ import annotations

import dataclasses
import difflib
import logging
import re
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterable


class ConfigError(Exception):
    """A configuration that cannot be used; the message names the key."""


def _static(name: str) -> str:
    return str(resources.files("realplexor.static").joinpath(name))


def _packaged(name: str) -> str:
    return str(resources.files("realplexor").joinpath(name))


@dataclass(frozen=True)
class Config:
    """Every tunable of the server, with the documented defaults."""

    WAIT_ADDR: tuple[str, ...] = ("127.0.0.1:8088",)
    WAIT_TIMEOUT: float = 300
    WAIT_MAXLEN: int = 5120
    WAIT_MAX_ANSWER: int = 1 << 20
    WAIT_MAX_IDS: int = 1000
    WAIT_REQUEST_TIMEOUT: float = 10
    WAIT_KEEPALIVE_TIMEOUT: float = 15
    WRITE_TIMEOUT: float = 30
    IN_ADDR: tuple[str, ...] = ("127.0.0.1:10010",)
    IN_TIMEOUT: float = 20
    IN_MAXLEN: int = 204800
    EVENT_CHAIN_LEN: int = 1000
    OFFLINE_TIMEOUT: float = 30
    MAX_DATA_FOR_ID: int = 30
    CLEAN_ID_AFTER: float = 3600
    CHARSET: str = "utf-8"
    USERS_FILE: str = field(default_factory=lambda: _packaged("default_users.htpasswd"))
    IFRAME_FILE: str = field(default_factory=lambda: _static("dklab_realplexor.html"))
    IFRAME_ID: str = "IFRAME"
    SCRIPT_FILE: str = field(default_factory=lambda: _static("dklab_realplexor.js"))
    SCRIPT_ID: str = "SCRIPT"
    IDENTIFIER: str = "identifier"
    JS_MAX_BOUNCES: int = 10
    JS_WAIT_RECONNECT_DELAY: float = 0.01
    JS_WAIT_URI: str = "/"
    JS_DEBUG: bool = False
    VERBOSITY: int = 1
    MAX_MEM_MB: int = 0
    MAX_QUEUE_MB: float = 256
    SU_USER: str = ""
    CORS_ORIGINS: tuple[str, ...] = ("*",)
    WAIT_ENGINE: str = "wsgi"
    BACKEND: str = "memory"
    PROCESS_TIMEOUT: float = 10
    REUSE_PORT: bool = False
    METRICS: bool = True
    STREAM_TRANSPORTS: tuple[str, ...] = ("eventsource", "websocket")
    STREAM_PING_INTERVAL: float = 20
    STREAM_MAX_BACKLOG: int = 1 << 20

    def substitutions(self) -> dict[str, str]:
        """Values for ``$NAME`` placeholders in the IFRAME and SCRIPT pages."""
        return {f.name: _as_text(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def changed_from(self, other: "Config") -> list[str]:
        """Names of the options whose values differ from ``other``."""
        return [f.name for f in dataclasses.fields(self)
                if getattr(self, f.name) != getattr(other, f.name)]


# VERBOSITY 0..3 as logging levels; 2 adds a line per IN request.
VERBOSE = 15
LOG_LEVELS = {0: logging.ERROR, 1: logging.INFO, 2: VERBOSE, 3: logging.DEBUG}

# Options a running server cannot take on without re-binding or re-exec.
RESTART_ONLY = frozenset({"WAIT_ADDR", "IN_ADDR", "SU_USER", "MAX_MEM_MB", "WAIT_ENGINE", "BACKEND",
                          "REUSE_PORT", "METRICS"})
SHARED_BACKENDS = ("redis://", "rediss://", "unix://")
WAIT_ENGINES = ("wsgi", "lean")
STREAM_TRANSPORT_NAMES = ("eventsource", "websocket")
# Lists that may be empty (no transport at all).
_MAY_BE_EMPTY = frozenset({"STREAM_TRANSPORTS"})

_NUMBER_MINIMUMS = {
    "WAIT_TIMEOUT": 0.001, "WAIT_MAXLEN": 16, "WAIT_MAX_ANSWER": 1, "WAIT_MAX_IDS": 1, "PROCESS_TIMEOUT": 2, "WAIT_REQUEST_TIMEOUT": 0.001,
    "WAIT_KEEPALIVE_TIMEOUT": 0.001, "WRITE_TIMEOUT": 0.001, "IN_TIMEOUT": 0.001,
    "IN_MAXLEN": 16, "EVENT_CHAIN_LEN": 1, "OFFLINE_TIMEOUT": 0,
    "MAX_DATA_FOR_ID": 1, "CLEAN_ID_AFTER": 0.001, "JS_MAX_BOUNCES": 0,
    "JS_WAIT_RECONNECT_DELAY": 0, "MAX_MEM_MB": 0, "VERBOSITY": 0, "MAX_QUEUE_MB": 0.001,
    "STREAM_PING_INTERVAL": 0.001, "STREAM_MAX_BACKLOG": 1024,
}
# An idle server's resident memory is about 35 MB; a MAX_MEM_MB below this
# floor would restart a fresh server over and over.
MAX_MEM_MB_FLOOR = 64
_WORD_OPTIONS = ("IFRAME_ID", "SCRIPT_ID", "IDENTIFIER")
_URI_RE = re.compile(r"[A-Za-z0-9/._~%:+-]+\Z")


def _as_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def load_config(path: str | None = None) -> Config:
    """Read and validate the configuration at ``path`` (defaults when None)."""
    if path is None:
        return validate({})
    try:
        with open(path, "rb") as fh:
            raw = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    config = validate(raw)
    return _resolve_paths(config, Path(path).resolve().parent)


def validate(raw: dict[str, Any]) -> Config:
    """Turn a mapping of option names to values into a checked Config."""
    fields = {f.name: f for f in dataclasses.fields(Config)}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        name = key.upper()
        if name not in fields:
            raise ConfigError(f"unknown option {key!r}{_suggestion(name, fields)}")
        values[name] = _convert(name, fields[name].type, value)
    config = Config(**values)
    _check_ranges(config)
    return config


def _suggestion(name: str, known: Iterable[str]) -> str:
    """``"; did you mean X?"`` for the known option nearest to a misspelt one, or ""."""
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.7)
    return f"; did you mean {close[0]}?" if close else ""


def _convert(name: str, kind: str, value: Any) -> Any:
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"option {name} must be true or false, not {value!r}")
    if kind == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"option {name} must be a whole number, not {value!r}")
    if kind == "float":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"option {name} must be a number, not {value!r}")
    if kind == "str":
        if isinstance(value, str):
            return value
        raise ConfigError(f"option {name} must be a string, not {value!r}")
    # Lists: a TOML array of strings, or one string of comma-separated
    # items (WAIT_ADDR = "0.0.0.0:8088" is one address, as documented).
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",") if part.strip()]
    if isinstance(value, list) and (value or name in _MAY_BE_EMPTY) and all(isinstance(v, str) for v in value):
        return tuple(value)
    if name in _MAY_BE_EMPTY:
        raise ConfigError(f"option {name} must be a list of strings, not {value!r}")
    raise ConfigError(f"option {name} must be a non-empty list of strings, not {value!r}")


def _check_ranges(config: Config) -> None:
    for name, minimum in _NUMBER_MINIMUMS.items():
        if getattr(config, name) < minimum:
            raise ConfigError(f"option {name} must be at least {minimum}, not {getattr(config, name)!r}")
    if 0 < config.MAX_MEM_MB < MAX_MEM_MB_FLOOR:
        raise ConfigError(f"option MAX_MEM_MB must be 0 (off) or at least {MAX_MEM_MB_FLOOR}, "
                          f"not {config.MAX_MEM_MB!r}")
    if config.VERBOSITY > 3:
        raise ConfigError(f"option VERBOSITY must be 0..3, not {config.VERBOSITY!r}")
    for name in ("WAIT_ADDR", "IN_ADDR"):
        for addr in getattr(config, name):
            parse_address(addr, name)
    for name in _WORD_OPTIONS:
        value = getattr(config, name)
        if not value or not all(c.isalnum() or c == "_" for c in value):
            raise ConfigError(f"option {name} must be a word of letters, digits and _, not {value!r}")
    _check_backend(config.BACKEND)
    if config.WAIT_ENGINE not in WAIT_ENGINES:
        raise ConfigError(f"option WAIT_ENGINE must be one of {', '.join(WAIT_ENGINES)}, "
                          f"not {config.WAIT_ENGINE!r}")
    for transport in config.STREAM_TRANSPORTS:
        if transport not in STREAM_TRANSPORT_NAMES:
            raise ConfigError(f"option STREAM_TRANSPORTS: unknown transport {transport!r}; "
                              f"known: {', '.join(STREAM_TRANSPORT_NAMES)}")
    if not _URI_RE.match(config.JS_WAIT_URI):
        # It is pasted into the served script and page: keep it a plain URI.
        raise ConfigError(f"option JS_WAIT_URI must be a URI path of letters, digits and /._~%:+-, "
                          f"not {config.JS_WAIT_URI!r}")
    try:
        "".encode(config.CHARSET)
    except LookupError:
        raise ConfigError(f"option CHARSET names an unknown charset {config.CHARSET!r}") from None


def _check_backend(backend: str) -> None:
    if backend == "memory":
        return
    if not backend.startswith(SHARED_BACKENDS):
        raise ConfigError(f"option BACKEND must be \"memory\" or a Redis URL (redis://host:port/db), "
                          f"not {backend!r}")
    try:
        import redis  # noqa: F401 - only to say early that it is missing
    except ImportError:
        raise ConfigError(f"option BACKEND {backend!r} needs the redis package: "
                          "pip install 'realplexor[redis]'") from None


def parse_address(addr: str, option: str = "address") -> tuple[str, int]:
    """Split ``host:port`` (``[v6]:port`` too) into a bindable pair."""
    host, sep, port = addr.rpartition(":")
    # Port 0 asks the system for a free port; the server logs the one it got.
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"option {option}: {addr!r} is not host:port with a port 0..65535")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


def _resolve_paths(config: Config, base: Path) -> Config:
    """Make file options relative to the config file's own folder."""
    changes = {}
    for name in ("USERS_FILE", "IFRAME_FILE", "SCRIPT_FILE"):
        value = getattr(config, name)
        if value and not Path(value).is_absolute():
            changes[name] = str(base / value)
    return dataclasses.replace(config, **changes)
