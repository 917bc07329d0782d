"""tmt-evaluate: translate a test set with a checkpoint and score it with sacreBLEU and chrF.

tmt-evaluate runs/.../checkpoints/best.pt --split test --beam 5 --json
tmt-evaluate best.pt --src my.en --ref my.de
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from omegaconf import OmegaConf

from transformer_mt.cli.common import decoding_parser, exit_on_user_error, parse_decoding_args
from transformer_mt.data.corpus import read_lines
from transformer_mt.data.dataset import fetch_raw
from transformer_mt.decoding.translator import Translator
from transformer_mt.errors import CorpusError
from transformer_mt.evaluation import score
from transformer_mt.training.checkpoint import atomic_write_text
from transformer_mt.training.trainer import read_references


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags of tmt-evaluate."""
    p = decoding_parser("tmt-evaluate", __doc__)
    p.add_argument(
        "--split",
        choices=["val", "test"],
        default="val",
        help="the checkpoint's own corpus: val, or test (test_2016_flickr for Multi30k)",
    )
    p.add_argument(
        "--src", type=Path, help="score this source file instead of a split (needs --ref)"
    )
    p.add_argument("--ref", type=Path, help="reference translations of --src, one per line")
    p.add_argument(
        "--output",
        type=Path,
        help="where to write the hypotheses (default: next to the checkpoint)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parse_decoding_args(p, argv)
    if (args.src is None) != (args.ref is None):
        p.error("--src and --ref go together")
    return args


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    """Translate, score, print, and save the hypotheses."""
    args = parse_args(argv)
    translator = Translator.from_checkpoint(args.checkpoint, device=args.device)
    data_cfg = OmegaConf.create(translator.config["data"])
    if args.src is not None:
        src, ref = read_lines(args.src), read_lines(args.ref)
        if len(src) != len(ref):
            raise CorpusError(f"{args.src} has {len(src)} lines but {args.ref} has {len(ref)}")
        name = args.src.stem
    else:
        fetch_raw(data_cfg)
        src, ref = read_references(data_cfg, "valid" if args.split == "val" else "test")
        name = data_cfg.valid_split if args.split == "val" else data_cfg.test_split
    hyps = translator.translate(
        src, beam_size=args.beam, batch_size=args.batch_size, alpha=args.alpha
    )
    s = score(hyps, ref)
    output = args.output or args.checkpoint.with_name(
        f"{args.checkpoint.stem}.{name}.beam{args.beam}.{data_cfg.tgt_lang}"
    )
    atomic_write_text(output, "".join(h + "\n" for h in hyps))
    if args.json:
        print(
            json.dumps(
                {
                    "checkpoint": str(args.checkpoint),
                    "split": name,
                    "beam": args.beam,
                    "bleu": s.bleu,
                    "chrf": s.chrf,
                    "signature": s.bleu_signature,
                    "chrf_signature": s.chrf_signature,
                    "n_sentences": len(hyps),
                    "hypotheses": str(output),
                }
            )
        )
    else:
        print(
            f"{s.bleu_detail}\nchrF2 = {s.chrf:.2f}\nBLEU signature: {s.bleu_signature}\n"
            f"chrF signature: {s.chrf_signature}\nhypotheses: {output}",
            file=sys.stdout,
        )


if __name__ == "__main__":
    main()
