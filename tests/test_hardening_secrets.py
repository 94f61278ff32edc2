"""Secrets on the server side: `batchtag serve -v` (verbose: every request logged) gets good
and hostile requests, some carrying the secret key itself; the key and the signatures
(bearer tokens for their lifetime) must never reach the server's stdout or stderr."""

from __future__ import annotations

import base64
import http.client
import json
import signal
from dataclasses import dataclass

import pytest

from batchtag import codes
from batchtag.api import DETECT_PATH as DETECT
from batchtag.signing import Credentials, sign
from tests.support import CREDENTIALS, Spawner, encode_image, free_port, wait_healthy, write_credentials

IMAGE = base64.b64encode(encode_image(size=(16, 12))).decode()
GOOD = CREDENTIALS
APPID, SECRET_ID, SECRET_KEY = GOOD.appid, GOOD.secret_id, GOOD.secret_key


@dataclass
class ServerLog:
    text: str  # stdout + stderr of the whole server life
    port: int
    authorizations: list[str]  # every Authorization header sent
    detect_requests: int
    answers: list[tuple[int, object]]


def post(port, path, body, headers):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("POST", path, body=body, headers=headers)
        response = connection.getresponse()
        data = response.read()
    finally:
        connection.close()
    try:
        return response.status, json.loads(data)
    except ValueError:
        return response.status, data


@pytest.fixture(scope="module")
def verbose_server_log(tmp_path_factory) -> ServerLog:
    """Start `serve -v`, send every request below, stop it; its whole output."""
    tmp = tmp_path_factory.mktemp("secrets")
    spawner = Spawner(tmp)
    port = free_port()
    try:
        server = spawner.start(
            "serve",
            "-v",
            "--tagger",
            "color",
            "--port",
            port,
            "--credentials",
            write_credentials(tmp / "creds.json"),
            name="serve",
        )
        wait_healthy(f"http://127.0.0.1:{port}", server.popen)
        secret_in_signature = base64.b64encode(
            b"\0" * 20 + f"a={APPID}&b=&k={SECRET_KEY}&e=9999999999&t=1&r=1&f=".encode()
        ).decode()
        cases = [
            # (Authorization, JSON body or raw bytes, path, extra headers, expected code or None)
            (sign(GOOD), {"appid": APPID, "image": IMAGE}, DETECT, {}, codes.OK),
            (sign(Credentials(APPID, SECRET_ID, "wrong")), {"appid": APPID, "image": IMAGE}, DETECT, {}, 14),
            ("garbage ¿ !!", {"appid": APPID, "image": IMAGE}, DETECT, {}, codes.SIGNATURE_MALFORMED),
            (SECRET_KEY, {"appid": APPID, "image": IMAGE}, DETECT, {}, codes.SIGNATURE_MALFORMED),
            (secret_in_signature, {"appid": APPID, "image": IMAGE}, DETECT, {}, codes.SECRET_ID_UNKNOWN),
            (sign(GOOD), {"appid": SECRET_KEY, "image": IMAGE}, DETECT, {}, codes.APPID_UNKNOWN),
            (sign(GOOD), {"appid": APPID, "image": SECRET_KEY}, DETECT, {}, codes.IMAGE_FORMAT),
            (sign(GOOD), {"appid": APPID, "secret_key": SECRET_KEY, "image": IMAGE}, DETECT, {}, codes.OK),
            (sign(GOOD), {"appid": APPID, "url": f"http://u:{SECRET_KEY}@127.0.0.1:9/a.jpg"}, DETECT, {}, None),
            (sign(GOOD), {"appid": APPID, "url": f"http://127.0.0.1:9/{SECRET_KEY}.jpg"}, DETECT, {}, None),
            (sign(GOOD), {"appid": APPID, "bucket": SECRET_KEY, "image": IMAGE}, DETECT, {}, None),
            (sign(GOOD), {SECRET_KEY: 1, "appid": APPID}, DETECT, {}, codes.NO_SOURCE),
            (sign(GOOD), b"secret_key=" + SECRET_KEY.encode(), DETECT, {}, codes.BAD_REQUEST),
            (sign(GOOD), b'{"appid": "' + SECRET_KEY.encode() + b'", "image": "' + b"A" * (17 << 20) + b'"}',
             DETECT, {}, codes.IMAGE_TOO_LARGE),
            (sign(GOOD), {"appid": APPID, "image": IMAGE}, DETECT + "?secret_key=" + SECRET_KEY,
             {"X-Secret-Key": SECRET_KEY}, codes.OK),
            (sign(GOOD), {"appid": APPID}, "/nothing/" + SECRET_KEY, {}, None),
        ]  # fmt: skip
        answers, authorizations, detect_requests = [], [], 0
        for authorization, body, path, extra, expected in cases:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            headers = {"Authorization": authorization, "Content-Type": "application/json", **extra}
            status, answer = post(port, path, data, headers)
            answers.append((status, answer))
            authorizations.append(authorization)
            detect_requests += path.startswith(DETECT)
            if expected is not None:
                assert status == 200 and answer["code"] == expected, (
                    path,
                    body if len(data) < 300 else "",
                    answer,
                )
        server.signal(signal.SIGTERM)
        assert server.wait(timeout=15) == 0
        text = server.stdout() + server.stderr()
    finally:
        spawner.close()
    return ServerLog(text, port, authorizations, detect_requests, answers)


def test_serve_verbose_never_logs_the_secret_key_or_a_signature(verbose_server_log):
    log = verbose_server_log
    assert f"serving on http://127.0.0.1:{log.port}" in log.text  # we did capture its log
    assert "shutting down" in log.text
    assert SECRET_KEY not in log.text
    assert base64.b64encode(SECRET_KEY.encode()).decode()[:-4] not in log.text
    for authorization in log.authorizations:
        if authorization != SECRET_KEY:
            assert authorization not in log.text  # a signature is a bearer token for 10 minutes


def test_serve_verbose_does_log_every_request(verbose_server_log):
    log = verbose_server_log
    logged = [line for line in log.text.splitlines() if "imagetag_detect" in line or "POST" in line]
    assert len(logged) >= log.detect_requests, log.text[-2000:]
