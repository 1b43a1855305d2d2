"""IN-line authentication against an htpasswd users file.

The file holds ``login:hash`` lines in any format Apache's ``htpasswd``
writes (bcrypt, apr1 MD5, SHA1, crypt), checked by passlib. A line ``:``
(empty login and password) lets clients without credentials in.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

from gevent.threadpool import ThreadPool
from passlib.apache import HtpasswdFile

from .protocol import ProtocolError


@dataclass(frozen=True)
class Principal:
    """Who sent an IN-line request: a login, or None for a guest."""

    login: str | None = None

    @property
    def prefix(self) -> str | None:
        """The id prefix a logged-in client is confined to (``LOGIN_``)."""
        return None if self.login is None else self.login + "_"

    def may_touch(self, channel_id: str) -> bool:
        """Whether this client may publish to or see ``channel_id``."""
        return self.login is None or channel_id.startswith(self.prefix)

    def scoped(self, prefixes: Sequence[str]) -> Sequence[str] | None:
        """The id prefixes this client may query; None when it may see nothing.

        A logged-in client sees only ids under its own ``LOGIN_`` prefix, so
        its prefixes must lie within it, and no prefix means nothing at all.
        """
        if self.login is None:
            return prefixes
        own = [p for p in prefixes if p.startswith(self.prefix)]
        return own or None


GUEST = Principal()
# Checked credentials remembered per users file (see Users.authenticate).
VERIFIED_CACHE_SIZE = 1024
# Password hashes are checked in these many threads (bcrypt leaves the
# GIL); more checks wait their turn, up to MAX_WAITING_CHECKS, then 503.
PASSWORD_CHECK_THREADS = 2
MAX_WAITING_CHECKS = 64


class Users:
    """The users of one htpasswd file, read once."""

    def __init__(self, text: str):
        lines = text.splitlines()
        self.anonymous = any(line.strip() == ":" for line in lines)
        entries = "\n".join(line for line in lines if line.strip() and line.strip() != ":"
                            and not line.lstrip().startswith("#"))
        self._file = HtpasswdFile.from_string(entries + "\n") if entries else None
        # (login, SHA-256 of the password) -> principal, for credentials
        # already checked: a bcrypt check takes milliseconds, and a back end
        # sends the same credentials with every publish. Failures are not
        # kept, so guessing costs as much as ever. A reload makes new Users.
        self._verified: dict[tuple[str, bytes], Principal] = {}

    @classmethod
    def load(cls, path: str) -> "Users":
        """Read the users file at ``path``; OSError if it cannot be read."""
        with open(path, encoding="utf-8") as fh:
            return cls(fh.read())

    def authenticate(self, login: str | None, password: str | None) -> Principal:
        """The principal for these credentials, or ProtocolError 403 with the reason.

        May check a password hash: milliseconds of CPU for bcrypt. A server
        calls :meth:`known` first and :meth:`check` off its event loop.
        """
        principal = self.known(login, password)
        return principal if principal is not None else self.check(login, password)

    def known(self, login: str | None, password: str | None) -> Principal | None:
        """The principal when no hash needs checking (a guest, credentials already checked).

        None when the password must be checked against its hash; a guest
        without an anonymous entry, or an unknown login, is a ProtocolError 403.
        """
        if login is None:
            if not self.anonymous:
                raise ProtocolError(403, "access denied for guest user")
            return GUEST
        principal = self._verified.get(_key(login, password))
        if principal is not None:
            return principal
        if self._file is None or self._file.get_hash(login) is None:
            raise ProtocolError(403, f"unknown login: {login}")
        return None

    def check(self, login: str, password: str | None) -> Principal:
        """Check the password against the login's hash (slow; safe in a worker thread)."""
        try:
            found = self._file.check_password(login, password or "") if self._file else None
        except ValueError:
            # A password the hash cannot take (bcrypt: a NUL byte, over 72 bytes).
            found = False
        if found is None:
            raise ProtocolError(403, f"unknown login: {login}")
        if not found:
            raise ProtocolError(403, f"invalid password for login: {login}")
        if len(self._verified) >= VERIFIED_CACHE_SIZE:
            self._verified.clear()
        principal = self._verified[_key(login, password)] = Principal(login)
        return principal


def _key(login: str, password: str | None) -> tuple[str, bytes]:
    return login, hashlib.sha256((password or "").encode("utf-8")).digest()


class PasswordChecks:
    """Password hashes checked in a small pool of threads, off the event loop."""

    def __init__(self) -> None:
        self._pool: ThreadPool | None = None
        self._waiting = 0

    def check(self, users: Users, login: str, password: str | None) -> Principal:
        """``users.check`` in a worker thread (blocks the calling greenlet).

        ProtocolError 403 for wrong credentials, 503 when too many checks wait.
        """
        if self._waiting >= MAX_WAITING_CHECKS:
            raise ProtocolError(503, "too many password checks waiting; try again shortly")
        self._waiting += 1
        try:
            return self._threads().apply(users.check, (login, password))
        finally:
            self._waiting -= 1

    def _threads(self) -> ThreadPool:
        # Made on first use, in the process that serves (gunicorn forks after import).
        if self._pool is None:
            self._pool = ThreadPool(PASSWORD_CHECK_THREADS)
        return self._pool
