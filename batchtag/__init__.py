"""batchtag: tag large image collections through the image-tag API.

The Python API: ``run_batch`` (async) and ``run`` (sync) take a ``RunConfig`` and return
a ``Summary``; ``batchtag.cli`` is a thin layer over them.
"""

__version__ = "0.1.0"

from batchtag.config import RunConfig
from batchtag.pipeline import run, run_batch
from batchtag.progress import Summary

__all__ = ["RunConfig", "Summary", "__version__", "run", "run_batch"]
