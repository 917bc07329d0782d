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
from transformer_mt.evaluation.final import EvalSet, decode_and_score
from transformer_mt.training.step import UpdateStep


@dataclass
class Validation:
    """One validation: per-token loss, perplexity, greedy BLEU and the hypotheses."""

    loss: float
    ppl: float
    bleu: float
    hypotheses: list[str]

    def examples(self, valid: EvalSet, n: int = 4) -> list[str]:
        """The first ``n`` source, reference and hypothesis triples as Markdown."""
        return [
            f"**src** {src}  \n**ref** {ref}  \n**hyp** {hyp}"
            for src, ref, hyp in zip(
                valid.sources[:n], valid.references[:n], self.hypotheses[:n], strict=True
            )
        ]


@torch.inference_mode()
def validation_loss(
    update: UpdateStep, tokenizer: Tokenizer, split: EncodedSplit, max_tokens: int
) -> tuple[float, float]:
    """Per-token label-smoothed loss and perplexity (from the NLL) of ``split``."""
    model = update.model
    model.eval()
    tok = tokenizer
    total_loss, total_nll, total_tokens = 0.0, 0.0, 0
    max_len = model.max_positions - 1  # val/test are not length-filtered
    for batch in iterate_batches(
        split, max_tokens, tok.pad_id, tok.bos_id, tok.eos_id, max_len=max_len
    ):
        batch = batch.to(update.device)
        loss, nll = update.loss(model, batch)
        total_loss += float(loss)
        total_nll += float(nll)
        total_tokens += batch.n_tgt_tokens
    return total_loss / total_tokens, math.exp(min(total_nll / total_tokens, 50.0))


def validate(
    update: UpdateStep,
    tokenizer: Tokenizer,
    split: EncodedSplit,
    valid: EvalSet,
    max_tokens: int,
    batch_size: int,
) -> Validation:
    """Loss and perplexity of the encoded split, greedy BLEU on the raw sentences."""
    loss, ppl = validation_loss(update, tokenizer, split, max_tokens)
    translator = Translator(update.model, tokenizer, update.device)
    decoded = decode_and_score(translator, valid, GREEDY, batch_size, metrics=("bleu",))
    return Validation(loss, ppl, decoded.bleu, decoded.hypotheses)
