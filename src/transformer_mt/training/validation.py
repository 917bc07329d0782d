"""Validation during training: loss and perplexity on the encoded val split, and greedy BLEU
on its raw sentences. Numbers in, numbers out: logging is the loop's business."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from transformer_mt.data.batching import iterate_batches
from transformer_mt.data.dataset import EncodedSplit
from transformer_mt.data.tokenizer import Tokenizer
from transformer_mt.decoding.search import GREEDY
from transformer_mt.decoding.translator import Translator
from transformer_mt.evaluation.final import EvalSet, decode_sets, mean_bleu
from transformer_mt.training import distributed as dist
from transformer_mt.training.step import UpdateStep


@dataclass
class Validation:
    """One validation: per-token loss, perplexity, greedy BLEU (the mean over the val sets:
    a multilingual model's directions) and each set's BLEU and hypotheses."""

    loss: float
    ppl: float
    bleu: float
    bleu_by_set: dict[str, float]
    hypotheses: list[list[str]]  # per val set

    def examples(self, valid: list[EvalSet], n: int = 4) -> list[str]:
        """The first ``n`` source, reference and hypothesis triples of each set as Markdown."""
        return [
            f"**src** {src}  \n**ref** {ref}  \n**hyp** {hyp}"
            for data, hyps in zip(valid, self.hypotheses, strict=True)
            for src, ref, hyp in zip(data.sources[:n], data.references[:n], hyps[:n], strict=True)
        ]


@torch.inference_mode()
def validation_loss(
    update: UpdateStep,
    tokenizer: Tokenizer,
    split: EncodedSplit,
    max_tokens: int,
    ctx: dist.DistContext | None = None,
) -> tuple[float, float]:
    """Per-token label-smoothed loss and perplexity (from the NLL) of ``split``; in a job of
    several processes each rank takes every world_size-th batch and the sums are reduced.
    Summed on the device: one host copy at the end."""
    ctx = ctx or dist.DistContext()
    model = update.model
    model.eval()
    tok = tokenizer
    totals = torch.zeros(3, dtype=torch.float64, device=update.device)  # loss, nll, tokens
    max_len = model.max_positions - 1  # val/test are not length-filtered
    batches = iterate_batches(
        split, max_tokens, tok.pad_id, tok.bos_id, tok.eos_id, max_len=max_len
    )
    for i, batch in enumerate(batches):
        if i % ctx.world_size != ctx.rank:
            continue
        loss, nll = update.loss(model, batch.to(update.device))
        totals[0] += loss
        totals[1] += nll
        totals[2] += batch.n_tgt_tokens
    if ctx.enabled:
        torch.distributed.all_reduce(totals)
    loss_sum, nll_sum, tokens = totals.tolist()
    return loss_sum / tokens, math.exp(min(nll_sum / tokens, 50.0))


def validate(
    update: UpdateStep,
    tokenizer: Tokenizer,
    split: EncodedSplit,
    valid: list[EvalSet],
    max_tokens: int,
    batch_size: int,
    ctx: dist.DistContext | None = None,
) -> Validation:
    """Loss and perplexity of the encoded split, greedy BLEU on the raw sentences of each
    val set (their mean is the BLEU that chooses checkpoints); in a job of several
    processes every rank takes its share and gets the same results."""
    ctx = ctx or dist.DistContext()
    loss, ppl = validation_loss(update, tokenizer, split, max_tokens, ctx)
    translator = dist.ShardedTranslator(Translator(update.model, tokenizer, update.device), ctx)
    decoded = decode_sets(translator, valid, GREEDY, batch_size, metrics=("bleu",))
    return Validation(
        loss,
        ppl,
        mean_bleu(decoded),
        {data.name: d.bleu for data, d in zip(valid, decoded, strict=True)},
        [d.hypotheses for d in decoded],
    )
