"""tmt-export: export a checkpoint for another inference engine (CTranslate2).

    tmt-export runs/.../checkpoints/best.pt --format ctranslate2 exported/en-de
    tmt-export averaged.pt exported/en-de-int8 --quantization int8 --force

OUT_DIR gets CTranslate2's model.bin, config.json and shared_vocabulary.json, plus spm.model
(the SentencePiece model) and transformer_mt.json (languages, source checkpoint, positions,
and the α the checkpoint's run chose on val by beam size: tmt-translate and tmt-serve decode
the export at it without --alpha).
It is written to a temporary sibling directory and renamed into place; an existing non-empty
OUT_DIR is replaced only with --force. Translate with it from Python:

    from transformer_mt.decoding import SearchOptions
    from transformer_mt.export.ctranslate2_engine import CTranslate2Translator
    ct2 = CTranslate2Translator.from_dir("exported/en-de")
    ct2.translate(["A man is riding a bike."], SearchOptions(beam_size=5))
"""

from __future__ import annotations

import argparse
from pathlib import Path

from transformer_mt.cli.common import exit_on_user_error
from transformer_mt.export.ctranslate2 import QUANTIZATIONS, export_ctranslate2


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line of tmt-export."""
    p = argparse.ArgumentParser(
        prog="tmt-export",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "checkpoint",
        type=Path,
        metavar="CKPT",
        help="a checkpoint written by tmt-train/tmt-average",
    )
    p.add_argument("output_dir", type=Path, metavar="OUT_DIR", help="the model directory to write")
    p.add_argument(
        "--format", choices=["ctranslate2"], default="ctranslate2", help="(default ctranslate2)"
    )
    p.add_argument(
        "--quantization",
        choices=QUANTIZATIONS,
        help="weight type (default: float32, as trained)",
    )
    p.add_argument("--force", action="store_true", help="replace OUT_DIR if it is not empty")
    return p.parse_args(argv)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    """Export the checkpoint and list what was written."""
    args = parse_args(argv)
    out = export_ctranslate2(args.checkpoint, args.output_dir, args.quantization, args.force)
    weights = args.quantization or "float32"
    print(f"exported {args.checkpoint} to {out} (CTranslate2, {weights} weights):")
    for path in sorted(out.iterdir()):
        print(f"  {path.name:<24} {path.stat().st_size:>12,} bytes")


if __name__ == "__main__":
    main()
