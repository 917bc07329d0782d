"""Decoding benchmark (``make bench-decode``): translate test_2016_flickr with a trained
checkpoint and print, from one run, sentences/s and target tokens/s of

* this project's search (greedy and beam 5 with the key/value cache, beam 5 without it),
* ``--engine ctranslate2`` (this project's CTranslate2 path: same options and scores),
* bare CTranslate2: the library's own ``translate_batch`` on the exported model, fp32 and
  int8, on the same SentencePiece pieces, same threads, batch size and output limit,
* with ``--bf16``, ours in bf16 (``tmt-translate --precision bf16``) and bare
  CTranslate2 in bfloat16 (where the installed build supports it; the 4.8 CPU wheel does not),
* with ``--workers N``, ours in N worker processes (``tmt-translate --workers N``) and bare
  CTranslate2 fp32 with ``inter_threads=N``, each worker on threads/N threads: their ratio is
  to bare CTranslate2 with the same workers, and a last line gives it to the one-worker row,

with ratios to bare CTranslate2 fp32 of the same search, BLEU, and how many translations
equal this project's. Beam search uses ``--alpha``, else the length penalty the checkpoint's
run tuned on val (as ``tmt-evaluate`` does), else the default α. Each row runs in a process
of its own (engines sharing a process slow each other down), warms up on one batch, and keeps
the best of ``--repeat`` timed runs; the rows take turns, one run each per round, so the
ratios are side by side on the same state of the machine. On CUDA the device is synchronized
around each run.

    python scripts/bench_decode.py --checkpoint runs/multi30k_en-de/default/checkpoints/final.pt
    python scripts/bench_decode.py --device cuda --batch-size 128 --bf16
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import sys
import tempfile
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from transformer_mt.cli.common import CT2_COMPUTE_TYPES, search_for
from transformer_mt.data.directions import fetch_raw, read_references
from transformer_mt.data.tokenizer import Tokenizer
from transformer_mt.decoding import SearchOptions, Translator
from transformer_mt.decoding.search import output_budget
from transformer_mt.decoding.translator import freeze_loaded
from transformer_mt.decoding.workers import PooledTranslator, threads_per_worker
from transformer_mt.errors import UserError
from transformer_mt.evaluation import score
from transformer_mt.export.ctranslate2 import SPM_FILE, export_ctranslate2, import_ctranslate2
from transformer_mt.export.ctranslate2_engine import NO_EARLY_EXIT, CTranslate2Translator

DEFAULT_CHECKPOINT = Path("runs/multi30k_en-de/default/checkpoints/final.pt")
ENGINES = ["ours", "--engine ctranslate2", "bare CT2 fp32", "bare CT2 int8"]


def parse_args() -> argparse.Namespace:
    """The command-line flags; the module docstring is the help text."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--split", choices=["val", "test"], default="test")
    p.add_argument("--device", default="cpu", help="cpu | cuda (both engines)")
    p.add_argument("--limit", type=int, help="only the first N sentences (a quick run)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--repeat", type=int, default=3, help="timed runs of each row (best kept)")
    p.add_argument("--no-uncached", action="store_true", help="skip the slow uncached row")
    p.add_argument("--bf16", action="store_true", help="add bf16 rows: ours and bare CT2")
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="with N > 1, add rows of ours and bare CT2 fp32 in N workers of threads/N threads",
    )
    p.add_argument(
        "--alpha",
        type=float,
        help="length penalty of beam 5 (default: the one the checkpoint's run tuned on val, "
        f"else {SearchOptions.alpha:g})",
    )
    p.add_argument("--save-hyps", type=Path, help="write each row's translations to DIR/<row>.txt")
    p.add_argument("--json", action="store_true", help="end with one JSON object")
    return p.parse_args()


def timed(fn: Callable[[], list[str]], repeat: int, cuda: bool) -> tuple[list[str], float]:
    """The output of ``fn()`` and its best wall time over ``repeat`` runs."""
    best, out = float("inf"), []
    for _ in range(repeat):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return out, best


def load_engine(row: dict[str, Any]) -> Callable[[list[str]], list[str]]:
    """The row's engine, loaded in this process: sentences in, translations out."""
    torch.set_num_threads(row["threads"])
    src, bs, options = row["src"], row["batch_size"], row["options"]
    engine, device, threads, workers = row["engine"], row["device"], row["threads"], row["workers"]
    if engine.startswith("ours"):
        precision = "bf16" if engine == "ours, bf16" else "fp32"
        ours = Translator.from_checkpoint(row["checkpoint"], device=device, precision=precision)
        if engine == "ours, no cache":
            ours = Translator(ours.model, ours.tokenizer, ours.device, ours.config, use_cache=False)
        if workers > 1:
            # as many threads each as CTranslate2's replicas get: like for like
            pooled = PooledTranslator(ours, workers, threads_per_worker(workers))
            pooled.start()  # its processes stop when this row's process ends
            ours = pooled
        return lambda sentences: ours.translate(sentences, options, batch_size=bs)
    if engine == "--engine ctranslate2":
        ct2 = CTranslate2Translator.from_dir(row["export"], device=device, intra_threads=threads)
        return lambda sentences: ct2.translate(sentences, options, batch_size=bs)
    # bare CTranslate2: pieces in, pieces out, as its users call it
    precision = engine.split(",")[0].split()[-1]  # fp32, int8 or bf16
    compute_type = "int8" if precision == "int8" else CT2_COMPUTE_TYPES[precision]
    bare = import_ctranslate2().Translator(
        row["export"],
        device=device,
        compute_type=compute_type,
        intra_threads=threads_per_worker(workers) if workers > 1 else threads,
        inter_threads=workers,
    )
    sp = Tokenizer((Path(row["export"]) / SPM_FILE).read_bytes()).sp  # no torch model here
    pieces = {s: sp.encode(s, out_type=str) for s in src}

    def run(sentences: list[str]) -> list[str]:
        outputs = bare.translate_batch(
            [pieces[s] for s in sentences],
            max_batch_size=bs,
            beam_size=options.beam_size,
            length_penalty=options.alpha or NO_EARLY_EXIT,
            max_decoding_length=row["max_length"],
            max_input_length=0,
        )
        return [sp.decode_pieces(r.hypotheses[0]) for r in outputs]

    return run


def serve_row(row: dict[str, Any], conn: Connection) -> None:
    """A worker process for one row: load its engine and warm up on one batch, then time one
    run over all sentences each time the parent asks. (Engines sharing a process slow each
    other down: with a torch model loaded beside it, CTranslate2 decoded 2.5 times slower.)"""
    run = load_engine(row)
    freeze_loaded()  # as the console scripts do once loaded
    run(row["src"][: row["batch_size"] * row["workers"]])  # warm-up: first-call allocations
    conn.send("ready")
    while conn.recv() == "run":
        conn.send(timed(lambda: run(row["src"]), 1, row["device"].startswith("cuda")))


def time_rows(rows: dict[str, dict[str, Any]], repeat: int) -> dict[str, tuple[list[str], float]]:
    """Each row's output and best time. Every row runs in a process of its own, loaded once;
    the rows take turns, one timed run each per round, so a slow stretch of a shared machine
    falls on all of them instead of on whichever row ran then."""
    spawn = multiprocessing.get_context("spawn")
    workers: dict[str, tuple[Any, Connection]] = {}
    best: dict[str, tuple[list[str], float]] = {}
    try:
        for name, row in rows.items():
            parent, child = spawn.Pipe()
            # (a daemon process cannot start the worker processes of its own)
            process = spawn.Process(target=serve_row, args=(row, child), daemon=row["workers"] == 1)
            process.start()
            workers[name] = (process, parent)
            if parent.recv() != "ready":
                raise RuntimeError(f"{name}: the worker did not start")
        for round_ in range(repeat):
            names = list(rows)
            for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
                if round_ >= rows[name]["repeat"]:
                    continue
                workers[name][1].send("run")
                hyps, seconds = workers[name][1].recv()
                print(f"  round {round_ + 1}, {name}: {seconds:.2f} s", file=sys.stderr, flush=True)
                if name not in best or seconds < best[name][1]:
                    best[name] = (hyps, seconds)
                time.sleep(0.5)  # the last run's OpenMP threads stop spinning
    finally:
        for process, conn in workers.values():
            with contextlib.suppress(OSError):  # it died: its error is printed above
                conn.send("stop")
            process.join(timeout=30)
    return best


def main() -> None:
    """Decode the split with every engine and print sentences/s and the ratios of one run."""
    args = parse_args()
    if args.workers < 1:
        sys.exit(f"error: --workers must be ≥ 1, got {args.workers}")
    if not args.checkpoint.is_file():
        sys.exit(
            f"error: {args.checkpoint} not found; train first (make train) or pass --checkpoint"
        )
    ours = Translator.from_checkpoint(args.checkpoint)
    data_cfg = OmegaConf.create(ours.config["data"])
    fetch_raw(data_cfg)
    _, src, ref = read_references(data_cfg, "valid" if args.split == "val" else "test")[0]
    if args.limit:
        src, ref = src[: args.limit], ref[: args.limit]
    given = SearchOptions.alpha if args.alpha is None else args.alpha
    args.search = SearchOptions(beam_size=5, alpha=given)
    beam5 = search_for(args, args.checkpoint, ours.step)  # the α tmt-evaluate would use
    if args.alpha is not None:
        alpha_source = "--alpha"
    elif beam5 is args.search:
        alpha_source = "the default"
    else:
        alpha_source = "tuned on val by the checkpoint's run"
    greedy = SearchOptions(beam_size=1)
    tok, bs = ours.tokenizer, args.batch_size
    lengths = torch.tensor([len(s) + 1 for s in tok.encode(src)])
    budget = int(
        output_budget(lengths, greedy.max_len_a, greedy.max_len_b, ours.model.max_positions).max()
    )
    engines = ENGINES + (["ours, bf16", "bare CT2 bf16"] if args.bf16 else [])
    if args.workers > 1:
        engines += [f"ours, {args.workers} workers", f"bare CT2 fp32, {args.workers} workers"]
    rows = [("greedy", greedy, e) for e in engines] + [("beam 5", beam5, e) for e in engines]
    if not args.no_uncached:
        rows.insert(len(engines) + 1, ("beam 5", beam5, "ours, no cache"))

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        export = Path(tmp) / "ct2"
        try:
            export_ctranslate2(args.checkpoint, export)
            CTranslate2Translator.from_dir(export, device=args.device)  # loads on this device?
        except (UserError, RuntimeError, ValueError) as e:  # no ctranslate2, or not here
            print(f"CTranslate2 rows skipped: {e}", file=sys.stderr)
            rows = [r for r in rows if r[2].startswith("ours")]
        else:
            supported = import_ctranslate2().get_supported_compute_types(args.device.split(":")[0])
            if "bfloat16" not in supported:
                print(f"bare CT2 bf16 skipped: {args.device} has no bfloat16", file=sys.stderr)
                rows = [r for r in rows if r[2] != "bare CT2 bf16"]
        settings = {
            f"{search}, {engine}": {
                "engine": engine,
                "options": options,
                "src": src,
                "batch_size": bs,
                "threads": args.threads,
                "device": args.device,
                "checkpoint": str(args.checkpoint),
                "export": str(export),
                "max_length": budget - 1,
                "repeat": 1 if engine == "ours, no cache" else args.repeat,
                "workers": args.workers if engine.endswith(" workers") else 1,
            }
            for search, options, engine in rows
        }
        for name, (hyps, seconds) in time_rows(settings, args.repeat).items():
            tokens = sum(len(t) + 1 for t in tok.encode(hyps))  # subwords + EOS
            results[name] = {
                "seconds": seconds,
                "sentences_per_s": len(src) / seconds,
                "tokens_per_s": tokens / seconds,
                "bleu": score(hyps, ref, ("bleu",))["bleu"].score,
                "hyps": hyps,
            }
        results = {name: results[name] for name in settings}  # rows in table order

    print(
        f"\n{len(src)} sentences of {args.split}, {args.device}, {args.threads} threads, "
        f"batch {bs}, {args.checkpoint}"
    )
    print(
        f"beam 5 at length penalty α {beam5.alpha:g} ({alpha_source}); best of {args.repeat} runs"
    )
    print(f"{'mode':<34} {'sent/s':>8} {'tok/s':>9} {'× bare fp32':>12} {'BLEU':>6} {'= ours':>7}")
    for name, r in results.items():
        search = name.split(",")[0]
        workers = f", {args.workers} workers" if name.endswith(" workers") else ""
        base = results.get(f"{search}, bare CT2 fp32{workers}", {}).get("sentences_per_s")
        same = results[f"{search}, ours"]["hyps"]
        agree = sum(a == b for a, b in zip(r["hyps"], same, strict=True)) / len(src)
        r["vs_bare_fp32"] = r["sentences_per_s"] / base if base else None
        r["same_as_ours"] = agree
        ratio = f"{r['vs_bare_fp32']:12.2f}" if base else f"{'-':>12}"
        print(
            f"{name:<34} {r['sentences_per_s']:8.1f} {r['tokens_per_s']:9.0f} "
            f"{ratio} {r['bleu']:6.2f} {100 * agree:6.1f}%"
        )
    for search in ("greedy", "beam 5") if args.workers > 1 else ():
        pooled = results.get(f"{search}, ours, {args.workers} workers")
        base = results.get(f"{search}, bare CT2 fp32")
        if pooled and base:
            ratio = pooled["sentences_per_s"] / base["sentences_per_s"]
            pooled["vs_bare_fp32_one_worker"] = ratio
            print(
                f"{search}: ours in {args.workers} workers ÷ bare CT2 fp32 in one worker of "
                f"{args.threads} threads: {ratio:.2f}"
            )
    if args.save_hyps:
        args.save_hyps.mkdir(parents=True, exist_ok=True)
        for name, r in results.items():
            slug = name.replace(", ", "_").replace(" ", "_").replace("-", "")
            (args.save_hyps / f"{slug}.txt").write_text("".join(h + "\n" for h in r["hyps"]))
    if args.json:
        summary = {k: {m: v for m, v in r.items() if m != "hyps"} for k, r in results.items()}
        summary["beam_alpha"] = beam5.alpha  # type: ignore[assignment]
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
