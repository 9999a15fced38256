"""API bearer tokens: ``<state-dir>/conf/api-tokens.json`` (mode 0600).

A token is 32 random bytes (``secrets.token_urlsafe``), shown once when created;
only its SHA-256 is stored. A salted slow hash (scrypt, argon2) protects guessable
passwords; a 256-bit random token cannot be guessed, and one fast hash per request
keeps authentication cheap. Tokens are compared in constant time
(:func:`hmac.compare_digest`). Each has a name (what the daemon logs with every call)
and a role: ``read`` (GET routes), ``operate`` (also VM, snapshot and clone
changes), ``admin`` (also grants and deleting VMs). The daemon re-reads the file
when it changes, so a revoked token stops working at once, without a restart.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

from ...errors import IscsiVmtargetError
from ...storage import atomic_file

FILE = os.path.join("conf", "api-tokens.json")
#: Roles in increasing power: each may do what those before it may.
ROLES = ("read", "operate", "admin")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class TokenError(IscsiVmtargetError):
    """A token name or role that cannot be used, or a token file that cannot be read."""


@dataclass(frozen=True)
class Token:
    name: str
    role: str
    sha256: str
    created: float

    def allows(self, role: str) -> bool:
        return ROLES.index(self.role) >= ROLES.index(role)

    def public(self) -> dict[str, Any]:
        """What ``api token list`` shows: never the hash."""
        return {"name": self.name, "role": self.role, "created": self.created}


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class TokenStore:
    """The token file of one state directory."""

    def __init__(self, state_dir: str) -> None:
        self.path = os.path.join(state_dir, FILE)
        self._cache: tuple[tuple[int, int, int], dict[str, Token]] | None = None

    def load(self) -> dict[str, Token]:
        """The tokens by name; re-read only when the file changed (mtime, inode)."""
        try:
            info = os.stat(self.path)
        except FileNotFoundError:
            return {}
        stamp = (info.st_mtime_ns, info.st_ino, info.st_size)
        if self._cache is not None and self._cache[0] == stamp:
            return self._cache[1]
        try:
            with open(self.path, encoding="utf-8") as fh:
                doc = json.load(fh)
            tokens = {t["name"]: Token(**t) for t in doc["tokens"]}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise TokenError(f"{self.path}: cannot read the API tokens: {exc}") from exc
        self._cache = (stamp, tokens)
        return tokens

    def _save(self, tokens: dict[str, Token]) -> None:
        doc = {"tokens": [t.__dict__ for t in sorted(tokens.values(), key=lambda t: t.name)]}
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        atomic_file.write_file(
            self.path, json.dumps(doc, indent=1).encode(), tmp=self.path + ".tmp", mode=0o600
        )

    @contextlib.contextmanager
    def _locked(self) -> Any:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with atomic_file.locked(self.path + ".lock"):
            yield

    def create(self, name: str, role: str) -> str:
        """A new token ``name``; returns its secret (stored only hashed)."""
        if not NAME.match(name):
            raise TokenError(f"token name {name!r}: letters, digits, '.', '_', '-' (max 64)")
        if role not in ROLES:
            raise TokenError(f"role {role!r}: one of {', '.join(ROLES)}")
        secret = "ivt_" + secrets.token_urlsafe(32)
        with self._locked():
            tokens = dict(self.load())
            if name in tokens:
                raise TokenError(f"a token named {name!r} exists (revoke it first)")
            tokens[name] = Token(name, role, _digest(secret), round(time.time(), 3))
            self._save(tokens)
        return secret

    def revoke(self, name: str) -> Token:
        if name not in self.load():  # refused without creating anything
            raise TokenError(f"no token named {name!r}")
        with self._locked():
            tokens = dict(self.load())
            if name not in tokens:
                raise TokenError(f"no token named {name!r}")
            token = tokens.pop(name)
            self._save(tokens)
        return token

    def check(self, secret: str) -> Token | None:
        """The token whose secret this is, or None."""
        digest = _digest(secret)
        found = None
        for token in self.load().values():  # every one compared: no early exit to time
            if hmac.compare_digest(token.sha256, digest):
                found = token
        return found
