"""The ``--cluster`` driver with workers that answer at once, to measure what one driver
can take (records/s, CPU per record, memory) without the tagging in the way.

    BENCH_PEAK_FILE=path python -m bench.cluster_driver SOURCE... -o OUT --cluster local:2 [run options]

Everything but the task is the real run: walk, resume, chunks, window, Dask, dedupe,
sink. SIGINT stops it as it stops ``batchtag run``. The peak RSS is recorded at exit
like ``bench.peak`` does.
"""

from __future__ import annotations

import asyncio
import atexit
import signal
import sys

from batchtag.cluster.worker import ChunkResult
from batchtag.pipeline.sources import Item
from batchtag.records import Record

TAGS = [{"tag_name": "红", "tag_confidence": 81}, {"tag_name": "明亮", "tag_confidence": 64}]


def answer_at_once(run_id: str, items: list[Item], grant: int | None = None) -> ChunkResult:
    """A worker that tags in no time: an ok record per item (no --max-requests here)."""
    from distributed import get_worker

    records = [Record(item.key, item.kind, "ok", 0, "success", TAGS, 1) for item in items]
    return ChunkResult(str(get_worker().name), records)


async def drive(argv: list[str]) -> int:
    from batchtag.cli import make_parser
    from batchtag.cluster.driver import run_on_cluster
    from batchtag.commands.run import run_flags
    from batchtag.config import build_config
    from batchtag.pipeline.progress import Progress
    from batchtag.pipeline.sink import open_sink

    args = make_parser().parse_args(["run", *argv])
    config = build_config(run_flags(args), args.config)
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, task.cancel)
    sink, checkpoint = open_sink(config.out)
    try:
        summary = await run_on_cluster(config, sink, checkpoint, Progress(False), task=answer_at_once)
    finally:
        await sink.close()
    if config.summary_json:
        summary.write_json(config.summary_json)
    return summary.exit_code


def main() -> int:
    from bench.peak import _record_peak

    atexit.register(_record_peak)
    try:
        return asyncio.run(drive(sys.argv[1:]))
    except (KeyboardInterrupt, asyncio.CancelledError):
        return 130


if __name__ == "__main__":
    sys.exit(main())
