"""Quota, fault injection and dynamic batching under concurrent load."""

from __future__ import annotations

import asyncio
import base64
import random
import threading
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from PIL import Image

from batchtag import codes
from batchtag.api import DETECT_PATH
from batchtag.server import faults
from batchtag.server.batcher import Batcher
from batchtag.server.faults import Fault, FaultInjector
from batchtag.server.quota import QuotaLimiter
from batchtag.taggers import Tag, load_tagger, preparer
from tests.support import encode_image, signed_headers

JPEG = base64.b64encode(encode_image("JPEG")).decode()
PHOTOS = Path(__file__).resolve().parent.parent / "examples" / "photos"


def ok_body(creds) -> dict[str, str]:
    return {"appid": creds.appid, "image": JPEG}


# --- quota ------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(("rate_factor", "min_refused", "max_refused"), [(1.0, 0.0, 0.0), (0.5, 0.0, 0.0),
                                                                        (2.0, 0.45, 0.55), (4.0, 0.70, 0.80)])  # fmt: skip
def test_token_bucket_steady_state(rate_factor: float, min_refused: float, max_refused: float) -> None:
    clock, limit = FakeClock(), 10.0
    quota = QuotaLimiter(limit, clock=clock)
    interval, sent = 1 / (limit * rate_factor), 2000
    refused = 0
    for i in range(sent):
        clock.now = i * interval
        refused += not quota.try_acquire("app")
    assert min_refused * sent <= refused <= max_refused * sent


def test_quota_is_per_appid_and_allows_a_burst_of_the_limit() -> None:
    quota = QuotaLimiter(3, clock=FakeClock())
    assert [quota.try_acquire("a") for _ in range(4)] == [True, True, True, False]
    assert quota.try_acquire("b")


def test_quota_below_one_per_second_still_admits() -> None:
    clock = FakeClock()
    quota = QuotaLimiter(0.5, clock=clock)
    assert quota.try_acquire("a") and not quota.try_acquire("a")
    clock.now = 2.0
    assert quota.try_acquire("a")


async def send_one(detect, server, creds) -> int:
    _, answer = await detect(server, ok_body(creds), signed_headers(creds))
    return answer["code"]


async def send_paced(detect, server, creds, count: int, per_second: float) -> Counter[int]:
    async def one(delay: float) -> int:
        await asyncio.sleep(delay)
        _, answer = await detect(server, ok_body(creds), signed_headers(creds))
        return answer["code"]

    results = await asyncio.gather(*(one(i / per_second) for i in range(count)))
    return Counter(results)


async def test_quota_over_http(serve, creds, detect) -> None:
    limit = 20
    at_limit = await send_paced(detect, await serve(qps_limit=limit), creds, 30, limit * 0.95)
    assert at_limit == {codes.OK: 30}
    # A burst of 40 at a limit of 5: the full bucket lets 5 through, then 5 more a second for
    # as long as the burst lasts. The span is measured (an upper bound of the server's), so
    # the bound holds however slowly a loaded machine sends.
    burst_limit, burst = 5, 40
    server = await serve(qps_limit=burst_limit)
    started = time.monotonic()
    answers = Counter(await asyncio.gather(*(send_one(detect, server, creds) for _ in range(burst))))
    span = time.monotonic() - started
    assert set(answers) <= {codes.OK, codes.RATE_LIMITED}, answers
    assert answers[codes.OK] >= burst_limit, answers  # the bucket starts full
    assert answers[codes.OK] <= burst_limit + burst_limit * span + 1, (answers, span)


# --- fault injection --------------------------------------------------------------------------


async def classify(http: aiohttp.ClientSession, url: str, creds) -> str:
    try:
        async with http.post(
            url + DETECT_PATH, json=ok_body(creds), headers=signed_headers(creds)
        ) as response:
            if response.status == 503:
                return Fault.HTTP_503.value
            answer = await response.json()
    except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
        return Fault.DROP.value
    return Fault.CODE_203.value if answer["code"] == codes.INTERNAL_TIMEOUT else str(answer["code"])


async def test_injected_faults_rate_and_kinds(serve, creds) -> None:
    server = await serve(inject_error_rate=0.3)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=8)) as http:
        outcomes = Counter(await asyncio.gather(*(classify(http, server.url, creds) for _ in range(200))))
    faults = sum(outcomes[fault.value] for fault in Fault)
    assert 0.18 * 200 <= faults <= 0.42 * 200, outcomes
    assert all(outcomes[fault.value] > 0 for fault in Fault), outcomes
    assert outcomes["0"] == 200 - faults, outcomes
    async with aiohttp.ClientSession() as http, http.get(server.url + "/stats") as response:
        assert (await response.json())["injected_faults"] == {f.value: outcomes[f.value] for f in Fault}


async def test_faults_never_touch_healthz_or_stats(serve, http) -> None:
    """Every fault, and a latency no test could wait out: a delayed /healthz would hit the
    client's timeout (an ordering, not a wall-clock bound a loaded machine can miss)."""
    server = await serve(inject_error_rate=1.0, inject_latency_ms=3_600_000)
    patience = aiohttp.ClientTimeout(total=60)
    for path in ["/healthz"] * 10 + ["/stats"]:
        async with http.get(server.url + path, timeout=patience) as response:
            assert response.status == 200


@pytest.mark.parametrize(("latency_ms", "jitter_ms"), [(150, 0), (100, 100)])
async def test_latency_injection(serve, creds, detect, latency_ms: float, jitter_ms: float) -> None:
    server = await serve(inject_latency_ms=latency_ms, inject_latency_jitter_ms=jitter_ms)
    started = time.monotonic()
    _, answer = await detect(server, ok_body(creds), signed_headers(creds))
    elapsed_ms = (time.monotonic() - started) * 1000
    assert answer["code"] == codes.OK
    assert latency_ms <= elapsed_ms  # the upper end: test_injected_latency_stays_within_its_jitter


async def test_injected_latency_stays_within_its_jitter(monkeypatch) -> None:
    """The delays drawn, not wall time: at least the latency, at most latency + jitter,
    and spread over the range."""
    slept: list[float] = []

    async def record(seconds: float) -> None:
        slept.append(seconds)

    monkeypatch.setattr(faults, "asyncio", SimpleNamespace(sleep=record))
    injector = FaultInjector(latency_ms=100, jitter_ms=100, rng=random.Random(5))
    for _ in range(200):
        await injector.delay()
    assert len(slept) == 200 and all(0.1 <= s <= 0.2 for s in slept)
    assert min(slept) < 0.11 and max(slept) > 0.19


def test_fault_injector_rejects_bad_settings() -> None:
    with pytest.raises(ValueError):
        FaultInjector(error_rate=1.5)
    with pytest.raises(ValueError):
        FaultInjector(latency_ms=-1)
    injector = FaultInjector(error_rate=0.5, rng=random.Random(1))
    picks = Counter(injector.pick_fault() for _ in range(3000))
    assert 1300 < picks[None] < 1700 and all(picks[fault] > 400 for fault in Fault)


# --- dynamic batching -------------------------------------------------------------------------


class RecordingTagger:
    """Slow enough that concurrent requests pile up behind a running batch. No ``prepare``:
    the server hands it the decoded images."""

    name = "recording"
    input_size = None
    max_batch = 8

    def __init__(self) -> None:
        self.batch_sizes: list[int] = []
        self.threads: set[str] = set()
        self.items: list[Any] = []
        self.overlapping = False
        self._busy = threading.Lock()

    def tag_batch(self, items: list[Any]) -> list[list[Tag]]:
        if not self._busy.acquire(blocking=False):
            self.overlapping = True
            self._busy.acquire()
        try:
            self.batch_sizes.append(len(items))
            self.threads.add(threading.current_thread().name)
            self.items.extend(items)
            time.sleep(0.03)
            return [[{"tag_name": f"w{self.width(item)}", "tag_confidence": 50}] for item in items]
        finally:
            self._busy.release()

    def width(self, item: Any) -> int:
        return item.width


class PreparingTagger(RecordingTagger):
    """The same, with a ``prepare`` step: the server runs it in its decode threads and hands
    ``tag_batch`` what it returned instead of the images."""

    def __init__(self) -> None:
        super().__init__()
        self.prepare_threads: set[str] = set()

    def prepare(self, image: Image.Image) -> tuple[str, int]:
        self.prepare_threads.add(threading.current_thread().name)
        if image.width == 13:
            raise ValueError("cannot prepare this one")
        return ("prepared", image.width)

    def width(self, item: Any) -> int:
        return item[1]


def png_body(creds, width: int) -> dict[str, str]:
    return {"appid": creds.appid, "image": base64.b64encode(encode_image("PNG", size=(width, 10))).decode()}


@pytest.mark.parametrize("tagger_class", [RecordingTagger, PreparingTagger])
async def test_concurrent_requests_are_batched(serve, creds, detect, http, tagger_class) -> None:
    tagger = tagger_class()
    server = await serve(tagger=tagger)
    widths = [20 + i for i in range(24)]

    async def tag_width(width: int) -> Any:
        return (await detect(server, png_body(creds, width), signed_headers(creds)))[1]

    answers = await asyncio.gather(*(tag_width(width) for width in widths))
    # Every request got its own image's tags back, whichever batch it rode in.
    assert [a["tags"] for a in answers] == [[{"tag_name": f"w{w}", "tag_confidence": 50}] for w in widths]
    assert sum(tagger.batch_sizes) == len(widths)
    assert max(tagger.batch_sizes) > 1 and max(tagger.batch_sizes) <= tagger.max_batch
    assert len(tagger.threads) == 1 and not tagger.overlapping
    if isinstance(tagger, PreparingTagger):
        # Prepared in the decode pool, never on the tagger thread; tag_batch got the results.
        assert tagger.prepare_threads and all(t.startswith("batchtag-decode") for t in tagger.prepare_threads)
        assert not tagger.prepare_threads & tagger.threads
        assert sorted(tagger.items) == [("prepared", w) for w in widths]
    else:
        assert all(isinstance(item, Image.Image) for item in tagger.items)
    async with http.get(server.url + "/stats") as response:
        stats = (await response.json())["batching"]
    assert stats["images"] == len(widths) and stats["batches"] == len(tagger.batch_sizes)
    assert stats["mean_batch_size"] > 1


async def test_a_failed_prepare_fails_only_its_own_request(serve, creds, detect) -> None:
    tagger = PreparingTagger()
    server = await serve(tagger=tagger)
    widths = [11, 12, 13, 14]
    answers = await asyncio.gather(
        *(detect(server, png_body(creds, w), signed_headers(creds)) for w in widths)
    )
    assert [answer["code"] for _, answer in answers] == [codes.OK, codes.OK, codes.INTERNAL_UNPACK, codes.OK]
    assert sorted(tagger.items) == [("prepared", w) for w in (11, 12, 14)]


class GatedTagger:
    """Holds its first batch until ``gate`` opens; records every batch."""

    name = "gated"
    input_size = None
    max_batch = 4

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.started = threading.Event()
        self.batches: list[list[Any]] = []
        self.start_times: list[float] = []

    def tag_batch(self, items: list[Any]) -> list[list[Tag]]:
        self.start_times.append(time.monotonic())
        self.batches.append(list(items))
        self.started.set()
        self.gate.wait(10)
        return [[{"tag_name": str(item), "tag_confidence": 1}] for item in items]


async def test_lone_request_goes_straight_through_and_arrivals_form_the_next_batch() -> None:
    tagger = GatedTagger()
    batcher = Batcher(tagger)  # no batch wait by default
    batcher.start()
    try:
        first = asyncio.create_task(batcher.tag(0))
        assert await asyncio.to_thread(tagger.started.wait, 10)
        # alone, with no batch timer to wait out (no wall-clock bound: a loaded machine)
        assert tagger.batches == [[0]] and batcher.wait_s == 0
        rest = [asyncio.create_task(batcher.tag(i)) for i in range(1, 7)]
        deadline = time.monotonic() + 10
        while batcher._queue.qsize() < 6:  # readiness: all six have arrived at the batcher
            assert time.monotonic() < deadline
            await asyncio.sleep(0.001)
        assert len(tagger.batches) == 1  # the tagger is busy: they queue instead of starting
        tagger.gate.set()
        answers = await asyncio.gather(first, *rest)
        assert [tags[0]["tag_name"] for tags in answers] == [str(i) for i in range(7)]
        assert tagger.batches == [[0], [1, 2, 3, 4], [5, 6]]  # up to max_batch at a time
        assert batcher.stats.as_dict()["batch_sizes"] == {"1": 1, "2": 1, "4": 1}
    finally:
        tagger.gate.set()
        await batcher.close()


async def test_batch_wait_holds_a_lone_request_for_company() -> None:
    tagger = GatedTagger()
    tagger.gate.set()
    batcher = Batcher(tagger, wait_ms=300)
    batcher.start()
    try:
        sent = time.monotonic()
        first = asyncio.create_task(batcher.tag("a"))
        await asyncio.sleep(0.1)
        await asyncio.gather(first, batcher.tag("b"))
        assert tagger.batches == [["a", "b"]]
        assert tagger.start_times[0] - sent >= 0.25
    finally:
        await batcher.close()


def test_model_tagger_prepared_inputs_tag_like_images() -> None:
    tagger = load_tagger("model", "en")
    images = [Image.open(path).convert("RGB") for path in sorted(PHOTOS.glob("*.jpg"))[:3]]
    images.append(Image.new("RGB", (300, 200), (20, 60, 200)))
    prepare = preparer(tagger)
    assert prepare is not None
    prepared = [prepare(image) for image in images]
    assert all(item.pixels.shape == (3, 224, 224) for item in prepared)
    tags = tagger.tag_batch(prepared)
    assert tags == tagger.tag_batch(images) and all(tags[:3])


def test_taggers_without_prepare_get_images() -> None:
    assert preparer(RecordingTagger()) is None
    assert preparer(load_tagger("color")) is None  # measured: cheaper without (see color.py)


async def test_batch_max_from_config_wins(serve, creds, detect) -> None:
    tagger = RecordingTagger()
    server = await serve(tagger=tagger, batch_max=2, batch_wait_ms=20)
    await asyncio.gather(*(detect(server, ok_body(creds), signed_headers(creds)) for _ in range(8)))
    assert max(tagger.batch_sizes) == 2
