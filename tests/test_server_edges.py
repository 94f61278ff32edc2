"""The server against callers it cannot trust yet, over real sockets.

The signature is checked before a byte of the body is read; large bodies are read a few at
a time; half-sent requests and idle connections are closed; malformed requests never crash
the access log nor reach any log; every numeric IPv4 form is classified by the url guard;
signatures have a maximum lifetime; buckets are checked both ways.
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import threading
import time
import urllib.request
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest

from batchtag import codes
from batchtag.api import DETECT_PATH, HEALTH_PATH
from batchtag.server import RunningServer, urlfetch
from batchtag.signing import Credentials, sign
from tests.support import encode_image, run_cli, signed_headers, write_credentials

MIB = 1024 * 1024
JPEG = base64.b64encode(encode_image("JPEG")).decode()
# Long enough for any loaded CI machine; only a server that waits forever runs into it.
PATIENCE_S = 20.0


# --- raw HTTP ---------------------------------------------------------------------------------


def request_head(
    length: int | None, authorization: str | None = None, path: str = DETECT_PATH, method: str = "POST"
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    if authorization is not None:
        lines.append(f"Authorization: {authorization}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def host_port(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One HTTP/1.1 response with a Content-Length: (status, body)."""
    status_line = await reader.readline()
    status = int(status_line.split()[1])
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    return status, await reader.readexactly(length)


async def closed_by_server(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sends until it closes the connection (a reset counts as closed)."""
    received = b""
    try:
        while chunk := await reader.read(65536):
            received += chunk
    except ConnectionResetError:
        pass
    return received


# --- 9. the signature before the body ---------------------------------------------------------


def _unknown_secret_id(creds: Credentials) -> str:
    return sign(Credentials(creds.appid, "AKIDnobodyHasThisOne", creds.secret_key))


CONDEMNED_BY_THE_HEADER: list[tuple[str, int, Callable[[Credentials], str | None]]] = [
    ("no signature", codes.SIGNATURE_EMPTY, lambda c: None),
    ("not base64", codes.SIGNATURE_MALFORMED, lambda c: "!!not-a-signature!!"),
    ("unknown secret id", codes.SECRET_ID_UNKNOWN, _unknown_secret_id),
    ("wrong key", codes.SIGNATURE_FAILED, lambda c: sign(Credentials(c.appid, c.secret_id, "wrong-key"))),
    ("expired", codes.SIGNATURE_EXPIRED, lambda c: sign(c, now=int(time.time()) - 700, ttl=600)),
    ("lifetime over the maximum", codes.SIGNATURE_EXPIRED, lambda c: sign(c, ttl=2 * 24 * 3600)),
]


@pytest.mark.parametrize(
    ("code", "authorize"), [pytest.param(c, a, id=i) for i, c, a in CONDEMNED_BY_THE_HEADER]
)
async def test_a_request_its_header_condemns_is_answered_before_its_body_arrives(
    serve, creds, code: int, authorize
) -> None:
    server: RunningServer = await serve()
    reader, writer = await asyncio.open_connection(*host_port(server.url))
    # 16 MiB announced, 64 KiB sent: a server that reads the body first never answers.
    start = b'{"appid": "%s", "image": "' % creds.appid.encode()
    writer.write(request_head(16 * MIB, authorize(creds)) + start + b"A" * 65536)
    await writer.drain()
    status, body = await asyncio.wait_for(read_answer(reader), PATIENCE_S)
    writer.close()
    answer = json.loads(body)
    assert (status, answer["code"], answer["tags"]) == (200, code, [])
    assert answer["message"].startswith(codes.message(code))


async def test_a_valid_signature_still_gets_the_body_checked_against_it(serve, creds, detect) -> None:
    server = await serve()
    other_appid = {"appid": "1000002", "image": JPEG}  # signed for creds.appid
    assert (await detect(server, other_appid, signed_headers(creds)))[1]["code"] == codes.APPID_UNKNOWN
    server = await serve(credentials=[creds, Credentials("1000002", "AKIDsecond", "second-key")])
    assert (await detect(server, other_appid, signed_headers(creds)))[1]["code"] == codes.SIGNATURE_MISMATCH
    _, answer = await detect(server, {"appid": creds.appid, "image": JPEG}, signed_headers(creds))
    assert answer["code"] == codes.OK


def many_small_objects_body(appid: str, size: int) -> bytes:
    """A JSON object that parses into millions of dicts: 16 MiB becomes ~350 MB in Python."""
    head, tail = b'{"appid": "%s", "pad": [' % appid.encode(), b"{}]}"
    count = (size - len(head) - len(tail)) // 3
    return head + b"{}," * count + tail


def vm_hwm_kb(pid: int) -> int:
    """Peak resident memory of a process so far (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def send_unsigned(port: int, body: bytes, answers: list[bytes]) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=PATIENCE_S * 3) as sock:
        sock.sendall(request_head(len(body)) + body)
        answer = b""
        while b"}" not in answer and (chunk := sock.recv(65536)):
            answer += chunk
    answers.append(answer)


def test_six_unsigned_16_mib_bodies_neither_stall_healthz_nor_grow_memory(tmp_path, spawner, creds) -> None:
    """Parsing such a body is what would hold the event loop (seconds, ~350 MB of dicts), so
    the memory bound catches it; /healthz must also be answered while the bodies are still
    being sent. No wall-clock bound: on a loaded CI machine any fixed one is a coin toss."""
    proc, url = spawner.serve(write_credentials(tmp_path / "creds.json", creds))
    port = host_port(url)[1]
    body = many_small_objects_body(creds.appid, 16 * MIB - 1024)
    peak_before = vm_hwm_kb(proc.pid)
    answers: list[bytes] = []
    senders = [threading.Thread(target=send_unsigned, args=(port, body, answers)) for _ in range(6)]
    for sender in senders:
        sender.start()
    answered_while_sending = 0
    waits = []
    while any(sender.is_alive() for sender in senders):
        started = time.monotonic()
        with urllib.request.urlopen(url + HEALTH_PATH, timeout=PATIENCE_S) as response:
            assert response.status == 200
        waits.append(time.monotonic() - started)
        answered_while_sending += any(sender.is_alive() for sender in senders)
    for sender in senders:
        sender.join()
    print(f"/healthz answered {len(waits)} times, slowest {max(waits, default=0):.3f} s")
    assert len(answers) == 6
    assert all(b'"code": %d' % codes.SIGNATURE_EMPTY in answer for answer in answers), answers
    assert answered_while_sending >= 1, "/healthz was not answered while the bodies were being sent"
    growth_mib = (vm_hwm_kb(proc.pid) - peak_before) / 1024
    assert growth_mib < 150, f"peak RSS grew by {growth_mib:.0f} MiB"


async def test_large_bodies_are_read_a_few_at_a_time(serve, creds) -> None:
    """With one slot, a second large body waits until the first one has been read."""
    server = await serve(large_body_slots=1)
    address = host_port(server.url)
    first_body = json.dumps({"appid": creds.appid, "image": "A" * (512 * 1024)}).encode()
    second_body = json.dumps({"appid": creds.appid, "image": "not base64!" * 40_000}).encode()
    auth = signed_headers(creds)["Authorization"]

    first_reader, first = await asyncio.open_connection(*address)
    first.write(request_head(len(first_body), auth) + first_body[: len(first_body) // 2])
    await first.drain()
    await asyncio.sleep(0.2)  # let the first request take the slot (only ever too short: a pass)
    second_reader, second = await asyncio.open_connection(*address)
    second.write(request_head(len(second_body), auth) + second_body)
    await second.drain()
    second_answer = asyncio.ensure_future(read_answer(second_reader))
    done, _ = await asyncio.wait([second_answer], timeout=1.0)
    assert not done, "the second large body was read while the only slot was taken"

    first.write(first_body[len(first_body) // 2 :])
    await first.drain()
    first_status, first_answer = await asyncio.wait_for(read_answer(first_reader), PATIENCE_S)
    second_status, answer = await asyncio.wait_for(second_answer, PATIENCE_S)
    assert (first_status, second_status) == (200, 200)
    assert json.loads(first_answer)["code"] == codes.IMAGE_FORMAT  # "AAAA..." is not an image
    assert json.loads(answer)["code"] == codes.IMAGE_FORMAT
    for writer in (first, second):
        writer.close()


# --- 10. slow and silent clients --------------------------------------------------------------


async def test_half_sent_requests_and_idle_connections_are_closed(serve, creds) -> None:
    server = await serve(idle_timeout_s=0.5, body_timeout_s=0.5)
    address = host_port(server.url)
    auth = signed_headers(creds)["Authorization"]
    sends = {
        "nothing": b"",
        "half a request line": b"POST /v1/detection/image",
        "half a head": b"POST " + DETECT_PATH.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-",
        "a head, then part of the body": request_head(1000, auth) + b'{"appid": "',
        "a head, no body": request_head(1000, auth),
        "a chunked body, never finished": request_head(None, auth)[:-2]
        + b"Transfer-Encoding: chunked\r\n\r\n10\r\n{}",
    }
    connections = {}
    for name, data in sends.items():
        reader, writer = await asyncio.open_connection(*address)
        writer.write(data)
        connections[name] = (reader, writer)
    # A keep-alive connection that got its answer and then goes quiet.
    reader, writer = await asyncio.open_connection(*address)
    writer.write(request_head(None, path=HEALTH_PATH, method="GET"))
    assert (await asyncio.wait_for(read_answer(reader), PATIENCE_S))[0] == 200
    connections["idle after an answer"] = (reader, writer)

    received = {}
    for name, (reader, _) in connections.items():
        received[name] = await asyncio.wait_for(closed_by_server(reader), PATIENCE_S)
    for name in ("a head, then part of the body", "a head, no body", "a chunked body, never finished"):
        assert received[name].startswith(b"HTTP/1.1 408 "), (name, received[name][:200])
    for name in ("nothing", "half a request line", "half a head", "idle after an answer"):
        assert received[name] == b"", (name, received[name][:200])
    for _, writer in connections.values():
        writer.close()


# --- 11. the access log and malformed requests ------------------------------------------------

SECRET = "QUERYSECRET-4711"
MALFORMED = [
    b"GE T /?k=%s HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /healthz?k=%s HTTP/9.9\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nBad Header: %s\r\n\r\n",
    b"POST /v1/detection/imagetag_detect?q=%s HTTP/1.1\r\nContent-Length: x%s\r\n\r\n",
    b"\x00\x01\x02%s\r\n\r\n",
    b"GET /" + b"A" * 9000 + b"?%s HTTP/1.1\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X-Long: %s" + b"B" * 9000 + b"\r\n\r\n",
    b"POST /healthz?%s HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n%s\r\n",
    b"%s /healthz HTTP/1.1\r\nHost: x\r\n\r\n",  # a well-formed but unknown method
    b"GET /%zz?%s HTTP/1.1\r\nHost: x\r\n\r\n",
]


def send_raw(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=PATIENCE_S) as sock:
        sock.sendall(data)
        try:
            return sock.recv(65536)
        except ConnectionResetError:
            return b""


@pytest.mark.parametrize("verbose", [False, True], ids=["quiet", "-v"])
def test_malformed_requests_never_crash_or_leak_into_the_log(tmp_path, spawner, creds, verbose) -> None:
    flags = ["-v"] if verbose else []
    proc, url = spawner.serve(write_credentials(tmp_path / "creds.json", creds), *flags)
    port = host_port(url)[1]
    for template in MALFORMED:
        answer = send_raw(port, template.replace(b"%s", SECRET.encode()))
        assert answer.startswith(b"HTTP/1."), answer[:100]
    body = json.dumps({"appid": creds.appid, "image": JPEG, "note": SECRET}).encode()
    headers = signed_headers(creds) | {"X-Token": SECRET}
    request = urllib.request.Request(f"{url}{DETECT_PATH}?token={SECRET}", body, headers)
    with urllib.request.urlopen(request, timeout=PATIENCE_S) as response:
        assert json.loads(response.read())["code"] == codes.OK
    with urllib.request.urlopen(url + HEALTH_PATH, timeout=PATIENCE_S) as response:
        assert response.status == 200  # still serving
    assert proc.stop() == 0
    log = proc.stderr()
    assert "Traceback" not in log and "Error" not in log, log[-3000:]
    assert SECRET not in log and creds.secret_key not in log
    request_lines = [line for line in log.splitlines() if " ms" in line]
    if verbose:
        # One short line per request at most (readiness polls of /healthz aside).
        sent = [line for line in request_lines if "GET /healthz 200" not in line]
        assert 0 < len(sent) <= len(MALFORMED) + 1, request_lines
        assert all(len(line) < 120 for line in request_lines), request_lines
        assert any("(malformed request) 400" in line for line in request_lines), request_lines
    else:
        assert request_lines == []


# --- 12. every numeric form of an address -----------------------------------------------------

NUMERIC_PRIVATE_URLS = [
    "http://2130706433/a.jpg",  # 127.0.0.1 as one decimal number
    "http://017700000001/a.jpg",  # ... in octal
    "http://0x7f000001/a.jpg",  # ... in hex
    "http://0177.0.0.1/a.jpg",  # octal first part
    "http://127.1/a.jpg",  # two parts
    "http://0x7f.1/a.jpg",
    "http://0xa.0x1.0x2.0x3/a.jpg",  # 10.1.2.3
    "http://167772161/a.jpg",  # 10.0.0.1
    "http://0/a.jpg",  # 0.0.0.0
    "http://0xa9fea9fe/latest/meta-data/",  # 169.254.169.254
    "http://[2002:7f00:1::1]/a.jpg",  # 6to4 of 127.0.0.1
    "http://[2002:a00:1::]/a.jpg",  # 6to4 of 10.0.0.1
    "http://[64:ff9b::7f00:1]/a.jpg",  # NAT64 of 127.0.0.1
    "http://[64:ff9b::a9fe:a9fe]/a.jpg",  # NAT64 of 169.254.169.254
    "http://[64:ff9b:1::808:808]/a.jpg",  # local-use NAT64
    "http://[::7f00:1]/a.jpg",  # IPv4-compatible 127.0.0.1
    "http://[::ffff:7f00:1]/a.jpg",  # IPv4-mapped 127.0.0.1, in hex
]


@pytest.mark.parametrize("url", NUMERIC_PRIVATE_URLS)
async def test_every_numeric_form_of_a_private_address_is_refused_before_connecting(
    color_server, creds, detect, connections, url
) -> None:
    _, answer = await detect(color_server, {"appid": creds.appid, "url": url}, signed_headers(creds))
    assert answer["code"] == codes.URL_FORMAT and "private address" in answer["message"], answer
    assert connections == []


@pytest.mark.parametrize(
    ("host", "address"),
    [("2130706433", "127.0.0.1"), ("134744072", "8.8.8.8"), ("0x08.0x08.0x08.0x08", "8.8.8.8"),
     ("010.1", "8.0.0.1"), ("[::1]", "::1"), ("example.com", None), ("deadbeef", None), ("1.2.3.4.5", None)],
)  # fmt: skip
def test_literal_addresses_are_read_as_the_os_reads_them(host: str, address: str | None) -> None:
    assert urlfetch.literal_address(host) == address


@pytest.mark.parametrize(
    ("address", "forbidden"),
    [("2002:808:808::1", False), ("2002:c0a8:101::1", True), ("64:ff9b::808:808", False),
     ("64:ff9b::c0a8:101", True), ("64:ff9b:1::808:808", True), ("::808:808", True),
     ("::ffff:8.8.8.8", False), ("2001::1", True)],
)  # fmt: skip
def test_ipv6_forms_are_judged_by_the_ipv4_address_they_embed(address: str, forbidden: bool) -> None:
    assert urlfetch.is_forbidden_address(address) is forbidden


def test_the_package_requires_an_aiohttp_that_resolves_numeric_hosts() -> None:
    """aiohttp < 3.14.1 connects to ``http://2130706433/`` without asking the resolver."""
    requirement = next(r for r in metadata.requires("batchtag") or [] if r.startswith("aiohttp"))
    minimum = tuple(int(part) for part in requirement.split(">=")[1].split(",")[0].strip().split("."))
    assert minimum >= (3, 14, 1), requirement
    installed = tuple(int(part) for part in metadata.version("aiohttp").split(".")[:3])
    assert installed >= minimum


# --- 13. signature lifetime and buckets -------------------------------------------------------


async def test_signatures_valid_for_too_long_are_refused(serve, creds, detect) -> None:
    server = await serve(max_signature_lifetime_s=60)
    body = {"appid": creds.appid, "image": JPEG}
    now = int(time.time())
    cases = [
        (sign(creds, ttl=60), codes.OK),
        (sign(creds, ttl=61), codes.SIGNATURE_EXPIRED),
        (sign(creds, ttl=30 * 24 * 3600), codes.SIGNATURE_EXPIRED),
        # A signing time far ahead does not stretch it: what is left from now counts too.
        (sign(creds, now=now + 10 * 24 * 3600, ttl=30), codes.SIGNATURE_EXPIRED),
    ]
    for authorization, code in cases:
        _, answer = await detect(server, body, {"Authorization": authorization})
        assert answer["code"] == code, answer
        if code == codes.SIGNATURE_EXPIRED:
            assert "maximum of 60 s" in answer["message"]


async def test_the_default_lifetime_accepts_batchtag_run_and_the_providers_sdk(serve, creds, detect) -> None:
    server = await serve()
    for ttl in (30, 600, 3600):
        _, answer = await detect(
            server, {"appid": creds.appid, "image": JPEG}, signed_headers(creds, ttl=ttl)
        )
        assert answer["code"] == codes.OK


BUCKET_CASES = [
    # (bucket configured for the account, signed b, body bucket or None, code)
    pytest.param(None, "b1", "b1", codes.OK, id="free-same"),
    pytest.param(None, "", None, codes.OK, id="free-none"),
    pytest.param(None, "", "b1", codes.SIGNATURE_MISMATCH, id="free-body-only"),
    pytest.param(None, "b1", None, codes.SIGNATURE_MISMATCH, id="free-signature-only"),
    pytest.param(None, "b1", "b2", codes.SIGNATURE_MISMATCH, id="free-different"),
    pytest.param("photos", "photos", "photos", codes.OK, id="bound-same"),
    pytest.param("photos", "photos", None, codes.SIGNATURE_MISMATCH, id="bound-body-missing"),
    pytest.param("photos", "photos", "other", codes.SIGNATURE_MISMATCH, id="bound-body-other"),
    pytest.param("photos", "other", "other", codes.BUCKET_UNKNOWN, id="bound-signed-other"),
    pytest.param("photos", "", None, codes.BUCKET_UNKNOWN, id="bound-signed-none"),
    pytest.param("photos", "", "photos", codes.BUCKET_UNKNOWN, id="bound-signed-none-body-right"),
]


@pytest.mark.parametrize(("configured", "signed_bucket", "body_bucket", "code"), BUCKET_CASES)
async def test_buckets_are_checked_both_ways(
    serve, creds, detect, configured, signed_bucket, body_bucket, code
):
    account = Credentials(creds.appid, creds.secret_id, creds.secret_key, bucket=configured)
    server = await serve(credentials=[account])
    body = {"appid": creds.appid, "image": JPEG}
    if body_bucket is not None:
        body["bucket"] = body_bucket
    _, answer = await detect(server, body, signed_headers(creds, signed_bucket))
    assert answer["code"] == code, answer
    assert bool(answer["tags"]) == (code == codes.OK)


def test_serve_flags_set_the_timeouts_the_lifetime_and_buckets(tmp_path, spawner, creds) -> None:
    credentials = write_credentials(tmp_path / "creds.json", creds)
    document = json.loads(credentials.read_text())
    document["credentials"][0]["bucket"] = "photos"
    credentials.write_text(json.dumps(document))
    flags = ("--idle-timeout", "0.5", "--body-timeout", "0.5", "--max-signature-ttl", "120")
    _proc, url = spawner.serve(credentials, *flags)

    def detect(authorization: str, body: dict[str, Any]) -> int:
        headers = {"Authorization": authorization, "Content-Type": "application/json"}
        request = urllib.request.Request(url + DETECT_PATH, json.dumps(body).encode(), headers)
        with urllib.request.urlopen(request, timeout=PATIENCE_S) as response:
            return json.loads(response.read())["code"]

    body = {"appid": creds.appid, "bucket": "photos", "image": JPEG}
    assert detect(sign(creds, "photos", ttl=120), body) == codes.OK
    assert detect(sign(creds, "photos", ttl=121), body) == codes.SIGNATURE_EXPIRED
    assert detect(sign(creds, "", ttl=60), body | {"bucket": ""}) == codes.BUCKET_UNKNOWN
    with socket.create_connection(host_port(url), timeout=PATIENCE_S) as half_a_head:
        half_a_head.sendall(b"POST " + DETECT_PATH.encode() + b" HTTP/1.1\r\nHost:")
        assert half_a_head.recv(100) == b""  # closed by the server well before PATIENCE_S
    with socket.create_connection(host_port(url), timeout=PATIENCE_S) as half_a_body:
        half_a_body.sendall(request_head(500, sign(creds, "photos", ttl=60)) + b"{")
        assert half_a_body.recv(100).startswith(b"HTTP/1.1 408 ")


@pytest.mark.parametrize(
    "flag",
    [
        ("--idle-timeout", "0"),
        ("--body-timeout", "-1"),
        ("--max-signature-ttl", "0"),
        ("--idle-timeout", "x"),
    ],
)
def test_serve_limits_must_be_positive(flag: tuple[str, str]) -> None:
    done = run_cli("serve", "--tagger", "color", *flag, timeout=60)
    assert done.returncode == 2
    assert "must be a positive number of seconds" in done.stderr and "Traceback" not in done.stderr
