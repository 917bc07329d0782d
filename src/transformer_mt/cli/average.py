"""tmt-average: average checkpoints into a new one that tmt-evaluate/tmt-translate accept.

tmt-average runs/multi30k_en-de/default --last 5 -o averaged.pt
tmt-average a.pt b.pt c.pt -o averaged.pt
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from transformer_mt.cli.common import exit_on_user_error
from transformer_mt.errors import UserError
from transformer_mt.formats.checkpoint import save_checkpoint
from transformer_mt.training.averaging import average_checkpoints, last_checkpoints


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line of tmt-average."""
    p = argparse.ArgumentParser(
        prog="tmt-average",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("inputs", type=Path, nargs="+", help="checkpoint files, or one run directory")
    p.add_argument("-o", "--output", type=Path, required=True, help="the averaged checkpoint")
    p.add_argument("--last", type=int, default=5, help="with a run directory: average its last N")
    p.add_argument("--force", action="store_true", help="overwrite OUTPUT if it exists")
    args = p.parse_args(argv)
    if args.last < 1:
        p.error("--last must be ≥ 1")
    return args


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    """Average the checkpoints and write the result atomically."""
    args = parse_args(argv)
    if args.output.exists() and not args.force:
        raise UserError(f"{args.output} exists; pass --force to overwrite it")
    if len(args.inputs) == 1 and args.inputs[0].is_dir():
        paths = last_checkpoints(args.inputs[0], args.last)
    else:
        paths = args.inputs
    state = average_checkpoints(paths)
    save_checkpoint(args.output, state)
    n = sum(t.numel() for t in state["model"].values() if isinstance(t, torch.Tensor))
    print(f"averaged {len(paths)} checkpoints ({n:,} values) into {args.output}:")
    for path in paths:
        print(f"  {path}")


if __name__ == "__main__":
    main()
