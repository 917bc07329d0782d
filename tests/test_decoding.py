"""Greedy and beam search: a hand-set fake decoder (fairseq-style), exhaustive search on a
tiny model, cached vs. uncached decoding, and batch-independence of the Translator."""

from __future__ import annotations

import itertools
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import SMALL_MODEL_CONFIG, WORDS, FakeDecoder, small_transformer
from transformer_mt.data.batching import pad
from transformer_mt.data.tokenizer import Tokenizer, train_sentencepiece
from transformer_mt.decoding import (
    Hypothesis,
    SearchOptions,
    Translator,
    beam_search,
    greedy_search,
    length_penalty,
)
from transformer_mt.decoding.attention_maps import cross_attention, write_attention_map
from transformer_mt.decoding.beam import place_survivors
from transformer_mt.decoding.search import (
    UncachedDecoder,
    argmax,
    block_repeated_ngrams,
    compaction_order,
    output_budget,
    top_k,
)
from transformer_mt.errors import CheckpointError, UserError
from transformer_mt.formats.checkpoint import save_checkpoint, spm_bytes_to_tensor
from transformer_mt.formats.results import CheckpointResult, RunResults, Score
from transformer_mt.model import Transformer

PAD, UNK, BOS, EOS = 0, 1, 2, 3
A, B, C, D = 4, 5, 6, 7


SRC = torch.tensor([[A, B, C, EOS]])  # the fake decoder ignores the source


def best(decoder: FakeDecoder, **options: object) -> Hypothesis:
    return beam_search(decoder, SRC, BOS, EOS, SearchOptions(**options))[0][0]  # type: ignore[arg-type]


def test_beam_finds_the_better_path_that_greedy_misses() -> None:
    fake = FakeDecoder(
        {(): {A: 0.6, B: 0.4}, (A,): {C: 0.4, D: 0.3, EOS: 0.3}, (B,): {C: 0.9, EOS: 0.1}},
        default={EOS: 1.0},
    )
    assert greedy_search(fake, SRC, BOS, EOS) == [[A, C]]  # type: ignore[arg-type]
    h = best(fake, beam_size=2, alpha=0.0)
    assert h.tokens == [B, C]
    assert h.log_prob == pytest.approx(math.log(0.4) + math.log(0.9))
    assert h.score == pytest.approx(h.log_prob)  # α = 0: raw log-probability


def test_length_penalty_decides_between_short_and_long() -> None:
    # Stop at once (p .55), or A then B C D with certainty (p .45 overall).
    fake = FakeDecoder(
        {(): {EOS: 0.55, A: 0.45}, (A,): {B: 1.0}, (A, B): {C: 1.0}, (A, B, C): {D: 1.0}},
        default={EOS: 1.0},
    )
    short = best(fake, beam_size=2, alpha=0.0)
    assert short.tokens == [] and short.score == pytest.approx(math.log(0.55))
    long = best(fake, beam_size=2, alpha=1.0)
    assert long.tokens == [A, B, C, D]
    assert long.score == pytest.approx(math.log(0.45) / ((5 + 5) / 6))
    assert length_penalty(5, 1.0) == pytest.approx(10 / 6)


def test_max_length_forces_eos_and_min_length_forbids_it() -> None:
    # EOS is never in the top K here; only the budget ends the hypotheses (with EOS's own
    # log-probability).
    never_stops = FakeDecoder({}, default={A: 0.6, B: 0.4 - 1e-6, EOS: 1e-6})
    h = best(never_stops, beam_size=2, alpha=0.0, max_len_a=0.0, max_len_b=4)
    assert h.tokens == [A, A, A]  # 3 tokens + EOS = the budget of 4
    assert h.log_prob == pytest.approx(3 * math.log(0.6) + math.log(1e-6))
    h = best(never_stops, beam_size=2, alpha=0.0, max_len_a=2.0, max_len_b=1)
    assert h.tokens == [A] * 8  # budget 2·4 + 1 (the source has 4 tokens, EOS included)

    loves_eos = FakeDecoder({}, default={EOS: 0.9, A: 0.1})
    assert best(loves_eos, beam_size=3, alpha=0.0).tokens == []
    h = best(loves_eos, beam_size=3, alpha=0.0, min_len=3)
    assert h.tokens == [A, A]
    assert h.log_prob == pytest.approx(2 * math.log(0.1) + math.log(0.9))
    assert greedy_search(loves_eos, SRC, BOS, EOS, SearchOptions(beam_size=1, min_len=3)) == [
        [A, A]
    ]  # type: ignore[arg-type]


def test_eos_ends_hypotheses_and_nbest_is_sorted_and_distinct() -> None:
    fake = FakeDecoder(
        {(): {A: 0.5, B: 0.3, C: 0.2}, (A,): {EOS: 0.7, D: 0.3}, (B,): {EOS: 1.0}},
        default={EOS: 1.0},
    )
    hyps = beam_search(fake, SRC, BOS, EOS, SearchOptions(beam_size=4, alpha=0.0, nbest=4))[0]  # type: ignore[arg-type]
    assert [h.tokens for h in hyps] == [[A], [B], [C], [A, D]]
    expected = [math.log(0.35), math.log(0.3), math.log(0.2), math.log(0.15)]
    assert [h.score for h in hyps] == pytest.approx(expected)


def test_no_repeat_ngram_blocks_the_repetition() -> None:
    fake = FakeDecoder(
        {
            (): {A: 0.9, EOS: 0.1},
            (A,): {B: 0.9, EOS: 0.1},
            (A, B): {A: 0.9, EOS: 0.1},
            (A, B, A): {B: 0.9, C: 0.06, EOS: 0.04},
        },
        default={EOS: 1.0},
    )
    assert greedy_search(fake, SRC, BOS, EOS) == [[A, B, A, B]]  # type: ignore[arg-type]
    blocked = SearchOptions(beam_size=1, no_repeat_ngram=2)
    assert greedy_search(fake, SRC, BOS, EOS, blocked) == [[A, B, A, C]]  # type: ignore[arg-type]
    assert best(fake, beam_size=1, no_repeat_ngram=2).tokens == [A, B, A, C]

    found = beam_search(fake, SRC, BOS, EOS, SearchOptions(beam_size=3, nbest=3, no_repeat_ngram=2))  # type: ignore[arg-type]
    for h in found[0]:
        bigrams = list(zip(h.tokens, h.tokens[1:], strict=False))
        assert len(bigrams) == len(set(bigrams)), h.tokens


def test_block_repeated_ngrams_bans_exactly_the_completing_tokens() -> None:
    lprobs = torch.zeros(2, 8)
    block_repeated_ngrams(lprobs, [[A, B, A, B], [A, B, C, D]], 3)
    assert torch.isinf(lprobs[0]).nonzero().flatten().tolist() == [A]  # (A B) A seen before
    assert not torch.isinf(lprobs[1]).any()
    lprobs = torch.zeros(1, 8)
    block_repeated_ngrams(lprobs, [[A, C, A]], 1)  # unigrams: no token twice
    assert torch.isinf(lprobs[0]).nonzero().flatten().tolist() == [A, C]
    lprobs = torch.zeros(2, 8)  # rows of different lengths (a finished row stops growing)
    block_repeated_ngrams(lprobs, [[A, EOS], [B, B, B, B]], 3)
    assert not torch.isinf(lprobs[0]).any()
    assert torch.isinf(lprobs[1]).nonzero().flatten().tolist() == [B]


@pytest.mark.parametrize("m", [40000, 8000, 12000, 10000, 997, 30])
def test_top_k_and_argmax_equal_torch(m: int) -> None:
    g = torch.Generator().manual_seed(m)
    x = torch.randn(6, m, generator=g)
    x[1, 5:] = -math.inf  # a row with few finite entries
    x[2, m // 3] = x[2, m // 2] = x[2].max() + 1  # a tie for the maximum
    values, index = top_k(x, 10)
    expected_values, expected_index = x.topk(10, dim=1)
    assert torch.equal(values, expected_values)
    assert torch.equal(index[[0, 3, 4, 5]], expected_index[[0, 3, 4, 5]])  # distinct values
    assert torch.equal(x.gather(1, index), values)
    assert torch.equal(argmax(x), x.argmax(dim=1))  # the first of equal maxima, too
    assert argmax(x)[2] == m // 3


def test_survivors_stay_in_their_parents_row_when_they_can() -> None:
    parents = np.array([[2, 2, 0, 4, 4], [0, 1, 2, 3, 4], [3, 3, 3, 3, 3]])
    slots = place_survivors(parents)
    for row in range(3):
        assert sorted(slots[row]) == [0, 1, 2, 3, 4]  # a permutation of the rows
    assert slots[0].tolist() == [2, 1, 0, 4, 3]  # first of parent 2 stays at 2, second moves
    assert slots[1].tolist() == [0, 1, 2, 3, 4]  # nobody moves
    assert slots[2].tolist() == [3, 0, 1, 2, 4]


def test_compaction_keeps_survivors_in_place_and_fills_gaps_from_the_end() -> None:
    stay = np.array([True, False, True, False, True, True, False, True])
    order = compaction_order(stay)
    assert order.tolist() == [0, 5, 2, 7, 4]  # 0, 2, 4 stay; 5 and 7 fill the gaps 1 and 3
    assert sorted(order.tolist()) == np.nonzero(stay)[0].tolist()
    assert compaction_order(np.ones(3, dtype=bool)).tolist() == [0, 1, 2]
    assert compaction_order(np.array([False, False, True])).tolist() == [2]


def random_model(vocab_size: int = 30) -> Transformer:
    return small_transformer(vocab_size=vocab_size)


def sources(seed: int = 1, vocab_size: int = 30) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    lengths = (3, 7, 5, 1, 9)
    seqs = [[*torch.randint(4, vocab_size, (n,), generator=g).tolist(), EOS] for n in lengths]
    return pad(seqs, PAD)


@pytest.mark.parametrize("alpha", [0.0, 1.0])
@torch.inference_mode()
def test_a_very_wide_beam_finds_the_exhaustive_search_optimum(alpha: float) -> None:
    model, src = random_model(vocab_size=7), sources(seed=3, vocab_size=7)[:2]
    budget = 4  # ≤ 3 tokens, then EOS
    allowed = [UNK, 4, 5, 6]  # everything but PAD, BOS and EOS
    memory, mask = model.encode(src)
    options = SearchOptions(beam_size=128, alpha=alpha, max_len_a=0.0, max_len_b=budget)
    found = beam_search(model, src, BOS, EOS, options)
    for row in range(src.size(0)):
        candidates = []
        for n in range(budget):
            for seq in itertools.product(allowed, repeat=n):
                tgt_in = torch.tensor([[BOS, *seq]])
                lp = torch.log_softmax(
                    model.decode(tgt_in, memory[row : row + 1], mask[row : row + 1]), -1
                )
                gold = [*seq, EOS]
                log_prob = float(lp[0, torch.arange(len(gold)), torch.tensor(gold)].sum())
                candidates.append((log_prob / length_penalty(len(gold), alpha), list(seq)))
        assert len(candidates) == 1 + 4 + 16 + 64
        top_score, top_tokens = max(candidates)
        assert found[row][0].tokens == top_tokens
        assert found[row][0].score == pytest.approx(top_score, abs=1e-5)


def test_beam_size_one_equals_greedy() -> None:
    model, src = random_model(), sources()
    options = SearchOptions(beam_size=1, alpha=0.0, max_len_a=1.0, max_len_b=5)
    greedy = greedy_search(model, src, BOS, EOS, options)
    beam = beam_search(model, src, BOS, EOS, options)
    assert [h[0].tokens for h in beam] == greedy


def test_cached_decoding_gives_the_outputs_of_uncached_decoding() -> None:
    model, src = random_model(), sources()
    for options in (SearchOptions(beam_size=1), SearchOptions(beam_size=4, nbest=4)):
        cached = beam_search(model, src, BOS, EOS, options)
        uncached = beam_search(UncachedDecoder(model), src, BOS, EOS, options)  # type: ignore[arg-type]
        assert [[h.tokens for h in hs] for hs in cached] == [
            [h.tokens for h in hs] for hs in uncached
        ]
        for hs, us in zip(cached, uncached, strict=True):
            assert [h.score for h in hs] == pytest.approx([u.score for u in us], abs=1e-4)


def test_outputs_respect_max_length_and_contain_no_specials() -> None:
    model, src = random_model(), sources()
    src_len = (src != PAD).sum(1)
    options = SearchOptions(beam_size=4, max_len_a=0.5, max_len_b=2, nbest=4)
    greedy = greedy_search(
        model, src, BOS, EOS, SearchOptions(beam_size=1, max_len_a=0.5, max_len_b=2)
    )
    for hyps in (
        [[Hypothesis(t, 0, 0)] for t in greedy],
        beam_search(model, src, BOS, EOS, options),
    ):
        for n, hs in zip(src_len.tolist(), hyps, strict=True):
            assert hs
            for h in hs:
                assert len(h.tokens) + 1 <= int(0.5 * n) + 2  # + EOS
                assert not {PAD, BOS, EOS} & set(h.tokens)


def test_nbest_is_sorted_by_normalized_score_and_scores_are_consistent() -> None:
    model, src = random_model(), sources()
    alpha = 0.6
    hyps = beam_search(model, src, BOS, EOS, SearchOptions(beam_size=5, alpha=alpha, nbest=5))
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


def test_min_len_and_max_len_conflict_still_finishes_every_sentence() -> None:
    model, src = random_model(), sources()
    options = SearchOptions(beam_size=3, max_len_a=0.0, max_len_b=2, min_len=5)
    hyps = beam_search(model, src, BOS, EOS, options)
    assert all(h and len(h[0].tokens) <= 1 for h in hyps)


def test_search_options_are_checked() -> None:
    bad_options = (
        dict(beam_size=0),
        dict(beam_size=2, nbest=3),
        dict(max_len_a=0.0, max_len_b=0),
        dict(alpha=-0.5),
    )
    for bad in bad_options:
        with pytest.raises(ValueError):
            SearchOptions(**bad)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def translator() -> Translator:
    rng = np.random.default_rng(0)
    text = [" ".join(rng.choice(WORDS, size=rng.integers(2, 12))) for _ in range(400)]
    tokenizer = Tokenizer(train_sentencepiece(text, 80, "unigram", 1.0))
    model = small_transformer(vocab_size=tokenizer.vocab_size, max_positions=20)
    return Translator(model, tokenizer, torch.device("cpu"))


def test_translations_do_not_depend_on_batching(translator: Translator) -> None:
    rng = np.random.default_rng(1)
    lines = [" ".join(rng.choice(WORDS, size=rng.integers(1, 15))) for _ in range(60)]
    lines[7], lines[40] = "", "   ".strip()
    options_tried = (
        SearchOptions(beam_size=1),
        SearchOptions(beam_size=3),
        SearchOptions(beam_size=1, no_repeat_ngram=2, min_len=2),  # rows finish at other steps
        SearchOptions(beam_size=3, no_repeat_ngram=2),
    )
    for options in options_tried:
        one_by_one = [translator.translate([line], options)[0] for line in lines]
        assert translator.translate(lines, options, batch_size=64) == one_by_one
        assert translator.translate(lines, options, batch_size=7, max_tokens=40) == one_by_one
        assert len(set(one_by_one)) > 10  # real, varied outputs


def test_bf16_decoding_multiplies_in_bf16_and_keeps_the_search_in_fp32(
    translator: Translator, monkeypatch: pytest.MonkeyPatch
) -> None:
    bf16 = Translator(translator.model, translator.tokenizer, translator.device, precision="bf16")
    products: list[torch.dtype] = []  # of every F.linear: the modules' and the decoding step's
    linear = F.linear

    def recorded(*args: Any, **kwargs: Any) -> torch.Tensor:
        out = linear(*args, **kwargs)
        products.append(out.dtype)
        return out

    monkeypatch.setattr(F, "linear", recorded)
    lines = ["a man rides a bike", "two dogs play in the snow", "a woman"]
    fp32_hyps = translator.translate_ids(lines, beam_size=3, nbest=3)
    assert products and set(products) == {torch.float32}
    products.clear()
    bf16_hyps = bf16.translate_ids(lines, beam_size=3, nbest=3)
    # the layers' products of the encoder, of every decoding step and the output projection
    assert len(products) > 100 and set(products) == {torch.bfloat16}
    for n_best in (*fp32_hyps, *bf16_hyps):
        scores = [h.score for h in n_best]
        assert len(n_best) == 3 and scores == sorted(scores, reverse=True)
        assert all(isinstance(x, float) and math.isfinite(x) for x in scores)
    assert not torch.is_autocast_enabled("cpu")  # the context ends with the call


def test_half_precision_searches_a_cast_copy_and_leaves_the_model_in_fp32(
    translator: Translator,
) -> None:
    model = translator.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bf16 = Translator(model, translator.tokenizer, translator.device, precision="bf16")
    assert translator.search_model is model and bf16.model is model
    half = bf16.search_model
    assert half is not model
    kinds = {type(m).__name__ for m in half.modules()}
    assert {"Linear", "Embedding", "LayerNorm"} <= kinds
    for m in half.modules():  # linear layers in bf16; embeddings and norms in fp32
        for p in m.parameters(recurse=False):
            linear = isinstance(m, torch.nn.Linear)
            assert p.dtype == (torch.bfloat16 if linear else torch.float32), type(m)
    for name, buffer in half.named_buffers():
        assert buffer.dtype == model.get_buffer(name).dtype, name
    assert model.output_projection.weight is model.embedding.tokens.weight  # tied in the model
    assert half.embedding.tokens.weight.dtype == torch.float32  # the copy's projection: bf16
    for k, v in model.state_dict().items():  # the model keeps its fp32 weights, unchanged
        assert v.dtype == before[k].dtype and torch.equal(v, before[k]), k
    for k, v in half.state_dict().items():  # the copy holds the same values, rounded
        assert torch.allclose(v.float(), before[k], rtol=1e-2, atol=1e-6), k
    src = torch.tensor([[5, 6, 7, 2], [8, 9, 2, 0]])
    for enabled, dtype in ((False, torch.float32), (True, torch.bfloat16)):
        with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=enabled):
            cache = (half if enabled else model).start_decoding(*model.encode(src), group=2)
        # keys and values are kept in the type the products come in: no cast at each step
        assert cache.self_kv.dtype == cache.source_kv.dtype == dtype
    lines = ["a man rides a bike", "two dogs play in the snow"]
    assert bf16.translate(lines, beam_size=3) == bf16.translate(lines, beam_size=3)


def test_an_unusable_precision_is_a_user_error_naming_it(translator: Translator) -> None:
    model, tok, cpu = translator.model, translator.tokenizer, translator.device
    with pytest.raises(UserError, match=r"precision must be one of .*got 'int8'"):
        Translator(model, tok, cpu, precision="int8")
    with pytest.raises(UserError, match="fp16 needs a CUDA device"):
        Translator(model, tok, cpu, precision="fp16")


def test_too_long_inputs_are_truncated_with_a_warning(
    translator: Translator, capsys: pytest.CaptureFixture[str]
) -> None:
    long = " ".join(["the red ball"] * 20)  # far more than max_positions 20
    seen: list[tuple[int, int]] = []
    out = translator.translate_ids(["a dog", long], on_truncate=lambda i, n: seen.append((i, n)))
    assert len(out) == 2 and seen and seen[0][0] == 1 and seen[0][1] > 19
    translator.translate(["a dog", long])
    assert "sentence 2" in capsys.readouterr().err


def test_attention_maps_rows_sum_to_one_and_are_drawn(
    translator: Translator, tmp_path: Path
) -> None:
    tok = translator.tokenizer
    src_ids = tok.encode(["a dog runs on the street"])[0]
    hyp = translator.translate_ids(["a dog runs on the street"], SearchOptions(beam_size=2))[0][0]
    weights = write_attention_map(tmp_path, "000001", translator.model, tok, src_ids, hyp.tokens)
    assert weights.shape == (len(hyp.tokens) + 1, len(src_ids) + 1)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(np.load(tmp_path / "000001.npy"), weights)
    assert (tmp_path / "000001.png").read_bytes().startswith(b"\x89PNG")
    one_head = cross_attention(translator.model, [*src_ids, EOS], hyp.tokens, BOS, layer=0, head=3)
    np.testing.assert_allclose(one_head.sum(axis=1), 1.0, rtol=1e-5)
    assert not np.allclose(one_head, weights)
    with pytest.raises(UserError, match="attention-head 4"):
        cross_attention(translator.model, [*src_ids, EOS], hyp.tokens, BOS, head=4)


@pytest.mark.parametrize("alpha", [-0.5, math.inf, math.nan])
def test_search_options_refuse_an_unusable_length_penalty(alpha: float) -> None:
    with pytest.raises(ValueError, match="length penalty α must be finite and ≥ 0"):
        SearchOptions(beam_size=5, alpha=alpha)


def test_translate_takes_search_settings_as_keywords(translator: Translator) -> None:
    lines = ["a dog runs on the street", "the red ball", ""]
    by_keywords = translator.translate(lines, beam_size=3, alpha=0.5, max_len_a=1.0)
    options = SearchOptions(beam_size=3, alpha=0.5, max_len_a=1.0)
    assert by_keywords == translator.translate(lines, options)
    assert translator.translate(lines) == translator.translate(lines, SearchOptions())
    assert translator.translate(lines, beam_size=1) == translator.translate(
        lines, SearchOptions(beam_size=1)
    )
    nbest = translator.translate(lines, beam_size=3, nbest=3)
    ids = translator.translate_ids(lines, beam_size=3, nbest=3)
    assert [len(n) for n in nbest] == [3, 3, 1]  # an empty input has one empty translation
    assert nbest[0] == translator.tokenizer.decode([h.tokens for h in ids[0]])
    assert [n[0] for n in nbest] == translator.translate(lines, beam_size=3)
    with pytest.raises(TypeError, match="not both"):
        translator.translate(lines, options, beam_size=3)
    with pytest.raises(ValueError, match="nbest"):
        translator.translate(lines, beam_size=2, nbest=3)


def checkpoint_state(translator: Translator) -> dict[str, Any]:
    """A self-contained checkpoint (step 42) of ``translator``'s model and tokenizer."""
    return {
        "model": translator.model.state_dict(),
        "config": {"model": {**SMALL_MODEL_CONFIG, "max_positions": 20}, "data": {}},
        "spm_model": spm_bytes_to_tensor(translator.tokenizer.model_bytes),
        "step": 42,
        "epoch": 1,
    }


def test_a_checkpoint_is_decoded_at_the_alpha_its_run_chose(
    translator: Translator, tmp_path: Path
) -> None:
    ckpts = tmp_path / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    path = ckpts / "averaged.pt"
    state = checkpoint_state(translator)
    save_checkpoint(path, state)
    os.link(path, ckpts / "final.pt")
    loaded = Translator.from_checkpoint(ckpts / "final.pt")
    assert loaded.search_options(beam_size=4).alpha == SearchOptions.alpha  # no results.json
    chosen = CheckpointResult(42, 4, 0.25, Score(1.0, 2.0, "s"))
    RunResults(steps=42, final="averaged.pt", checkpoints={"averaged.pt": chosen}).write(
        tmp_path / "run"
    )
    assert loaded.search_options(beam_size=4).alpha == 0.25
    assert loaded.search_options(beam_size=4, alpha=1.0).alpha == 1.0  # given wins
    assert loaded.search_options(beam_size=5).alpha == SearchOptions.alpha  # chosen for beam 4
    lines = ["a dog runs", "the red ball on the street"]
    assert loaded.translate(lines, beam_size=4) == translator.translate(
        lines, beam_size=4, alpha=0.25
    )


@pytest.mark.parametrize("max_len_a", [math.inf, -math.inf, math.nan])
def test_search_options_refuse_a_non_finite_max_len_a(max_len_a: float) -> None:
    with pytest.raises(ValueError, match=r"max_len_a \(.*\) must be finite"):
        SearchOptions(max_len_a=max_len_a)


def test_a_huge_output_budget_is_capped_by_the_models_positions(translator: Translator) -> None:
    lengths = torch.tensor([2, 5, 19])
    assert output_budget(lengths, 1.5, 10, 64).tolist() == [13, 17, 38]  # ⌊1.5·n⌋ + 10
    for a, b in ((1e30, 10), (1e300, 10), (1.5, 2**70)):  # past int64, or inf in float32
        assert output_budget(lengths, a, b, 20).tolist() == [20, 20, 20]
    lines = ["a dog runs on the street", "the red ball", "a cat sits"]
    capped = translator.translate(lines, beam_size=1, max_len_a=1e30)
    assert capped == translator.translate(lines, beam_size=1, max_len_a=100.0)
    assert all(capped)  # not cut to an empty budget


@pytest.mark.parametrize(
    "damage",
    [
        "spm_as_bytes",  # bytes have no .numpy(): AttributeError
        "model_as_list",
        "step_not_a_number",
        "config_not_a_dict",
        "config_without_model",
    ],
)
def test_an_inconsistent_checkpoint_is_a_checkpoint_error_naming_it(
    translator: Translator, tmp_path: Path, damage: str
) -> None:
    state = checkpoint_state(translator)
    state |= {
        "spm_as_bytes": {"spm_model": translator.tokenizer.model_bytes},
        "model_as_list": {"model": [1, 2]},
        "step_not_a_number": {"step": "forty-two"},
        "config_not_a_dict": {"config": ["model"]},
        "config_without_model": {"config": {"data": {}}},
    }[damage]
    path = tmp_path / f"{damage}.pt"
    save_checkpoint(path, state)
    with pytest.raises(CheckpointError, match=f"{damage}.pt: damaged checkpoint: '"):
        Translator.from_checkpoint(path)
