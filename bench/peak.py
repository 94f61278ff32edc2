"""Run the ``batchtag`` CLI and record this process's own peak RSS (VmHWM) at exit.

    BENCH_PEAK_FILE=path python -m bench.peak run SOURCE... -o OUT ...

Why: ``ru_maxrss`` of a child, as ``wait4`` reports it, also counts the memory of the
forked copy of the parent before ``exec`` (Linux keeps the old hiwater mark), so a child
of a 110 MB benchmark process never reports less than 110 MB. VmHWM is per address space,
so it starts afresh at exec and is exact.
"""

from __future__ import annotations

import atexit
import os
import sys


def _record_peak() -> None:
    path = os.environ.get("BENCH_PEAK_FILE")
    if not path:
        return
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                with open(path, "w", encoding="ascii") as out:
                    out.write(line.split()[1])
                return


if __name__ == "__main__":
    atexit.register(_record_peak)
    from batchtag.cli import main

    sys.argv[0] = "batchtag"
    sys.exit(main(sys.argv[1:]))
