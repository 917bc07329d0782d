"""The training loop: batches -> model -> label-smoothed loss -> Adam -> checkpoints.

Every epoch ends with validation (loss, perplexity, greedy BLEU); ``last.pt`` is saved
every epoch and ``best.pt`` whenever val BLEU improves. Progress goes to a tqdm bar and
to TensorBoard in ``<run dir>/tensorboard``.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from transformer_mt.data.batching import Batch, iterate_batches
from transformer_mt.data.corpus import corpus_file, read_lines
from transformer_mt.data.dataset import EncodedSplit, PreparedData, prepare_data
from transformer_mt.decoding.translator import Translator, build_model, resolve_device
from transformer_mt.errors import ConfigError
from transformer_mt.evaluation import score
from transformer_mt.model import Transformer
from transformer_mt.training.checkpoint import (
    atomic_write_text,
    save_checkpoint,
    spm_bytes_to_tensor,
)
from transformer_mt.training.loss import label_smoothed_nll_loss
from transformer_mt.training.schedule import inverse_sqrt_schedule


@dataclass
class TrainResult:
    """Where the best checkpoint is, and its scores."""

    best_checkpoint: Path
    best_val_bleu: float
    steps: int
    final: dict[str, Any]


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed-precision context for ``trainer.precision`` (fp32 | bf16)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    raise ConfigError(f"trainer.precision must be fp32 or bf16, got '{precision}'")


def validate_config(cfg: DictConfig) -> None:
    """Fail before any work on settings that cannot train; the message names the key."""
    t, o, m, d = cfg.trainer, cfg.optim, cfg.model, cfg.data
    checks = [
        (o.lr > 0, f"optim.lr must be positive, got {o.lr}"),
        (o.warmup_steps > 0, f"optim.warmup_steps must be positive, got {o.warmup_steps}"),
        (t.max_tokens > 0, f"trainer.max_tokens must be positive, got {t.max_tokens}"),
        (t.max_epochs >= 1, f"trainer.max_epochs must be ≥ 1, got {t.max_epochs}"),
        (
            t.max_steps is None or t.max_steps >= 1,
            f"trainer.max_steps must be ≥ 1, got {t.max_steps}",
        ),
        (t.log_every >= 1, f"trainer.log_every must be ≥ 1, got {t.log_every}"),
        (
            0 <= t.label_smoothing < 1,
            f"trainer.label_smoothing must be in [0, 1), got {t.label_smoothing}",
        ),
        (t.final_beam_size >= 1, f"trainer.final_beam_size must be ≥ 1, got {t.final_beam_size}"),
        (
            m.d_model % m.n_heads == 0,
            f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}",
        ),
        (
            d.filter.max_len < m.max_positions,
            f"data.filter.max_len={d.filter.max_len} must be below "
            f"model.max_positions={m.max_positions} (room for BOS/EOS)",
        ),
        (d.src_lang != d.tgt_lang, f"data.src_lang and data.tgt_lang are both '{d.src_lang}'"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    autocast(torch.device("cpu"), t.precision)  # raises ConfigError for an unknown precision


def read_references(data_cfg: DictConfig, role: str) -> tuple[list[str], list[str]]:
    """Raw source sentences and references of split ``role`` ("valid" or "test")."""
    split = {"valid": data_cfg.valid_split, "test": data_cfg.test_split}[role]
    src = read_lines(corpus_file(data_cfg.raw_dir, split, data_cfg.src_lang))
    ref = read_lines(corpus_file(data_cfg.raw_dir, split, data_cfg.tgt_lang))
    return src, ref


class Trainer:
    """Owns the model, optimizer, scheduler and run directory of one training run."""

    def __init__(self, cfg: DictConfig, run_dir: Path) -> None:
        self.cfg = cfg
        self.tcfg = cfg.trainer
        self.run_dir = run_dir
        self.ckpt_dir = run_dir / "checkpoints"
        self.device = resolve_device(self.tcfg.device)
        if self.tcfg.num_threads:
            torch.set_num_threads(self.tcfg.num_threads)
        validate_config(cfg)
        seed_everything(cfg.seed)

        self.data: PreparedData = prepare_data(cfg.data)
        self.tokenizer = self.data.tokenizer
        self.train_split: EncodedSplit = self.data.split("train")
        self.valid_split: EncodedSplit = self.data.split("valid")
        self.valid_src, self.valid_ref = read_references(cfg.data, "valid")
        if self.tcfg.valid_max_sentences:
            self.valid_src = self.valid_src[: self.tcfg.valid_max_sentences]
            self.valid_ref = self.valid_ref[: self.tcfg.valid_max_sentences]

        self.config_dict: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
        self.model: Transformer = build_model(
            self.config_dict["model"], self.tokenizer.vocab_size, self.tokenizer.pad_id
        ).to(self.device)
        total, trainable = self.model.num_parameters()
        print(f"model parameters: {total:,} total, {trainable:,} trainable", flush=True)

        ocfg = cfg.optim
        self.optimizer = torch.optim.Adam(
            self.model.parameters(),
            lr=ocfg.lr,
            betas=tuple(ocfg.betas),
            eps=ocfg.eps,
            weight_decay=ocfg.weight_decay,
            foreach=True,
        )
        self.scheduler = inverse_sqrt_schedule(self.optimizer, ocfg.warmup_steps)
        self.step = 0
        self.epoch = 0
        self.best_bleu = -1.0
        self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    # -- one update ---------------------------------------------------------------------------
    def train_step(self, batch: Batch) -> torch.Tensor:
        """Forward, backward, clip, update; returns the summed loss (a tensor, no host sync)."""
        self.model.train()
        batch = batch.to(self.device)
        with autocast(self.device, self.tcfg.precision):
            logits = self.model(batch.src, batch.tgt_in)  # (B, T, V)
        loss, _ = label_smoothed_nll_loss(
            logits, batch.tgt_out, self.tcfg.label_smoothing, self.tokenizer.pad_id
        )
        self.optimizer.zero_grad(set_to_none=True)
        (loss / batch.n_tgt_tokens).backward()
        if self.tcfg.clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.tcfg.clip_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return loss.detach()

    # -- validation ---------------------------------------------------------------------------
    @torch.inference_mode()
    def validation_loss(self) -> tuple[float, float]:
        """Per-token label-smoothed loss and perplexity (from the NLL) on the validation split."""
        self.model.eval()
        tok = self.tokenizer
        total_loss, total_nll, total_tokens = 0.0, 0.0, 0
        max_len = self.model.max_positions - 1  # val/test are not length-filtered
        for batch in iterate_batches(
            self.valid_split,
            self.tcfg.max_tokens,
            tok.pad_id,
            tok.bos_id,
            tok.eos_id,
            max_len=max_len,
        ):
            batch = batch.to(self.device)
            with autocast(self.device, self.tcfg.precision):
                logits = self.model(batch.src, batch.tgt_in)
            loss, nll = label_smoothed_nll_loss(
                logits, batch.tgt_out, self.tcfg.label_smoothing, tok.pad_id
            )
            total_loss += float(loss)
            total_nll += float(nll)
            total_tokens += batch.n_tgt_tokens
        return total_loss / total_tokens, math.exp(min(total_nll / total_tokens, 50.0))

    def validation_bleu(self) -> tuple[float, list[str]]:
        """Greedy, detokenized sacreBLEU on the validation sentences."""
        translator = Translator(self.model, self.tokenizer, self.device)
        hyps = translator.translate(
            self.valid_src, beam_size=1, batch_size=self.tcfg.valid_batch_size
        )
        return score(hyps, self.valid_ref).bleu, hyps

    # -- checkpoints --------------------------------------------------------------------------
    def checkpoint_state(self, val_bleu: float) -> dict[str, Any]:
        """Everything needed to translate with (and continue) this run, as plain data."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "val_bleu": val_bleu,
            "best_val_bleu": max(self.best_bleu, val_bleu),
            "config": self.config_dict,
            "spm_model": spm_bytes_to_tensor(self.tokenizer.model_bytes),
        }

    # -- the loop -----------------------------------------------------------------------------
    def _finished(self) -> bool:
        max_steps = self.tcfg.max_steps
        return max_steps is not None and self.step >= max_steps

    def train(self) -> TrainResult:
        """Train until ``max_epochs`` or ``max_steps``, validating and checkpointing every epoch."""
        tok = self.tokenizer
        best_path = self.ckpt_dir / "best.pt"
        rng = np.random.default_rng(self.cfg.seed)
        while self.epoch < self.tcfg.max_epochs and not self._finished():
            self.epoch += 1
            batches = list(
                iterate_batches(
                    self.train_split, self.tcfg.max_tokens, tok.pad_id, tok.bos_id, tok.eos_id, rng
                )
            )
            bar = tqdm(
                batches,
                desc=f"epoch {self.epoch}",
                unit="batch",
                dynamic_ncols=True,
                mininterval=1.0,
            )
            window_loss = torch.zeros((), device=self.device)  # summed on device: no host sync
            window_tokens, window_start = 0, time.perf_counter()
            for batch in bar:
                window_loss += self.train_step(batch)
                window_tokens += batch.n_tgt_tokens
                if self.step % self.tcfg.log_every == 0:
                    elapsed = time.perf_counter() - window_start
                    loss = float(window_loss) / window_tokens
                    lr = self.scheduler.get_last_lr()[0]
                    tps = window_tokens / elapsed
                    bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}")
                    self.writer.add_scalar("train/loss", loss, self.step)
                    self.writer.add_scalar("train/lr", lr, self.step)
                    self.writer.add_scalar("train/tokens_per_s", tps, self.step)
                    window_loss.zero_()
                    window_tokens, window_start = 0, time.perf_counter()
                if self._finished():
                    break
            bar.close()
            self.end_of_epoch(best_path)
        self.writer.flush()
        final = self.final_evaluation(best_path) if self.tcfg.final_eval else {}
        self.writer.close()
        return TrainResult(best_path, self.best_bleu, self.step, final)

    def end_of_epoch(self, best_path: Path) -> None:
        """Validate, log, and write ``last.pt`` (and ``best.pt`` on a new best val BLEU)."""
        val_loss, val_ppl = self.validation_loss()
        val_bleu, hyps = self.validation_bleu()
        print(
            f"epoch {self.epoch} step {self.step}: val loss {val_loss:.3f} ppl {val_ppl:.2f} "
            f"BLEU {val_bleu:.2f}",
            flush=True,
        )
        self.writer.add_scalar("valid/loss", val_loss, self.step)
        self.writer.add_scalar("valid/ppl", val_ppl, self.step)
        self.writer.add_scalar("valid/bleu", val_bleu, self.step)
        self.writer.add_text("valid/examples", "\n\n".join(hyps[:3]), self.step)
        state = self.checkpoint_state(val_bleu)
        save_checkpoint(self.ckpt_dir / "last.pt", state)
        if val_bleu > self.best_bleu:
            self.best_bleu = val_bleu
            save_checkpoint(best_path, state)

    def final_evaluation(self, best_path: Path) -> dict[str, Any]:
        """Beam-search BLEU/chrF of ``best.pt`` on val and test; written to ``results.json``."""
        translator = Translator.from_checkpoint(best_path, device=str(self.device))
        results: dict[str, Any] = {
            "checkpoint": str(best_path),
            "beam_size": self.tcfg.final_beam_size,
        }
        for role in ("valid", "test"):
            src, ref = read_references(self.cfg.data, role)
            hyps = translator.translate(
                src, beam_size=self.tcfg.final_beam_size, batch_size=self.tcfg.valid_batch_size
            )
            s = score(hyps, ref)
            results[role] = {"bleu": s.bleu, "chrf": s.chrf, "signature": s.bleu_signature}
        atomic_write_text(self.run_dir / "results.json", json.dumps(results, indent=2) + "\n")
        return results
