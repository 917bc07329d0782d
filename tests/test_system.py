"""System test: the tiny model learns to copy a sequence in reverse."""

from __future__ import annotations

import numpy as np
import torch
from sacrebleu.metrics import BLEU

from conftest import small_transformer
from transformer_mt.data.batching import pad
from transformer_mt.decoding import SearchOptions, greedy_search
from transformer_mt.training.loss import label_smoothed_nll_loss
from transformer_mt.training.schedule import inverse_sqrt_schedule

PAD, BOS, EOS, FIRST_SYMBOL, VOCAB = 0, 2, 3, 4, 24


def reverse_batch(
    rng: np.random.Generator, n: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    seqs = [rng.integers(FIRST_SYMBOL, VOCAB, rng.integers(3, 9)).tolist() for _ in range(n)]
    src = pad([[*s, EOS] for s in seqs], PAD)
    tgt_in = pad([[BOS, *s[::-1]] for s in seqs], PAD)
    tgt_out = pad([[*s[::-1], EOS] for s in seqs], PAD)
    return src, tgt_in, tgt_out


def test_tiny_model_learns_copy_and_reverse() -> None:
    rng = np.random.default_rng(0)
    # the tiny preset's shape (d_model 64, ffn 128, 2+2 pre-norm layers) over 24 symbols
    model = small_transformer(vocab_size=VOCAB, d_model=64, d_ff=128, max_positions=32)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3, betas=(0.9, 0.98), eps=1e-9)
    scheduler = inverse_sqrt_schedule(optimizer, warmup_steps=50)
    model.train()
    for _ in range(350):
        src, tgt_in, tgt_out = reverse_batch(rng, 64)
        loss, _ = label_smoothed_nll_loss(model(src, tgt_in), tgt_out, 0.1, PAD)
        optimizer.zero_grad()
        (loss / (tgt_out != PAD).sum()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()

    model.eval()
    src, _, tgt_out = reverse_batch(np.random.default_rng(123), 200)  # unseen sequences
    hyps = greedy_search(
        model, src, BOS, EOS, SearchOptions(beam_size=1, max_len_a=1.0, max_len_b=3)
    )
    refs = [[t for t in row if t not in (PAD, EOS)] for row in tgt_out.tolist()]
    as_text = lambda seqs: [" ".join(f"w{t}" for t in s) for s in seqs]  # noqa: E731
    bleu = BLEU().corpus_score(as_text(hyps), [as_text(refs)]).score
    exact = np.mean([h == r for h, r in zip(hyps, refs, strict=True)])
    assert bleu >= 90.0, f"BLEU {bleu:.1f}"
    assert exact >= 0.8, f"exact-match rate {exact:.2f}"
