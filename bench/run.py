"""``python -m bench.run [--quick] [--only NAME ...] [--out DIR]``: run the benchmark sections
and write DIR/latest.md (and latest.json) plus PNG plots. See bench/README.md."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path

from bench.common import DEFAULT_OUT, WORK, Ctx, Section, have_wrk, versions
from bench.report import render

SECTIONS = {
    "efficiency": "bench.s1_efficiency",
    "cost": "bench.s2_cost",
    "rate": "bench.s3_rate",
    "scale": "bench.s4_scale",
    "model": "bench.s5_model",
    "peers": "bench.s6_peers",
    "cluster": "bench.s7_cluster",
    "embedded": "bench.s8_embedded",
    "quality": "bench.s9_quality",
    "stages": "bench.s10_stages",
    "endpoints": "bench.s11_endpoints",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny smoke version (seconds)")
    parser.add_argument(
        "--only", action="append", choices=sorted(SECTIONS), help="run only this section (repeatable)"
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"results directory (default {DEFAULT_OUT})"
    )
    parser.add_argument(
        "--work",
        type=Path,
        default=None,
        help=f"generated inputs, reused between runs (default {WORK}, quick: {WORK}/quick)",
    )
    args = parser.parse_args(argv)

    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = (args.work or (WORK / "quick" if args.quick else WORK)).resolve()
    work.mkdir(parents=True, exist_ok=True)
    ctx = Ctx(out=out, work=work, quick=args.quick)
    names = args.only or list(SECTIONS)
    started = time.monotonic()
    sections: list[Section] = []
    for name in names:
        print(f"bench: {name} ...", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        load_before = os.getloadavg()[0]
        try:
            section = importlib.import_module(SECTIONS[name]).run(ctx)
        except Exception as exc:  # one broken section must not lose the others' numbers
            traceback.print_exc()
            section = Section(name, name, error=f"{type(exc).__name__}: {exc}")
        section.seconds = time.monotonic() - t0
        section.load = (load_before, os.getloadavg()[0])
        sections.append(section)
        print(f"bench: {name} done in {section.seconds:.1f} s", file=sys.stderr, flush=True)
    total = time.monotonic() - started
    env = versions() | {"load generator": "wrk" if have_wrk() else "aiohttp fallback (wrk not installed)"}
    (out / "latest.md").write_text(render(sections, env, total, args.quick, args.only or []))
    (out / "latest.json").write_text(
        json.dumps(
            {
                "quick": args.quick,
                "total_s": round(total, 1),
                "env": env,
                "sections": [asdict(s) for s in sections],
            },
            indent=1,
            ensure_ascii=False,
            default=str,
        )
    )
    print(f"bench: wrote {out / 'latest.md'} in {total:.0f} s", file=sys.stderr)
    return 1 if any(s.error for s in sections) else 0


if __name__ == "__main__":
    sys.exit(main())
