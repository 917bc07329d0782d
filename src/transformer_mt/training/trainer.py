"""The training loop: batches -> model -> label-smoothed loss -> Adam -> checkpoints.

One *update* consumes ``world_size · update_freq`` token-budget batches (gradient
accumulation across micro-batches and data-parallel ranks), normalised by their real target
tokens, so it equals one big batch. Validation (loss, perplexity, greedy BLEU) runs every
``validate_every_steps`` updates or at every epoch end; checkpoints are written every
``save_every_steps`` updates, at every epoch end and when training stops, and hold all the
state needed to continue bitwise identically (see :meth:`Trainer.training_state`). Training
stops at ``max_epochs``, ``max_steps``, early stopping (``patience``) or once ``max_minutes``
of training time are spent, whichever comes first.
Progress goes to a tqdm bar and to TensorBoard in ``<run dir>/tensorboard``.
"""

from __future__ import annotations

import contextlib
import json
import math
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from transformer_mt.data.batching import Batch, collate, iterate_batches, token_batches
from transformer_mt.data.corpus import corpus_file, read_lines
from transformer_mt.data.dataset import EncodedSplit, PreparedData, prepare_data
from transformer_mt.decoding.search import GREEDY, SearchOptions
from transformer_mt.decoding.translator import Translator, build_model, resolve_device
from transformer_mt.errors import CheckpointError, ConfigError, TrainingDivergedError
from transformer_mt.evaluation import score
from transformer_mt.model import Transformer
from transformer_mt.training import distributed as dist
from transformer_mt.training.averaging import average_checkpoints
from transformer_mt.training.checkpoint import (
    CheckpointManager,
    atomic_write_text,
    load_checkpoint,
    save_checkpoint,
    spm_bytes_to_tensor,
    step_checkpoints,
)
from transformer_mt.training.config import final_alphas, validate_config
from transformer_mt.training.loss import OutputLayerLoss
from transformer_mt.training.precision import autocast, grad_scaler
from transformer_mt.training.rng import rng_state, seed_everything, set_rng_state
from transformer_mt.training.schedule import inverse_sqrt_schedule


@dataclass
class TrainResult:
    """Where the best checkpoint is, and its scores."""

    best_checkpoint: Path
    best_val_bleu: float
    steps: int
    final: dict[str, Any]


def read_references(data_cfg: DictConfig, role: str) -> tuple[list[str], list[str]]:
    """Raw source sentences and references of split ``role`` ("valid" or "test")."""
    split = {"valid": data_cfg.valid_split, "test": data_cfg.test_split}[role]
    src = read_lines(corpus_file(data_cfg.raw_dir, split, data_cfg.src_lang))
    ref = read_lines(corpus_file(data_cfg.raw_dir, split, data_cfg.tgt_lang))
    return src, ref


def epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    """The batch sampler's generator for ``epoch``: a pure function of (seed, epoch), so the
    batch order of any epoch is known again after a restart without saving it."""
    return np.random.default_rng([seed, epoch])


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


class Trainer:
    """Owns the model, optimizer, scheduler, checkpoints and run directory of one run."""

    def __init__(self, cfg: DictConfig, run_dir: Path) -> None:
        self.cfg = cfg
        self.tcfg = cfg.trainer
        self.run_dir = run_dir
        device = resolve_device(self.tcfg.device)
        validate_config(cfg, device)
        self.dist, self.device = dist.init_distributed(device)
        if self.tcfg.num_threads:
            torch.set_num_threads(self.tcfg.num_threads)
        seed_everything(cfg.seed + self.dist.rank)  # each rank its own dropout stream
        self.ckpts = CheckpointManager(
            run_dir / "checkpoints", self.tcfg.keep_last, self.tcfg.keep_best
        )
        resume = self.find_resume_checkpoint()

        if self.dist.is_main:  # rank 0 builds the prepared cache; the others then read it
            self.data: PreparedData = prepare_data(cfg.data)
        dist.barrier(self.dist)
        if not self.dist.is_main:
            self.data = prepare_data(cfg.data)
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
        self.ddp = DistributedDataParallel(self.model) if self.dist.enabled else None
        # What the training forward runs: the (DDP-wrapped) model, compiled on request.
        self.train_module: torch.nn.Module = self.ddp or self.model
        if self.tcfg.compile:
            self.train_module = torch.compile(self.train_module)  # type: ignore[assignment]
        ocfg = cfg.optim
        self.optimizer = torch.optim.Adam(
            self.model.parameters(),
            lr=ocfg.lr,
            betas=tuple(ocfg.betas),
            eps=ocfg.eps,
            weight_decay=ocfg.weight_decay,
            # One fused kernel over all parameters: on this project's 2-core CPU an update of
            # the small model takes ~3-10x less time than the foreach or per-tensor versions.
            fused=self.device.type in ("cpu", "cuda"),
        )
        self.scheduler = inverse_sqrt_schedule(self.optimizer, ocfg.warmup_steps)
        self.scaler = grad_scaler(self.device, self.tcfg.precision)
        self.criterion = OutputLayerLoss(self.tcfg.label_smoothing, self.tokenizer.pad_id)

        # Progress; all of it is saved in checkpoints (see training_state).
        self.step = 0  # successful updates
        self.epoch = 0  # completed epochs
        self.batches_done = 0  # batches of epoch ``epoch + 1`` already consumed
        self.best_bleu = -1.0
        self.best_step = -1
        self.bad_validations = 0  # validations since the best one (early stopping)
        self.nonfinite_total = 0
        self.nonfinite_run = 0  # consecutive non-finite updates
        self.stop_reason = ""
        self.validated = (-1, 0.0)  # (step, val BLEU) of the latest validation
        self.saved_step = -1
        self.last_grad_norm = 0.0
        # Training time (the loop: updates, validation, checkpoints), summed over resumes.
        self.clock: Callable[[], float] = time.monotonic  # tests substitute a fake clock
        self.seconds_before = 0.0  # training time of earlier launches of this run
        self.clock_start: float | None = None  # clock() when this launch's loop began
        self.time_up = False  # trainer.max_minutes spent (decided by rank 0)
        if resume is not None:
            self.load_training_state(*resume)

        self.writer: SummaryWriter | None = None
        if self.dist.is_main:
            total, trainable = self.model.num_parameters()
            self.log(f"model parameters: {total:,} total, {trainable:,} trainable")
            self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=self.step + 1)

    def log(self, message: str) -> None:
        """Print on rank 0 only."""
        if self.dist.is_main:
            print(message, flush=True)

    # -- resume -------------------------------------------------------------------------------
    def find_resume_checkpoint(self) -> tuple[Path, dict[str, Any]] | None:
        """The checkpoint ``trainer.resume`` asks for (auto: the newest good one of this run)."""
        mode = str(self.tcfg.resume)
        if mode == "never":
            if step_checkpoints(self.ckpts.directory):
                raise ConfigError(
                    f"trainer.resume=never but {self.ckpts.directory} already holds checkpoints; "
                    "continue it with trainer.resume=auto or pick another hydra.run.dir"
                )
            return None
        # auto, or PATH: this run's own newest good checkpoint first (so a relaunch after a
        # crash continues the run); PATH only starts a run that has none yet.
        found = self.ckpts.newest_good() if self.dist.is_main else None
        path = dist.broadcast_object(str(found[0]) if found else None, self.dist)
        if path is not None:
            return Path(path), (found[1] if found else load_checkpoint(path))
        return None if mode == "auto" else (Path(mode), load_checkpoint(mode))

    def load_training_state(self, path: Path, state: dict[str, Any]) -> None:
        """Continue from ``state``: weights, optimizer, scheduler, counters and RNGs."""
        if "trainer" not in state or "optimizer" not in state:
            raise CheckpointError(f"{path} holds no training state (an averaged checkpoint?)")
        for section in ("model", "data"):
            if state["config"][section] != self.config_dict[section]:
                raise ConfigError(
                    f"cannot resume from {path}: its {section} config differs from this "
                    f"run's ({section}.* must match; trainer.resume=never starts afresh)"
                )
        self.model.load_state_dict(state["model"])
        kernel = {k: self.optimizer.defaults[k] for k in ("foreach", "fused")}
        self.optimizer.load_state_dict(state["optimizer"])
        for group in self.optimizer.param_groups:  # the saved flags would override ours
            group.update(kernel)
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        t = state["trainer"]
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        self.batches_done = int(t["batches_done"])
        self.best_bleu = float(t["best_val_bleu"])
        self.best_step = int(t["best_step"])
        self.bad_validations = int(t["bad_validations"])
        self.nonfinite_total = int(t["nonfinite_total"])
        self.stop_reason = str(t["stop_reason"])
        self.validated = (int(t["validated_step"]), float(t["validated_bleu"]))
        self.seconds_before = float(t.get("train_seconds", 0.0))  # absent before max_minutes
        self.ckpts.scores = {str(k): float(v) for k, v in t["checkpoint_scores"].items()}
        self.saved_step = self.step
        rngs = state["rng"]
        if len(rngs) == self.dist.world_size:
            set_rng_state(rngs[self.dist.rank])
        else:
            print(
                f"warning: {path} was written by {len(rngs)} process(es), this job has "
                f"{self.dist.world_size}; dropout streams are reseeded",
                file=sys.stderr,
            )
        self.log(f"resumed from {path} at epoch {self.epoch} step {self.step}")

    def training_state(self, val_bleu: float | None) -> dict[str, Any]:
        """Everything needed to translate with this run and to continue it identically."""
        rngs = dist.all_gather_object(rng_state(), self.dist)
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "val_bleu": val_bleu,
            "config": self.config_dict,
            "spm_model": spm_bytes_to_tensor(self.tokenizer.model_bytes),
            "rng": rngs,
            "trainer": {
                "batches_done": self.batches_done,
                "best_val_bleu": self.best_bleu,
                "best_step": self.best_step,
                "bad_validations": self.bad_validations,
                "nonfinite_total": self.nonfinite_total,
                "stop_reason": self.stop_reason,
                "validated_step": self.validated[0],
                "validated_bleu": self.validated[1],
                "checkpoint_scores": dict(self.ckpts.scores),
                "train_seconds": self.training_seconds(),
            },
        }
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    # -- one update ---------------------------------------------------------------------------
    def batch_loss(
        self, module: torch.nn.Module, batch: Batch
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed label-smoothed loss and NLL of ``batch`` (on the device) through ``module``
        (the model, or its DDP/compiled wrapper), at the real target positions only."""
        with autocast(self.device, self.tcfg.precision):
            hidden = module(batch.src, batch.tgt_in, batch.tgt_positions, project=False)
            return self.criterion(hidden, self.model.output_projection.weight, batch.real_targets())

    def train_step(self, batches: list[tuple[Batch, float]]) -> tuple[torch.Tensor, int] | None:
        """One update from this rank's micro-batches ``[(batch, weight), ...]``.

        The loss is divided by the real target tokens of the whole update on all ranks, so
        accumulation and data parallelism give the gradient of one big batch. A non-finite
        gradient norm skips the update. Returns this rank's summed loss (no host sync) and the
        update's target tokens on all ranks, or None when the update was skipped.
        """
        model = self.train_module
        model.train()
        local_tokens = sum(b.n_tgt_tokens * w for b, w in batches)
        global_tokens = dist.all_reduce_sum(local_tokens, self.dist, self.device)
        scale = self.dist.world_size / global_tokens  # DDP averages gradients over ranks
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        for i, (batch, weight) in enumerate(batches):
            last = i == len(batches) - 1
            no_sync = self.ddp.no_sync() if self.ddp and not last else contextlib.nullcontext()
            batch = batch.to(self.device)
            with no_sync:
                loss, _ = self.batch_loss(model, batch)
                scaled = loss * (scale * weight)
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            total += loss.detach() * weight
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        max_norm = self.tcfg.clip_norm if self.tcfg.clip_norm > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        self.last_grad_norm = float(grad_norm)  # the one host sync per update
        finite = math.isfinite(self.last_grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skips the step itself on inf/nan
            self.scaler.update()
        elif finite:
            self.optimizer.step()
        if not finite:
            if self.scaler is not None and self.scaler.get_scale() >= 1.0:
                self.nonfinite_total += 1  # fp16 overflow: the scaler lowers its scale
                return None
            self.skip_nonfinite_update()
            return None
        self.nonfinite_run = 0
        self.scheduler.step()
        self.step += 1
        return total, int(global_tokens)

    def skip_nonfinite_update(self) -> None:
        """Count a skipped update; too many in a row stop the run (checkpoints are kept)."""
        self.nonfinite_total += 1
        self.nonfinite_run += 1
        limit = self.tcfg.max_nonfinite_updates
        print(
            f"warning: non-finite loss/gradient after update {self.step}; update skipped "
            f"({self.nonfinite_run} in a row, {self.nonfinite_total} in total)",
            file=sys.stderr,
            flush=True,
        )
        if self.nonfinite_run >= limit:
            last = self.ckpts.last_path if self.ckpts.last_path.exists() else "none yet"
            raise TrainingDivergedError(
                f"{limit} consecutive non-finite updates (trainer.max_nonfinite_updates) at "
                f"update {self.step}: training diverged. The last good checkpoint is {last}; "
                "lower optim.lr, raise optim.warmup_steps or use trainer.precision=fp32."
            )

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
            loss, nll = self.batch_loss(self.model, batch)
            total_loss += float(loss)
            total_nll += float(nll)
            total_tokens += batch.n_tgt_tokens
        return total_loss / total_tokens, math.exp(min(total_nll / total_tokens, 50.0))

    def validate(self) -> float:
        """Val loss, perplexity and greedy BLEU on rank 0 (logged); every rank gets the BLEU."""
        bleu = 0.0
        if self.dist.is_main:
            val_loss, val_ppl = self.validation_loss()
            translator = Translator(self.model, self.tokenizer, self.device)
            hyps = translator.translate(
                self.valid_src, GREEDY, batch_size=self.tcfg.valid_batch_size
            )
            bleu = score(hyps, self.valid_ref, ("bleu",))["bleu"].score
            self.log(
                f"epoch {self.epoch} step {self.step}: val loss {val_loss:.3f} "
                f"ppl {val_ppl:.2f} BLEU {bleu:.2f}"
            )
            assert self.writer is not None
            self.writer.add_scalar("valid/loss", val_loss, self.step)
            self.writer.add_scalar("valid/ppl", val_ppl, self.step)
            self.writer.add_scalar("valid/bleu", bleu, self.step)
            examples = [
                f"**src** {s}  \n**ref** {r}  \n**hyp** {h}"
                for s, r, h in zip(self.valid_src[:4], self.valid_ref[:4], hyps[:4], strict=True)
            ]
            self.writer.add_text("valid/examples", "\n\n".join(examples), self.step)
        bleu = dist.broadcast_object(bleu, self.dist)
        self.validated = (self.step, bleu)
        return bleu

    def checkpoint(self, validate: bool) -> None:
        """Optionally validate (best score, early stopping), then save a checkpoint."""
        if validate and self.validated[0] != self.step:  # not yet validated at this step
            val_bleu = self.validate()
            if val_bleu > self.best_bleu:
                self.best_bleu, self.best_step, self.bad_validations = val_bleu, self.step, 0
            else:
                self.bad_validations += 1
                patience = self.tcfg.patience
                if patience and self.bad_validations >= patience:
                    self.stop_reason = (
                        f"early stopping: no val BLEU gain in {patience} validations "
                        f"(best {self.best_bleu:.2f})"
                    )
        val_bleu = self.validated[1] if self.validated[0] == self.step else None
        is_best = val_bleu is not None and self.best_step == self.step
        if val_bleu is not None:  # before training_state(), so the saved scores include it
            self.ckpts.record_score(self.step, val_bleu)
        if self.dist.enabled:
            digest = dist.check_replicas_in_sync(self.model, self.dist)
            self.log(
                f"step {self.step}: parameters identical on all {self.dist.world_size} ranks "
                f"(sha256 {digest[:16]})"
            )
        state = self.training_state(val_bleu)
        if self.dist.is_main:
            self.ckpts.save(state, is_best)
        dist.barrier(self.dist)
        self.saved_step = self.step

    # -- the loop -----------------------------------------------------------------------------
    def training_seconds(self) -> float:
        """Training time of this run so far, earlier launches included."""
        if self.clock_start is None:
            return self.seconds_before
        return self.seconds_before + self.clock() - self.clock_start

    def check_time(self) -> None:
        """Set ``time_up`` once ``trainer.max_minutes`` of training time are spent (not when
        training stops anyway). Rank 0's clock decides, so all ranks stop after the same
        update."""
        max_minutes = self.tcfg.max_minutes
        if max_minutes is None or self.done():
            return
        up = self.training_seconds() >= 60.0 * max_minutes
        self.time_up = bool(dist.broadcast_object(up, self.dist))

    def finished(self) -> bool:
        """max_epochs or max_steps reached."""
        max_steps = self.tcfg.max_steps
        return self.epoch >= self.tcfg.max_epochs or (
            max_steps is not None and self.step >= max_steps
        )

    def done(self) -> bool:
        """max_epochs, max_steps or max_minutes reached, or early stopping triggered."""
        return self.finished() or self.time_up or bool(self.stop_reason)

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        """The shuffled token-budget batches (example indices) of ``epoch`` (1-based)."""
        split = self.train_split
        rng = epoch_rng(self.cfg.seed, epoch)
        return token_batches(split.src_lengths, split.tgt_lengths, self.tcfg.max_tokens, rng)

    def micro_batches(self, group: list[np.ndarray]) -> list[tuple[Batch, float]]:
        """This rank's share of one update's batches, with weight 1. A rank left without one
        (the last, short update of an epoch) runs the first batch with weight 0, so every
        rank takes part in the gradient all-reduce and each example counts once."""
        tok = self.tokenizer
        mine = dist.shard(group, self.dist)
        weight = 1.0 if mine else 0.0
        return [
            (collate(self.train_split, idx, tok.pad_id, tok.bos_id, tok.eos_id), weight)
            for idx in (mine or group[:1])
        ]

    def train(self) -> TrainResult:
        """Train until ``max_epochs``/``max_steps``/``max_minutes``/early stopping, then
        average and evaluate (see :meth:`finish`)."""
        per_update = self.dist.world_size * self.tcfg.update_freq
        self.clock_start = self.clock()
        self.check_time()  # a relaunch of a run whose time is already spent trains no further
        while not self.done():
            batches = self.epoch_batches(self.epoch + 1)
            # Regroup what is left of the epoch: a resumed run may use another update_freq
            # or number of processes than the one that wrote the checkpoint.
            done_before = self.batches_done
            groups = [
                batches[i : i + per_update] for i in range(done_before, len(batches), per_update)
            ]
            bar = tqdm(
                total=len(groups) + math.ceil(done_before / per_update),
                initial=math.ceil(done_before / per_update),
                desc=f"epoch {self.epoch + 1}",
                unit="update",
                dynamic_ncols=True,
                mininterval=1.0,
                disable=not self.dist.is_main,
            )
            window = _Window(self.device)
            for group in groups:
                micro = self.micro_batches(group)
                result = self.train_step(micro)
                self.batches_done += len(group)
                bar.update()
                if result is not None:
                    local_tokens = sum(int(b.n_tgt_tokens * w) for b, w in micro)
                    window.add(result[0], local_tokens, result[1])
                    self.after_update(window, bar)
                if self.done():
                    break
            bar.close()
            if self.batches_done >= len(batches):
                self.epoch += 1
                self.batches_done = 0
                self.check_time()  # before the save, which then records the time as spent
                self.checkpoint(validate=self.tcfg.validate_every_steps is None)
        if self.saved_step != self.step or self.validated[0] != self.step:
            self.checkpoint(validate=True)
        self.seconds_before, self.clock_start = self.training_seconds(), None  # the loop's end
        if message := self.stop_message():
            self.log(message)
        return self.finish()

    def stop_message(self) -> str:
        """Why training stopped before max_epochs/max_steps ("" when it did not)."""
        reasons = [self.stop_reason] if self.stop_reason else []
        if self.time_up and not self.finished():  # its validation may also end the patience
            where = f"{self.batches_done} batches into epoch {self.epoch + 1}"
            reasons.insert(
                0,
                f"time budget: trainer.max_minutes={self.tcfg.max_minutes} spent "
                f"({self.training_seconds() / 60:.1f} min of training) at step {self.step}, "
                + (where if self.batches_done else f"after epoch {self.epoch}"),
            )
        return "; ".join(reasons)

    def after_update(self, window: _Window, bar: tqdm) -> None:
        """Log every ``log_every`` updates; validate/save on their step intervals, and when
        training stops."""
        t = self.tcfg
        if not self.dist.enabled or self.step % t.log_every == 0:  # a collective when distributed
            self.check_time()
        if self.step % t.log_every == 0 and self.writer is not None:
            loss, tps = window.flush()
            lr = self.scheduler.get_last_lr()[0]
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}")
            for name, value in (
                ("train/loss", loss),
                ("train/lr", lr),
                ("train/tokens_per_s", tps),
                ("train/grad_norm", self.last_grad_norm),
                ("train/peak_memory_mib", peak_memory_mib(self.device)),
                ("train/nonfinite_updates", self.nonfinite_total),
            ):
                self.writer.add_scalar(name, value, self.step)
        elif self.step % t.log_every == 0:
            window.flush()
        validate = bool(t.validate_every_steps) and self.step % t.validate_every_steps == 0
        save = bool(t.save_every_steps) and self.step % t.save_every_steps == 0
        if validate or save or self.done():
            self.checkpoint(validate=validate or self.done())

    # -- the end ------------------------------------------------------------------------------
    def finish(self) -> TrainResult:
        """Averaging (``trainer.average_last``) and the final beam evaluation of best.pt and
        averaged.pt (rank 0), results.json, TensorBoard hparams."""
        best = self.ckpts.best_path
        if not best.exists():  # resumed from a PATH whose best no later validation beat
            best = self.ckpts.last_path
        final: dict[str, Any] = {}
        if self.dist.is_main:
            averaged = self.average_last_checkpoints()
            if self.tcfg.final_eval:
                final = self.final_evaluation(best)
            if averaged is not None:
                final["averaged"] = {"checkpoint": str(averaged)}
                if self.tcfg.final_eval:
                    final["averaged"].update(self.final_evaluation(averaged))
            results = {
                "best_checkpoint": str(best),
                "best_val_bleu_greedy": self.best_bleu,
                "steps": self.step,
                "epochs": self.epoch,
                "stop_reason": self.stop_message(),
                "train_minutes": round(self.training_seconds() / 60, 2),
                "nonfinite_updates": self.nonfinite_total,
                **final,
            }
            atomic_write_text(self.run_dir / "results.json", json.dumps(results, indent=2) + "\n")
            assert self.writer is not None
            metrics = {"hparam/best_val_bleu_greedy": self.best_bleu}
            for role in ("valid", "test"):
                if role in final:
                    metrics[f"hparam/{role}_bleu_beam"] = final[role]["bleu"]
                if role in final.get("averaged", {}):
                    metrics[f"hparam/{role}_bleu_beam_averaged"] = final["averaged"][role]["bleu"]
            self.writer.add_hparams(flat_hparams(self.config_dict), metrics, run_name="hparams")
            self.writer.close()
        dist.barrier(self.dist)
        return TrainResult(best, self.best_bleu, self.step, final)

    def average_last_checkpoints(self) -> Path | None:
        """With ``trainer.average_last=N``: the mean of the run's last N step checkpoints,
        written to ``checkpoints/averaged.pt`` (None when off or fewer than 2 exist)."""
        n = self.tcfg.average_last
        if not n:
            return None
        paths = step_checkpoints(self.ckpts.directory)[-n:]
        if len(paths) < 2:
            self.log(f"trainer.average_last={n}: only {len(paths)} checkpoint(s); nothing averaged")
            return None
        if len(paths) < n:
            self.log(f"trainer.average_last={n}: only {len(paths)} checkpoints to average")
        out = self.ckpts.directory / "averaged.pt"
        try:
            save_checkpoint(out, average_checkpoints(paths))
        except CheckpointError as e:  # the run's results matter more than its average
            print(f"warning: trainer.average_last: {e}; nothing averaged", file=sys.stderr)
            return None
        self.log(
            f"averaged {len(paths)} checkpoints ({paths[0].name} .. {paths[-1].name}) -> {out}"
        )
        return out

    def final_evaluation(self, checkpoint: Path) -> dict[str, Any]:
        """Beam-search BLEU/chrF of ``checkpoint`` (best.pt, averaged.pt) on val and test.

        With a list for ``trainer.final_alpha`` the length penalty is tuned on val: val is
        decoded at each α, the α of the highest val BLEU (the first of ties) is kept, and only
        that α decodes test. ``alpha_grid`` in the result maps each α to its val BLEU.
        """
        translator = Translator.from_checkpoint(checkpoint, device=str(self.device))
        grid = final_alphas(self.tcfg.final_alpha)
        search = {a: SearchOptions(beam_size=self.tcfg.final_beam_size, alpha=a) for a in grid}
        val_src, val_ref = read_references(self.cfg.data, "valid")
        scored = {}
        for alpha in grid:
            hyps = translator.translate(val_src, search[alpha], self.tcfg.valid_batch_size)
            scored[alpha] = score(hyps, val_ref)
        alpha = max(grid, key=lambda a: scored[a]["bleu"].score)  # max keeps the first of ties
        results: dict[str, Any] = {
            "step": translator.step,  # with the α, read back by tmt-evaluate/tmt-translate
            "beam_size": self.tcfg.final_beam_size,
            "alpha": alpha,
        }
        if len(grid) > 1:
            results["alpha_grid"] = {f"{a:g}": scored[a]["bleu"].score for a in grid}
            self.log(
                f"{checkpoint.name}: val BLEU by α "
                + ", ".join(f"{a:g}: {scored[a]['bleu'].score:.2f}" for a in grid)
                + f"; test decoded at α {alpha:g}"
            )
        test_src, test_ref = read_references(self.cfg.data, "test")
        hyps = translator.translate(test_src, search[alpha], self.tcfg.valid_batch_size)
        for role, s in (("valid", scored[alpha]), ("test", score(hyps, test_ref))):
            results[role] = {
                "bleu": s["bleu"].score,
                "chrf": s["chrf"].score,
                "signature": s["bleu"].signature,
            }
        return results


class _Window:
    """Loss and token counts since the last log line (loss summed on the device: no sync)."""

    def __init__(self, device: torch.device) -> None:
        self.loss = torch.zeros((), device=device)
        self.local_tokens = 0  # this rank's, for the loss per token
        self.global_tokens = 0  # all ranks', for the throughput
        self.start = time.perf_counter()

    def add(self, loss: torch.Tensor, local_tokens: int, global_tokens: int) -> None:
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
