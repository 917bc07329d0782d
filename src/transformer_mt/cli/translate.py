"""tmt-translate: translate raw sentences, one per line, with a checkpoint.

    echo "A man is riding a bike." | tmt-translate best.pt --beam 5
    tmt-translate best.pt --greedy --input in.en --output out.de
    tmt-translate best.pt --interactive              # one line in, one line out, at once
    tmt-translate best.pt --nbest 5 < in.en          # 5 scored hypotheses per line
    tmt-translate multilingual.pt --tgt-lang fr < in.de   # a model trained with data.pairs
    tmt-translate exported/en-de --engine ctranslate2 < in.en   # a tmt-export directory
    tmt-translate ckpt_de-en.pt --sample --topk 10 --seed 1 < mono.de > synthetic.en
                                                     # back-translation (docs/decoding.md)

Every input line gives exactly one output line, in order; an empty or whitespace-only line
gives an empty line. Invalid UTF-8 is replaced (with a warning naming the line); inputs
longer than the model's positions are truncated (with a warning naming the line). Input is
read and translated in chunks, so memory stays bounded on any file size.

With --nbest K each input line gives K lines (fewer if the search finished fewer
hypotheses; one for an empty line), best first, tab-separated:
    <input line number>  <rank>  <score>  <log-probability>  <translation>
where score is the log-probability divided by the length penalty.

With --sample each token is drawn from the model's distribution (after --temperature, --topk
and --topp) instead of searched for: the standard way to make synthetic sources for
back-translation. The same --seed and input give the same output, whatever --batch-size,
--max-tokens or --interactive; --nbest N gives N independent samples per line, sorted by
log-probability (score = log-probability: no length penalty).

With --attention-html FILE, FILE is one self-contained page exploring every attention weight
(encoder, decoder, cross; each layer and head) of every translated line, as tmt-serve's page.

With --attention-dir DIR, each translated line N also gets DIR/<N>.png, N zero-padded to six
digits (line 1: DIR/000001.png; a heatmap of the decoder→encoder attention, subwords on the
axes) and DIR/<N>.npy (the weights; rows sum to 1): the last decoder layer, averaged over
heads, unless --attention-layer/-head (which need --attention-dir) say.

Without --alpha, beam search uses the α the checkpoint's run chose on val (from its
results.json; for a tmt-export directory, the one tmt-export recorded), else the default.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from transformer_mt.cli.common import (
    add_sampling_flags,
    decoding_parser,
    exit_on_user_error,
    load_export,
    load_translator,
    parse_decoding_args,
    search_for,
    search_for_export,
)
from transformer_mt.decoding.attention_maps import (
    attention_item,
    check_selection,
    write_attention_map,
)
from transformer_mt.decoding.beam import Hypothesis
from transformer_mt.decoding.translator import (
    Translator,
    encode_to_fit,
    freeze_loaded,
    source_prefix,
)
from transformer_mt.export.ctranslate2_engine import CTranslate2Translator
from transformer_mt.formats.atomic import atomic_write_bytes, atomic_write_text
from transformer_mt.serve.html import standalone_html

CHUNK_LINES = 2000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags of tmt-translate."""
    p = decoding_parser("tmt-translate", __doc__)
    p.add_argument(
        "checkpoint",
        type=Path,
        help="a checkpoint (tmt-train/tmt-average), or a tmt-export directory with --engine",
    )
    p.add_argument(
        "--engine",
        choices=["torch", "ctranslate2"],
        default="torch",
        help="torch (this project's search) or ctranslate2 (a tmt-export directory)",
    )
    p.add_argument(
        "--tgt-lang",
        help="the target language of a multilingual model (trained with data.pairs), e.g. de",
    )
    p.add_argument("--input", type=Path, help="input file (default: stdin)")
    p.add_argument("--output", type=Path, help="output file, written atomically (default: stdout)")
    p.add_argument(
        "--nbest",
        type=int,
        default=1,
        help="print the K best hypotheses (≤ --beam), or with --sample K samples",
    )
    p.add_argument(
        "--interactive",
        action="store_true",
        help="translate each line as soon as it is read and flush it (terminal or pipe)",
    )
    p.add_argument("--attention-dir", type=Path, help="write cross-attention maps here")
    p.add_argument(
        "--attention-layer", type=int, help="the maps' decoder layer (default -1: the last)"
    )
    p.add_argument("--attention-head", type=int, help="the maps' head (default: mean of all)")
    p.add_argument(
        "--attention-html",
        type=Path,
        help="write the attention explorer of every translated line to this HTML file "
        "(self-contained; for a handful of lines)",
    )
    add_sampling_flags(p)
    args = parse_decoding_args(p, argv)
    if args.interactive and args.output is not None:
        p.error("--interactive writes to stdout; drop --output")
    if args.interactive and args.workers > 1:
        p.error("--interactive decodes one line at a time: --workers would leave all but one idle")
    selection = {"--attention-layer": args.attention_layer, "--attention-head": args.attention_head}
    for flag, value in selection.items():  # they choose what --attention-dir's maps show
        if value is not None and args.attention_dir is None:
            p.error(f"{flag} needs --attention-dir")
    if args.attention_layer is None:
        args.attention_layer = -1
    if args.engine == "ctranslate2" and (
        args.nbest > 1
        or args.attention_dir is not None
        or args.attention_html is not None
        or args.max_tokens is not None
    ):
        p.error("--nbest, --attention-dir, --attention-html and --max-tokens need --engine torch")
    return args


def decode_line(raw: bytes, name: str, number: int) -> str:
    """One input line as text; invalid UTF-8 is replaced with U+FFFD and reported."""
    line = raw.rstrip(b"\n").rstrip(b"\r")
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError:
        print(f"warning: {name}:{number}: invalid UTF-8 replaced", file=sys.stderr)
        return line.decode("utf-8", errors="replace")


def read_chunks(stream: BinaryIO, name: str, size: int = CHUNK_LINES) -> Iterator[list[str]]:
    """The lines of a byte stream, ``size`` at a time (1 = as soon as each line arrives)."""
    chunk: list[str] = []
    number = 0
    while raw := stream.readline():
        number += 1
        chunk.append(decode_line(raw, name, number))
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def format_hypotheses(
    translator: Translator, hyps: list[list[Hypothesis]], first_line: int, nbest: int
) -> str:
    """Output text: the best translation per line, or the n-best format of the module doc."""
    if nbest == 1:
        return "".join(t + "\n" for t in translator.tokenizer.decode([h[0].tokens for h in hyps]))
    out = []
    for offset, candidates in enumerate(hyps):
        texts = translator.tokenizer.decode([h.tokens for h in candidates])
        for rank, (h, text) in enumerate(zip(candidates, texts, strict=True), start=1):
            out.append(f"{first_line + offset}\t{rank}\t{h.score:.4f}\t{h.log_prob:.4f}\t{text}\n")
    return "".join(out)


def write_attention_maps(
    translator: Translator,
    lines: list[str],
    hyps: list[list[Hypothesis]],
    first_line: int,
    args: argparse.Namespace,
) -> None:
    """``<line>.png`` and ``<line>.npy`` in --attention-dir for every non-empty line."""
    tok = translator.tokenizer
    for offset, (src_ids, candidates) in enumerate(
        zip(source_ids(translator, lines, args), hyps, strict=True)
    ):
        if src_ids:
            write_attention_map(
                args.attention_dir,
                f"{first_line + offset:06d}",
                translator.model,
                tok,
                src_ids,
                candidates[0].tokens,
                args.attention_layer,
                args.attention_head,
            )


def source_ids(
    translator: Translator, lines: list[str], args: argparse.Namespace
) -> list[list[int]]:
    """The source ids the model read for ``lines``: cut to fit, led by the --tgt-lang tag of
    a multilingual model (for attention maps, without a second truncation warning)."""
    prefix = translator.source_prefix(args.tgt_lang)
    return encode_to_fit(
        translator.tokenizer, lines, translator.model.max_positions, lambda i, n: None, prefix
    )


def truncation_warning(name: str, first: int, limit: int) -> Callable[[int, int], None]:
    """The ``on_truncate`` of a chunk whose first line is line ``first`` of input ``name``:
    a warning naming the line and ``limit``, the subwords the model reads of one (its
    positions less EOS and a multilingual model's language tag)."""

    def warn(index: int, length: int) -> None:
        print(
            f"warning: {name}:{first + index}: {length} subwords, more than the model's "
            f"{limit}; truncated",
            file=sys.stderr,
        )

    return warn


def translate_stream(
    translator: Translator,
    chunks: Iterator[list[str]],
    out: BinaryIO,
    args: argparse.Namespace,
    name: str,
    explored: list[dict] | None = None,
) -> None:
    """Translate chunk by chunk, writing UTF-8 lines and flushing after every chunk; with
    ``explored``, append each translated line's attention to it (--attention-html)."""
    options = args.search
    limit = translator.model.max_positions - 1 - len(translator.source_prefix(args.tgt_lang))
    first = 1
    for lines in chunks:
        stripped = [line.strip() for line in lines]
        hyps = translator.translate_ids(
            stripped,
            options,
            batch_size=args.batch_size,
            max_tokens=args.max_tokens,
            on_truncate=truncation_warning(name, first, limit),
            first_index=first - 1,
            tgt_lang=args.tgt_lang,
        )
        out.write(format_hypotheses(translator, hyps, first, options.nbest).encode("utf-8"))
        out.flush()
        if args.attention_dir is not None:
            write_attention_maps(translator, stripped, hyps, first, args)
        if explored is not None:
            tok = translator.tokenizer
            for offset, (src_ids, candidates) in enumerate(
                zip(source_ids(translator, stripped, args), hyps, strict=True)
            ):
                if src_ids:
                    item = attention_item(translator.model, tok, src_ids, candidates[0].tokens)
                    explored.append(item | {"line": first + offset})
        first += len(lines)


def translate_stream_ctranslate2(
    translator: CTranslate2Translator,
    chunks: Iterator[list[str]],
    out: BinaryIO,
    args: argparse.Namespace,
    name: str,
) -> None:
    """The same contract through CTranslate2: one line out per line in, flushed per chunk,
    truncation warnings naming the line."""
    prefix = source_prefix(translator.tokenizer, translator.data, args.tgt_lang)
    limit = translator.max_positions - 1 - len(prefix)
    first = 1
    for lines in chunks:
        hyps = translator.translate(
            [line.strip() for line in lines],
            args.search,
            batch_size=args.batch_size,
            tgt_lang=args.tgt_lang,
            on_truncate=truncation_warning(name, first, limit),
        )
        out.write("".join(h + "\n" for h in hyps).encode("utf-8"))
        out.flush()
        first += len(lines)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    """Translate stdin (or --input) to stdout (or --output)."""
    args = parse_args(argv)
    if args.engine == "ctranslate2":
        ct2 = load_export(args)
        source_prefix(ct2.tokenizer, ct2.data, args.tgt_lang)  # a language it translates into?
        search = search_for_export(args, ct2)
    else:
        translator = load_translator(args.checkpoint, args)
        translator.source_prefix(args.tgt_lang)  # a language it translates into?
        search = search_for(args, args.checkpoint, translator.step)
        if args.attention_dir is not None:
            check_selection(translator.model, args.attention_layer, args.attention_head)
    freeze_loaded()
    if search is not args.search:
        print(f"α {search.alpha:g}, chosen by the checkpoint's run", file=sys.stderr)
    args.search = search
    if args.input is not None and not args.input.exists():  # a pipe will do: <(zcat x.gz)
        raise FileNotFoundError(f"input file not found: {args.input}")
    if args.input is not None and args.input.is_dir():
        raise IsADirectoryError(f"--input {args.input} is a directory, not a file")
    name = str(args.input or "<stdin>")
    explored: list[dict] | None = [] if args.attention_html is not None else None
    with (
        open(args.input, "rb") if args.input else sys.stdin.buffer as stream,
        translator if args.engine == "torch" else contextlib.nullcontext(),
    ):
        chunks = read_chunks(stream, name, 1 if args.interactive else CHUNK_LINES)

        def write(out: BinaryIO) -> None:
            if args.engine == "ctranslate2":
                translate_stream_ctranslate2(ct2, chunks, out, args, name)
            else:
                translate_stream(translator, chunks, out, args, name, explored)

        if args.output is None:
            write(sys.stdout.buffer)
        else:  # streamed into a temporary file, renamed over --output only when complete
            atomic_write_bytes(args.output, write)
    if explored is not None:
        html = standalone_html(explored, f"attention: {args.checkpoint.name}")
        atomic_write_text(args.attention_html, html)


if __name__ == "__main__":
    main()
