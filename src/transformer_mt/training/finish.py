"""The end of a run: average the last checkpoints, evaluate best.pt and averaged.pt (α tuned
on val, test at the chosen α), link the val-chosen one as ``final.pt``, write results.json
and the TensorBoard hparams. Rank 0 averages and writes; every rank decodes its share of
the evaluation sets."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from transformer_mt.decoding.translator import Translator
from transformer_mt.decoding.workers import PooledTranslator
from transformer_mt.errors import CheckpointError
from transformer_mt.evaluation.final import choose_final, eval_sets, evaluate_checkpoint
from transformer_mt.formats.atomic import atomic_link
from transformer_mt.formats.checkpoint import save_checkpoint, step_checkpoints
from transformer_mt.formats.results import RunResults
from transformer_mt.model import build_model
from transformer_mt.training import distributed as dist
from transformer_mt.training.averaging import average_checkpoints
from transformer_mt.training.config import final_alphas
from transformer_mt.training.progress import Progress
from transformer_mt.training.run_dir import CheckpointManager
from transformer_mt.training.setup import TrainingSetup
from transformer_mt.training.state import TrainState


@dataclass
class TrainResult:
    """What ``tmt-train`` reports: the checkpoint to use and the run's results."""

    best_checkpoint: Path  # best greedy val BLEU during training
    final_checkpoint: Path | None  # final.pt, the val-chosen one (None without final_eval)
    results: RunResults

    @property
    def best_val_bleu(self) -> float:
        """The best greedy val BLEU during training."""
        return float(self.results.best_val_bleu_greedy or 0.0)

    @property
    def steps(self) -> int:
        """Applied updates."""
        return self.results.steps


def finish_run(
    setup: TrainingSetup,
    ckpts: CheckpointManager,
    state: TrainState,
    stop_message: str,
    progress: Progress,
) -> TrainResult:
    """Averaging (``trainer.average_last``), the final evaluation (``trainer.final_eval``),
    ``final.pt``, results.json and TensorBoard hparams, on rank 0."""
    tcfg = setup.cfg.trainer
    best = ckpts.best_path if ckpts.best_path.exists() else ckpts.last_path  # resumed from a
    # PATH whose best no later validation beat: the newest checkpoint stands in
    results = RunResults(
        steps=state.step,
        epochs=state.epoch,
        stop_reason=stop_message,
        train_minutes=round(state.train_seconds / 60, 2),
        nonfinite_updates=state.nonfinite_total,
        best_val_bleu_greedy=state.best_val_bleu,
    )
    final: Path | None = None
    ctx = setup.dist
    candidates = [best]
    if ctx.is_main:
        ckpts.final_path.unlink(missing_ok=True)  # a relaunch's choice is made anew
        if (averaged := average_last(ckpts, tcfg.average_last, progress.log)) is not None:
            candidates.append(averaged)
    candidates = [Path(p) for p in dist.broadcast_object([str(p) for p in candidates], ctx)]
    if tcfg.final_eval:
        evaluate_candidates(setup, candidates, results, progress.log)
    if ctx.is_main:
        if tcfg.final_eval:
            final = ckpts.final_path
            atomic_link(ckpts.directory / str(results.final), final)
        results.write(ckpts.directory.parent)
        metrics = {"hparam/best_val_bleu_greedy": state.best_val_bleu}
        for name, r in results.checkpoints.items():
            stem = Path(name).stem
            metrics[f"hparam/{stem}_valid_bleu"] = r.valid.bleu
            for test_name, t in r.test.items():
                metrics[f"hparam/{stem}_{test_name}_bleu"] = t.bleu
        progress.hparams(setup.config, metrics)
    progress.close()
    dist.barrier(ctx)
    return TrainResult(best, final, results)


def evaluate_candidates(
    setup: TrainingSetup, candidates: list[Path], results: RunResults, log: Callable[[str], None]
) -> None:
    """Beam-search BLEU/chrF of each checkpoint on val (α tuned there) and on test (at the
    chosen α) into ``results``; sets ``results.final`` to the val-best. Rank 0 reads each
    checkpoint and sends its weights to the other ranks (no shared file system needed);
    each rank decodes its share of the sentences."""
    tcfg, data_cfg, ctx = setup.cfg.trainer, setup.cfg.data, setup.dist
    valid, tests = eval_sets(data_cfg, "valid"), eval_sets(data_cfg, "test")
    receiver = None  # on the other ranks, the architecture that receives rank 0's weights
    if not ctx.is_main:
        tok = setup.tokenizer
        receiver = build_model(setup.config["model"], tok.vocab_size, tok.pad_id)
    for path in candidates:
        if receiver is None:
            translator = Translator.from_checkpoint(path, device=str(setup.device))
        else:
            translator = Translator(receiver, setup.tokenizer, setup.device, checkpoint=path)
        dist.broadcast_parameters(translator.model, ctx)
        translator.step = dist.broadcast_object(translator.step, ctx)
        if ctx.enabled:  # each rank decodes its share
            decoder: Translator = dist.ShardedTranslator(translator, ctx)
        else:  # in trainer.final_workers processes
            decoder = PooledTranslator(translator, tcfg.final_workers)
        try:
            results.checkpoints[path.name] = evaluate_checkpoint(
                decoder,
                valid,
                tests,
                tcfg.final_beam_size,
                final_alphas(tcfg.final_alpha),
                tcfg.valid_batch_size,
                log,
            )
        finally:
            decoder.close()
    results.final = choose_final(results.checkpoints)


def average_last(
    ckpts: CheckpointManager, n: int | None, log: Callable[[str], None]
) -> Path | None:
    """With ``trainer.average_last=N``: the mean of the run's last N step checkpoints,
    written to ``checkpoints/averaged.pt`` (None when off or fewer than 2 exist)."""
    if not n:
        return None
    paths = step_checkpoints(ckpts.directory)[-n:]
    if len(paths) < 2:
        log(f"trainer.average_last={n}: only {len(paths)} checkpoint(s); nothing averaged")
        return None
    if len(paths) < n:
        log(f"trainer.average_last={n}: only {len(paths)} checkpoints to average")
    out = ckpts.averaged_path
    try:
        save_checkpoint(out, average_checkpoints(paths))
    except CheckpointError as e:  # the run's results matter more than its average
        print(f"warning: trainer.average_last: {e}; nothing averaged", file=sys.stderr)
        return None
    log(f"averaged {len(paths)} checkpoints ({paths[0].name} .. {paths[-1].name}) -> {out}")
    return out
