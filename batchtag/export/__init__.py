"""Tags out of OUT and into the places people use them.

``xmp`` writes keyword sidecars for photo managers, ``table`` writes CSV and Parquet for
data tools, ``report`` writes an HTML page to look at the results. All of them read OUT
through ``records.iter_valid_records`` (one valid record per key, streaming) and share the
helpers in ``common``; ``commands`` is their command line.
"""

from typing import Literal

# Sidecar names (``xmp.sidecar_path``); here, not in ``xmp``, so that the command line can
# offer them without loading lxml, Pillow and the rest for every subcommand.
Naming = Literal["default", "lightroom"]
NAMINGS: tuple[Naming, ...] = ("default", "lightroom")
