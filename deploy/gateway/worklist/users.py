"""The worklist's users file: one `name:argon2-hash` line per user, hashed with argon2id.

Also `abdoserve gateway-user --users FILE NAME`, which adds a user or replaces their
password (read from the terminal, or from stdin when it is not one). The file is
written 0600 by an atomic rename; the gateway reads it at start.
"""

from __future__ import annotations

import argparse
import getpass
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

# Names go into the audit log and the page: a small alphabet keeps both plain.
USER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
MIN_PASSWORD = 8


class UsersError(ValueError):
    """A users file or name that cannot be used; names the line, never a password."""


def check_name(name: str) -> str:
    if not USER_NAME.match(name):
        raise UsersError("a user name is 1-64 letters, digits, '.', '_', '@' or '-'")
    return name


@dataclass
class Users:
    """Names and their argon2 hashes; `verify` costs the same for unknown names."""

    hashes: dict[str, str]
    hasher: PasswordHasher = field(default_factory=PasswordHasher)

    def __post_init__(self) -> None:
        # Checked against when the name is unknown, so a wrong name takes as long as a
        # wrong password and the timing does not tell which names exist.
        self._decoy = self.hasher.hash(os.urandom(16).hex())

    def verify(self, name: str, password: str) -> bool:
        stored = self.hashes.get(name)
        try:
            return self.hasher.verify(stored or self._decoy, password) and stored is not None
        except (VerificationError, InvalidHashError):
            return False


def parse_users(text: str, source: str) -> dict[str, str]:
    hashes: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, _, hashed = line.partition(":")
        if not USER_NAME.match(name) or not hashed.startswith("$argon2"):
            raise UsersError(f"{source}, line {number}: expected NAME:$argon2id$...")
        if name in hashes:
            raise UsersError(f"{source}, line {number}: user {name} is listed twice")
        hashes[name] = hashed
    return hashes


def load_users(path: Path) -> Users:
    return Users(parse_users(path.read_text(encoding="utf-8"), str(path)))


def set_password(
    path: Path, name: str, password: str, hasher: PasswordHasher | None = None
) -> None:
    """Add `name` to the users file, or replace its hash; the file stays 0600."""
    check_name(name)
    if len(password) < MIN_PASSWORD:
        raise UsersError(f"a password has at least {MIN_PASSWORD} characters")
    hashes = parse_users(path.read_text(encoding="utf-8"), str(path)) if path.exists() else {}
    hashes[name] = (hasher or PasswordHasher()).hash(password)
    text = "".join(f"{user}:{hashed}\n" for user, hashed in sorted(hashes.items()))
    staged = path.with_name(f".{path.name}.part")
    descriptor = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(staged, path)


# `abdoserve gateway-user` ----------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--users", type=Path, required=True, help="the users file (created 0600)")
    parser.add_argument("name", help="the user's name (letters, digits, . _ @ -)")


def run(args: argparse.Namespace) -> int:
    if sys.stdin.isatty():
        password = getpass.getpass(f"password for {args.name}: ")
        if getpass.getpass("again: ") != password:
            print("gateway-user: the passwords differ", file=sys.stderr)
            return 2
    else:
        password = sys.stdin.readline().rstrip("\n")
    try:
        set_password(args.users, args.name, password)
    except (UsersError, OSError) as error:
        print(f"gateway-user: {error}", file=sys.stderr)
        return 2
    print(f"user {args.name} set in {args.users}")
    return 0
