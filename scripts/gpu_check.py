"""Check the CUDA path and print one report (``scripts/gpu_check.sh`` runs this on a machine
with one GPU and no network). Each step is a section of the report:

1. the CUDA tests (``tests/test_cuda.py``);
2. a tiny model trained 100 updates in each precision, stopped at 50 and resumed;
3. 30 timed updates of make bench's model (model=small) against the plain nn.Transformer loop
   (``scripts/bench_train.py``: tokens/s, MFU, data wait, host syncs per update);
4. the decoding benchmark (``scripts/bench_decode.py``, fp32 and bf16 rows) on
   ``--checkpoint``, or else on the tiny model of step 2.

``--device cpu`` runs the same steps without a GPU (the CUDA tests are skipped there, and
the precisions are those a CPU has); ``--quick`` shrinks every step, for the test suite.

    python scripts/gpu_check.py --out gpu_report.md
    python scripts/gpu_check.py --device cpu --quick --out /tmp/report.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def parse_args() -> argparse.Namespace:
    """The command-line flags; the module docstring is the help text."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (default) | cpu")
    p.add_argument("--out", type=Path, default=Path("gpu_report.md"), help="the report (Markdown)")
    p.add_argument("--work", type=Path, default=Path("runs/gpu_check"), help="run directories")
    p.add_argument(
        "--checkpoint",
        type=Path,
        help="for the decoding benchmark (default: make train's final.pt, else the tiny run's)",
    )
    p.add_argument("--quick", action="store_true", help="a few updates and sentences per step")
    p.add_argument(
        "--budget",
        type=float,
        default=570,
        help="seconds for the whole check (default 570): a step still running then is stopped "
        "and reported as failed, and the steps after it fail at once",
    )
    return p.parse_args()


# When the whole check must end (time.time()); set from --budget in main.
DEADLINE = float("inf")


class Report:
    """Markdown sections, printed and written as they come (a killed run keeps its start)."""

    def __init__(self, path: Path) -> None:
        self.path, self.lines = path, []
        self.failures: list[str] = []

    def add(self, *lines: str) -> None:
        """Print ``lines`` and rewrite the report file with them appended."""
        self.lines += lines
        print("\n".join(lines), flush=True)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("\n".join(self.lines) + "\n")

    def check(self, ok: bool, what: str) -> None:
        """Record a check as ok or FAILED; a failure makes the script exit non-zero."""
        self.add(f"- {'ok' if ok else 'FAILED'}: {what}")
        if not ok:
            self.failures.append(what)


def run(command: list[str], timeout: int) -> tuple[subprocess.CompletedProcess, float]:
    """Run a command from the repository root, for at most ``timeout`` seconds and not past
    the check's deadline; its result (exit status 124 when stopped, with the processes it
    started) and its wall time. Once the deadline has passed it starts nothing."""
    start = time.perf_counter()
    left = DEADLINE - time.time()
    if left <= 0:
        return subprocess.CompletedProcess(command, 124, "", "not run: the --budget is spent"), 0.0
    budget = left < timeout  # the check's deadline comes first
    timeout = max(1, int(min(timeout, left)))
    env = {
        **os.environ,
        "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    # a session of its own: a timeout stops the command's own children too (decoding workers)
    with subprocess.Popen(
        command,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    ) as process:
        try:
            out, err = process.communicate(timeout=timeout)
            result = subprocess.CompletedProcess(command, process.returncode, out, err)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            out, _ = process.communicate()
            why = f"timed out after {timeout} s" + (": the --budget is spent" if budget else "")
            result = subprocess.CompletedProcess(command, 124, out, why)
    return result, time.perf_counter() - start


def tail(text: str, lines: int = 15) -> str:
    """The last ``lines`` lines of ``text``."""
    return "\n".join(text.strip().splitlines()[-lines:])


def cuda_tests(report: Report) -> None:
    """Section 1: run tests/test_cuda.py and report its summary."""
    report.add("", "## 1. CUDA tests", "")
    result, seconds = run([sys.executable, "-m", "pytest", "-q", "-rs", "tests/test_cuda.py"], 300)
    report.add("```", tail(result.stdout), "```")
    report.check(result.returncode == 0, f"tests/test_cuda.py ({seconds:.0f} s)")


def quick_overrides(args: argparse.Namespace) -> list[str]:
    """--quick: a 2,000-pair subset of Multi30k with a 1,000-piece vocabulary, prepared once
    under --work (a fresh checkout would otherwise prepare all of it first), and validation
    on 20 sentences (which an untrained model decodes to the length limit)."""
    if not args.quick:
        return []
    prepared = (args.work / "prepared").resolve()
    return [
        "data.max_train_pairs=2000",
        "data.tokenizer.vocab_size=1000",
        "trainer.valid_max_sentences=20",
        f"data.prepared_dir={prepared}",
    ]


def tiny_trainings(report: Report, args: argparse.Namespace) -> Path | None:
    """100 updates of the tiny model per precision, in two launches; the last run's best.pt."""
    report.add("", "## 2. Tiny training per precision, with a resume", "")
    cuda = args.device.startswith("cuda")
    precisions = ["fp32", "tf32", "bf16", "fp16"] if cuda else ["fp32", "bf16"]
    if args.quick and not cuda:
        precisions = ["fp32"]
    half, full = (3, 6) if args.quick else (50, 100)
    last: Path | None = None
    for precision in precisions:
        run_dir = (args.work / f"tiny-{precision}").resolve()
        shutil.rmtree(run_dir, ignore_errors=True)  # a rerun's launch would resume the old run
        common = [
            sys.executable,
            "-m",
            "transformer_mt.cli.train",
            "model=tiny",
            f"trainer.device={args.device}",
            f"trainer.precision={precision}",
            "trainer.final_beam_size=2",
            "trainer.final_alpha=1.0",
            "trainer.resume=auto",
            f"hydra.run.dir={run_dir}",
            *(quick_overrides(args) or ["trainer.valid_max_sentences=100"]),
        ]
        first, s1 = run([*common, f"trainer.max_steps={half}", "trainer.final_eval=false"], 600)
        final_eval = f"trainer.final_eval={not args.quick}"  # quick: no beam search at the end
        second, s2 = run([*common, f"trainer.max_steps={full}", final_eval], 600)
        resumed = f"first update of this launch: step {half + 1}" in second.stdout
        ok = first.returncode == 0 and second.returncode == 0 and resumed
        results = run_dir / "results.json"
        summary = ""
        if results.is_file():
            data = json.loads(results.read_text())
            summary = f", best greedy val BLEU {data.get('best_val_bleu_greedy') or 0:.2f}"
            last = run_dir / "checkpoints" / "best.pt"
        report.check(
            ok,
            f"{precision}: {half} + {full - half} updates, resumed ({s1:.0f} s + {s2:.0f} s{summary})",
        )
        if not ok:
            report.add("```", tail(first.stderr + "\n" + second.stderr), "```")
    return last


def train_benchmark(report: Report, args: argparse.Namespace) -> None:
    """Section 3: ``make bench``'s timed updates in each precision, on the device."""
    report.add(
        "", "## 3. Training throughput (model=small, as make bench; the plain loop's shape)", ""
    )
    cuda = args.device.startswith("cuda")
    rows = ["fp32", "tf32", "bf16"] if cuda else ["fp32"]
    steps = ["--steps", "3", "--warmup", "1"] if args.quick else ["--steps", "30", "--warmup", "5"]
    # bench_train.py's model=small: the plain loop's architecture (sinusoids, ReLU), so the
    # ratio is like for like, and the shape of make bench's CPU figures
    model = ["model=tiny", *quick_overrides(args)] if args.quick else []
    for precision in rows:
        command = [sys.executable, "scripts/bench_train.py", "--device", args.device]
        command += ["--precision", precision, *steps, "--json", *model]
        result, seconds = run(command, 600)
        if result.returncode != 0:
            report.check(False, f"bench_train {precision}")
            report.add("```", tail(result.stderr), "```")
            continue
        r = json.loads(result.stdout.strip().splitlines()[-1])
        syncs = r["host_syncs_per_update"]
        report.check(
            True,
            f"{precision}: ours {r['tokens_per_s_ours']:,.0f} tok/s, plain loop "
            f"{r['tokens_per_s_reference']:,.0f} ({r['throughput_ratio']:.2f}×); MFU "
            f"{r['mfu']:.1%} of {r['matmul_peak_flops'] / 1e12:.1f} TFLOP/s; data wait "
            f"{r['data_wait_fraction']:.1%}; host syncs per update {syncs}; {seconds:.0f} s",
        )


def decode_benchmark(report: Report, args: argparse.Namespace, fallback: Path | None) -> None:
    """Section 4: ``make bench-decode`` on the device, with the default run's checkpoint or
    else the check's own."""
    report.add("", "## 4. Decoding (test_2016_flickr)", "")
    default = ROOT / "runs/multi30k_en-de/default/checkpoints/final.pt"
    checkpoint = args.checkpoint or (default if default.is_file() else fallback)
    if checkpoint is None or not checkpoint.is_file():
        report.check(False, "no checkpoint to decode with")
        return
    command = [sys.executable, "scripts/bench_decode.py", "--checkpoint", str(checkpoint)]
    command += ["--device", args.device, "--bf16"]
    if args.quick:
        command += ["--limit", "30", "--repeat", "1", "--no-uncached"]
    result, seconds = run(command, 600)
    report.add("```", tail(result.stdout, 20), tail(result.stderr, 3), "```")
    report.check(result.returncode == 0, f"bench_decode on {checkpoint} ({seconds:.0f} s)")


def main() -> None:
    """Run every section within the budget and write the report; exit 1 if a check failed."""
    args = parse_args()
    report = Report(args.out)
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        sys.exit("error: no CUDA device; use --device cpu for the parts that need none")
    name = torch.cuda.get_device_name() if cuda else platform.processor() or "cpu"
    global DEADLINE
    start = time.perf_counter()
    # counted from gpu_check.sh's start (its wheel install included), else from now
    DEADLINE = float(os.environ.get("GPU_CHECK_START", time.time())) + args.budget
    report.add(
        f"# GPU check: {name}",
        "",
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; "
        f"torch {torch.__version__}, CUDA {torch.version.cuda}; "
        f"Python {platform.python_version()}; budget {args.budget:.0f} s",
    )
    if cuda:
        cuda_tests(report)
    last = tiny_trainings(report, args)
    train_benchmark(report, args)
    decode_benchmark(report, args, last)
    verdict = "all checks passed" if not report.failures else f"{len(report.failures)} FAILED"
    report.add("", f"{verdict}; {time.perf_counter() - start:.0f} s in all")
    sys.exit(1 if report.failures else 0)


if __name__ == "__main__":
    main()
