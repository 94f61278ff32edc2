"""batchtag: tag large image collections through the image-tag API.

The Python API: ``run_batch`` (async) and ``run`` (sync) take a ``RunConfig`` and return
a ``Summary``; ``batchtag.cli`` is a thin layer over them. They are imported on first use,
so ``batchtag --help`` and signal handling start before numpy and aiohttp load.
"""

from __future__ import annotations

# Not typing's: importing typing costs more than the rest of this package's first module,
# and a Ctrl-C or SIGTERM before `batchtag`'s handlers are in gets Python's default.
TYPE_CHECKING = False

__version__ = "0.1.0"

__all__ = ["RunConfig", "Summary", "__version__", "run", "run_batch"]

_LAZY = {
    "RunConfig": "batchtag.config",
    "Summary": "batchtag.pipeline.progress",
    "run": "batchtag.pipeline.batch",
    "run_batch": "batchtag.pipeline.batch",
}

if TYPE_CHECKING:
    from typing import Any

    from batchtag.config import RunConfig
    from batchtag.pipeline.batch import run, run_batch
    from batchtag.pipeline.progress import Summary


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'batchtag' has no attribute {name!r}")
