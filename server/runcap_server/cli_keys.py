"""`runcap keys`: create, list and revoke the API keys of a keys file.

The file holds only each key's SHA-256; `create` prints the key itself once.
An entry may name a client certificate instead (`--mtls-subject`, for a
server with mTLS), or both. Servers reading the file pick changes up within a
second.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from runcap_server.auth import (
    KeyEntry,
    Role,
    check_subject,
    digest,
    new_key,
    read_keys,
    write_keys,
)
from runcap_server.validation import ID_PATTERN


def add_commands(commands: argparse._SubParsersAction[Any]) -> None:
    keys = commands.add_parser("keys", help="create, list and revoke API keys (a keys file)")
    keys.add_argument(
        "--file",
        default=os.environ.get("RUNCAP_API_KEYS_FILE") or None,
        help="the keys file (env RUNCAP_API_KEYS_FILE)",
    )
    actions = keys.add_subparsers(
        dest="keys_command", required=True, metavar="{create,list,revoke}"
    )
    create = actions.add_parser(
        "create", help="add a key (prints it once) or a client certificate's principal"
    )
    create.add_argument("key_id", help="the key's id: its principal, and its runs' API key scope")
    create.add_argument("--tenant", required=True, help="the tenant (ledger namespace) it reaches")
    create.add_argument(
        "--role", required=True, choices=["agent", "operator", "admin"], help="what it may do"
    )
    create.add_argument("--user", default="", help="the user of the runs it creates")
    create.add_argument("--team", default="", help="the team of the runs it creates")
    create.add_argument(
        "--mtls-subject",
        default="",
        metavar="NAME",
        help="a client certificate's name (its spiffe:// URI SAN, else its subject CN) that "
        "authenticates as this principal on an mTLS server; no API key is made unless --with-key",
    )
    create.add_argument(
        "--with-key",
        action="store_true",
        help="with --mtls-subject: make an API key for the entry too",
    )
    create.set_defaults(func=_guarded(_create))
    listing = actions.add_parser("list", help="the keys, without secrets")
    listing.set_defaults(func=_guarded(_list))
    revoke = actions.add_parser("revoke", help="revoke a key (servers stop accepting it)")
    revoke.add_argument("key_id")
    revoke.set_defaults(func=_guarded(_revoke))


def _path(args: argparse.Namespace) -> Path:
    if not args.file:
        raise ValueError("name the keys file: --file PATH or RUNCAP_API_KEYS_FILE")
    return Path(args.file)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def _existing(path: Path) -> list[KeyEntry]:
    return read_keys(path) if path.exists() else []


def _create(args: argparse.Namespace) -> int:
    path = _path(args)
    keys = _existing(path)
    for name, value in (("key id", args.key_id), ("tenant", args.tenant)):
        if not ID_PATTERN.fullmatch(value):
            raise ValueError(f"{name} {value!r} is not a valid id (letters, digits, ._:-)")
    if any(key.id == args.key_id for key in keys):
        raise ValueError(f"the keys file already has a key {args.key_id!r}")
    subject: str = args.mtls_subject
    if args.with_key and not subject:
        raise ValueError("--with-key goes with --mtls-subject (a plain entry always has a key)")
    if subject:
        check_subject(subject, "--mtls-subject")
        holder = next((k for k in keys if k.mtls_subject == subject and not k.revoked), None)
        if holder is not None:
            raise ValueError(f"the key {holder.id!r} already has the mtls_subject {subject!r}")
    secret = new_key(args.key_id) if args.with_key or not subject else ""
    entry = KeyEntry(
        id=args.key_id,
        sha256=digest(secret) if secret else "",
        tenant=args.tenant,
        role=Role.parse(args.role),
        user_id=args.user,
        team_id=args.team,
        created=_now(),
        mtls_subject=subject,
    )
    KeyEntry.from_json(entry.to_json(), "the new key")  # the same checks as on reading
    write_keys(path, [*keys, entry])
    certificate = f", client certificate {subject!r}" if subject else ""
    if secret:
        print(secret)
        print(
            f"key {args.key_id} ({args.role}, tenant {args.tenant}{certificate}) added to "
            f"{path}; this is the only time the key is shown",
            file=sys.stderr,
        )
    else:
        print(
            f"key {args.key_id} ({args.role}, tenant {args.tenant}{certificate}) added to "
            f"{path}, without an API key",
            file=sys.stderr,
        )
    return 0


def _list(args: argparse.Namespace) -> int:
    for key in read_keys(_path(args)):
        state = f"revoked {key.revoked}" if key.revoked else "active"
        scopes = " ".join(
            f"{n}={v}"
            for n, v in (
                ("user", key.user_id),
                ("team", key.team_id),
                ("mtls_subject", key.mtls_subject),
            )
            if v
        )
        if not key.sha256:
            scopes += " (no API key)"
        print(f"{key.id}\t{key.role.name.lower()}\ttenant={key.tenant}\t{state}\t{scopes}".rstrip())
    return 0


def _revoke(args: argparse.Namespace) -> int:
    path = _path(args)
    keys = read_keys(path)
    if not any(key.id == args.key_id for key in keys):
        raise ValueError(f"the keys file has no key {args.key_id!r}")
    stamp = _now()
    keys = [
        dataclasses.replace(key, revoked=key.revoked or stamp) if key.id == args.key_id else key
        for key in keys
    ]
    write_keys(path, keys)
    print(f"key {args.key_id} revoked", file=sys.stderr)
    return 0


def _guarded(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """A mistake (a bad file, an unknown key) is one line on stderr, exit 2."""

    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except ValueError as error:
            print(f"runcap: {error}", file=sys.stderr)
            return 2

    return run
