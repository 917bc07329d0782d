"""Training speed of the architecture variants (``make bench-variants``): the trainer's update
step of the paper's model and of each ``model.*`` variant of the default recipe, on the same
real Multi30k batches, in one process; the variants alternate batch by batch, so all see the
same state of the machine. Prints target tokens/s, the ratio to the paper's model and
parameter counts. With
--json the last line is one JSON object. Timings are printed, never asserted.

    python scripts/bench_variants.py [--steps 20] [--warmup 3] [--json] [OVERRIDE ...]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from bench_train import timed_side_by_side  # scripts/ is the script's own directory
from transformer_mt.cli.common import config_dir, register_resolvers
from transformer_mt.data.batching import Batch, collate, token_batches
from transformer_mt.training.setup import TrainingSetup, build_training

# The rows of docs/experiments.md's variant table: name -> the variant keys that differ from the
# paper's model. Every row sets all three keys, so the rows do not depend on the recipe's
# default model; the one equal to it is marked "(default)".
PAPER = {"positions": "sinusoidal", "norm": "layernorm", "activation": "relu"}
VARIANTS: dict[str, dict[str, str]] = {
    "paper": {},
    "learned positions": {"positions": "learned"},
    "RoPE": {"positions": "rope"},
    "RMSNorm": {"norm": "rmsnorm"},
    "GELU": {"activation": "gelu"},
    "SwiGLU": {"activation": "swiglu"},
    "RoPE + GELU": {"positions": "rope", "activation": "gelu"},
    "RoPE + SwiGLU": {"positions": "rope", "activation": "swiglu"},
    "all three": {"positions": "rope", "norm": "rmsnorm", "activation": "swiglu"},
}


def variant_overrides(name: str) -> list[str]:
    """The Hydra overrides of row ``name``: all three variant keys."""
    return [f"model.{key}={value}" for key, value in (PAPER | VARIANTS[name]).items()]


def parse_args() -> argparse.Namespace:
    """The command-line flags; the module docstring is the help text."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=20, help="timed updates per variant")
    p.add_argument("--warmup", type=int, default=3, help="untimed updates per variant first")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--json", action="store_true", help="end with one JSON object")
    p.add_argument("overrides", nargs="*", help="Hydra overrides applied to every variant")
    return p.parse_args()


def compose_recipe(overrides: list[str]) -> DictConfig:
    """The default recipe's config with ``overrides``."""
    with initialize_config_dir(config_dir(), version_base="1.3"):
        return compose(
            "train", overrides=["trainer.final_eval=false", "trainer.resume=never", *overrides]
        )


def setup_variant(overrides: list[str]) -> TrainingSetup:
    """The trainer's objects for the default recipe with ``overrides`` (no run directory)."""
    cfg = compose_recipe(overrides)
    torch.manual_seed(cfg.seed)
    return build_training(cfg)


def main() -> None:
    """Time each variant's update step, batch by batch in turn, and print tokens/s and the
    ratio to the paper's model."""
    args = parse_args()
    torch.set_num_threads(args.threads)
    register_resolvers()
    setups = {name: setup_variant([*args.overrides, *variant_overrides(name)]) for name in VARIANTS}
    default = compose_recipe(args.overrides).model
    label = {
        name: f"{name} (default)" if all(default[k] == v for k, v in (PAPER | o).items()) else name
        for name, o in VARIANTS.items()
    }
    first = next(iter(setups.values()))
    tok, split = first.tokenizer, first.train_split
    rng = np.random.default_rng(first.cfg.seed)
    batches = token_batches(split.src_lengths, split.tgt_lengths, first.cfg.trainer.max_tokens, rng)
    batches = batches[: args.warmup + args.steps]

    def make(idx: np.ndarray) -> Batch:
        return collate(split, idx, tok.pad_id, tok.bos_id, tok.eos_id)

    def stepper(setup: TrainingSetup) -> Callable[[Batch], None]:
        return lambda b: setup.update([(b, 1.0)], b.n_tgt_tokens)

    step_s, _, tokens = timed_side_by_side(
        batches, make, {name: stepper(s) for name, s in setups.items()}, args.warmup, first.device
    )
    base = tokens / step_s["paper"]
    rows = [
        {
            "variant": label[name],
            "overrides": variant_overrides(name),
            "parameters": setups[name].model.num_parameters()[0],
            "tokens_per_s": tokens / step_s[name],
            "vs_paper": tokens / step_s[name] / base,
        }
        for name in setups
    ]
    print(
        f"{args.steps} timed updates per variant, {args.threads} threads, {tokens:,} target tokens"
    )
    print(f"{'variant':<30}{'parameters':>12}{'tokens/s':>10}{'× paper':>11}")
    for r in rows:
        print(
            f"{r['variant']:<30}{r['parameters']:>12,}{r['tokens_per_s']:>10,.0f}{r['vs_paper']:>11.2f}"
        )
    if args.json:
        print(json.dumps({"threads": args.threads, "steps": args.steps, "variants": rows}))


if __name__ == "__main__":
    main()
