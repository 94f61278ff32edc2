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
# How far ahead of the server's a client's clock may run before its signatures look too long-lived.
CLOCK_SKEW_S = 300


@dataclass(frozen=True)
class Credentials:
    appid: str
    secret_id: str
    secret_key: str
    # Server side only: the one bucket this account may name (signed ``b`` and the body's
    # ``bucket`` must both be it); None: any bucket, as long as signature and body agree.
    bucket: str | None = None

    def __repr__(self) -> str:  # keep the key out of logs and tracebacks
        bucket = "" if self.bucket is None else f", bucket={self.bucket!r}"
        return f"Credentials(appid={self.appid!r}, secret_id={self.secret_id!r}{bucket}, secret_key=***)"


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


class SignatureCache:
    """One reusable signature for many requests, renewed once it is ``renew_s`` old.

    v1 signatures are reusable until they expire, and making one per request (HMAC, random
    number, base64) was 5 % of the client's event-loop time. Renewing after ``renew_s``
    keeps the guarantee a signature per attempt gave: every request, a retry after a long
    backoff included, leaves with at least ``ttl - renew_s`` seconds of validity.
    """

    def __init__(
        self,
        creds: Credentials,
        bucket: str = "",
        ttl: int = DEFAULT_TTL_SECONDS,
        renew_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._creds = creds
        self._bucket = bucket
        self._ttl = ttl
        self._renew_s = renew_s
        self._clock = clock
        self._signature = ""
        self._made_at = float("-inf")

    def current(self) -> str:
        now = self._clock()
        if now - self._made_at >= self._renew_s:
            self._signature = sign(self._creds, self._bucket, self._ttl)
            self._made_at = now
        return self._signature


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


def verify_header(
    authorization: str | None,
    lookup_secret: Callable[[str], Credentials | None],
    now: int | None = None,
    max_lifetime_s: int | None = None,
    appid_exists: Callable[[str], bool] | None = None,
) -> tuple[SignedFields, Credentials]:
    """Everything the Authorization header alone can prove; raise SignatureError with the API code.

    Runs before the server reads a byte of the body, so an unsigned or forged request costs
    almost nothing. Order: format, secret id known (11), HMAC over the plain text (14; compared
    in constant time, and before any signed field is trusted), the signed appid (10 when
    ``appid_exists`` says no such appid, 6 when it is not the key's), expiry (9), lifetime
    over ``max_lifetime_s`` (9), then the account's configured bucket (16). What needs the
    body (its appid and bucket) is ``check_body``'s job.
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
    if appid_exists is not None and not appid_exists(fields["a"]):
        raise SignatureError(codes.APPID_UNKNOWN)
    if fields["a"] != creds.appid:
        raise SignatureError(codes.SIGNATURE_MISMATCH, "appid does not match the signature")
    now = int(time.time()) if now is None else now
    _check_time_window(expires, signed_at, now, max_lifetime_s)
    signed = SignedFields(fields["a"], fields.get("b", ""), fields["k"], expires, signed_at)
    if creds.bucket is not None and signed.bucket != creds.bucket:
        detail = "the signature names no bucket" if not signed.bucket else "not this account's bucket"
        raise SignatureError(codes.BUCKET_UNKNOWN, detail)
    return signed, creds


def _check_time_window(expires: int, signed_at: int, now: int, max_lifetime_s: int | None) -> None:
    """Not expired, and not valid for longer than the server allows.

    A v1 signature is reusable until ``e``: a leaked one is a key for that long. The
    lifetime is bounded both as signed (``e - t``) and as left from now (``e - now``, with
    ``CLOCK_SKEW_S`` for a client whose clock runs ahead), so a future ``t`` cannot stretch it.
    """
    if expires <= signed_at or expires < now:
        raise SignatureError(codes.SIGNATURE_EXPIRED)
    if max_lifetime_s is not None and (
        expires - signed_at > max_lifetime_s or expires - now > max_lifetime_s + CLOCK_SKEW_S
    ):
        raise SignatureError(
            codes.SIGNATURE_EXPIRED,
            f"signature valid for longer than this server's maximum of {max_lifetime_s} s",
        )


def check_body(signed: SignedFields, appid: str, bucket: str | None) -> None:
    """The body's appid and bucket against the signed ones (code 6), both ways.

    A missing bucket counts as the empty one, so a bucket in the body but not in the
    signature (or the reverse) is a mismatch as much as two different buckets are.
    """
    if signed.appid != appid:
        raise SignatureError(codes.SIGNATURE_MISMATCH, "appid does not match the signature")
    if signed.bucket != (bucket or ""):
        raise SignatureError(codes.SIGNATURE_MISMATCH, "bucket does not match the signature")


def verify(
    authorization: str | None,
    appid: str,
    bucket: str | None,
    lookup_secret: Callable[[str], Credentials | None],
    now: int | None = None,
    max_lifetime_s: int | None = None,
) -> SignedFields:
    """``verify_header`` then ``check_body``: the whole check when the body is already known."""
    signed, _creds = verify_header(authorization, lookup_secret, now, max_lifetime_s)
    check_body(signed, appid, bucket)
    return signed
