"""Training benchmark (``make bench``): this project's training step against a plain
``torch.nn.Transformer`` loop, same model dimensions, same real Multi30k batches, one process;
the two alternate batch by batch, so both see the same state of the machine.

Prints target tokens/s of each, their ratio, peak memory, achieved model FLOP/s
(6 · N · tokens/s, N = parameters including the output projection) and its ratio to a
matrix-multiply peak measured in the same run for the precision used (MFU; the best of
measurements before and after the timed updates, so a slow stretch cannot inflate it), the
padding fraction of the batches, the fraction of time the loop waits for batches, which are
built in a background thread as in training (data wait), and on CUDA the host syncs per
update. On CUDA the device is synchronized around every timed step.
With --json the last line is one JSON object. Timings are printed, never asserted.

    python scripts/bench_train.py [--steps 30] [--warmup 5] [--precision fp32|bf16] [--json]
    python scripts/bench_train.py --device cuda --precision bf16 model=base
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import time
import warnings
from collections.abc import Callable

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from torch import nn

from transformer_mt.cli.common import config_dir, register_resolvers
from transformer_mt.data.batching import Batch, collate, token_batches
from transformer_mt.data.loader import Prefetcher
from transformer_mt.device import HALF_TYPES
from transformer_mt.training.precision import autocast
from transformer_mt.training.setup import build_training


def parse_args() -> argparse.Namespace:
    """The command-line flags; the module docstring is the help text."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=30, help="timed updates per side")
    p.add_argument("--warmup", type=int, default=5, help="untimed updates per side first")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument(
        "--precision",
        choices=["fp32", "tf32", "bf16", "fp16"],
        default="fp32",
        help="trainer.precision of both sides (tf32 and fp16: CUDA only)",
    )
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--json", action="store_true", help="end with one JSON object")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for the model/data/trainer")
    return p.parse_args()


class Reference(nn.Module):
    """The plain loop's model: embeddings + sinusoidal positions + ``nn.Transformer`` + a
    tied output projection, with the same dimensions as ours."""

    def __init__(
        self, vocab: int, d: int, heads: int, enc: int, dec: int, ff: int, p: float
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d, padding_idx=0)
        self.scale = math.sqrt(d)
        pos = torch.arange(512)[:, None] * torch.exp(torch.arange(0, d, 2) * (-math.log(1e4) / d))
        pe = torch.zeros(512, d)
        pe[:, 0::2], pe[:, 1::2] = torch.sin(pos), torch.cos(pos)
        self.register_buffer("pe", pe)
        self.transformer = nn.Transformer(
            d, heads, enc, dec, ff, p, batch_first=True, norm_first=True
        )
        self.out = nn.Linear(d, vocab, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, V) of the target prefix ``tgt`` given the source ``src``."""
        s = self.embed(src) * self.scale + self.pe[: src.size(1)]
        t = self.embed(tgt) * self.scale + self.pe[: tgt.size(1)]
        causal = nn.Transformer.generate_square_subsequent_mask(tgt.size(1))
        y = self.transformer(
            s,
            t,
            tgt_mask=causal,
            src_key_padding_mask=src == 0,
            tgt_key_padding_mask=tgt == 0,
            memory_key_padding_mask=src == 0,
            tgt_is_causal=True,
        )
        return self.out(y)


def matmul_peak(device: torch.device, precision: str, n: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of an n×n matrix multiply at ``precision`` on ``device``, best of a few runs
    (fp32 with IEEE matmuls, tf32 with TF32 tensor cores, bf16/fp16 in that type)."""
    dtype = HALF_TYPES.get(precision, torch.float32)
    if device.type == "cuda":
        n = max(n, 8192)
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if precision == "tf32" else "highest")
    try:
        a @ b  # warm-up
        best = math.inf
        for _ in range(3):
            sync(device)
            start = time.perf_counter()
            for _ in range(repeats):
                a @ b
            sync(device)
            best = min(best, (time.perf_counter() - start) / repeats)
    finally:
        torch.set_float32_matmul_precision(before)
    return 2 * n**3 / best


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so that a timer sees it done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def host_syncs(fn: Callable[[], None]) -> int:
    """How many times ``fn()`` makes the host wait for the GPU (CUDA's sync debug mode)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def timed_side_by_side(
    batches: list[np.ndarray],
    make: Callable[[np.ndarray], Batch],
    steps: dict[str, Callable[[Batch], None]],
    warmup: int,
    device: torch.device,
) -> tuple[dict[str, float], float, int]:
    """Every step function on every batch, in turn: (seconds stepping per function, seconds
    waiting for batches, target tokens) over the timed batches.

    Batches are built ahead in a background thread, as in training (the wait is what the
    loop still spends on data). The functions alternate batch by batch, so a slower or
    faster stretch of the machine (other tenants, frequency changes) falls on all of them
    alike.
    """
    step_s = dict.fromkeys(steps, 0.0)
    tokens = 0
    with Prefetcher(make, batches) as ahead:
        for i, batch in enumerate(ahead):
            for name, step in steps.items():
                sync(device)
                t1 = time.perf_counter()
                step(batch)
                sync(device)
                if i >= warmup:
                    step_s[name] += time.perf_counter() - t1
            tokens += batch.n_tgt_tokens if i >= warmup else 0
            if i == warmup - 1:  # count the waits from the first timed batch on
                ahead.wait_seconds = 0.0
        return step_s, ahead.wait_seconds, tokens


def main() -> None:
    """Time our update step and the plain loop side by side and print tokens/s, MFU and the ratio."""
    args = parse_args()
    torch.set_num_threads(args.threads)
    register_resolvers()
    with initialize_config_dir(config_dir(), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                "model=small",  # the shape make bench compares (docs/benchmarks.md); override at will
                f"trainer.device={args.device}",
                f"trainer.precision={args.precision}",
                "trainer.final_eval=false",
                "trainer.resume=never",
                *args.overrides,
            ],
        )
    setup = build_training(cfg)  # the real update step, without a run directory
    device = setup.device
    peaks = [matmul_peak(device, args.precision)]  # again after the timed updates
    tok, split = setup.tokenizer, setup.train_split
    rng = np.random.default_rng(cfg.seed)
    batches = token_batches(split.src_lengths, split.tgt_lengths, cfg.trainer.max_tokens, rng)
    batches = batches[: args.warmup + args.steps]

    def make(idx: np.ndarray) -> Batch:
        return collate(split, idx, tok.pad_id, tok.bos_id, tok.eos_id)

    # (b) the plain loop around torch.nn.Transformer; (a), ours, is the trainer's UpdateStep.
    m = cfg.model
    torch.manual_seed(cfg.seed)
    ref = Reference(
        tok.vocab_size,
        m.d_model,
        m.n_heads,
        m.n_encoder_layers,
        m.n_decoder_layers,
        m.d_ff,
        m.dropout,
    ).to(device)
    optimizer = torch.optim.Adam(ref.parameters(), lr=cfg.optim.lr, betas=(0.9, 0.98), eps=1e-9)
    scaler = torch.amp.GradScaler("cuda") if args.precision == "fp16" else None
    loss_fn = nn.CrossEntropyLoss(
        ignore_index=tok.pad_id, label_smoothing=cfg.trainer.label_smoothing, reduction="sum"
    )

    def ref_step(b: Batch) -> None:
        ref.train()
        b = b.to(device)
        with autocast(device, args.precision):
            logits = ref(b.src, b.tgt_in)
        loss = loss_fn(logits.float().view(-1, logits.size(-1)), b.tgt_out.view(-1))
        optimizer.zero_grad(set_to_none=True)
        scaled = loss / b.n_tgt_tokens
        (scaler.scale(scaled) if scaler else scaled).backward()
        if scaler:
            scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(ref.parameters(), cfg.trainer.clip_norm)
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        float(loss.detach())  # the usual per-step loss read-out

    def ours_step(b: Batch) -> None:
        setup.update([(b, 1.0)], b.n_tgt_tokens)

    step_s, data_s, tokens = timed_side_by_side(
        batches, make, {"ours": ours_step, "reference": ref_step}, args.warmup, device
    )
    peaks.append(matmul_peak(device, args.precision))
    syncs = None
    if device.type == "cuda":
        b = make(batches[-1])
        syncs = host_syncs(lambda: ours_step(b))
    ours_s, ref_s = step_s["ours"], step_s["reference"]

    timed = batches[args.warmup :]
    real = sum(
        int(split.src_lengths[i].sum() + split.tgt_lengths[i].sum()) + 2 * len(i) for i in timed
    )
    padded = sum(
        len(i) * (int(split.src_lengths[i].max()) + 1)
        + len(i) * (int(split.tgt_lengths[i].max()) + 1)
        for i in timed
    )
    n_params = setup.model.num_parameters()[0]  # tied: the output projection counted once
    peak = max(peaks)
    ours_tps, ref_tps = tokens / ours_s, tokens / ref_s
    result = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "precision": args.precision,
        "threads": args.threads,
        "timed_updates": len(timed),
        "target_tokens": tokens,
        "tokens_per_s_ours": ours_tps,
        "tokens_per_s_reference": ref_tps,
        "throughput_ratio": ours_tps / ref_tps,
        "parameters": n_params,
        "model_flops_ours": 6 * n_params * ours_tps,
        "matmul_peak_flops": peak,
        "matmul_peak_flops_each": peaks,
        "host_syncs_per_update": syncs,
        "mfu": 6 * n_params * ours_tps / peak,
        "mfu_reference": 6 * n_params * ref_tps / peak,
        "padding_fraction": 1 - real / padded,
        "data_wait_fraction": data_s / (data_s + ours_s),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_gpu_mib": (
            torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
        ),
    }
    print(
        f"\n{len(timed)} timed updates ({tokens:,} target tokens), {args.precision}, "
        f"{result['device_name']}, {args.threads} threads"
    )
    print(f"{'':<28}{'ours':>12}{'nn.Transformer':>16}")
    print(f"{'target tokens/s':<28}{ours_tps:12,.0f}{ref_tps:16,.0f}")
    gflops_ours, gflops_ref = 6 * n_params * ours_tps / 1e9, 6 * n_params * ref_tps / 1e9
    print(f"{'model GFLOP/s (6·N·tok/s)':<28}{gflops_ours:12.1f}{gflops_ref:16.1f}")
    print(f"{'MFU':<28}{result['mfu']:12.1%}{result['mfu_reference']:16.1%}")
    print(f"throughput ratio ours/reference: {result['throughput_ratio']:.2f}×")
    each = ", ".join(f"{p / 1e9:.0f}" for p in peaks)
    print(
        f"matmul peak ({args.precision}): {peak / 1e9:.0f} GFLOP/s (best of {each}); "
        f"N = {n_params:,} parameters"
    )
    if syncs is not None:
        print(f"host syncs per update (ours): {syncs}")
    print(
        f"padding fraction {result['padding_fraction']:.1%}, data wait {result['data_wait_fraction']:.1%}"
    )
    print(f"peak RSS {result['peak_rss_mib']:,.0f} MiB")
    if result["peak_gpu_mib"] is not None:
        print(f"peak GPU memory {result['peak_gpu_mib']:,.0f} MiB")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
