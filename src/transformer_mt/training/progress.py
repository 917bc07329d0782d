"""What a run shows while it trains: a tqdm bar per epoch and TensorBoard scalars, texts and
hparams in ``<run dir>/tensorboard``. Rank 0 logs; the other ranks get a silent Progress."""

from __future__ import annotations

import resource
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory so far: allocated CUDA memory on GPUs, resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def flat_hparams(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Scalar leaves of a nested config as ``{"optim.lr": 0.002, ...}`` (TensorBoard hparams)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_hparams(value, name + "."))
        elif isinstance(value, bool | int | float | str):
            out[name] = value
        elif value is None:
            out[name] = "null"
        else:
            out[name] = str(value)
    return out


class Window:
    """Loss and token counts since the last log line (loss summed on the device: no sync)."""

    def __init__(self, device: torch.device) -> None:
        self.loss = torch.zeros((), device=device)
        self.local_tokens = 0  # this rank's, for the loss per token
        self.global_tokens = 0  # all ranks', for the throughput
        self.start = time.perf_counter()

    def add(self, loss: torch.Tensor, local_tokens: int, global_tokens: int) -> None:
        """Count one applied update."""
        self.loss += loss
        self.local_tokens += local_tokens
        self.global_tokens += global_tokens

    def flush(self) -> tuple[float, float]:
        """(loss per token, target tokens/s of the whole job) of the window; starts a new one."""
        elapsed = time.perf_counter() - self.start
        out = float(self.loss) / max(self.local_tokens, 1), self.global_tokens / max(elapsed, 1e-9)
        self.loss.zero_()
        self.local_tokens = self.global_tokens = 0
        self.start = time.perf_counter()
        return out


class Progress:
    """The progress bar and TensorBoard writer of a run (both off when ``enabled`` is False)."""

    def __init__(self, tensorboard_dir: Path, enabled: bool, first_step: int) -> None:
        self.enabled = enabled
        self.writer = (
            SummaryWriter(str(tensorboard_dir), purge_step=first_step) if enabled else None
        )
        self.bar: tqdm | None = None

    def log(self, message: str) -> None:
        """Print a line (rank 0 only)."""
        if self.enabled:
            print(message, flush=True)

    def note(self, tag: str, message: str, step: int = 0) -> None:
        """Print a line and keep it as TensorBoard text under ``tag``."""
        self.log(message)
        if self.writer is not None:
            self.writer.add_text(tag, message, step)

    def start_epoch(self, epoch: int, updates: int, done: int) -> None:
        """A bar for ``epoch`` with ``updates`` in all, ``done`` of them already run."""
        self.bar = tqdm(
            total=updates,
            initial=done,
            desc=f"epoch {epoch}",
            unit="update",
            dynamic_ncols=True,
            mininterval=1.0,
            disable=not self.enabled,
        )

    def advance(self) -> None:
        """One more update on the bar."""
        if self.bar is not None:
            self.bar.update()

    def end_epoch(self) -> None:
        """Close the epoch's bar."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def train_scalars(self, step: int, scalars: dict[str, float]) -> None:
        """Loss, lr, tokens/s ... of a log interval, on the bar and under ``train/``."""
        if self.bar is not None:
            self.bar.set_postfix(
                loss=f"{scalars['loss']:.3f}",
                lr=f"{scalars['lr']:.2e}",
                tok_s=f"{scalars['tokens_per_s']:,.0f}",
            )
        if self.writer is not None:
            for name, value in scalars.items():
                self.writer.add_scalar(f"train/{name}", value, step)

    def validation(
        self,
        step: int,
        epoch: int,
        loss: float,
        ppl: float,
        bleu: float,
        examples: list[str],
        bleu_by_set: dict[str, float] | None = None,
    ) -> None:
        """A validation's line, its scalars under ``valid/`` and a few example translations;
        with several val sets (a multilingual model) also each one's BLEU."""
        by_set = bleu_by_set if bleu_by_set and len(bleu_by_set) > 1 else {}
        detail = f" (mean of {', '.join(f'{k} {b:.2f}' for k, b in by_set.items())})"
        self.log(
            f"epoch {epoch} step {step}: val loss {loss:.3f} ppl {ppl:.2f} BLEU {bleu:.2f}"
            + (detail if by_set else "")
        )
        if self.writer is not None:
            self.writer.add_scalar("valid/loss", loss, step)
            self.writer.add_scalar("valid/ppl", ppl, step)
            self.writer.add_scalar("valid/bleu", bleu, step)
            for name, set_bleu in by_set.items():
                self.writer.add_scalar(f"valid/bleu/{name}", set_bleu, step)
            self.writer.add_text("valid/examples", "\n\n".join(examples), step)

    def hparams(self, config: dict[str, Any], metrics: dict[str, float]) -> None:
        """The run's config and final metrics in TensorBoard's hparams view."""
        if self.writer is not None:
            self.writer.add_hparams(flat_hparams(config), metrics, run_name="hparams")

    def close(self) -> None:
        """Flush and close the writer."""
        self.end_epoch()
        if self.writer is not None:
            self.writer.close()


__all__ = ["Progress", "Window", "flat_hparams", "peak_memory_mib"]
