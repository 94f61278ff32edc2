"""The image-tag API's result codes: the one table both client and server read.

Every code the provider documents is here with its message and whether a client should
try again (docs/api.md prints this table). The server answers with these messages; the client's retry policy
asks ``is_transient``. HTTP statuses and transport failures, which carry no API code, are
classified in the same place so the retry decision lives in exactly one table.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Retry(Enum):
    """What a client should do with a failure, within a run and across runs."""

    TRANSIENT = "transient"  # heals soon: retried with backoff, and again by every plain rerun
    # Does not heal by retrying soon (a dead link, a 4xx): one quick retry within a run, then
    # later plain runs try it again until the key has been tried in --max-attempts runs;
    # after that it stays an error until --retry-errors.
    SETTLES = "settles"
    PERMANENT = "permanent"  # record the error, never retry (until --retry-errors)


@dataclass(frozen=True)
class CodeInfo:
    code: int
    message: str
    retry: Retry
    # An answer about the credentials or the account, not the item: every other request
    # would get it too, so the run stops at once (exit 2) with ``fix`` as the advice.
    fix: str = ""

    @property
    def stops_run(self) -> bool:
        return bool(self.fix)


OK = 0
BAD_REQUEST = 3
SIGNATURE_EMPTY = 4
SIGNATURE_MALFORMED = 5
SIGNATURE_MISMATCH = 6
SIGNATURE_EXPIRED = 9
APPID_UNKNOWN = 10
SECRET_ID_UNKNOWN = 11
APPID_MISMATCH = 12
REPLAY = 13
SIGNATURE_FAILED = 14
RATE_LIMITED = 15
BUCKET_UNKNOWN = 16
URL_EMPTY = 17
NO_SOURCE = 18
IMAGE_TOO_LARGE = 20
BAD_PARAMETER = 21
INTERNAL_PACK = 200
INTERNAL_UNPACK = 201
INTERNAL_LINK = 202
INTERNAL_TIMEOUT = 203
IMAGE_DECODE_FAILED = -1102
IMAGE_EMPTY = -1300
PARAMETER_EMPTY = -1301
URL_DOWNLOAD_FAILED = -1308
IMAGE_FORMAT = -1400
IMAGE_DOWNLOAD_FAILED = -1403
IMAGE_UNRECOGNISED = -1404
URL_FORMAT = -1505
URL_DOWNLOAD_TIMEOUT = -1506
URL_UNREACHABLE = -1507
URL_PROHIBITED = -5062

# Runs that try a key whose failure settles before it is left alone (--max-attempts).
DEFAULT_MAX_ATTEMPTS = 3

T, S, P = Retry.TRANSIENT, Retry.SETTLES, Retry.PERMANENT

_KEY = "check that the secret key (BATCHTAG_SECRET_KEY or --secret-key-file) belongs to --secret-id"
_SIGNATURE = "the signature did not reach the service intact: a proxy in between, or a client bug"
_BUCKET = "check --bucket (BATCHTAG_BUCKET): it must exist and belong to --appid"

API_CODES: dict[int, CodeInfo] = {
    info.code: info
    for info in (
        CodeInfo(OK, "success", P),
        CodeInfo(BAD_REQUEST, "bad request", P),
        CodeInfo(SIGNATURE_EMPTY, "signature empty", P, _SIGNATURE),
        CodeInfo(SIGNATURE_MALFORMED, "signature malformed", P, _SIGNATURE),
        CodeInfo(SIGNATURE_MISMATCH, "appid/bucket/url mismatch with the signature", P, _BUCKET),
        CodeInfo(7, "signature encode failed", T),
        CodeInfo(8, "signature decode failed", T),
        # The client signs every attempt afresh, so an expired signature is worth one more go.
        CodeInfo(SIGNATURE_EXPIRED, "signature expired", T),
        CodeInfo(APPID_UNKNOWN, "appid does not exist", P, "check --appid (BATCHTAG_APPID)"),
        CodeInfo(SECRET_ID_UNKNOWN, "secret id does not exist", P, "check --secret-id (BATCHTAG_SECRET_ID)"),
        CodeInfo(APPID_MISMATCH, "appid mismatch", P, "check that --appid is the account of --secret-id"),
        CodeInfo(REPLAY, "replay attack", T),
        CodeInfo(SIGNATURE_FAILED, "signature check failed", P, _KEY),
        CodeInfo(RATE_LIMITED, "too many requests: rate limit hit", T),
        CodeInfo(BUCKET_UNKNOWN, "bucket does not exist", P, _BUCKET),
        CodeInfo(URL_EMPTY, "url empty", P),
        CodeInfo(NO_SOURCE, "neither image nor url", P),
        CodeInfo(IMAGE_TOO_LARGE, "image too large", P),
        CodeInfo(BAD_PARAMETER, "invalid parameter", P),
        CodeInfo(INTERNAL_PACK, "internal pack failure", T),
        CodeInfo(INTERNAL_UNPACK, "internal unpack failure", T),
        CodeInfo(INTERNAL_LINK, "internal link failure", T),
        CodeInfo(INTERNAL_TIMEOUT, "internal processing timeout", T),
        CodeInfo(IMAGE_DECODE_FAILED, "image decode failed", P),
        CodeInfo(IMAGE_EMPTY, "image empty", P),
        CodeInfo(PARAMETER_EMPTY, "request parameter empty", P),
        CodeInfo(URL_DOWNLOAD_FAILED, "downloading the url image failed", S),
        CodeInfo(IMAGE_FORMAT, "illegal image format", P),
        CodeInfo(IMAGE_DOWNLOAD_FAILED, "image download failed", S),
        CodeInfo(IMAGE_UNRECOGNISED, "image cannot be recognised", P),
        CodeInfo(URL_FORMAT, "url format wrong", P),
        CodeInfo(URL_DOWNLOAD_TIMEOUT, "image download timed out", S),
        CodeInfo(URL_UNREACHABLE, "cannot reach the server behind the url", S),
        CodeInfo(URL_PROHIBITED, "the url's image is flagged as prohibited", P),
    )
}

# Codes the client itself produces for failures that never got an API answer. They are
# outside the provider's range so a record always says which side failed.
CLIENT_HTTP_ERROR = -9001  # non-200 HTTP status without an API code
CLIENT_TRANSPORT_ERROR = -9002  # connection refused/reset, DNS, protocol error
CLIENT_TIMEOUT = -9003  # no answer within --timeout
CLIENT_BAD_RESPONSE = -9004  # 200 but the body is not the API's JSON
CLIENT_INPUT_ERROR = -9010  # the item itself: missing, unreadable, empty, not an image
CLIENT_BAD_MANIFEST_LINE = -9011  # a manifest line that names no usable path or URL
CLIENT_INTERNAL_ERROR = -9099  # a bug in batchtag: costs one item, not the run

CLIENT_CODES: dict[int, CodeInfo] = {
    info.code: info
    for info in (
        CodeInfo(CLIENT_HTTP_ERROR, "HTTP error", S),  # the status decides: see retry_class
        CodeInfo(CLIENT_TRANSPORT_ERROR, "connection failed", T),
        CodeInfo(CLIENT_TIMEOUT, "request timed out", T),
        CodeInfo(CLIENT_BAD_RESPONSE, "response is not the API's JSON", T),
        CodeInfo(CLIENT_INPUT_ERROR, "input error", P),
        CodeInfo(CLIENT_BAD_MANIFEST_LINE, "bad manifest line", P),
        CodeInfo(CLIENT_INTERNAL_ERROR, "internal error", P),
    )
}

# Codes of errors that stop a whole run (exit 2) rather than end one item: they appear in
# no record, only on the error objects (errors.UsageError), so every error has a code.
RUN_USAGE_ERROR = -9020  # bad settings or an unusable SOURCE argument
RUN_OUT_ERROR = -9021  # OUT cannot be opened, locked or written
RUN_CLUSTER_ERROR = -9022  # --cluster: the Dask scheduler cannot be reached, or went away
RUN_CREDENTIALS_REFUSED = -9023  # the service refused the credentials or the account
RUN_ENDPOINT_UNREACHABLE = -9024  # the endpoint did not answer (at all, or again in time)

RUN_CODES: dict[int, CodeInfo] = {
    info.code: info
    for info in (
        CodeInfo(RUN_USAGE_ERROR, "usage or configuration error", P),
        CodeInfo(RUN_OUT_ERROR, "OUT cannot be opened, locked or written", P),
        CodeInfo(RUN_CLUSTER_ERROR, "the Dask cluster cannot be used or went away", P),
        CodeInfo(RUN_CREDENTIALS_REFUSED, "credentials refused by the service", P),
        CodeInfo(RUN_ENDPOINT_UNREACHABLE, "the endpoint does not answer", P),
    )
}

# HTTP statuses without an API code: worth retrying when the server or a proxy is
# overloaded or restarting, never when the request itself is wrong.
TRANSIENT_HTTP_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


def describe(code: int) -> CodeInfo:
    """The table's row for ``code``; unknown codes are permanent (we cannot know better)."""
    info = API_CODES.get(code) or CLIENT_CODES.get(code) or RUN_CODES.get(code)
    return info or CodeInfo(code, f"unknown code {code}", P)


def message(code: int) -> str:
    return describe(code).message


def retry_class(code: int, http_status: int | None = None) -> Retry:
    """How a failure is retried. A plain HTTP error (no API code) is classed by its status:
    429 and 5xx heal soon, other 4xx answers settle, anything else is permanent."""
    if code == CLIENT_HTTP_ERROR and http_status is not None:
        if is_transient_http(http_status):
            return Retry.TRANSIENT
        return Retry.SETTLES if 400 <= http_status < 500 else Retry.PERMANENT
    return describe(code).retry


def is_transient(code: int, http_status: int | None = None) -> bool:
    return retry_class(code, http_status) is Retry.TRANSIENT


def settles(code: int, http_status: int | None = None) -> bool:
    """A failure retried by later runs only up to --max-attempts runs (``Retry.SETTLES``)."""
    return retry_class(code, http_status) is Retry.SETTLES


def stops_run(code: int) -> bool:
    """An answer about the credentials or the account: the run stops instead of writing it
    as every item's record."""
    return describe(code).stops_run


def is_transient_http(status: int) -> bool:
    return status in TRANSIENT_HTTP_STATUSES


# The API's own "busy / internal failure" answers: with HTTP 5xx and no connection at all,
# they say the endpoint is in trouble, not the item (an endpoint pool takes it out).
ENDPOINT_TROUBLE_CODES = frozenset({INTERNAL_PACK, INTERNAL_UNPACK, INTERNAL_LINK, INTERNAL_TIMEOUT})


def says_endpoint_down(code: int, http_status: int | None, unreachable: bool) -> bool:
    """A failure that is the endpoint's, and that definitely did not tag the item: no
    connection, an HTTP 5xx, or a busy/internal code. A timeout is not one: the request
    may have been processed (endpoints.py says why that matters)."""
    if unreachable or code in ENDPOINT_TROUBLE_CODES:
        return True
    return code == CLIENT_HTTP_ERROR and http_status is not None and 500 <= http_status <= 599


def is_rate_limit(code: int | None = None, http_status: int | None = None) -> bool:
    """Both ways a server says "slow down": the API's code 15 and plain HTTP 429."""
    return code == RATE_LIMITED or http_status == 429


def markdown_table() -> str:
    """The code table as docs/api.md shows it (``python -m batchtag.codes`` prints it; a
    test fails when the doc and this table drift apart)."""
    rows = ["| code | message | retry | side |", "|---:|---|---|---|"]
    sides = (("API", API_CODES), ("client", CLIENT_CODES), ("run (exit 2, no record)", RUN_CODES))
    for side, table in sides:
        for info in table.values():
            retry = "-" if info.code == OK else info.retry.value
            rows.append(f"| {info.code} | {info.message} | {retry} | {side} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(markdown_table(), end="")
