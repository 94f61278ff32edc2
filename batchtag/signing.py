"""The v1 HMAC-SHA1 request signature, both sides: clients sign, the server verifies.

    plain = "a=<appid>&b=<bucket>&k=<secret_id>&e=<expires>&t=<now>&r=<rand>&f="
    Authorization = base64(HMAC-SHA1(secret_key, plain) + plain)

One module so the client and ``batchtag serve`` can never disagree about the format.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from batchtag import codes
from batchtag.errors import SignatureError

DIGEST_SIZE = 20  # SHA-1
DEFAULT_TTL_SECONDS = 600


@dataclass(frozen=True)
class Credentials:
    appid: str
    secret_id: str
    secret_key: str

    def __repr__(self) -> str:  # keep the key out of logs and tracebacks
        return f"Credentials(appid={self.appid!r}, secret_id={self.secret_id!r}, secret_key=***)"


def plain_text(
    appid: str,
    bucket: str,
    secret_id: str,
    expires: int,
    now: int,
    rand: int,
    fileid: str = "",
) -> str:
    return f"a={appid}&b={bucket}&k={secret_id}&e={expires}&t={now}&r={rand}&f={fileid}"


def sign_plain(secret_key: str, plain: str) -> str:
    digest = hmac.new(secret_key.encode(), plain.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest + plain.encode()).decode("ascii")


def sign(
    creds: Credentials,
    bucket: str = "",
    ttl: int = DEFAULT_TTL_SECONDS,
    now: int | None = None,
    rand: int | None = None,
) -> str:
    """A fresh reusable signature, valid for ``ttl`` seconds from ``now``."""
    now = int(time.time()) if now is None else now
    rand = secrets.randbelow(2**31) if rand is None else rand
    plain = plain_text(creds.appid, bucket, creds.secret_id, now + ttl, now, rand)
    return sign_plain(creds.secret_key, plain)


@dataclass(frozen=True)
class SignedFields:
    appid: str
    bucket: str
    secret_id: str
    expires: int
    now: int


def parse_plain(plain: str) -> dict[str, str]:
    """``key=value`` pairs joined by ``&``, in any order, as the provider allows."""
    fields: dict[str, str] = {}
    for part in plain.split("&"):
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise SignatureError(codes.SIGNATURE_MALFORMED, "signature fields malformed")
        fields[key] = value
    return fields


def _as_int(fields: Mapping[str, str], key: str) -> int:
    try:
        return int(fields[key])
    except (KeyError, ValueError):
        raise SignatureError(
            codes.SIGNATURE_MALFORMED, f"signature field {key!r} missing or not a number"
        ) from None


def verify(
    authorization: str | None,
    appid: str,
    bucket: str | None,
    lookup_secret: Callable[[str], Credentials | None],
    now: int | None = None,
) -> SignedFields:
    """Check a request's Authorization header; raise SignatureError with the API code.

    ``lookup_secret`` maps a secret id to its credentials (None when unknown). The digest
    is compared in constant time so timing leaks nothing about the key.
    """
    if not authorization:
        raise SignatureError(codes.SIGNATURE_EMPTY)
    try:
        raw = base64.b64decode(authorization.strip(), validate=True)
        plain = raw[DIGEST_SIZE:].decode("utf-8")
    except (binascii.Error, ValueError):
        raise SignatureError(codes.SIGNATURE_MALFORMED, "signature is not valid base64") from None
    if len(raw) <= DIGEST_SIZE:
        raise SignatureError(codes.SIGNATURE_MALFORMED, "signature too short")
    digest = raw[:DIGEST_SIZE]
    fields = parse_plain(plain)
    for key in ("a", "k"):
        if not fields.get(key):
            raise SignatureError(codes.SIGNATURE_MALFORMED, f"signature field {key!r} missing")
    expires, signed_at = _as_int(fields, "e"), _as_int(fields, "t")

    creds = lookup_secret(fields["k"])
    if creds is None:
        raise SignatureError(codes.SECRET_ID_UNKNOWN)
    expected = hmac.new(creds.secret_key.encode(), plain.encode(), hashlib.sha1).digest()
    if not hmac.compare_digest(expected, digest):
        raise SignatureError(codes.SIGNATURE_FAILED)
    if fields["a"] != appid or creds.appid != appid:
        raise SignatureError(codes.SIGNATURE_MISMATCH, "appid does not match the signature")
    if bucket and fields.get("b") and fields["b"] != bucket:
        raise SignatureError(codes.SIGNATURE_MISMATCH, "bucket does not match the signature")
    now = int(time.time()) if now is None else now
    if expires <= signed_at or expires < now:
        raise SignatureError(codes.SIGNATURE_EXPIRED)
    return SignedFields(fields["a"], fields.get("b", ""), fields["k"], expires, signed_at)
