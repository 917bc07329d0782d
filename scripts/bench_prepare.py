"""Preparation benchmark (``make bench-prepare``): synthetic corpora of 100k, 1M and 4M pairs
through the real ``tmt-prepare`` code path, against bare SentencePiece encoding.

The corpora are made from the Multi30k training sentences (seeded): each line joins a run of
1-3 consecutive sentences, on both sides alike, so lengths vary like news text (about 21
words a line). Each is prepared from scratch by ``tmt-prepare data=text`` in a subprocess;
for each size the benchmark prints the wall time and pairs/s, the time of each stage
(sampling + SentencePiece training; encoding + writing the training split), the peak RSS of
the whole process tree (workers included, sampled every 50 ms) and the cost per pair relative
to the smallest size. In the same run, on the same sentences (at most the first 1M pairs) and
with as many threads as preparation has workers, it measures bare SentencePiece batch
encoding in memory — the floor no encoding stage can beat — and prints the encoding stage's
throughput as a ratio of it. Last, it times ``tmt-train`` from launch to its first update on
the largest corpus. With --json the last line is one JSON object. Timings are printed, never
asserted.

    python scripts/bench_prepare.py [--sizes 100000,1000000,4000000] [--workers N] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import sentencepiece as spm

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MULTI30K = REPO / "data" / "raw" / "multi30k"


def parse_args() -> argparse.Namespace:
    """The command-line flags; the module docstring is the help text."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", default="100000,1000000,4000000", help="pairs per corpus")
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--work-dir", type=Path, default=REPO / "data" / "bench_prepare")
    p.add_argument("--keep", action="store_true", help="keep the generated corpora")
    p.add_argument("--no-train", action="store_true", help="skip the tmt-train start-up timing")
    p.add_argument("--json", action="store_true", help="end with one JSON object")
    return p.parse_args()


def read_gz(path: Path) -> list[str]:
    """The lines of a gzipped text file, without their newlines."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return f.read().split("\n")[:-1]


def generate(prefix: Path, n_pairs: int, src: list[str], tgt: list[str], seed: int) -> None:
    """``prefix.en`` and ``prefix.de``: ``n_pairs`` lines, each a run of 1-3 consecutive
    Multi30k sentences (a random start and run length), joined by a space on both sides."""
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(src) - 3, n_pairs)
    runs = rng.integers(1, 4, n_pairs)
    with open(f"{prefix}.en", "w", encoding="utf-8") as fs, open(f"{prefix}.de", "w") as ft:
        for lo in range(0, n_pairs, 100_000):
            hi = min(lo + 100_000, n_pairs)
            pairs = zip(starts[lo:hi].tolist(), runs[lo:hi].tolist(), strict=True)
            block = [(" ".join(src[s : s + r]), " ".join(tgt[s : s + r])) for s, r in pairs]
            fs.write("".join(a + "\n" for a, _ in block))
            ft.write("".join(b + "\n" for _, b in block))


class TreeRSS:
    """Samples the summed RSS of a process and all its descendants; keeps the peak."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.process = psutil.Process(pid)
        self.interval = interval
        self.peak = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            total = 0
            try:
                tree = [self.process, *self.process.children(recursive=True)]
            except psutil.Error:  # the process has ended
                return
            for p in tree:
                with contextlib.suppress(psutil.Error):  # a worker that just ended
                    total += p.memory_info().rss
            self.peak = max(self.peak, total)
            time.sleep(self.interval)

    def finish(self) -> float:
        """Stop sampling; the peak in MiB."""
        self.stop.set()
        self.thread.join()
        return self.peak / 2**20


def overrides(prefix: Path, work: Path, workers: int) -> list[str]:
    """The ``tmt-prepare`` overrides for the corpus at ``prefix``, cached under ``work``."""
    return [
        "data=text",
        "data.corpus=bench",
        "data.src_lang=en",
        "data.tgt_lang=de",
        f"data.train={prefix}",
        f"data.valid={MULTI30K / 'val'}",
        f"data.test=[{MULTI30K / 'test_2016_flickr'}]",
        f"data.prepared_dir={work / 'prepared'}",
        f"data.num_workers={workers}",
    ]


def prepare(prefix: Path, work: Path, workers: int) -> dict[str, Any]:
    """``tmt-prepare`` from scratch on ``prefix``: wall time, peak RSS, its meta.json."""
    shutil.rmtree(work / "prepared", ignore_errors=True)
    command = [str(BIN / "tmt-prepare"), *overrides(prefix, work, workers), f"hydra.run.dir={work}"]
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rss = TreeRSS(proc.pid)
    out, err = proc.communicate()
    wall = time.perf_counter() - start
    peak = rss.finish()
    if proc.returncode != 0:
        sys.exit(f"tmt-prepare failed:\n{err[-3000:]}")
    directory = Path(out.strip().splitlines()[-1])
    return {
        "wall_s": wall,
        "peak_rss_mib": peak,
        "meta": json.loads((directory / "meta.json").read_text()),
        "dir": directory,
    }


def bare_spm(prefix: Path, model: Path, threads: int, max_pairs: int = 1_000_000) -> float:
    """Pairs/s of SentencePiece's own batch encode, in memory, on the first ``max_pairs``
    pairs (both sides, 100k sentences a call, outputs dropped as they come)."""
    sp = spm.SentencePieceProcessor(model_file=str(model))
    sides = []
    for lang in ("en", "de"):
        with open(f"{prefix}.{lang}", encoding="utf-8") as f:
            sides.append([line.rstrip("\n") for _, line in zip(range(max_pairs), f, strict=False)])
    n = len(sides[0])
    start = time.perf_counter()
    for side in sides:
        for lo in range(0, n, 100_000):
            sp.encode(side[lo : lo + 100_000], num_threads=threads)
    return n / (time.perf_counter() - start)


def train_startup(prefix: Path, work: Path, workers: int) -> float:
    """Seconds from launching ``tmt-train`` on the prepared corpus to its first update."""
    command = [
        str(BIN / "tmt-train"),
        *overrides(prefix, work, workers),
        "trainer.max_steps=1",
        "trainer.final_eval=false",
        "trainer.valid_max_sentences=10",
        "trainer.device=cpu",
        f"hydra.run.dir={work / 'run'}",
    ]
    shutil.rmtree(work / "run", ignore_errors=True)
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    first = None
    for line in proc.stdout:
        if first is None and line.startswith("first update"):
            first = time.perf_counter() - start
    if proc.wait() != 0 or first is None:
        sys.exit("tmt-train failed or printed no 'first update' line")
    return first


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo."""
    with open("/proc/cpuinfo") as f:
        names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    return names[0] if names else "unknown"


def main() -> None:
    """Generate and prepare each corpus size, time bare SentencePiece beside it, print the table."""
    args = parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if not (MULTI30K / "train.en.gz").is_file():
        sys.exit(f"error: {MULTI30K} has no Multi30k files; run make data first")
    src, tgt = read_gz(MULTI30K / "train.en.gz"), read_gz(MULTI30K / "train.de.gz")
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    cpu = cpu_model()
    print(f"host: {cpu}, {len(os.sched_getaffinity(0))} cores; {args.workers} worker(s)")
    rows: dict[str, dict[str, Any]] = {}
    for n in sizes:
        prefix = work / f"corpus{n}"
        if not Path(f"{prefix}.de").is_file():
            start = time.perf_counter()
            generate(prefix, n, src, tgt, seed=n)
            print(f"generated {n:,} pairs in {time.perf_counter() - start:.1f} s")
        run = prepare(prefix, work, args.workers)
        meta, seconds = run["meta"], run["meta"]["seconds"]
        floor = bare_spm(prefix, run["dir"] / "spm.model", args.workers)
        encode_pairs_s = meta["train_pairs_in"] / seconds["encode_train"]
        rows[str(n)] = {
            "pairs": n,
            "wall_s": round(run["wall_s"], 2),
            "pairs_per_s": round(n / run["wall_s"]),
            "sample_and_tokenizer_s": seconds["sample_and_tokenizer"],
            "encode_s": seconds["encode_train"],
            "encode_pairs_per_s": round(encode_pairs_s),
            "spm_pairs_per_s": round(floor),
            "encode_ratio_to_spm": round(encode_pairs_s / floor, 3),
            "peak_rss_mib": round(run["peak_rss_mib"]),
        }
    smallest = rows[str(sizes[0])]
    for row in rows.values():
        row["cost_per_pair_vs_smallest"] = round(
            (row["wall_s"] / row["pairs"]) / (smallest["wall_s"] / smallest["pairs"]), 3
        )
    print(
        f"{'pairs':>10} {'wall s':>8} {'pairs/s':>9} {'sample+spm s':>13} {'encode s':>9} "
        f"{'enc/spm':>8} {'peak RSS MiB':>13} {'cost/pair':>10}"
    )
    for r in rows.values():
        print(
            f"{r['pairs']:>10,} {r['wall_s']:>8.1f} {r['pairs_per_s']:>9,} "
            f"{r['sample_and_tokenizer_s']:>13.1f} {r['encode_s']:>9.1f} "
            f"{r['encode_ratio_to_spm']:>8.2f} {r['peak_rss_mib']:>13,} "
            f"{r['cost_per_pair_vs_smallest']:>10.2f}"
        )
    result: dict[str, Any] = {"host": cpu, "workers": args.workers, "sizes": rows}
    if not args.no_train:
        largest = work / f"corpus{sizes[-1]}"
        result["train_first_update_s"] = round(train_startup(largest, work, args.workers), 1)
        seconds = result["train_first_update_s"]
        print(f"tmt-train on {sizes[-1]:,} pairs: first update {seconds} s after launch")
    if not args.keep:
        for n in sizes:
            for lang in ("en", "de"):
                Path(f"{work / f'corpus{n}'}.{lang}").unlink(missing_ok=True)
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
