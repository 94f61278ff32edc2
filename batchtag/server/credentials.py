"""Which callers the server accepts: loading the credentials file and looking keys up.

Error messages name the file, the entry and the field, never a value: a secret pasted into
the wrong field must not end up on a terminal or in a CI log.
"""

from __future__ import annotations

import json
import secrets
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from batchtag.signing import Credentials

CREDENTIAL_FIELDS = ("appid", "secret_id", "secret_key")


def load_credentials_file(path: Path) -> list[Credentials]:
    """Read ``{"credentials": [{appid, secret_id, secret_key[, bucket]}, ...]}`` from JSON or TOML."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read credentials file {path}: {type(exc).__name__}") from None
    document = _parse_document(path, text)
    entries = document.get("credentials") if isinstance(document, Mapping) else None
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"credentials file {path}: expected a non-empty list under 'credentials'")
    loaded = [_entry_to_credentials(path, index, entry) for index, entry in enumerate(entries)]
    _reject_duplicate_secret_ids(path, loaded)
    return loaded


def _parse_document(path: Path, text: str) -> Any:
    """TOML for ``.toml`` files, JSON for anything else (the more common hand-written format)."""
    if path.suffix.lower() == ".toml":
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"credentials file {path} is not valid TOML: {_position_only(exc)}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        # JSONDecodeError's message quotes no input, only the position.
        raise ValueError(
            f"credentials file {path} is not valid JSON: {exc.msg} at line {exc.lineno}"
        ) from None


def _position_only(exc: tomllib.TOMLDecodeError) -> str:
    """tomllib messages carry a position and a description but no input text; keep it that way."""
    return str(exc).splitlines()[0]


def _entry_to_credentials(path: Path, index: int, entry: object) -> Credentials:
    where = f"credentials file {path}, entry {index}"
    if not isinstance(entry, Mapping):
        raise ValueError(f"{where}: expected a table/object with {', '.join(CREDENTIAL_FIELDS)}")
    values: dict[str, str] = {}
    for name in CREDENTIAL_FIELDS:
        value = entry.get(name)
        if name == "appid" and isinstance(value, int) and not isinstance(value, bool):
            value = str(value)  # numeric appids are common in the provider's examples
        if not isinstance(value, str) or not value:
            raise ValueError(f"{where}: field '{name}' is missing or not a non-empty string")
        values[name] = value
    bucket = entry.get("bucket")  # optional: binds the account to this one bucket
    if bucket is not None and (not isinstance(bucket, str) or not bucket):
        raise ValueError(f"{where}: field 'bucket' must be a non-empty string when given")
    return Credentials(**values, bucket=bucket)


def _reject_duplicate_secret_ids(path: Path, loaded: Iterable[Credentials]) -> None:
    seen: set[str] = set()
    for index, creds in enumerate(loaded):
        if creds.secret_id in seen:
            raise ValueError(f"credentials file {path}, entry {index}: duplicate secret_id")
        seen.add(creds.secret_id)


def throwaway_credentials() -> Credentials:
    """Fresh random credentials for a server that lives only as long as one client run."""
    return Credentials(
        appid=str(1_000_000 + secrets.randbelow(9_000_000)),
        secret_id="AKID" + secrets.token_hex(16),
        secret_key=secrets.token_urlsafe(24),
    )


class CredentialStore:
    """The configured callers, indexed the two ways a request is checked."""

    def __init__(self, credentials: Iterable[Credentials]) -> None:
        self._by_secret_id = {creds.secret_id: creds for creds in credentials}
        self._appids = frozenset(creds.appid for creds in self._by_secret_id.values())

    def lookup_secret(self, secret_id: str) -> Credentials | None:
        return self._by_secret_id.get(secret_id)

    def knows_appid(self, appid: str) -> bool:
        return appid in self._appids

    def __len__(self) -> int:
        return len(self._by_secret_id)
