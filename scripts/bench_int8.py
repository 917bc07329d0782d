"""When does CTranslate2's int8 pay? fp32 against int8 CTranslate2 models of several widths.

For each ``--widths`` entry d, a model like the checkpoint's (for the default recipe's: 4+4
layers, rotary positions, GELU) but d wide, with heads of 32 and a feed-forward layer of 2·d,
over the checkpoint's SentencePiece vocabulary, is built with random weights, saved as a
checkpoint and exported twice with ``tmt-export``'s code: float32 and ``--quantization
int8``. Each export then translates the first ``--limit`` sentences of
test_2016_flickr (its SentencePiece pieces) with CTranslate2's own ``translate_batch``,
greedy and beam 5, batch 64, every hypothesis exactly ``--length`` tokens long (random
weights would otherwise decide the lengths), in a process of its own that loads no torch
(two OpenMP runtimes in one process slowed CTranslate2 2.5× here). The fp32 and int8 runs
take turns; each keeps its best of ``--repeat``. Printed: sentences/s and int8 ÷ fp32.

    .venv/bin/python scripts/bench_int8.py                      # widths 128, 256, 512
    .venv/bin/python scripts/bench_int8.py --widths 128,1024 --limit 200
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SEARCHES = {"greedy": 1, "beam 5": 5}


def parse_args() -> argparse.Namespace:
    """The command-line flags; the module docstring's first paragraph is the help text."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--checkpoint", type=Path, default=Path("runs/multi30k_en-de/default/checkpoints/final.pt")
    )
    p.add_argument("--widths", default="128,256,512", help="d_model values, comma-separated")
    p.add_argument("--limit", type=int, default=500, help="sentences of test_2016_flickr")
    p.add_argument("--length", type=int, default=20, help="tokens of every hypothesis")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # one export, timed on demand
    return p.parse_args()


def export_width(state: dict[str, Any], width: int, out: Path) -> dict[str, Path]:
    """A random model of ``width`` like that of the checkpoint ``state``, exported as float32
    and int8."""
    import torch  # only the parent process loads torch

    from transformer_mt.data.tokenizer import Tokenizer
    from transformer_mt.export.ctranslate2 import export_ctranslate2
    from transformer_mt.formats.checkpoint import save_checkpoint, spm_tensor_to_bytes
    from transformer_mt.model import build_model
    from transformer_mt.model.transformer import with_defaults

    tokenizer = Tokenizer(spm_tensor_to_bytes(state["spm_model"]))
    cfg = with_defaults(dict(state["config"]["model"]))
    cfg.update(d_model=width, n_heads=width // 32, d_ff=2 * width)
    torch.manual_seed(0)
    model = build_model(cfg, tokenizer.vocab_size, tokenizer.pad_id)
    config = {**state["config"], "model": cfg}
    path = out / f"d{width}.pt"
    save_checkpoint(path, {**state, "model": model.state_dict(), "config": config})
    exports = {}
    for name, quantization in (("fp32", None), ("int8", "int8")):
        exports[name] = out / f"d{width}_{name}"
        export_ctranslate2(path, exports[name], quantization=quantization)
    return exports


def worker(spec: dict[str, Any]) -> None:
    """Load one export (no torch here), then time one pass per line read from stdin."""
    import ctranslate2
    import sentencepiece as spm

    compute_type = "int8" if spec["name"] == "int8" else "float32"
    translator = ctranslate2.Translator(
        spec["export"], device="cpu", compute_type=compute_type, intra_threads=spec["threads"]
    )
    sp = spm.SentencePieceProcessor(model_file=spec["spm"])
    pieces = [sp.encode(s, out_type=str) for s in spec["sentences"]]

    def run(beam: int) -> float:
        start = time.perf_counter()
        translator.translate_batch(
            pieces,
            max_batch_size=64,
            beam_size=beam,
            min_decoding_length=spec["length"],
            max_decoding_length=spec["length"],
        )
        return time.perf_counter() - start

    if "torch" in sys.modules:  # two OpenMP runtimes in one process would slow CTranslate2
        sys.exit("error: the timing worker loaded torch")
    for beam in SEARCHES.values():
        run(beam)  # warm-up
    print("ready", flush=True)
    for line in sys.stdin:
        print(json.dumps(run(int(line))), flush=True)


def main() -> None:
    """Export each width in fp32 and int8 and time them in worker processes (``--worker``: be one)."""
    args = parse_args()
    if args.worker is not None:
        worker(json.loads(args.worker.read_text()))
        return
    try:
        widths = [int(w) for w in args.widths.split(",")]
    except ValueError:
        sys.exit(f"error: --widths {args.widths!r}: comma-separated integers, e.g. 128,256,512")
    if any(w <= 0 or w % 32 for w in widths):
        sys.exit(f"error: --widths {args.widths!r}: each a positive multiple of 32 (heads of 32)")
    if not args.checkpoint.is_file():
        sys.exit(
            f"error: {args.checkpoint} not found; train first (make train) or pass --checkpoint"
        )
    from omegaconf import OmegaConf

    from transformer_mt.data.directions import fetch_raw, read_references
    from transformer_mt.export.ctranslate2 import SPM_FILE
    from transformer_mt.formats.checkpoint import load_checkpoint

    state = load_checkpoint(args.checkpoint)
    data_cfg = OmegaConf.create(state["config"]["data"])
    fetch_raw(data_cfg)
    sentences = read_references(data_cfg, "test")[0][1][: args.limit]
    print(
        f"{len(sentences)} sentences of test, cpu, {args.threads} threads, batch 64, "
        f"{args.length} tokens each; best of {args.repeat}"
    )
    print(
        f"{'d_model':>7s} {'search':>7s} {'fp32 sent/s':>12s} {'int8 sent/s':>12s} {'int8/fp32':>10s}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for width in widths:
            exports = export_width(state, width, Path(tmp))
            procs = {}
            for name, export in exports.items():
                spec = Path(tmp) / f"{name}.json"
                spec.write_text(
                    json.dumps(
                        {
                            "name": name,
                            "export": str(export),
                            "spm": str(export / SPM_FILE),
                            "threads": args.threads,
                            "sentences": sentences,
                            "length": args.length,
                        }
                    )
                )
                procs[name] = subprocess.Popen(
                    [sys.executable, __file__, "--worker", str(spec)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                )
                assert procs[name].stdout.readline().strip() == "ready"
            for search, beam in SEARCHES.items():
                best = {name: float("inf") for name in procs}
                for _ in range(args.repeat):
                    for name, proc in procs.items():  # fp32 and int8 take turns
                        proc.stdin.write(f"{beam}\n")
                        proc.stdin.flush()
                        best[name] = min(best[name], json.loads(proc.stdout.readline()))
                fp32, int8 = (len(sentences) / best[n] for n in ("fp32", "int8"))
                print(
                    f"{width:7d} {search:>7s} {fp32:12.1f} {int8:12.1f} {int8 / fp32:9.2f}×",
                    flush=True,
                )
            for proc in procs.values():
                proc.stdin.close()
                proc.wait()


if __name__ == "__main__":
    main()
