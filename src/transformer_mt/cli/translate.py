"""tmt-translate: translate raw sentences, one per line, with a checkpoint.

    echo "A man is riding a bike." | tmt-translate best.pt --beam 5
    tmt-translate best.pt --greedy --input in.en --output out.de

Every input line gives exactly one output line, in order; an empty line gives an empty
line. Invalid UTF-8 is replaced (with a warning); inputs longer than the model's
positions are truncated. Input is read and translated in chunks, so memory stays bounded.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from transformer_mt.cli.common import decoding_parser, exit_on_user_error, parse_decoding_args
from transformer_mt.decoding.translator import Translator
from transformer_mt.training.checkpoint import atomic_write_bytes

CHUNK_LINES = 2000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags of tmt-translate."""
    p = decoding_parser("tmt-translate", __doc__)
    p.add_argument("--input", type=Path, help="input file (default: stdin)")
    p.add_argument("--output", type=Path, help="output file, written atomically (default: stdout)")
    return parse_decoding_args(p, argv)


def read_chunks(stream: BinaryIO, name: str) -> Iterator[list[str]]:
    """Lines of a byte stream in chunks; invalid UTF-8 is replaced with U+FFFD and reported."""
    chunk: list[str] = []
    for number, raw in enumerate(stream, start=1):
        line = raw.rstrip(b"\n").rstrip(b"\r")
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            text = line.decode("utf-8", errors="replace")
            print(f"warning: {name}:{number}: invalid UTF-8 replaced", file=sys.stderr)
        chunk.append(text)
        if len(chunk) >= CHUNK_LINES:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def translate_stream(
    translator: Translator,
    chunks: Iterator[list[str]],
    out: BinaryIO,
    beam: int,
    batch_size: int,
    alpha: float,
) -> None:
    """Translate chunk by chunk, writing one UTF-8 line per input line and flushing each chunk."""
    for lines in chunks:
        stripped = [line.strip() for line in lines]
        hyps = translator.translate(stripped, beam_size=beam, batch_size=batch_size, alpha=alpha)
        out.write("".join(h + "\n" for h in hyps).encode("utf-8"))
        out.flush()


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    """Translate stdin (or --input) to stdout (or --output)."""
    args = parse_args(argv)
    translator = Translator.from_checkpoint(args.checkpoint, device=args.device)
    if args.input is not None and not args.input.is_file():
        raise FileNotFoundError(f"input file not found: {args.input}")
    with open(args.input, "rb") if args.input else sys.stdin.buffer as stream:
        chunks = read_chunks(stream, str(args.input or "<stdin>"))

        def write(out: BinaryIO) -> None:
            translate_stream(translator, chunks, out, args.beam, args.batch_size, args.alpha)

        if args.output is None:
            write(sys.stdout.buffer)
        else:  # streamed into a temporary file, renamed over --output only when complete
            atomic_write_bytes(args.output, write)


if __name__ == "__main__":
    main()
