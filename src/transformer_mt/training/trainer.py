"""The training loop: batches -> update step -> validation -> checkpoints, until a stop rule.

One *update* consumes ``world_size · update_freq`` token-budget batches (see
:mod:`transformer_mt.training.step`). Validation (loss, perplexity, greedy BLEU) runs every
``validate_every_steps`` updates or at every epoch end; checkpoints are written every
``save_every_steps`` updates, at every epoch end and when training stops, and hold all the
state needed to continue bitwise identically (:mod:`transformer_mt.training.state`).
Training stops at ``max_epochs``, ``max_steps``, early stopping (``patience``) or once
``max_minutes`` of training time are spent, whichever comes first; then the run is averaged
and evaluated (:mod:`transformer_mt.training.finish`). A run with ``trainer.init_from``
starts from that checkpoint's weights (:mod:`transformer_mt.training.init_from`) unless it
resumes its own checkpoints: resuming wins.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from transformer_mt.data.batching import Batch, collate, target_tokens, token_batches
from transformer_mt.data.loader import Prefetcher, pinned
from transformer_mt.errors import ConfigError, TrainingDivergedError
from transformer_mt.formats.checkpoint import load_checkpoint, step_checkpoints
from transformer_mt.training import distributed as dist
from transformer_mt.training.finish import TrainResult, finish_run
from transformer_mt.training.progress import Progress, Window, peak_memory_mib
from transformer_mt.training.run_dir import CheckpointManager
from transformer_mt.training.setup import TrainingSetup, build_training
from transformer_mt.training.state import TrainState, restore_training, training_checkpoint
from transformer_mt.training.step import Outcome, StepResult
from transformer_mt.training.validation import validate


def epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    """The batch sampler's generator for ``epoch``: a pure function of (seed, epoch), so the
    batch order of any epoch is known again after a restart without saving it."""
    return np.random.default_rng([seed, epoch])


class Trainer:
    """Runs the loop of one run in ``run_dir``; its objects come from :func:`build_training`
    (or ``setup``, for tests that bring their own)."""

    def __init__(self, cfg: DictConfig, run_dir: Path, setup: TrainingSetup | None = None) -> None:
        self.cfg, self.tcfg, self.run_dir = cfg, cfg.trainer, Path(run_dir)
        self.setup = setup or build_training(cfg)  # checks the config first
        self.ckpts = CheckpointManager(
            self.run_dir / "checkpoints", self.tcfg.keep_last, self.tcfg.keep_best
        )
        if str(self.tcfg.resume) == "never" and step_checkpoints(self.ckpts.directory):
            raise ConfigError(
                f"trainer.resume=never but {self.ckpts.directory} already holds checkpoints; "
                f"continue it with hydra.run.dir={self.run_dir} trainer.resume=auto, or pick "
                "another hydra.run.dir"
            )
        self.dist, self.update = self.setup.dist, self.setup.update
        self.model, self.tokenizer = self.setup.model, self.setup.tokenizer
        self.state = TrainState()
        self.nonfinite_run = 0  # consecutive non-finite updates
        self.saved_step = -1
        self.last_grad_norm = 0.0
        # Training time (the loop: updates, validation, checkpoints), summed over resumes.
        self.clock: Callable[[], float] = time.monotonic  # tests substitute a fake clock
        self.clock_start: float | None = None  # clock() when this launch's loop began
        self.time_up = False  # trainer.max_minutes spent (decided by rank 0)
        self.first_step = 0  # the step this launch's loop began at
        source = self.setup.init_source
        if (resume := self.find_resume_checkpoint()) is not None:
            path, checkpoint = resume
            self.state = s = restore_training(self.update, path, checkpoint, self.setup.config)
            self.ckpts.scores = dict(self.state.checkpoint_scores)
            patience = self.tcfg.patience
            if s.stop_reason and not (patience and s.bad_validations >= patience):
                s.stop_reason = ""  # early stopping with a larger (or no) patience goes on
            # A checkpoint of another directory (resume=PATH) is saved again in this one.
            ours = path.resolve().parent == self.ckpts.directory.resolve()
            self.saved_step = self.state.step if ours else -1
            self.keep_lineage(checkpoint["config"])
            if self.dist.is_main:
                print(f"resumed from {path} at epoch {s.epoch} step {s.step}", flush=True)
                if source is not None:
                    print(
                        f"trainer.init_from={source.path} not applied again: this run "
                        "continues from its own checkpoint (trainer.resume wins)",
                        flush=True,
                    )
        # TensorBoard events after the resumed step (from a crashed launch) are dropped.
        self.progress = Progress(
            self.run_dir / "tensorboard", self.dist.is_main, self.state.step + 1
        )
        if source is not None and resume is None:
            self.progress.note(
                "run/init_from",
                f"trainer.init_from: weights from {source.describe()}; optimizer, "
                "learning-rate schedule and counters start afresh",
            )
        total, trainable = self.model.num_parameters()
        self.progress.log(f"model parameters: {total:,} total, {trainable:,} trainable")
        optim = self.setup.config["optim"]
        if optim["schedule"] == "cosine":
            self.progress.log(
                f"lr schedule: cosine from {optim['lr']:g} down to {optim['min_lr']:g} at "
                f"update {optim['decay_steps']:,}"
            )

    def keep_lineage(self, resumed_config: dict[str, Any]) -> None:
        """A resumed run keeps the lineage its checkpoint records (where its weights came
        from), not that of this launch's ``trainer.init_from``."""
        if "lineage" in resumed_config:
            self.setup.config["lineage"] = resumed_config["lineage"]
        else:
            self.setup.config.pop("lineage", None)

    def find_resume_checkpoint(self) -> tuple[Path, dict[str, Any]] | None:
        """The checkpoint ``trainer.resume`` asks for: this run's own newest good one first
        (so a relaunch after a crash continues the run); ``PATH`` only starts a run that has
        none yet; ``never`` none."""
        mode = str(self.tcfg.resume)
        if mode == "never":
            return None
        found = self.ckpts.newest_good() if self.dist.is_main else None
        path = dist.broadcast_object(str(found[0]) if found else None, self.dist)
        if path is not None:
            return Path(path), (found[1] if found else load_checkpoint(path))
        return None if mode == "auto" else (Path(mode), load_checkpoint(mode))

    # -- one update ---------------------------------------------------------------------------
    def train_step(
        self, batches: list[tuple[Batch, float]], global_tokens: int | None = None
    ) -> StepResult:
        """Run one update and count it: applied, an fp16 overflow, or skipped as non-finite
        (too many of those in a row stop the run)."""
        result = self.update(batches, global_tokens)
        self.last_grad_norm = result.grad_norm
        if result.outcome is Outcome.APPLIED:
            self.nonfinite_run = 0
            self.state.step += 1
            if self.clock_start is not None and self.state.step == self.first_step + 1:
                self.progress.log(f"first update of this launch: step {self.state.step}")
        elif result.outcome is Outcome.OVERFLOW:
            self.state.nonfinite_total += 1  # the scaler lowers its scale and goes on
        else:
            self.skip_nonfinite_update()
        return result

    def skip_nonfinite_update(self) -> None:
        """Count a skipped update; too many in a row stop the run (checkpoints are kept)."""
        s = self.state
        s.nonfinite_total += 1
        self.nonfinite_run += 1
        limit = self.tcfg.max_nonfinite_updates
        print(
            f"warning: non-finite loss/gradient after update {s.step}; update skipped "
            f"({self.nonfinite_run} in a row, {s.nonfinite_total} in total)",
            file=sys.stderr,
            flush=True,
        )
        if self.nonfinite_run >= limit:
            last = self.ckpts.last_path if self.ckpts.last_path.exists() else "none yet"
            raise TrainingDivergedError(
                f"{limit} consecutive non-finite updates (trainer.max_nonfinite_updates) at "
                f"update {s.step}: training diverged. The last good checkpoint is {last}; "
                "lower optim.lr, raise optim.warmup_steps or use trainer.precision=fp32."
            )

    # -- validation and checkpoints -----------------------------------------------------------
    def validate(self) -> float:
        """Val loss, perplexity and greedy BLEU, each rank doing its share; rank 0 logs."""
        s, setup = self.state, self.setup
        v = validate(
            self.update,
            self.tokenizer,
            setup.valid_split,
            setup.valid,
            self.tcfg.max_tokens,
            self.tcfg.valid_batch_size,
            self.dist,
        )
        examples = v.examples(setup.valid)
        self.progress.validation(s.step, s.epoch, v.loss, v.ppl, v.bleu, examples, v.bleu_by_set)
        s.validated_step, s.validated_bleu = s.step, v.bleu
        return v.bleu

    def checkpoint(self, validate: bool) -> None:
        """Optionally validate (best score, early stopping), then save a checkpoint."""
        s = self.state
        if validate and s.validated_step != s.step:  # not yet validated at this step
            val_bleu = self.validate()
            if val_bleu > s.best_val_bleu:
                s.best_val_bleu, s.best_step, s.bad_validations = val_bleu, s.step, 0
            else:
                s.bad_validations += 1
                patience = self.tcfg.patience
                if patience and s.bad_validations >= patience:
                    s.stop_reason = (
                        f"early stopping: no val BLEU gain in {patience} validations "
                        f"(best {s.best_val_bleu:.2f})"
                    )
        val_bleu = s.validated_bleu if s.validated_step == s.step else None
        if val_bleu is not None:  # before the state is taken, so the saved scores include it
            self.ckpts.record_score(s.step, val_bleu)
        if self.dist.enabled:
            digest = dist.check_replicas_in_sync(self.model, self.dist)
            self.progress.log(
                f"step {s.step}: parameters identical on all {self.dist.world_size} ranks "
                f"(checksum {digest[:16]})"
            )
        saved = dataclasses.replace(
            s, train_seconds=self.training_seconds(), checkpoint_scores=dict(self.ckpts.scores)
        )
        state = training_checkpoint(
            self.update, saved, self.setup.config, self.tokenizer.model_bytes, val_bleu
        )
        if self.dist.is_main:
            self.ckpts.save(state, is_best=val_bleu is not None and s.best_step == s.step)
        dist.barrier(self.dist)
        self.saved_step = s.step

    # -- stop rules ---------------------------------------------------------------------------
    def training_seconds(self) -> float:
        """Training time of this run so far, earlier launches included."""
        if self.clock_start is None:
            return self.state.train_seconds
        return self.state.train_seconds + self.clock() - self.clock_start

    def check_time(self) -> None:
        """Set ``time_up`` once ``trainer.max_minutes`` of training time are spent (not when
        training stops anyway). Rank 0's clock decides, so all ranks stop together."""
        max_minutes = self.tcfg.max_minutes
        if max_minutes is None or self.done():
            return
        up = self.training_seconds() >= 60.0 * max_minutes
        self.time_up = bool(dist.broadcast_object(up, self.dist))

    def finished(self) -> bool:
        """max_epochs or max_steps reached."""
        max_steps = self.tcfg.max_steps
        return self.state.epoch >= self.tcfg.max_epochs or (
            max_steps is not None and self.state.step >= max_steps
        )

    def done(self) -> bool:
        """max_epochs, max_steps or max_minutes reached, or early stopping triggered."""
        return self.finished() or self.time_up or bool(self.state.stop_reason)

    def stop_message(self) -> str:
        """Why training stopped before max_epochs/max_steps ("" when it did not)."""
        s = self.state
        reasons = [s.stop_reason] if s.stop_reason else []
        if self.time_up and not self.finished():  # its validation may also end the patience
            where = f"{s.batches_done} batches into epoch {s.epoch + 1}"
            reasons.insert(
                0,
                f"time budget: trainer.max_minutes={self.tcfg.max_minutes} spent "
                f"({self.training_seconds() / 60:.1f} min of training) at step {s.step}, "
                + (where if s.batches_done else f"after epoch {s.epoch}"),
            )
        return "; ".join(reasons)

    # -- the loop -----------------------------------------------------------------------------
    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        """The shuffled token-budget batches (example indices) of ``epoch`` (1-based)."""
        split = self.setup.train_split
        rng = epoch_rng(self.cfg.seed, epoch)
        return token_batches(split.src_lengths, split.tgt_lengths, self.tcfg.max_tokens, rng)

    def micro_batches(self, group: list[np.ndarray]) -> tuple[list[tuple[Batch, float]], int]:
        """This rank's share of one update's batches, with weight 1, and the update's target
        tokens on all ranks. A rank left without one (the last, short update of an epoch)
        runs the first batch with weight 0, so every rank takes part in the gradient
        all-reduce and each example counts once."""
        tok, split = self.tokenizer, self.setup.train_split
        mine = dist.shard(group, self.dist)
        weight = 1.0 if mine else 0.0
        batches = [
            (collate(split, idx, tok.pad_id, tok.bos_id, tok.eos_id), weight)
            for idx in (mine or group[:1])
        ]
        total = sum(target_tokens(split, idx) for idx in group)
        return (pinned(batches) if self.setup.device.type == "cuda" else batches), total

    def train(self) -> TrainResult:
        """Train until a stop rule, then average and evaluate the run."""
        s, per_update = self.state, self.dist.world_size * self.tcfg.update_freq
        self.clock_start, self.first_step = self.clock(), s.step
        self.check_time()  # a relaunch of a run whose time is already spent trains no further
        while not self.done():
            batches = self.epoch_batches(s.epoch + 1)
            # Regroup what is left of the epoch: a resumed run may use another update_freq
            # or number of processes than the one that wrote the checkpoint.
            groups = [
                batches[i : i + per_update] for i in range(s.batches_done, len(batches), per_update)
            ]
            done = math.ceil(s.batches_done / per_update)
            self.progress.start_epoch(s.epoch + 1, len(groups) + done, done)
            window = Window(self.setup.device)
            with Prefetcher(self.micro_batches, groups) as ahead:  # built in the background
                for group, (micro, global_tokens) in zip(groups, ahead, strict=True):
                    result = self.train_step(micro, global_tokens)
                    s.batches_done += len(group)
                    self.progress.advance()
                    if result.outcome is Outcome.APPLIED:
                        local_tokens = sum(int(b.n_tgt_tokens * w) for b, w in micro)
                        window.add(result.loss, local_tokens, result.tokens)
                        self.after_update(window)
                    if self.done():
                        break
            self.progress.end_epoch()
            if s.batches_done >= len(batches):
                s.epoch += 1
                s.batches_done = 0
                self.check_time()  # before the save, which then records the time as spent
                self.checkpoint(validate=self.tcfg.validate_every_steps is None)
        if self.saved_step != s.step or s.validated_step != s.step:
            self.checkpoint(validate=True)
        s.train_seconds, self.clock_start = self.training_seconds(), None  # the loop's end
        if message := self.stop_message():
            self.progress.log(message)
        return finish_run(self.setup, self.ckpts, s, self.stop_message(), self.progress)

    def after_update(self, window: Window) -> None:
        """Log every ``log_every`` updates; validate/save on their step intervals, and when
        training stops."""
        t, step = self.tcfg, self.state.step
        if not self.dist.enabled or step % t.log_every == 0:  # a collective when distributed
            self.check_time()
        if step % t.log_every == 0:
            loss, tokens_per_s = window.flush()
            scalars = {
                "loss": loss,
                "lr": self.update.scheduler.get_last_lr()[0],
                "tokens_per_s": tokens_per_s,
                "grad_norm": self.last_grad_norm,
                "peak_memory_mib": peak_memory_mib(self.setup.device),
                "nonfinite_updates": self.state.nonfinite_total,
            }
            self.progress.train_scalars(step, scalars)
        validate = bool(t.validate_every_steps) and step % t.validate_every_steps == 0
        save = bool(t.save_every_steps) and step % t.save_every_steps == 0
        if validate or save or self.done():
            self.checkpoint(validate=validate or self.done())
