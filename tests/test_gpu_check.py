"""scripts/gpu_check.sh without a GPU: the steps that need none (tiny training with a
resume, the training and decoding benchmarks) and the report they write."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_runs_its_cpu_steps_and_writes_one_report(tmp_path: Path) -> None:
    report = tmp_path / "report.md"
    stale = tmp_path / "runs" / "tiny-fp32" / "checkpoints"  # an earlier check's run
    stale.mkdir(parents=True)
    (stale / "last.pt").write_bytes(b"an interrupted earlier check")
    result = subprocess.run(
        [
            str(ROOT / "scripts/gpu_check.sh"),
            "--device",
            "cpu",
            "--quick",
            "--work",
            str(tmp_path / "runs"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={
            "REPORT": str(report),
            "PATH": f"{ROOT / '.venv/bin'}:/usr/bin:/bin",
            "PYTHON": str(ROOT / ".venv/bin/python"),
        },
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    text = report.read_text()
    assert (
        text == result.stdout.rstrip("\n").split("\n", 0)[0] + "\n" or text in result.stdout + "\n"
    )
    for section in ("## 2. Tiny training", "## 3. Training throughput", "## 4. Decoding"):
        assert section in text
    assert "## 1. CUDA tests" not in text  # a CPU run skips them
    assert "- ok: fp32: 3 + 3 updates, resumed" in text
    assert "FAILED" not in text and text.rstrip().splitlines()[-1].startswith("all checks passed")
    assert "greedy, ours" in text and "beam 5, bare CT2 fp32" in text
