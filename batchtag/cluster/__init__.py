"""``batchtag run --cluster``: the same run, its items tagged by Dask workers.

    driver (this process)                                     each Dask worker process
    sources -> dedupe vs OUT -> chunks --(bounded window)-->  tag_chunk: the pipeline's
    sink <- dedupe by key <- records <------------------------  preparers and senders, one
                                                              client (and tagger) a process

The driver keeps everything that makes a run trustworthy (resume, the one writer of OUT,
``--retry-errors``, the summary); workers only turn items into records. ``driver.py`` is
the driver, ``worker.py`` what runs in the workers. This module stays free of Dask
imports, so settings can be checked without loading it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from batchtag.errors import ClusterError, SchedulerLost

__all__ = ["ClusterAddress", "ClusterError", "SchedulerLost", "parse_cluster_address"]

LOCAL_PREFIX = "local:"
_SCHEDULER = re.compile(r"^(tcp|tls)://[^\s/:]+:\d{1,5}$|^(tcp|tls)://\[[0-9A-Fa-f:.]+\]:\d{1,5}$")


@dataclass(frozen=True)
class ClusterAddress:
    """Where the workers come from: ``local:N`` processes started by the run, or a scheduler."""

    local_workers: int | None  # N for local:N
    scheduler: str | None  # tcp://host:port otherwise

    def __str__(self) -> str:
        return f"{LOCAL_PREFIX}{self.local_workers}" if self.local_workers else str(self.scheduler)


def parse_cluster_address(text: str) -> ClusterAddress:
    """``local:N`` (N >= 1) or ``tcp://HOST:PORT`` / ``tls://HOST:PORT``; ClusterError otherwise."""
    if text.startswith(LOCAL_PREFIX):
        count = text[len(LOCAL_PREFIX) :]
        if not count.isdigit() or int(count) < 1:
            raise ClusterError(f"--cluster {text}: local:N needs a worker count N of 1 or more")
        return ClusterAddress(int(count), None)
    if _SCHEDULER.match(text):
        return ClusterAddress(None, text)
    raise ClusterError(f"--cluster {text}: give local:N or a Dask scheduler address tcp://HOST:PORT")
