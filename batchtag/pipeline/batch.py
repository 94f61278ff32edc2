"""The entry point of ``batchtag run``: checks, OUT opened and scanned, the middle stage
picked (local, or Dask with ``--cluster``), the summary written. ``run_batch`` is async,
``run`` its sync wrapper; the CLI is a thin layer over them. Only this module knows the
cluster exists, and it imports it only when a run asks for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import AsyncIterator

from batchtag.config import RunConfig, is_plain_http_to_another_host, public_url
from batchtag.pipeline.endpoints import EndpointPool
from batchtag.pipeline.flow import Run
from batchtag.pipeline.local import LocalStage, open_client
from batchtag.pipeline.progress import Progress, Summary, check_summary_path
from batchtag.pipeline.resume import Checkpoint, refuse_other_settings
from batchtag.pipeline.sink import ResultSink, Writer, open_sink, refuse_out_among_sources
from batchtag.pipeline.sources import check_source

log = logging.getLogger("batchtag")


@contextlib.asynccontextmanager
async def opened_out(
    config: RunConfig, writer: Writer | None
) -> AsyncIterator[tuple[ResultSink, Checkpoint]]:
    """OUT locked and scanned off the event loop, so Ctrl-C during a long resume scan stops
    it within a moment instead of after the whole file; closed (fsync) at the end."""
    stop = threading.Event()
    settings = config.settings()
    created = not os.path.lexists(config.out)
    try:
        sink, checkpoint = await asyncio.to_thread(
            open_sink, config.out, config.retry_errors, stop, settings, writer, config.max_attempts
        )
    except asyncio.CancelledError:
        stop.set()  # the scan thread raises ScanStopped, closes OUT and ends
        raise
    try:
        if not config.retag:
            refuse_other_settings(checkpoint, settings, config.out)
        yield sink, checkpoint
    finally:
        await sink.close()
        if created and sink.size == 0:  # nothing found or nothing answered: no empty OUT left
            with contextlib.suppress(OSError):
                os.unlink(config.out)


async def run_batch(
    config: RunConfig, progress: bool | None = None, *, writer: Writer | None = None
) -> Summary:
    """Tag every item of ``config.sources`` into ``config.out``; resumable, see sink.py.

    Raises ConfigError or SourceError for unusable settings and SinkError when OUT cannot
    be written (all UsageError, errors.py); ``writer`` replaces the disk (tests of a full
    disk). Interrupting the task (cancel) flushes finished
    records, then returns a summary with ``interrupted`` set.
    """
    started = time.monotonic()
    config.validate().load_secret_key()
    for source in config.sources:
        check_source(source)
    if config.summary_json:
        check_summary_path(config.summary_json)
    refuse_out_among_sources(config.out, config.sources)
    urls = [spec.url for spec in config.endpoint_specs] or ([] if config.is_local else [config.endpoint])
    for url in urls:
        if is_plain_http_to_another_host(url):
            log.warning(
                "%s is plain http: each request's signature travels in clear text and can be replayed "
                "until it expires; use https",
                public_url(url),
            )
    bar = Progress(config.progress if progress is None else progress)
    try:
        async with opened_out(config, writer) as (sink, checkpoint):
            summary = await tag_into(config, sink, checkpoint, bar)
            summary.broken_lines = checkpoint.bad_lines
            summary.compacted = checkpoint.compacted
            summary.previous_errors = checkpoint.error_records - checkpoint.transient_errors
    finally:
        bar.close()
    if summary.found == 0 and not summary.interrupted:  # the driver's count (--cluster too)
        log.warning("no items found in %s", " ".join(config.sources))
    summary.wall_s = time.monotonic() - started  # start-up (model load, resume scan) included
    if config.summary_json:
        summary.write_json(config.summary_json)
    return summary


async def tag_into(
    config: RunConfig, sink: ResultSink, checkpoint: Checkpoint, progress: Progress
) -> Summary:
    """The one place that picks the middle stage; the run around it is the same."""
    if config.cluster:
        from batchtag.cluster.driver import run_on_cluster

        return await run_on_cluster(config, sink, checkpoint, progress)
    async with open_client(config) as client:
        summary = await Run(config, sink, checkpoint, progress, LocalStage(config, client)).execute()
        if isinstance(client, EndpointPool):
            summary.endpoints = client.counts()
        return summary


def run(config: RunConfig, progress: bool | None = None) -> Summary:
    """Synchronous wrapper of ``run_batch`` for scripts and notebooks without a loop."""
    return asyncio.run(run_batch(config, progress))
