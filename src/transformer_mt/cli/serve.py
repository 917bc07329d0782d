"""tmt-serve: translate over HTTP, with a web page that shows the attention.

    tmt-serve runs/multi30k_en-de/default/checkpoints/final.pt --port 8000
    tmt-serve exported/en-de --engine ctranslate2 --beam 4
    curl -s localhost:8000/translate -H 'content-type: application/json' \\
        -d '{"q": ["A dog runs.", "Two men talk."], "source": "en", "target": "de"}'

Endpoints: POST /translate (LibreTranslate's), POST /v1/translate (n-best with scores),
POST /v1/attention (every attention weight for one sentence; --engine torch), GET /health,
GET /metrics (Prometheus), GET /docs (OpenAPI), GET / (the web page). Sentences of concurrent
requests are decoded together, in batches of at most --max-batch-tokens source tokens; a
batch waits at most --batch-timeout-ms for the clients the last batch answered to send again
(see serve.batcher); each sentence gets what tmt-translate gives it. Decoding
flags are tmt-translate's and set the server's default search (a request may change the
beam, α and n-best); --max-tokens needs --engine torch. With --workers N, the batches of one
micro-batch (--batch-size sentences each) are decoded in N processes at once.
"""

from __future__ import annotations

import argparse
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from transformer_mt.cli.common import (
    decoding_parser,
    exit_on_user_error,
    load_export,
    load_translator,
    parse_decoding_args,
    search_for,
    search_for_export,
)
from transformer_mt.decoding.translator import freeze_loaded
from transformer_mt.errors import UserError
from transformer_mt.serve.engine import Engine, ctranslate2_engine, torch_engine


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags of tmt-serve."""
    p = decoding_parser("tmt-serve", __doc__)
    p.add_argument("checkpoint", type=Path, help="a checkpoint, or a tmt-export directory")
    p.add_argument("--engine", choices=["torch", "ctranslate2"], default="torch")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    s = p.add_argument_group("serving")
    s.add_argument("--max-batch-tokens", type=int, default=4096, help="source tokens per batch")
    s.add_argument(
        "--batch-timeout-ms",
        type=float,
        default=50.0,
        help="the longest a batch waits for the last batch's clients to send again",
    )
    s.add_argument("--max-chars", type=int, default=2000, help="characters per input")
    s.add_argument("--max-inputs", type=int, default=64, help="inputs per request")
    s.add_argument(
        "--max-attention-tokens",
        type=int,
        default=128,
        help="source subwords /v1/attention explains (its answer grows with their square)",
    )
    s.add_argument("--nbest", type=int, default=1, help="default n-best size")
    args = parse_decoding_args(p, argv)
    for flag in ("max_batch_tokens", "max_chars", "max_inputs", "max_attention_tokens", "port"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be ≥ 1")
    if args.batch_timeout_ms < 0:
        p.error("--batch-timeout-ms must be ≥ 0")
    if args.engine == "ctranslate2" and args.max_tokens is not None:
        p.error("--max-tokens needs --engine torch")
    return args


def load_engine(args: argparse.Namespace) -> Engine:
    """The model to serve; a missing or unreadable one is a UserError naming it."""
    if args.engine == "ctranslate2":
        if not args.checkpoint.is_dir():
            raise UserError(f"{args.checkpoint}: not a tmt-export directory")
        ct2 = load_export(args)
        return ctranslate2_engine(
            args.checkpoint, ct2, search_for_export(args, ct2), args.batch_size
        )
    translator = load_translator(args.checkpoint, args)
    translator.start()  # the workers load the model now, not at the first request
    search = search_for(args, args.checkpoint, translator.step)
    return torch_engine(translator, search, args.batch_size, args.max_tokens)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    """Load the model, then serve until interrupted."""
    args = parse_args(argv)
    # The model is loaded by the thread that will decode with it: torch's OpenMP threads
    # belong to the thread that first ran an op, and a second team of them (loading in the
    # main thread, decoding in another) made beam search 1.9 times slower here.
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode")
    engine = executor.submit(load_engine, args).result()
    import uvicorn

    from transformer_mt.serve.app import Limits, create_app

    limits = Limits(
        max_chars=args.max_chars,
        max_attention_tokens=args.max_attention_tokens,
        max_inputs=args.max_inputs,
        max_batch_tokens=args.max_batch_tokens,
        batch_timeout_ms=args.batch_timeout_ms,
    )
    print(
        f"serving {engine.model_path} ({', '.join(f'{a}→{b}' for a, b in engine.pairs)}, "
        f"{engine.name}, "
        f"beam {engine.options.beam_size}, α {engine.options.alpha:g}) on "
        f"http://{args.host}:{args.port}/",
        file=sys.stderr,
        flush=True,
    )
    app = create_app(engine, limits, executor)
    freeze_loaded()  # what is loaded now lives as long as the server
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
