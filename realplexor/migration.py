"""Moving from the old daemon: its Perl configuration files as one TOML file.

Each old setting becomes an option line, or a comment line saying why it
is left out: this server has no such option, ``undef`` leaves the default,
or it names the old daemon's own page. Every value passes this server's
validation first, so the TOML printed loads as it is; a value refused is an
error naming its file and line.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

from .config import Config, ConfigError, validate
from .perlconfig import PerlConfigError, Setting, Value, read_settings

_FIELDS = {f.name: f for f in dataclasses.fields(Config)}
_MEMCACHED = "the old daemon's memcached online notifications; use ONLINE and WATCH on the IN line"
# Old options with no counterpart here, and what to do instead.
NO_EQUIVALENT = {
    "ID_BINDINGS_SERVERS": _MEMCACHED,
    "ID_BINDINGS_SERVER_NAME": _MEMCACHED,
    "HOOK_CHECK_VISIBILITY": "hooks are not supported; publish with limiters (*ID) to choose who sees a message",
}
# The old daemon's own pages; the packaged ones serve the same JavaScript API.
OLD_PAGES = {"IFRAME_FILE": "dklab_realplexor.html", "SCRIPT_FILE": "dklab_realplexor.js"}
PATH_OPTIONS = ("USERS_FILE", "IFRAME_FILE", "SCRIPT_FILE")
NOTES = {
    "VERBOSITY": "levels here: 0 errors only, 1 start/stop/reload, 2 every IN request, 3 per-connection debug",
}


def convert(sources: Sequence[tuple[str, str]]) -> str:
    """TOML for old configuration files given as (name, text), later ones over earlier ones.

    Raises ConfigError naming the file and line of anything refused.
    """
    settings: dict[str, Setting] = {}
    for name, text in sources:
        try:
            settings = read_settings(text, settings, name)
        except PerlConfigError as exc:
            raise ConfigError(f"{name} {exc}") from None
    lines = _header([name for name, _ in sources])
    for setting in settings.values():
        lines += _lines(setting)
    return "\n".join(lines) + "\n"


def _header(names: list[str]) -> list[str]:
    lines = ["# Realplexor configuration, converted by `realplexor convert-config` from the old daemon's files:"]
    lines += [f"#   {name}" + (" (over the files above)" if n else "") for n, name in enumerate(names)]
    lines += ["# Options not set here keep their defaults; contrib/realplexor.toml lists them all.", ""]
    return lines


def _lines(setting: Setting) -> list[str]:
    """The TOML line of one old setting, with the comments it needs."""
    name, where = setting.name, f"{setting.source} line {setting.line}"
    if name not in _FIELDS:
        return [f"# {name} = {_toml(setting.value)} ({where}): {_why_unknown(name)}; left out"]
    if setting.value is None:
        return [f"# {name} = undef ({where}): the default stays ({_default(name)})"]
    value = _validated(setting, where)
    if name in OLD_PAGES and Path(value).name == OLD_PAGES[name]:
        return [f"# {name} = {_toml(value)} ({where}): the old daemon's page, left out: "
                "the packaged one serves the same clients"]
    lines = []
    if name in PATH_OPTIONS and value and not Path(value).is_absolute():
        lines.append(f"# {name} ({where}) was relative to the old daemon's own folder; "
                     "here it is relative to this file's folder: copy the file here or make the path absolute")
    if name in NOTES:
        lines.append(f"# {name}: {NOTES[name]}")
    lines.append(f"{name} = {_toml(value)}")
    return lines


def _why_unknown(name: str) -> str:
    if name in NO_EQUIVALENT:
        return f"no equivalent here ({NO_EQUIVALENT[name]})"
    if name.upper() in _FIELDS:
        return "the old daemon ignored it too: option names are upper case"
    return "not an option here"


def _default(name: str) -> str:
    if name in PATH_OPTIONS:
        return "the packaged file"
    return _toml(getattr(Config(), name))


def _validated(setting: Setting, where: str) -> Any:
    """The setting's value as this server's validation makes it; ConfigError naming ``where``."""
    value = setting.value
    # Perl has one kind of number: 1e3 or 0.5 * 2048 is as whole as 1000.
    if _FIELDS[setting.name].type == "int" and isinstance(value, float) and value.is_integer():
        value = int(value)
    try:
        return getattr(validate({setting.name: value}), setting.name)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _toml(value: Value | tuple | bool) -> str:
    """A value as TOML (``undef`` for None, which only comments show)."""
    if value is None:
        return "undef"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer() and abs(value) < 2 ** 53:
        return str(int(value))
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(item) for item in value) + "]"
    return _toml_string(value)


def _toml_string(text: str) -> str:
    escaped = []
    for char in text:
        if char in '"\\':
            escaped.append("\\" + char)
        elif char < " " or char == "\x7f":
            escaped.append(f"\\u{ord(char):04x}")
        else:
            escaped.append(char)
    return '"' + "".join(escaped) + '"'
