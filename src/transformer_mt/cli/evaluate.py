"""tmt-evaluate: translate a test set with one or more checkpoints and score them with
sacreBLEU (BLEU, chrF, TER).

    tmt-evaluate runs/.../checkpoints/final.pt --split test --beam 5 --json   # every test set
    tmt-evaluate runs/multi30k_en-de/default --split val        # every checkpoint of a run
    tmt-evaluate a.pt b.pt averaged.pt --metrics bleu,chrf,ter
    tmt-evaluate best.pt --src my.en --ref my.de
    tmt-evaluate multilingual.pt --src my.en --ref my.fr --tgt-lang fr
    tmt-evaluate final.pt --split test --alpha-grid 0.6,1,1.4,1.8,2.2,3   # α tuned on val
    tmt-evaluate multilingual.pt --split test --pairs de-fr,fr-de         # zero-shot
    tmt-evaluate multilingual.pt --split test --pairs de-fr --pivot en    # through English

Prints a table (one row per checkpoint) and the sacreBLEU signatures, or with --json one
JSON object per checkpoint and line. Each checkpoint's hypotheses are saved next to it as
``<checkpoint stem>.<set>.<search>.<tgt lang>``, where <set> is the split's set, or for
--src the file's stem and a short hash of its absolute path (``test-1a2b3c4d``: files of one
name in two folders do not overwrite each other's hypotheses), and <search> is ``beam<N>``
plus any non-default setting and precision (``beam5-alpha1-bf16``); or to --output for one
checkpoint. An unreadable checkpoint among several is reported and skipped (exit status 1 at
the end).

The length penalty α: --alpha sets it; --alpha-grid decodes the checkpoint's val split at
each α of the grid and scores the chosen split at the val-best one (as tmt-train's final
evaluation does); without either, a checkpoint named on the command line is decoded at the
α its run chose on val (from its results.json), else at the default.

A multilingual checkpoint (trained with ``data.pairs``) is scored in every direction it was
trained on, one row each; --pairs names others (zero-shot directions: the corpus files of
both languages must exist), and --pivot L translates each source to L first, then L to the
target, with the same model and search (the baseline of a zero-shot direction). With
--src/--ref, --tgt-lang names the target language (as for tmt-translate; a multilingual
checkpoint needs it).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any, cast

from omegaconf import OmegaConf

from transformer_mt.cli.common import (
    decoding_parser,
    exit_on_user_error,
    load_translator,
    parse_decoding_args,
    search_for,
)
from transformer_mt.data.corpus import read_lines
from transformer_mt.data.directions import corpora, fetch_raw, is_multilingual, languages
from transformer_mt.decoding.search import is_length_penalty
from transformer_mt.decoding.translator import Translator, freeze_loaded, source_prefix
from transformer_mt.errors import CheckpointError, CorpusError, UserError
from transformer_mt.evaluation.final import Decoded, EvalSet, decode_and_score, tune_alpha
from transformer_mt.evaluation.metrics import METRICS
from transformer_mt.formats.atomic import atomic_write_text
from transformer_mt.formats.checkpoint import checkpoint_step, step_checkpoints

TGT_LANG = "with tmt-evaluate --tgt-lang"  # how to name a multilingual model's target


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags of tmt-evaluate."""
    p = decoding_parser("tmt-evaluate", __doc__)
    p.add_argument(
        "checkpoints", type=Path, nargs="+", help="checkpoint files and/or run directories"
    )
    p.add_argument(
        "--split",
        choices=["val", "test"],
        default="val",
        help="the checkpoint's own corpus: val, or test (test_2016_flickr for Multi30k)",
    )
    p.add_argument("--src", type=Path, help="score this source file instead of a split")
    p.add_argument("--ref", type=Path, help="reference translations of --src, one per line")
    p.add_argument(
        "--tgt-lang",
        help="the target language of --src for a multilingual model (trained with data.pairs), "
        "e.g. de",
    )
    p.add_argument(
        "--metrics", default="bleu,chrf", help=f"comma-separated, of {', '.join(METRICS)}"
    )
    p.add_argument(
        "--alpha-grid",
        help="comma-separated α values: tune the length penalty on val, score at the best",
    )
    p.add_argument(
        "--pairs",
        help="comma-separated directions of a multilingual checkpoint, e.g. de-fr,fr-de "
        "(default: the ones it was trained on)",
    )
    p.add_argument("--pivot", help="translate through this language (multilingual checkpoint)")
    p.add_argument("--output", type=Path, help="hypotheses file (one checkpoint only)")
    p.add_argument("--json", action="store_true", help="one JSON object per checkpoint")
    args = parse_decoding_args(p, argv)
    if (args.src is None) != (args.ref is None):
        p.error("--src and --ref go together")
    if args.tgt_lang is not None and args.src is None:
        p.error("--tgt-lang goes with --src/--ref (a split is scored in its own directions)")
    args.metrics = tuple(m.strip() for m in args.metrics.split(",") if m.strip())
    unknown = [m for m in args.metrics if m not in METRICS]
    if unknown or not args.metrics:
        p.error(f"--metrics: unknown {unknown}; choose from {', '.join(METRICS)}")
    if args.pairs is not None:
        args.pairs = parse_pairs(p, args.pairs)
    if (args.pairs or args.pivot) and args.src is not None:
        p.error("--pairs and --pivot score the checkpoint's corpus, not --src/--ref")
    if args.alpha_grid is not None:
        args.alpha_grid = parse_alpha_grid(p, args.alpha_grid)
        if args.alpha is not None:
            p.error("--alpha and --alpha-grid exclude each other")
        if args.beam == 1:
            p.error("--alpha-grid needs beam search (greedy search has no length penalty)")
    return args


def parse_alpha_grid(p: argparse.ArgumentParser, text: str) -> list[float]:
    """``"0.6,1,1.4"`` -> [0.6, 1.0, 1.4]; each a finite α ≥ 0."""
    grid = []
    for item in text.split(","):
        try:
            alpha = float(item)
        except ValueError:
            p.error(f"--alpha-grid: '{item.strip()}' is not a number")
        if not is_length_penalty(alpha):
            p.error(f"--alpha-grid: α must be finite and ≥ 0, got {item.strip()}")
        grid.append(alpha)
    return grid


def parse_pairs(p: argparse.ArgumentParser, text: str) -> list[tuple[str, str]]:
    """``"de-fr,fr-de"`` -> [("de", "fr"), ("fr", "de")]."""
    pairs = []
    for item in (i.strip() for i in text.split(",")):
        src, sep, tgt = item.partition("-")
        if not sep or not src or not tgt or src == tgt:
            p.error(f"--pairs: '{item}' is not a direction like de-fr")
        pairs.append((src, tgt))
    return pairs


def source_name(src: Path) -> str:
    """The name of a --src file in its hypotheses file's name: its stem and a short hash of
    its absolute path (``test-1a2b3c4d``), so that sources of one name in different folders
    never share a hypotheses file. A pipe (``<(zcat x.gz)``) is named as given, not by the
    ``pipe:[inode]`` it resolves to, which changes from run to run."""
    where = src.resolve() if src.is_file() else src.absolute()
    digest = hashlib.sha1(str(where).encode("utf-8")).hexdigest()[:8]
    return f"{src.stem}-{digest}"


def expand_checkpoints(paths: list[Path]) -> list[tuple[Path, bool]]:
    """``(checkpoint, named)`` pairs: files as given (named: True); a run directory (or its
    checkpoints/ folder) becomes its step checkpoints plus any other .pt file there but
    last.pt, each file once: a hard link (best.pt, final.pt) to a file already listed is
    left out (named: False)."""
    out: list[tuple[Path, bool]] = []
    for path in paths:
        if not path.is_dir():
            out.append((path, True))
            continue
        directory = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        steps = step_checkpoints(directory)
        seen = {os.stat(p).st_ino for p in steps}
        others = []
        for p in sorted(directory.glob("*.pt")):
            inode = p.stat().st_ino
            if checkpoint_step(p) is None and p.name != "last.pt" and inode not in seen:
                others.append(p)
                seen.add(inode)
        if not steps and not others:
            raise CheckpointError(f"no checkpoints (*.pt) in {directory}")
        out += [(p, False) for p in steps + others]
    return out


def split_sets(
    data_cfg: Any,
    role: str,
    sources: dict[str, Any],
    pairs: list[tuple[str, str]] | None = None,
) -> list[EvalSet]:
    """The sets of ``role`` ("valid": one, "test": every test set) of the corpus a checkpoint
    was trained on (fetched if needed), one per direction (``pairs``, default the trained
    ones) for a multilingual checkpoint; read once per file pair."""
    if pairs is not None and not is_multilingual(data_cfg):
        raise UserError(
            "--pairs and --pivot need a multilingual checkpoint (trained with data.pairs)"
        )
    trained = set(languages(data_cfg))
    unknown = [lang for pair in pairs or () for lang in pair if lang not in trained]
    if unknown:
        raise UserError(f"--pairs: the checkpoint was not trained on language {unknown[0]!r}")
    fetch_raw(data_cfg)  # the trained languages: a zero-shot direction needs no others
    out = []
    for corpus in corpora(data_cfg, role, pairs):
        key = f"{corpus.src_path.resolve()}:{corpus.tgt_path.resolve()}"
        if key not in sources:
            target = corpus.tgt_lang if corpus.tag is not None else None
            sources[key] = EvalSet(corpus.label, *corpus.read(), tgt_lang=target)
        out.append(sources[key])
    return out


def through_pivot(
    translator: Translator, data: EvalSet, pivot: str, search: Any, batching: dict[str, Any]
) -> EvalSet:
    """``data`` with its sources translated into the ``pivot`` language first, to be
    translated from there into its target."""
    if data.tgt_lang is None:
        raise UserError("--pivot needs a multilingual checkpoint (trained with data.pairs)")
    best = dataclasses.replace(search, nbest=1)
    pivoted = translator.translate(data.sources, best, tgt_lang=pivot, **batching)
    return EvalSet(
        f"{data.name}.via-{pivot}", cast(list[str], pivoted), data.references, data.tgt_lang
    )


def evaluate_one(
    path: Path, args: argparse.Namespace, sources: dict[str, Any], named: bool = True
) -> list[dict[str, Any]]:
    """Translate the chosen file or split (every test set with ``--split test``) with one
    checkpoint, score it and save the hypotheses; one result per set. The α: --alpha, else
    tuned on val with --alpha-grid, else for a checkpoint ``named`` on the command line (not
    found in a run directory) the one its run chose, if any."""
    translator = load_translator(path, args)
    freeze_loaded()
    with translator:
        return _evaluate_with(translator, path, args, sources, named)


def _evaluate_with(
    translator: Translator,
    path: Path,
    args: argparse.Namespace,
    sources: dict[str, Any],
    named: bool,
) -> list[dict[str, Any]]:
    """:func:`evaluate_one` with the checkpoint at ``path`` loaded into ``translator``."""
    data_cfg = OmegaConf.create(translator.config["data"])
    if args.src is not None:
        # a language it translates into? (a multilingual model needs one)
        source_prefix(translator.tokenizer, translator.config["data"], args.tgt_lang, TGT_LANG)
        if "file" not in sources:
            src, ref = read_lines(args.src), read_lines(args.ref)
            for file, lines in ((args.src, src), (args.ref, ref)):
                if not lines:
                    raise CorpusError(f"{file} is empty: no sentences to score")
            if len(src) != len(ref):
                raise CorpusError(f"{args.src} has {len(src)} lines but {args.ref} has {len(ref)}")
            sources["file"] = EvalSet(args.src.stem, src, ref, args.tgt_lang)
        targets = [sources["file"]]
    else:
        role = "valid" if args.split == "val" else "test"
        targets = split_sets(data_cfg, role, sources, args.pairs)
        if not targets:
            raise UserError(f"--split test: {path} was trained with no test set (data.test)")
    if args.output is not None and len(targets) > 1:
        raise UserError(f"--output needs one set, but --split test has {len(targets)}")
    batching = {"batch_size": args.batch_size, "max_tokens": args.max_tokens}
    tuned: list[Decoded] | None = None  # val decoded at each α of --alpha-grid: the best
    valid: list[EvalSet] = []
    grid: dict[str, float] = {}
    if args.alpha_grid is not None:
        valid = split_sets(data_cfg, "valid", sources)  # the trained directions
        tuned, by_alpha = tune_alpha(
            translator, valid, args.search, args.alpha_grid, metrics=args.metrics, **batching
        )
        grid = {f"{a:g}": bleu for a, bleu in by_alpha.items()}
        search = tuned[0].options
    else:
        search = search_for(args, path, translator.step) if named else args.search
    results = []
    for target in targets:
        if args.pivot:
            target = through_pivot(translator, target, args.pivot, search, batching)
        if tuned is not None and any(target is v for v in valid):  # --split val: decoded
            decoded = tuned[[v is target for v in valid].index(True)]
        else:
            decoded = decode_and_score(translator, target, search, metrics=args.metrics, **batching)
        name = target.name if args.src is None else source_name(args.src)
        tag = search.tag() + ("" if translator.precision == "fp32" else f"-{translator.precision}")
        output = args.output or path.with_name(
            f"{path.stem}.{name}.{tag}.{target.tgt_lang or data_cfg.tgt_lang}"
        )
        atomic_write_text(output, "".join(h + "\n" for h in decoded.hypotheses))
        scores = {m: s for m, s in decoded.scores.items() if m in args.metrics}
        result: dict[str, Any] = {"checkpoint": str(path), "step": translator.step}
        result |= {"split": target.name, "beam": search.beam_size, "alpha": search.alpha}
        result["precision"] = translator.precision
        result |= {m: s.score for m, s in scores.items()}
        result["signatures"] = {m: s.signature for m, s in scores.items()}
        if "bleu" in scores:
            result["signature"] = scores["bleu"].signature
        if grid:
            result["alpha_grid"] = grid
        result |= {"n_sentences": len(decoded.hypotheses), "hypotheses": str(output)}
        results.append(result)
    return results


def format_table(results: list[dict[str, Any]], metrics: tuple[str, ...]) -> str:
    """A fixed-width table, one row per checkpoint and set, then the metrics' signatures."""
    width = max(len("checkpoint"), *(len(r["checkpoint"]) for r in results))
    split_width = max(len("set"), *(len(r["split"]) for r in results))
    header = f"{'checkpoint':<{width}}  {'set':<{split_width}}  {'step':>7}  {'α':>5}"
    lines = [header + "".join(f"  {m.upper():>6}" for m in metrics)]
    for r in results:
        alpha = f"{r['alpha']:5g}" if r["beam"] > 1 else f"{'–':>5}"  # greedy: no penalty
        row = f"{r['checkpoint']:<{width}}  {r['split']:<{split_width}}  {r['step']!s:>7}  {alpha}"
        lines.append(row + "".join(f"  {r[m]:6.2f}" for m in metrics))
    lines.append(f"beam {results[0]['beam']}")
    for r in {r["checkpoint"]: r for r in results}.values():
        if "alpha_grid" in r:
            grid = ", ".join(f"{a}: {b:.2f}" for a, b in r["alpha_grid"].items())
            lines.append(f"{r['checkpoint']}: val BLEU by α {grid}")
    lines += [f"{m} signature: {results[0]['signatures'][m]}" for m in metrics]
    return "\n".join(lines)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    """Evaluate every checkpoint given, print the table (or JSON lines)."""
    args = parse_args(argv)
    entries = expand_checkpoints(args.checkpoints)
    if args.output is not None and len(entries) > 1:
        raise CheckpointError(f"--output needs exactly one checkpoint, got {len(entries)}")
    sources: dict[str, Any] = {}
    results, failed = [], []
    for path, named in entries:  # a run directory's checkpoints all get one α
        try:
            rows = evaluate_one(path, args, sources, named=named)
        except CheckpointError as e:  # one bad file does not lose the others' scores
            if len(entries) == 1:
                raise
            print(f"error: {e}", file=sys.stderr, flush=True)
            failed.append(path)
            continue
        results += rows
        for row in rows if args.json else []:
            print(json.dumps(row), flush=True)
    if results and not args.json:
        print(format_table(results, args.metrics))
        for r in results:
            print(f"hypotheses: {r['hypotheses']}")
    if failed:
        raise CheckpointError(f"{len(failed)} of {len(entries)} checkpoints could not be read")


if __name__ == "__main__":
    main()
