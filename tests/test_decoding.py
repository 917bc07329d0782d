"""Greedy and beam search, and the Translator's batching."""

from __future__ import annotations

import pytest
import torch

from conftest import small_transformer
from transformer_mt.data.batching import pad
from transformer_mt.decoding import Hypothesis, beam_search, greedy_search, length_penalty
from transformer_mt.model import Transformer

PAD, BOS, EOS = 0, 2, 3


def random_model() -> Transformer:
    return small_transformer(vocab_size=30)


def sources(seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    seqs = [[*torch.randint(4, 30, (n,), generator=g).tolist(), EOS] for n in (3, 7, 5, 1, 9)]
    return pad(seqs, PAD)


def test_beam_size_one_equals_greedy() -> None:
    model, src = random_model(), sources()
    greedy = greedy_search(model, src, BOS, EOS, max_len_a=1.0, max_len_b=5)
    beam = beam_search(model, src, BOS, EOS, beam_size=1, alpha=0.0, max_len_a=1.0, max_len_b=5)
    assert [h[0].tokens for h in beam] == greedy


def test_outputs_respect_max_length_and_contain_no_specials() -> None:
    model, src = random_model(), sources()
    src_len = (src != PAD).sum(1)
    for hyps in (
        [[Hypothesis(t, 0, 0)] for t in greedy_search(model, src, BOS, EOS, 0.5, 2)],
        beam_search(model, src, BOS, EOS, beam_size=4, max_len_a=0.5, max_len_b=2, nbest=4),
    ):
        for n, hs in zip(src_len.tolist(), hyps, strict=True):
            assert hs
            for h in hs:
                assert len(h.tokens) + 1 <= int(0.5 * n) + 2  # + EOS
                assert not {PAD, BOS, EOS} & set(h.tokens)


def test_nbest_is_sorted_by_normalized_score_and_scores_are_consistent() -> None:
    model, src = random_model(), sources()
    alpha = 0.6
    hyps = beam_search(model, src, BOS, EOS, beam_size=5, alpha=alpha, nbest=5)
    memory, mask = model.encode(src)
    for row, hs in enumerate(hyps):
        scores = [h.score for h in hs]
        assert scores == sorted(scores, reverse=True)
        for h in hs:  # rescore the hypothesis with teacher forcing
            tgt_in = torch.tensor([[BOS, *h.tokens]])
            lp = torch.log_softmax(
                model.decode(tgt_in, memory[row : row + 1], mask[row : row + 1]), -1
            )
            gold = torch.tensor([*h.tokens, EOS])
            log_prob = lp[0, torch.arange(len(gold)), gold].sum().item()
            assert h.log_prob == pytest.approx(log_prob, abs=1e-4)
            assert h.score == pytest.approx(log_prob / length_penalty(len(gold), alpha), abs=1e-4)


def test_beam_search_does_not_depend_on_the_rest_of_the_batch() -> None:
    model, src = random_model(), sources()
    together = beam_search(model, src, BOS, EOS, beam_size=4)
    for i in range(src.size(0)):
        row = src[i : i + 1, : int((src[i] != PAD).sum())]
        alone = beam_search(model, row, BOS, EOS, beam_size=4)
        assert alone[0][0].tokens == together[i][0].tokens
        assert alone[0][0].score == pytest.approx(together[i][0].score, abs=1e-4)


def test_min_len_and_max_len_conflict_still_finishes_every_sentence() -> None:
    model, src = random_model(), sources()
    hyps = beam_search(model, src, BOS, EOS, beam_size=3, max_len_a=0.0, max_len_b=2, min_len=5)
    assert all(h and len(h[0].tokens) <= 1 for h in hyps)
