"""Fuzz the API with hostile bodies and headers: always a known code, never a crash or a free tag."""

from __future__ import annotations

import base64
import json
from typing import Any

import aiohttp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchtag import codes
from batchtag.api import DETECT_PATH
from batchtag.signing import sign
from tests.support import CREDENTIALS, encode_image

CREDS = CREDENTIALS  # what the color_server fixture accepts
VALID_IMAGE = base64.b64encode(encode_image("PNG", size=(8, 8))).decode()

json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
)
# Base64-valid, then over the image limit, then over the body limit.
huge_strings = st.sampled_from([300_000, 14_500_000, 17_000_000]).map(lambda n: "A" * n)
bad_base64 = st.text(alphabet="AB=+/*-_ \n", max_size=60) | st.binary(max_size=60).map(
    lambda b: base64.b64encode(b).decode()[:-1]
)
string_images = st.sampled_from([VALID_IMAGE, "", "=="]) | bad_base64 | huge_strings
string_urls = st.sampled_from(
    ["", "ftp://x/a.jpg", "http://", "http://10.0.0.1/a.jpg", "http://[::1]/", "//x"]
)
images = string_images | json_values
urls = string_urls | json_values
appids = st.sampled_from([CREDS.appid, "", "999"]) | json_values
# Mostly well-formed bodies, so the fuzz reaches the signature, source and decoding stages.
plausible_fields = st.fixed_dictionaries(
    {"appid": st.sampled_from([CREDS.appid, CREDS.appid, "999"])},
    optional={"bucket": st.sampled_from(["", "b"]), "image": string_images, "url": string_urls},
)
random_fields = st.fixed_dictionaries(
    {}, optional={"appid": appids, "bucket": json_values, "image": images, "url": urls}
)


def as_json(value: Any) -> bytes:
    return json.dumps(value).encode()


json_bodies = [plausible_fields.map(as_json)] * 3 + [random_fields.map(as_json), json_values.map(as_json)]
bodies = st.sampled_from([*json_bodies, st.binary(max_size=200)]).flatmap(lambda strategy: strategy)
authorizations = (
    st.just("valid")
    | st.just("valid")
    | st.none()
    | st.text(max_size=80)
    | st.binary(min_size=1, max_size=80).map(lambda b: base64.b64encode(b).decode())
)


def headers_for(authorization: str | None) -> dict[str, str]:
    if authorization is None:
        return {}
    if authorization == "valid":
        return {"Authorization": sign(CREDS)}
    # Header values cannot carry control characters; keep the rest of the fuzz.
    return {"Authorization": "".join(ch for ch in authorization if ch.isprintable())}


@settings(max_examples=100, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(body=bodies, authorization=authorizations)
async def test_fuzzed_requests_get_known_codes(color_server, body: bytes, authorization: Any) -> None:
    headers = headers_for(authorization)
    async with (
        aiohttp.ClientSession() as http,
        http.post(color_server.url + DETECT_PATH, data=body, headers=headers) as response,
    ):
        assert response.status == 200
        answer = await response.json()
        assert set(answer) == {"code", "message", "tags"}
        assert answer["code"] in codes.API_CODES
        assert answer["code"] not in (codes.INTERNAL_PACK, codes.INTERNAL_UNPACK), answer
        if answer["tags"]:
            assert answer["code"] == codes.OK
            assert authorization == "valid"
            assert json.loads(body)["appid"] == CREDS.appid
        async with http.get(color_server.url + "/healthz") as health:
            assert health.status == 200
