"""Helpers shared by the console scripts: where the configs live, and clean error exits."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import OmegaConf

from transformer_mt.decoding.search import SearchOptions
from transformer_mt.decoding.translator import PRECISIONS, Translator
from transformer_mt.decoding.workers import PooledTranslator, threads_per_worker
from transformer_mt.errors import UserError
from transformer_mt.export.ctranslate2_engine import CTranslate2Translator
from transformer_mt.formats.results import tuned_alpha

F = TypeVar("F", bound=Callable[..., Any])

# Errors caused by the user's input or environment: one clear line and exit 1, no traceback.
USER_ERRORS = (UserError, OSError)


def config_dir() -> str:
    """Absolute path of the Hydra config tree (``$TMT_CONFIG_DIR`` or the repo's ``configs/``)."""
    return os.environ.get("TMT_CONFIG_DIR") or str(Path(__file__).resolve().parents[3] / "configs")


def run_name(overrides: str) -> str:
    """A directory name from Hydra's ``override_dirname``: "default" when empty, slashes
    replaced, long ones shortened with a hash so distinct commands keep distinct names."""
    name = overrides.replace("/", "_") or "default"
    if len(name) > 150:
        name = f"{name[:120]}_{hashlib.sha1(name.encode()).hexdigest()[:10]}"
    return name


def register_resolvers() -> None:
    """The config resolvers our YAML uses: ``${tmt.run_name:...}``."""
    if not OmegaConf.has_resolver("tmt.run_name"):
        OmegaConf.register_new_resolver("tmt.run_name", run_name)


def exit_on_user_error(fn: F) -> F:
    """Turn the errors in USER_ERRORS into ``error: <message>`` on stderr and exit status 1."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)

    return wrapper  # type: ignore[return-value]


def decoding_parser(prog: str, description: str | None) -> argparse.ArgumentParser:
    """An argument parser with the decoding flags tmt-translate and tmt-evaluate share."""
    p = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    g = p.add_argument_group("search")
    search = g.add_mutually_exclusive_group()
    search.add_argument("--beam", type=int, help="beam size (default 5); 1 = greedy")
    search.add_argument("--greedy", action="store_true", help="greedy search (same as --beam 1)")
    g.add_argument(
        "--alpha",
        type=float,
        help="length penalty α; 0 = off (default: the α the checkpoint's run tuned on val, "
        "from its results.json, or for an export the one tmt-export recorded; else "
        f"{SearchOptions.alpha:g})",
    )
    g.add_argument(
        "--max-len-a", type=float, default=1.5, help="output budget a·src_len + b: a (default 1.5)"
    )
    g.add_argument("--max-len-b", type=int, default=10, help="output budget: b (default 10)")
    g.add_argument("--min-len", type=int, default=1, help="minimum output tokens incl. EOS")
    g.add_argument(
        "--no-repeat-ngram", type=int, default=0, help="forbid repeating n-grams of this size"
    )
    b = p.add_argument_group("batching and device")
    b.add_argument("--batch-size", type=int, default=64, help="sentences per batch (default 64)")
    b.add_argument("--max-tokens", type=int, help="also cap a batch at this many source tokens")
    b.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    b.add_argument(
        "--precision",
        choices=PRECISIONS,
        help="compute in fp32 (default), or multiply in bf16 or fp16 (CUDA) against a copy of "
        "the weights in that type; with --engine ctranslate2 its compute type (default: the "
        "export's)",
    )
    b.add_argument(
        "--workers",
        type=int,
        default=1,
        help="decode the batches in N processes sharing the threads (CPU; default 1): "
        "the translations of one process, faster on several cores (docs/decoding.md); "
        "with --engine ctranslate2 its inter_threads",
    )
    return p


# --precision as a CTranslate2 compute type (None: the one the export was written with)
CT2_COMPUTE_TYPES = {None: "default", "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def load_translator(path: Path, args: argparse.Namespace) -> PooledTranslator:
    """The checkpoint at ``path`` on --device in --precision, decoding in --workers
    processes (one: in this one); use it in a ``with`` block, which stops them."""
    translator = Translator.from_checkpoint(
        path, device=args.device, precision=args.precision or "fp32"
    )
    return PooledTranslator(translator, args.workers)


def load_export(args: argparse.Namespace) -> CTranslate2Translator:
    """The tmt-export directory ``args.checkpoint`` on --device in --precision's compute
    type, its --workers as CTranslate2's ``inter_threads`` (threads shared out)."""
    return CTranslate2Translator.from_dir(
        args.checkpoint,
        device=args.device,
        compute_type=CT2_COMPUTE_TYPES[args.precision],
        intra_threads=threads_per_worker(args.workers) if args.workers > 1 else 0,
        inter_threads=args.workers,
    )


# The sampling flags (see add_sampling_flags), their SearchOptions fields and defaults.
SAMPLING_FLAGS = {
    "--topk": ("topk", SearchOptions.topk),
    "--topp": ("topp", SearchOptions.topp),
    "--temperature": ("temperature", SearchOptions.temperature),
    "--seed": ("seed", SearchOptions.seed),
}


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    """The flags of sampling instead of searching (for back-translation): --sample and the
    settings that only go with it (``parse_decoding_args`` checks them)."""
    g = p.add_argument_group("sampling (back-translation; see docs/decoding.md)")
    g.add_argument(
        "--sample",
        action="store_true",
        help="draw each token from the model's distribution instead of searching; "
        "--nbest N gives N independent samples",
    )
    g.add_argument(
        "--topk", type=int, help="sample from the K most probable tokens (default 0 = all)"
    )
    g.add_argument(
        "--topp",
        type=float,
        help="then from the nucleus of probability mass P (default 1.0 = all)",
    )
    g.add_argument(
        "--temperature", type=float, help="divide the logits by T before sampling (default 1.0)"
    )
    g.add_argument(
        "--seed",
        type=int,
        help=f"random seed (default {SearchOptions.seed}): the same seed and input give the "
        "same samples, at any batch size",
    )


def sampling_settings(p: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, Any]:
    """The SearchOptions fields of the sampling flags (none without --sample); a sampling
    flag without --sample, or a search flag with it, is a usage error naming the flag."""
    if not getattr(args, "sample", False):
        for flag, (name, _) in SAMPLING_FLAGS.items():
            if getattr(args, name, None) is not None:
                p.error(f"{flag} needs --sample")
        return {}
    if args.greedy or (args.beam is not None and args.beam != 1):
        given = "--greedy" if args.greedy else f"--beam {args.beam}"
        p.error(f"{given} and --sample exclude each other (--nbest N gives N samples)")
    if args.alpha is not None:
        p.error("--alpha is a beam search setting; --sample has no length penalty")
    args.beam = 1
    settings: dict[str, Any] = {"sample": True}
    for name, default in SAMPLING_FLAGS.values():
        settings[name] = default if getattr(args, name) is None else getattr(args, name)
    return settings


def parse_decoding_args(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse ``argv``; checks the decoding flags (and the sampling flags, where the parser
    has them) and puts them together in ``args.search`` (a SearchOptions; without --alpha,
    ``args.alpha`` stays None: see ``search_for``)."""
    args = p.parse_args(argv)
    sampling = sampling_settings(p, args)
    if args.greedy:
        args.beam = 1
    if args.beam is None:
        args.beam = 5
    if args.batch_size < 1:
        p.error("--batch-size must be ≥ 1")
    if args.max_tokens is not None and args.max_tokens < 1:
        p.error("--max-tokens must be ≥ 1")
    if args.workers < 1:
        p.error("--workers must be ≥ 1")
    try:
        args.search = SearchOptions(
            beam_size=args.beam,
            alpha=SearchOptions.alpha if args.alpha is None else args.alpha,
            max_len_a=args.max_len_a,
            max_len_b=args.max_len_b,
            min_len=args.min_len,
            no_repeat_ngram=args.no_repeat_ngram,
            nbest=getattr(args, "nbest", 1),
            **sampling,
        )
    except ValueError as e:
        p.error(str(e))
    return args


def search_for(args: argparse.Namespace, checkpoint: Path, step: int | None) -> SearchOptions:
    """``args.search`` for ``checkpoint`` at ``step``: without --alpha, with the α its run
    chose on val (:func:`~transformer_mt.formats.results.tuned_alpha`) where there is one
    (sampling has no length penalty)."""
    return _with_tuned_alpha(args, lambda beam_size: tuned_alpha(checkpoint, step, beam_size))


def search_for_export(args: argparse.Namespace, export: CTranslate2Translator) -> SearchOptions:
    """``args.search`` for a tmt-export directory, as :func:`search_for` for its checkpoint:
    without --alpha, with the α the checkpoint's run chose on val, as tmt-export recorded it
    (:meth:`~transformer_mt.export.ctranslate2_engine.CTranslate2Translator.tuned_alpha`)."""
    return _with_tuned_alpha(args, export.tuned_alpha)


def _with_tuned_alpha(
    args: argparse.Namespace, tuned: Callable[[int], float | None]
) -> SearchOptions:
    """``args.search``; without --alpha (and not sampling), at the α ``tuned(beam size)``
    gives, where it gives one."""
    if args.alpha is not None or args.search.sample:
        return args.search
    alpha = tuned(args.search.beam_size)
    return args.search if alpha is None else dataclasses.replace(args.search, alpha=alpha)
