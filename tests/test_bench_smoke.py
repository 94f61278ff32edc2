"""Smoke test of the benchmark harness: ``python -m bench.run --quick`` writes a well-formed
report and plots. Timings are not asserted: they depend on the machine."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.run import SECTIONS as BENCH_SECTIONS

REPO = Path(__file__).resolve().parent.parent
SECTIONS = tuple(BENCH_SECTIONS)  # the harness's own list: a new section is checked too
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    pytest.importorskip("matplotlib", reason="bench extras not installed (pip install -e '.[bench]')")
    out = tmp_path_factory.mktemp("bench")
    done = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    return out, done


def test_quick_run_succeeds(quick_run: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    _, done = quick_run
    assert done.returncode == 0, done.stderr[-3000:]


def test_report_is_well_formed(quick_run: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    out, _ = quick_run
    report = (out / "latest.md").read_text(encoding="utf-8")
    assert report.startswith("# batchtag benchmark results")
    for name in ("python", "aiohttp", "onnxruntime", "batchtag", "cpu_count"):
        assert f"| {name} |" in report
    assert report.count("| What was measured | Runs | Median | Ratio | Goal | Met | Notes |") == len(SECTIONS)
    assert "Section failed" not in report
    data = json.loads((out / "latest.json").read_text(encoding="utf-8"))
    assert data["quick"] is True
    assert [s["name"] for s in data["sections"]] == list(SECTIONS)
    for section in data["sections"]:
        assert section["error"] is None
        assert section["rows"], section["name"]
        for row in section["rows"]:
            assert row["runs"] >= 1
            assert isinstance(row["median"], int | float | str)


def test_plots_are_pngs(quick_run: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    out, _ = quick_run
    report = (out / "latest.md").read_text(encoding="utf-8")
    plots = sorted(out.glob("*.png"))
    assert plots
    for plot in plots:
        assert plot.read_bytes()[:8] == PNG_MAGIC
        assert f"]({plot.name})" in report
    assert (out / "profile-client.txt").read_text().strip()
