"""Decoding benchmark (``make bench-decode``): translate test_2016_flickr with a trained
checkpoint and print, from one run, sentences/s and target tokens/s for greedy and beam 5
with the key/value cache, beam 5 without it, and greedy / beam 5 through CTranslate2, with
ratios to this project's cached beam 5, BLEU, and the CTranslate2 greedy agreement rate.
Beam search uses ``--alpha``, else the length penalty the checkpoint's run tuned on val, as
``tmt-evaluate`` does, else the default α.

    python scripts/bench_decode.py --checkpoint runs/multi30k_en-de/default/checkpoints/final.pt
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import OmegaConf

from transformer_mt.cli.common import search_for
from transformer_mt.data.corpus import fetch_raw, read_references
from transformer_mt.decoding import SearchOptions, Translator
from transformer_mt.evaluation import score
from transformer_mt.export.ctranslate2 import CTranslate2Translator, export_ctranslate2

DEFAULT_CHECKPOINT = Path("runs/multi30k_en-de/default/checkpoints/final.pt")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--split", choices=["val", "test"], default="test")
    p.add_argument("--limit", type=int, help="only the first N sentences (a quick run)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument(
        "--alpha",
        type=float,
        help="length penalty of beam 5 (default: the one the checkpoint's run tuned on val, "
        f"else {SearchOptions.alpha:g})",
    )
    p.add_argument("--json", action="store_true", help="end with one JSON object")
    return p.parse_args()


def timed(fn: Callable[[], list[str]]) -> tuple[list[str], float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    args = parse_args()
    if not args.checkpoint.is_file():
        sys.exit(
            f"error: {args.checkpoint} not found; train first (make train) or pass --checkpoint"
        )
    torch.set_num_threads(args.threads)
    ours = Translator.from_checkpoint(args.checkpoint)
    uncached = Translator(ours.model, ours.tokenizer, ours.device, ours.config, use_cache=False)
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
    tok = ours.tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        ct2 = CTranslate2Translator.from_dir(
            export_ctranslate2(args.checkpoint, Path(tmp) / "ct2"), intra_threads=args.threads
        )
        runs: list[tuple[str, Callable[[], list[str]]]] = [
            ("greedy, cached", lambda: ours.translate(src, greedy, batch_size=args.batch_size)),
            ("beam 5, cached", lambda: ours.translate(src, beam5, batch_size=args.batch_size)),
            (
                "beam 5, no cache",
                lambda: uncached.translate(src, beam5, batch_size=args.batch_size),
            ),
            ("greedy, CTranslate2", lambda: ct2.translate(src, greedy, args.batch_size)),
            ("beam 5, CTranslate2", lambda: ct2.translate(src, beam5, args.batch_size)),
        ]
        results = {}
        for name, run in runs:
            hyps, seconds = timed(run)
            tokens = sum(len(ids) + 1 for ids in tok.encode(hyps))  # subwords + EOS
            results[name] = {
                "seconds": seconds,
                "sentences_per_s": len(src) / seconds,
                "tokens_per_s": tokens / seconds,
                "bleu": score(hyps, ref, ("bleu",))["bleu"].score,
                "hyps": hyps,
            }
            print(f"  {name}: {seconds:.1f} s", file=sys.stderr, flush=True)

    base = results["beam 5, cached"]["sentences_per_s"]
    print(f"\n{len(src)} sentences of {args.split}, {args.threads} threads, {args.checkpoint}")
    print(f"beam 5 at length penalty α {beam5.alpha:g} ({alpha_source})")
    print(f"{'mode':<22} {'sent/s':>8} {'tok/s':>9} {'× beam5':>8} {'BLEU':>6}")
    for name, r in results.items():
        ratio = r["sentences_per_s"] / base
        print(
            f"{name:<22} {r['sentences_per_s']:8.1f} {r['tokens_per_s']:9.0f} "
            f"{ratio:8.2f} {r['bleu']:6.2f}"
        )
    a, b = results["greedy, cached"]["hyps"], results["greedy, CTranslate2"]["hyps"]
    agreement = sum(x == y for x, y in zip(a, b, strict=True)) / len(a)
    print(f"CTranslate2 greedy output identical to ours: {100 * agreement:.1f}% of sentences")
    if args.json:
        summary = {k: {m: v for m, v in r.items() if m != "hyps"} for k, r in results.items()}
        summary["ct2_greedy_agreement"] = agreement  # type: ignore[assignment]
        summary["beam_alpha"] = beam5.alpha  # type: ignore[assignment]
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
