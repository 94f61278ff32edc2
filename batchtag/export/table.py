"""OUT as a table: CSV for spreadsheets, Parquet for DuckDB, pandas and Spark.

One row per item (one valid record per key). Both formats share one column list: the
record's fields, the file facts a record may carry, and ``extra`` (every other field, as
JSON, so nothing a record holds is lost). Parquet is written in row groups of
``ROWS_PER_GROUP``, so memory stays flat however long OUT is; both files are written under
a temporary name and renamed into place, and an existing file is replaced only when it is
a batchtag export (never someone else's file).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cache
from itertools import islice
from typing import TYPE_CHECKING, Any

from batchtag.errors import ExportTargetError
from batchtag.export.common import replaced_atomically
from batchtag.records import Record

if TYPE_CHECKING:
    import pyarrow as pa

ROWS_PER_GROUP = 65_536
BATCH_ROWS = 8_192  # rows held as Python objects at once; a row group is built from these batches
PARQUET_MARKER = b"batchtag.export"  # schema metadata key that marks a Parquet file as ours

# Fields beyond the contract's that get a typed column of their own when a record carries
# them: the Arrow type and where the value sits in the record's JSON (file facts sit in
# a ``file`` object). A value of another type stays in ``extra``, so nothing is lost.
FACTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "elapsed_ms": ("int64", ("elapsed_ms",)),
    "size": ("int64", ("file", "size")),
    "mtime_ns": ("int64", ("file", "mtime_ns")),
    "xxh3_128": ("string", ("file", "xxh3_128")),
    "made": ("string", ("made",)),  # when the record was made, UTC ISO 8601 (ledger.py)
    "run": ("string", ("run",)),  # the id of the run that made it
}
_PYTHON_TYPES: dict[str, type] = {"int64": int, "string": str}
RECORD_FIELDS = ("key", "source", "status", "code", "message", "tags", "attempts")
COLUMN_NAMES = [*RECORD_FIELDS, *FACTS, "extra"]


@cache
def parquet_schema() -> pa.Schema:
    """The Parquet columns (pyarrow is imported only when Parquet is written)."""
    import pyarrow as pa

    tag = pa.struct([("tag_name", pa.string()), ("tag_confidence", pa.int32())])
    record = [
        ("key", pa.string()),
        ("source", pa.string()),
        ("status", pa.string()),
        ("code", pa.int32()),
        ("message", pa.string()),
        ("tags", pa.list_(tag)),
        ("attempts", pa.int32()),
    ]
    facts = [(name, getattr(pa, arrow)()) for name, (arrow, _) in FACTS.items()]
    return pa.schema([*record, *facts, ("extra", pa.string())]).with_metadata({PARQUET_MARKER: b"1"})


@dataclass
class TableCounts:
    rows: int = 0
    path: str = ""


# --------------------------------------------------------------------------- rows


def take_fact(rest: dict[str, Any], arrow: str, path: tuple[str, ...]) -> Any:
    """Remove and return the value at ``path`` in ``rest`` if it has the column's type
    (an emptied parent object goes too); otherwise None, and ``rest`` keeps it."""
    parents = [rest]
    for name in path[:-1]:
        child = parents[-1].get(name)
        if not isinstance(child, dict):
            return None
        parents.append(child)
    value = parents[-1].get(path[-1])
    if isinstance(value, bool) or not isinstance(value, _PYTHON_TYPES[arrow]):
        return None
    del parents[-1][path[-1]]
    for depth in range(len(path) - 1, 0, -1):
        if not parents[depth]:
            del parents[depth - 1][path[depth - 1]]
    return value


def row_of(record: Record, min_confidence: int) -> dict[str, Any]:
    data = record.to_dict()
    row = {name: data.get(name) for name in RECORD_FIELDS}
    row["tags"] = [
        {"tag_name": t["tag_name"], "tag_confidence": t["tag_confidence"]}
        for t in record.tags
        if t["tag_confidence"] >= min_confidence
    ]
    # the fields beyond the contract's, copied one level deep so taking a fact leaves the record alone
    rest = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items() if k not in RECORD_FIELDS}
    for name, (arrow, path) in FACTS.items():
        row[name] = take_fact(rest, arrow, path)
    row["extra"] = json.dumps(rest, ensure_ascii=False, sort_keys=True) if rest else None
    return row


def tags_cell(tags: list[dict[str, Any]], raw: bool = False) -> str:
    """Tags in one CSV cell: ``猫:92;动物:96`` (spreadsheet filters and splits handle this).
    Each part is neutralised on its own too, as a split into columns makes it a cell."""
    parts = (f"{t['tag_name']}:{t['tag_confidence']}" for t in tags)
    return ";".join(parts if raw else map(inert_cell, parts))


# A text cell starting with one of these is run as a formula by Excel, LibreOffice and
# Google Sheets (=HYPERLINK(...), +cmd|' /C calc'!A0, @SUM(...)); tab and CR start one too.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def inert_cell(text: str) -> str:
    """A text cell a spreadsheet shows rather than runs: OWASP's convention, a leading
    single quote (the spreadsheet hides it and shows the text as it was)."""
    return "'" + text if text.startswith(FORMULA_STARTS) else text


def csv_cell(value: Any, raw: bool) -> Any:
    """A row's value as written: None empty, text made inert unless ``raw``; numbers as they
    are (an int cannot hold a formula, and ``-1102`` stays a number)."""
    if value is None:
        return ""
    return value if raw or not isinstance(value, str) else inert_cell(value)


# --------------------------------------------------------------------------- writing safely


def check_replaceable(path: str, is_ours: Any) -> None:
    if os.path.lexists(path) and not (os.path.isfile(path) and is_ours(path)):
        raise ExportTargetError(f"{path} exists and is not a batchtag export; not overwriting it")


# --------------------------------------------------------------------------- CSV


def is_our_csv(path: str) -> bool:
    """Our CSVs start with a BOM and the record's fields (later columns may change)."""
    start = ("\ufeff" + ",".join(RECORD_FIELDS) + ",").encode("utf-8")
    with open(path, "rb") as handle:
        return handle.read(len(start)) == start


def write_csv(
    records: Iterable[Record], path: str, min_confidence: int = 0, raw: bool = False
) -> TableCounts:
    """UTF-8 with a byte-order mark, which is what makes Excel read Chinese tags right.
    Text cells a spreadsheet would run as a formula get a leading ``'`` unless ``raw``."""
    check_replaceable(path, is_our_csv)
    counts = TableCounts(path=path)
    with replaced_atomically(path, "w", encoding="utf-8-sig", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(COLUMN_NAMES)
        for record in records:
            row = row_of(record, min_confidence)
            row["tags"] = tags_cell(row["tags"], raw)
            writer.writerow([csv_cell(row[name], raw) for name in COLUMN_NAMES])
            counts.rows += 1
    return counts


# --------------------------------------------------------------------------- Parquet


def is_our_parquet(path: str) -> bool:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        metadata = pq.read_schema(path).metadata or {}
    except (pa.ArrowException, OSError):
        return False
    return PARQUET_MARKER in metadata


def write_parquet(records: Iterable[Record], path: str, min_confidence: int = 0) -> TableCounts:
    """Row groups of ROWS_PER_GROUP rows, built from Arrow batches of BATCH_ROWS: memory
    holds one group in Arrow's compact form and one batch as Python objects, however
    long OUT is."""
    import pyarrow.parquet as pq

    check_replaceable(path, is_our_parquet)
    schema = parquet_schema()
    counts = TableCounts(path=path)
    rows = (row_of(record, min_confidence) for record in records)
    with (
        replaced_atomically(path, "wb") as handle,
        pq.ParquetWriter(handle, schema, compression="zstd") as writer,
    ):
        for group in row_groups(rows, schema):
            writer.write_table(group, row_group_size=ROWS_PER_GROUP)
            counts.rows += group.num_rows
    return counts


def row_groups(rows: Iterator[dict[str, Any]], schema: pa.Schema) -> Iterator[pa.Table]:
    """Tables of ROWS_PER_GROUP rows (the last may be shorter; at least one, maybe empty)."""
    import pyarrow as pa

    yielded = False
    while True:
        batches = []
        wanted = ROWS_PER_GROUP
        while wanted and (chunk := list(islice(rows, min(BATCH_ROWS, wanted)))):
            batches.append(pa.RecordBatch.from_pylist(chunk, schema=schema))
            wanted -= len(chunk)
        if batches or not yielded:
            yield pa.Table.from_batches(batches, schema=schema)
            yielded = True
        if wanted:
            return
