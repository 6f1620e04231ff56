"""Who is calling: API keys, their principals and roles, and what each role
may do.

A key is presented as ``authorization: Bearer <key>`` metadata. The server
knows only the SHA-256 of each key (keys are 256-bit random tokens, so a
plain hash is enough: nothing to brute-force), read from a JSON file
(RUNCAP_API_KEYS_FILE) that `runcap keys create|list|revoke` maintains. The
file is read again when it changes (checked at most once a second), so a
revocation reaches every replica that reads the file within a second of the
file changing there.

Each key belongs to one tenant (the ledger namespace it reaches) and one
principal: its key id, with an optional user and team, which become the API
key, user and team scopes of the runs it creates. Roles nest:

- ``agent``: create runs (bound to its principal) and reserve, commit,
  refund, close, read and watch its own runs; read prices;
- ``operator``: also read and watch every run of its tenant, read scopes and
  decisions, suspend and resume runs, approve and deny;
- ``admin``: also set ceilings, scope policies and prices.
"""

from __future__ import annotations

import base64
import contextvars
import dataclasses
import enum
import hashlib
import json
import logging
import os
import re
import secrets
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from runcap_server.errors import PermissionDenied, Unauthenticated
from runcap_server.validation import ID_PATTERN

_log = logging.getLogger(__name__)

RELOAD_CHECK_S: Final = 1.0
KEY_PREFIX: Final = "rck_"
_BEARER: Final = re.compile(r"Bearer\s+(\S+)\s*", re.IGNORECASE)


class Role(enum.IntEnum):
    """What a key may do; each role may do all that the ones below it may."""

    AGENT = 1
    OPERATOR = 2
    ADMIN = 3

    @classmethod
    def parse(cls, text: str) -> Role:
        try:
            return cls[text.strip().upper()]
        except KeyError:
            raise ValueError(f"role {text!r}: expected agent, operator or admin") from None


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller."""

    key_id: str
    tenant: str
    role: Role
    user_id: str = ""
    team_id: str = ""


CALLER: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "runcap_caller", default=None
)
"""The principal of the RPC being served; None when authentication is off."""


@dataclass(frozen=True, slots=True)
class KeyEntry:
    """One key as the keys file stores it: never the key itself."""

    id: str
    sha256: str
    tenant: str
    role: Role
    user_id: str = ""
    team_id: str = ""
    created: str = ""
    revoked: str = ""

    def principal(self) -> Principal:
        return Principal(self.id, self.tenant, self.role, self.user_id, self.team_id)

    def to_json(self) -> dict[str, str]:
        entry = dataclasses.asdict(self)
        entry["role"] = self.role.name.lower()
        return {name: value for name, value in entry.items() if value}

    @classmethod
    def from_json(cls, entry: Mapping[str, Any], where: str) -> KeyEntry:
        try:
            key = cls(
                id=str(entry["id"]),
                sha256=str(entry["sha256"]).lower(),
                tenant=str(entry["tenant"]),
                role=Role.parse(str(entry["role"])),
                user_id=str(entry.get("user_id", "")),
                team_id=str(entry.get("team_id", "")),
                created=str(entry.get("created", "")),
                revoked=str(entry.get("revoked", "")),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{where}: {error}") from None
        for name in ("id", "tenant", "user_id", "team_id"):
            value = getattr(key, name)
            if value and not ID_PATTERN.fullmatch(value):
                raise ValueError(f"{where}: {name} {value!r} is not a valid id")
        if not re.fullmatch(r"[0-9a-f]{64}", key.sha256):
            raise ValueError(f"{where}: sha256 must be 64 hex digits")
        return key


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key(key_id: str) -> str:
    """A fresh key: the prefix, the key id (so a leaked key says whose it
    is) and 256 random bits."""
    token = base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()
    return f"{KEY_PREFIX}{key_id}_{token}"


def read_keys(path: Path) -> list[KeyEntry]:
    """The entries of a keys file; ValueError says what is wrong with it."""
    try:
        document = json.loads(path.read_text())
    except OSError as error:
        raise ValueError(f"cannot read the keys file {path}: {error.strerror}") from None
    except ValueError as error:
        raise ValueError(f"the keys file {path} is not JSON: {error}") from None
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise ValueError(f'the keys file {path} has no "keys" list')
    keys = [KeyEntry.from_json(entry, f"{path}: keys[{i}]") for i, entry in enumerate(entries)]
    ids = [key.id for key in keys]
    if len(set(ids)) != len(ids):
        raise ValueError(f"the keys file {path} names a key id twice")
    return keys


def write_keys(path: Path, keys: Sequence[KeyEntry]) -> None:
    """Replaces the keys file atomically, readable by its owner only."""
    temporary = path.with_name(path.name + ".tmp")
    text = json.dumps({"keys": [key.to_json() for key in keys]}, indent=2) + "\n"
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(text)
    os.replace(temporary, path)


class KeyStore:
    """The keys of a keys file, by hash, read again when the file changes.

    A file that turns unreadable or invalid keeps the keys last read (and
    logs the error), so a bad edit does not lock everyone out; a revocation
    in a valid file takes effect on the next check.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._by_hash: dict[str, KeyEntry] = {}
        self._stamp: tuple[int, int, int] | None = None
        self._checked = 0.0
        self._load(strict=True)

    def _load(self, *, strict: bool) -> None:
        try:
            stat = self.path.stat()
            stamp = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
            if stamp == self._stamp:
                return
            keys = read_keys(self.path)
        except (OSError, ValueError) as error:
            if strict:
                raise ValueError(str(error)) from None
            _log.error("keeping the keys read before: %s", error)
            return
        self._by_hash = {key.sha256: key for key in keys if not key.revoked}
        self._stamp = stamp
        _log.info("read %d active API keys from %s", len(self._by_hash), self.path)

    def authenticate(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> Principal:
        """The principal of a call's `authorization` metadata."""
        now = time.monotonic()
        if now - self._checked >= RELOAD_CHECK_S:
            self._checked = now
            self._load(strict=False)
        token = ""
        for name, value in metadata or ():
            if name == "authorization":
                text = value.decode() if isinstance(value, bytes) else value
                matched = _BEARER.fullmatch(text)
                token = matched.group(1) if matched else ""
                break
        if not token:
            raise Unauthenticated(
                "this server needs an API key: send the metadata `authorization: Bearer <key>`"
            )
        entry = self._by_hash.get(digest(token))
        if entry is None:
            raise Unauthenticated("the API key is not valid (unknown or revoked)")
        return entry.principal()


def caller() -> Principal | None:
    return CALLER.get()


def require(role: Role, what: str) -> Principal | None:
    """The caller, when it has at least `role`; PermissionDenied otherwise.
    None when authentication is off (everything is allowed)."""
    principal = CALLER.get()
    if principal is not None and principal.role < role:
        raise PermissionDenied(
            f"{what} needs the {role.name.lower()} role; this key "
            f"({principal.key_id}) is {principal.role.name.lower()}",
            key_id=principal.key_id,
        )
    return principal


def deny_run(principal: Principal, run_id: str) -> PermissionDenied:
    """The answer to an agent about a run that is not its own (or does not
    exist: the two look the same, so run ids do not leak)."""
    return PermissionDenied(
        f"run {run_id} is not a run of this key ({principal.key_id})",
        key_id=principal.key_id,
        run_id=run_id,
    )
