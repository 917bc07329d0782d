"""scripts/gpu_check.sh without a GPU: the steps that need none (tiny training with a
resume, the training and decoding benchmarks) and the report they write."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def gpu_check(tmp_path: Path, report: Path, *args: str) -> subprocess.CompletedProcess:
    """scripts/gpu_check.sh on the CPU, its steps' runs under ``tmp_path/runs``."""
    command = [str(ROOT / "scripts/gpu_check.sh"), "--device", "cpu", "--quick"]
    return subprocess.run(
        [*command, "--work", str(tmp_path / "runs"), *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={
            "REPORT": str(report),
            "PATH": f"{ROOT / '.venv/bin'}:/usr/bin:/bin",
            "PYTHON": str(ROOT / ".venv/bin/python"),
        },
    )


def test_gpu_check_runs_its_cpu_steps_and_writes_one_report(tmp_path: Path) -> None:
    report = tmp_path / "report.md"
    stale = tmp_path / "runs" / "tiny-fp32" / "checkpoints"  # an earlier check's run
    stale.mkdir(parents=True)
    (stale / "last.pt").write_bytes(b"an interrupted earlier check")
    result = gpu_check(tmp_path, report)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    text = report.read_text()
    assert text == result.stdout  # the report is what was printed, every line once
    for section in ("## 2. Tiny training", "## 3. Training throughput", "## 4. Decoding"):
        assert section in text
    assert "## 1. CUDA tests" not in text  # a CPU run skips them
    assert "- ok: fp32: 3 + 3 updates, resumed" in text
    assert "FAILED" not in text and text.rstrip().splitlines()[-1].startswith("all checks passed")
    assert "greedy, ours" in text and "beam 5, bare CT2 fp32" in text


def test_gpu_check_stops_its_steps_when_its_budget_is_spent(tmp_path: Path) -> None:
    report = tmp_path / "report.md"
    result = gpu_check(tmp_path, report, "--budget", "2")
    assert result.returncode == 1
    text = report.read_text()
    assert "budget 2 s" in text and "FAILED: fp32" in text  # the first step, stopped
    assert "timed out after 1 s: the --budget is spent" in text or "not run: the --budget" in text
    assert text.rstrip().splitlines()[-1].split(";")[0] == "3 FAILED"  # and the two after it
