"""The v1 signature: the client's signer and the server's verifier, both from batchtag.signing."""

import base64
import hashlib
import hmac

import pytest

from batchtag import codes
from batchtag.signing import (
    Credentials,
    SignatureCache,
    SignatureError,
    parse_plain,
    plain_text,
    sign,
    sign_plain,
    verify,
)

CREDS = Credentials("1000001", "AKIDmO5cPW3LDGJsarDEDcQ1FprZVC1opgqX", "test-secret-key-0123456789abcdef")
NOW = 1469175230
# The provider's worked example (docs/api.md describes the format): the plain text it signs.
EXAMPLE_PLAIN = "a=1000001&b=qiniutest2&k=AKIDmO5cPW3LDGJsarDEDcQ1FprZVC1opgqX&t=1469175230&e=1469176230"


def lookup(secret_id):
    return CREDS if secret_id == CREDS.secret_id else None


def test_signature_layout_is_digest_then_plain_text():
    auth = sign_plain(CREDS.secret_key, EXAMPLE_PLAIN)
    raw = base64.b64decode(auth)
    expected = hmac.new(CREDS.secret_key.encode(), EXAMPLE_PLAIN.encode(), hashlib.sha1).digest()
    assert raw[:20] == expected
    assert raw[20:] == EXAMPLE_PLAIN.encode()


def test_plain_text_carries_every_field():
    plain = plain_text("1000001", "qiniutest2", "AKID", 1469176230, 1469175230, 42)
    assert plain == "a=1000001&b=qiniutest2&k=AKID&e=1469176230&t=1469175230&r=42&f="


def test_verifier_accepts_the_worked_example_field_order():
    # The example puts t before e and has no r or f: a verifier must accept any order.
    auth = sign_plain(CREDS.secret_key, EXAMPLE_PLAIN)
    fields = verify(auth, "1000001", "qiniutest2", lookup, now=NOW + 10)
    assert (fields.appid, fields.bucket, fields.expires, fields.now) == (
        "1000001",
        "qiniutest2",
        1469176230,
        NOW,
    )


def test_sign_then_verify_round_trip():
    auth = sign(CREDS, "bucket", ttl=60, now=NOW, rand=7)
    assert verify(auth, CREDS.appid, "bucket", lookup, now=NOW + 30).secret_id == CREDS.secret_id


def test_parse_plain_any_order():
    assert parse_plain("e=2&a=1&k=x&t=1") == {"e": "2", "a": "1", "k": "x", "t": "1"}


def tamper_digest(auth: str) -> str:
    raw = bytearray(base64.b64decode(auth))
    raw[0] ^= 0xFF
    return base64.b64encode(bytes(raw)).decode()


def tamper_plain(auth: str) -> str:
    raw = base64.b64decode(auth)
    return base64.b64encode(raw[:20] + raw[20:].replace(b"e=", b"e=9")).decode()


@pytest.mark.parametrize(
    ("make_auth", "appid", "bucket", "now", "code"),
    [
        (lambda: None, CREDS.appid, "", NOW, codes.SIGNATURE_EMPTY),
        (lambda: "", CREDS.appid, "", NOW, codes.SIGNATURE_EMPTY),
        (lambda: "%%%not-base64%%%", CREDS.appid, "", NOW, codes.SIGNATURE_MALFORMED),
        (lambda: base64.b64encode(b"short").decode(), CREDS.appid, "", NOW, codes.SIGNATURE_MALFORMED),
        (
            lambda: base64.b64encode(b"x" * 20 + b"garbage").decode(),
            CREDS.appid,
            "",
            NOW,
            codes.SIGNATURE_MALFORMED,
        ),
        (lambda: tamper_digest(sign(CREDS, now=NOW)), CREDS.appid, "", NOW, codes.SIGNATURE_FAILED),
        (lambda: tamper_plain(sign(CREDS, now=NOW)), CREDS.appid, "", NOW, codes.SIGNATURE_FAILED),
        (lambda: sign(CREDS, ttl=60, now=NOW), CREDS.appid, "", NOW + 61, codes.SIGNATURE_EXPIRED),
        (lambda: sign(CREDS, ttl=-5, now=NOW), CREDS.appid, "", NOW, codes.SIGNATURE_EXPIRED),
        (lambda: sign(CREDS, now=NOW), "999", "", NOW, codes.SIGNATURE_MISMATCH),
        (lambda: sign(CREDS, "b1", now=NOW), CREDS.appid, "b2", NOW, codes.SIGNATURE_MISMATCH),
        (
            lambda: sign(Credentials("1000001", "other-id", "k"), now=NOW),
            CREDS.appid,
            "",
            NOW,
            codes.SECRET_ID_UNKNOWN,
        ),
        (
            lambda: sign(Credentials("1000001", CREDS.secret_id, "wrong-key"), now=NOW),
            CREDS.appid,
            "",
            NOW,
            codes.SIGNATURE_FAILED,
        ),
    ],
    ids=[
        "none",
        "empty",
        "not-base64",
        "too-short",
        "no-fields",
        "tampered-digest",
        "tampered-plain",
        "expired",
        "expiry-before-signing",
        "appid-mismatch",
        "bucket-mismatch",
        "unknown-secret-id",
        "wrong-key",
    ],
)
def test_verifier_refuses(make_auth, appid, bucket, now, code):
    with pytest.raises(SignatureError) as caught:
        verify(make_auth(), appid, bucket, lookup, now=now)
    assert caught.value.code == code


def test_credentials_repr_hides_the_key():
    assert CREDS.secret_key not in repr(CREDS)


# The provider's published examples (the retired 万象优图 developer manual, quoted in
# tencentyun/qcloud-documents): a self-consistent one with its key, and the provider's
# worked example above, whose key was never published, as an Authorization header.
MANUAL = Credentials("1000027", "AKIDnX91172Bs2NK4SP9Ad9JDVYpm7Lx2Nek", "oHL5srXW3Fkn8xtugG0BDhUfOOsC9DAd")
MANUAL_PLAIN = "a=1000027&b=test333&k=AKIDnX91172Bs2NK4SP9Ad9JDVYpm7Lx2Nek&t=1466393489&e=1466393499"
MANUAL_SIGNATURE = (
    "xBx0lpW/tdIr1vfksAt3GpfXo9phPTEwMDAwMjcmYj10ZXN0MzMzJms9QUtJRG5YOTExNzJCczJOSzRTUDlBZDlKRFZZ"
    "cG03THgyTmVrJnQ9MTQ2NjM5MzQ4OSZlPTE0NjYzOTM0OTk="
)
NOTES_SIGNATURE = (
    "FL26MsO1nhrZGuXdin10DE5tnDdhPTEwMDAwMDEmYj1xaW5pdXRlc3QyJms9QUtJRG1PNWNQVzNMREdKc2FyREVEY1ExRnBy"
    "WlZDMW9wZ3FYJnQ9MTQ2OTE3NTIzMCZlPTE0NjkxNzYyMzA="
)


def test_signer_matches_the_providers_worked_example_byte_for_byte():
    assert sign_plain(MANUAL.secret_key, MANUAL_PLAIN) == MANUAL_SIGNATURE


def test_verifier_accepts_the_providers_worked_example():
    fields = verify(
        MANUAL_SIGNATURE,
        "1000027",
        "test333",
        lambda k: MANUAL if k == MANUAL.secret_id else None,
        now=1466393490,
    )
    assert (fields.bucket, fields.now, fields.expires) == ("test333", 1466393489, 1466393499)


def test_api_notes_example_decodes_to_the_documented_digest_and_plain_text():
    raw = base64.b64decode(NOTES_SIGNATURE)
    assert raw[:20].hex() == "14bdba32c3b59e1ad91ae5dd8a7d740c4e6d9c37"
    assert raw[20:].decode() == EXAMPLE_PLAIN
    # Its secret key is unpublished: any other key must fail the digest check, not parse.
    with pytest.raises(SignatureError) as caught:
        verify(NOTES_SIGNATURE, "1000001", "qiniutest2", lookup, now=NOW)
    assert caught.value.code == codes.SIGNATURE_FAILED


def test_signature_cache_reuses_one_signature_then_renews_it():
    clock = [1000.0]
    cache = SignatureCache(CREDS, "bkt", ttl=600, renew_s=60, clock=lambda: clock[0])
    first = cache.current()
    clock[0] += 59.9
    assert cache.current() == first
    clock[0] += 0.1
    second = cache.current()
    assert second != first  # a new random number and time
    lookup = lambda k: CREDS if k == CREDS.secret_id else None  # noqa: E731
    for auth in (first, second):
        fields = verify(auth, CREDS.appid, "bkt", lookup)
        assert fields.expires - fields.now == 600  # the full lifetime, whenever it is used
