"""Who is calling: API keys, their principals and roles, and what each role
may do.

A key is presented as ``authorization: Bearer <key>`` metadata. The server
knows only the SHA-256 of each key (keys are 256-bit random tokens, so a
plain hash is enough: nothing to brute-force), read from a JSON file
(RUNCAP_API_KEYS_FILE) that `runcap keys create|list|revoke` maintains. The
file is read again when it changes (checked at most once a second), so a
revocation reaches every replica that reads the file within a second of the
file changing there.

With mTLS (RUNCAP_TLS_CLIENT_CA_FILE), an entry may instead (or also) name
a client certificate: its ``mtls_subject`` is matched against the verified
peer certificate's name (`certificate_subject`: the certificate's SPIFFE ID,
its one ``spiffe://`` URI SAN, when it has one, else its subject common
name). A call with a Bearer key is authenticated by the key; a call without
one by its certificate.

Each entry belongs to one tenant (the ledger namespace it reaches) and one
principal: its id, with an optional user and team, which become the API
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
SPIFFE_SCHEME: Final = "spiffe://"
MAX_SUBJECT_LENGTH: Final = 1024


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
    """One key as the keys file stores it: never the key itself.

    `sha256` is empty for an entry that has no API key, only a client
    certificate (`mtls_subject`); an entry has at least one of the two.
    """

    id: str
    sha256: str
    tenant: str
    role: Role
    user_id: str = ""
    team_id: str = ""
    created: str = ""
    revoked: str = ""
    mtls_subject: str = ""

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
                sha256=str(entry.get("sha256", "")).lower(),
                tenant=str(entry["tenant"]),
                role=Role.parse(str(entry["role"])),
                user_id=str(entry.get("user_id", "")),
                team_id=str(entry.get("team_id", "")),
                created=str(entry.get("created", "")),
                revoked=str(entry.get("revoked", "")),
                mtls_subject=str(entry.get("mtls_subject", "")),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{where}: {error}") from None
        for name in ("id", "tenant", "user_id", "team_id"):
            value = getattr(key, name)
            if value and not ID_PATTERN.fullmatch(value):
                raise ValueError(f"{where}: {name} {value!r} is not a valid id")
        if not key.sha256 and not key.mtls_subject:
            raise ValueError(f"{where}: needs a sha256 (an API key), an mtls_subject, or both")
        if key.sha256 and not re.fullmatch(r"[0-9a-f]{64}", key.sha256):
            raise ValueError(f"{where}: sha256 must be 64 hex digits")
        if key.mtls_subject:
            check_subject(key.mtls_subject, where)
        return key


def check_subject(subject: str, where: str = "mtls_subject") -> None:
    """ValueError unless `subject` can name a client certificate."""
    if not (
        0 < len(subject) <= MAX_SUBJECT_LENGTH
        and subject.isprintable()
        and subject == subject.strip()
    ):
        raise ValueError(
            f"{where}: mtls_subject {subject!r} must be 1 to {MAX_SUBJECT_LENGTH} printable "
            "characters, without blanks at either end"
        )


def certificate_subject(auth_context: Mapping[str, Iterable[bytes]] | None) -> str | None:
    """The name of a call's verified client certificate, as keys files name
    it: its SPIFFE ID (its `spiffe://` URI SAN) when it has one, else its
    subject common name (CN). None when the call presented no certificate
    (plaintext, or TLS without client certificates).

    gRPC puts a peer certificate's names in the auth context only once it is
    verified (the server requires and verifies client certificates whenever
    it has a client CA). A certificate with several SPIFFE IDs, or with
    neither a SPIFFE ID nor a CN, is Unauthenticated: it names no one.
    """
    if not auth_context:
        return None
    security = [bytes(value) for value in auth_context.get("transport_security_type", ())]
    if security != [b"ssl"]:
        return None
    names = {
        bytes(value).decode("utf-8", "replace")
        for field in ("peer_uri", "x509_subject_alternative_name")
        for value in auth_context.get(field, ())
    }
    spiffe = sorted(name for name in names if name.startswith(SPIFFE_SCHEME))
    if len(spiffe) > 1:
        raise Unauthenticated(
            f"the client certificate has several SPIFFE IDs ({', '.join(spiffe)}); "
            "runcap needs exactly one"
        )
    if spiffe:
        return spiffe[0]
    common_names = [
        bytes(value).decode("utf-8", "replace")
        for value in auth_context.get("x509_common_name", ())
    ]
    if common_names:
        return common_names[0]
    if any(auth_context.get(field) for field in ("x509_pem_cert", "x509_subject")):
        raise Unauthenticated(
            "the client certificate has neither a spiffe:// URI SAN nor a subject common name"
        )
    return None


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
    subjects = [key.mtls_subject for key in keys if key.mtls_subject and not key.revoked]
    if len(set(subjects)) != len(subjects):
        raise ValueError(f"the keys file {path} gives an mtls_subject to two active entries")
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

    def __init__(self, path: Path, *, mtls: bool = False) -> None:
        self.path = path
        # Whether the server verifies client certificates (a client CA): only
        # then does a certificate authenticate a call.
        self.mtls = mtls
        self._by_hash: dict[str, KeyEntry] = {}
        self._by_subject: dict[str, KeyEntry] = {}
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
        active = [key for key in keys if not key.revoked]
        self._by_hash = {key.sha256: key for key in active if key.sha256}
        self._by_subject = {key.mtls_subject: key for key in active if key.mtls_subject}
        self._stamp = stamp
        _log.info(
            "read %d active API keys and %d client certificate subjects from %s",
            len(self._by_hash),
            len(self._by_subject),
            self.path,
        )
        if self._by_subject and not self.mtls:
            _log.warning(
                "the keys file names client certificates (mtls_subject), but this server does "
                "not verify client certificates (RUNCAP_TLS_CLIENT_CA_FILE): they authenticate "
                "nothing"
            )

    def authenticate(
        self,
        metadata: Iterable[tuple[str, str | bytes]] | None,
        auth_context: Mapping[str, Iterable[bytes]] | None = None,
    ) -> Principal:
        """The principal of a call: its `authorization: Bearer` key when it
        sends one; else, with mTLS, its verified client certificate's subject
        (`certificate_subject`) as the keys file maps it."""
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
        if token:
            entry = self._by_hash.get(digest(token))
            if entry is None:
                raise Unauthenticated("the API key is not valid (unknown or revoked)")
            return entry.principal()
        subject = certificate_subject(auth_context) if self.mtls else None
        if subject is not None:
            entry = self._by_subject.get(subject)
            if entry is None:
                raise Unauthenticated(
                    f"the client certificate {subject!r} is not valid here (no active entry of "
                    "the keys file has this mtls_subject)"
                )
            return entry.principal()
        if self.mtls:
            raise Unauthenticated(
                "this server needs an API key (the metadata `authorization: Bearer <key>`) or "
                "a client certificate named in its keys file"
            )
        raise Unauthenticated(
            "this server needs an API key: send the metadata `authorization: Bearer <key>`"
        )


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
