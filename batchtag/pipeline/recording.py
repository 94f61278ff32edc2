"""The records of items: ok or failed from the API's answer, or an error before (or
instead of) a request. Their schema and line layout are ``batchtag.records``'."""

from __future__ import annotations

import logging
from typing import Any

from batchtag import codes
from batchtag.pipeline.client import Answer
from batchtag.pipeline.sources import Item
from batchtag.records import FileFacts, Record, Status

log = logging.getLogger("batchtag")


def result_record(
    item: Item,
    answer: Answer,
    notes: dict[str, Any],
    elapsed_ms: int,
    facts: FileFacts | None = None,
) -> Record:
    """The record of an item the API answered (after retries): ok, or its last failure."""
    status: Status = "ok" if answer.code == codes.OK else "error"
    extra = {**notes, "elapsed_ms": elapsed_ms}
    if answer.code == codes.CLIENT_HTTP_ERROR and answer.http_status is not None:
        extra["http_status"] = answer.http_status  # its retry class across runs depends on it
    return Record(
        item.key,
        item.kind,
        status,
        answer.code,
        answer.message,
        answer.tags,
        answer.attempts,
        extra,
        file=facts,
    )


def error_record(item: Item, code: int, message: str, facts: FileFacts | None = None) -> Record:
    """The record of an item that failed before any request (bad input, bad manifest line)."""
    return Record(item.key, item.kind, "error", code, message, [], 0, file=facts or stat_facts(item))


def internal_error_record(item: Item, exc: BaseException, facts: FileFacts | None = None) -> Record:
    """A bug costs one item, not the run: logged with its traceback, recorded without it."""
    log.error("internal error on %s", item.key, exc_info=exc)
    return error_record(item, codes.CLIENT_INTERNAL_ERROR, f"internal error: {type(exc).__name__}", facts)


def stat_facts(item: Item) -> FileFacts | None:
    """The walker's stat of a file item (``sources.Item.size``/``mtime_ns``), for records
    made before or without a read of its bytes."""
    size, mtime_ns = item.size, item.mtime_ns
    return None if size is None or mtime_ns is None else FileFacts(size, mtime_ns)
