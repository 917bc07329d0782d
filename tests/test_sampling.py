"""Sampling for back-translation: reproducible, batch-invariant streams, the top-k / top-p /
temperature distribution, the limits every search obeys, the tmt-translate flags, and
CTranslate2's seeded sampling."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SMALL_MODEL_CONFIG, WORDS, FakeDecoder, small_transformer
from transformer_mt.cli import translate as translate_cli
from transformer_mt.data.batching import pad
from transformer_mt.data.tokenizer import Tokenizer, train_sentencepiece
from transformer_mt.decoding import SearchOptions, Translator, greedy_search, sample_search
from transformer_mt.errors import UserError
from transformer_mt.formats.checkpoint import save_checkpoint, spm_bytes_to_tensor
from transformer_mt.model import Transformer

PAD, UNK, BOS, EOS = 0, 1, 2, 3
A, B = 4, 5
# The chi-square distribution's 99.9% quantile, by degrees of freedom.
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32}


def sampling(**options: object) -> SearchOptions:
    return SearchOptions(beam_size=1, sample=True, **options)  # type: ignore[arg-type]


def sources(seed: int = 1, vocab_size: int = 30) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    lengths = (3, 7, 5, 1, 9)
    seqs = [[*torch.randint(4, vocab_size, (n,), generator=g).tolist(), EOS] for n in lengths]
    return pad(seqs, PAD)


@pytest.fixture(scope="module")
def model() -> Transformer:
    return small_transformer(vocab_size=30)


@pytest.fixture(scope="module")
def translator() -> Translator:
    rng = np.random.default_rng(0)
    text = [" ".join(rng.choice(WORDS, size=rng.integers(2, 12))) for _ in range(400)]
    tokenizer = Tokenizer(train_sentencepiece(text, 80, "unigram", 1.0))
    model = small_transformer(vocab_size=tokenizer.vocab_size, max_positions=20)
    return Translator(model, tokenizer, torch.device("cpu"))


def lines(n: int, seed: int = 1) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(1, 12))) for _ in range(n)]


def test_the_same_seed_gives_the_same_samples_and_other_seeds_others(
    translator: Translator,
) -> None:
    text = lines(40)
    first = translator.translate(text, sample=True, seed=1)
    assert translator.translate(text, sample=True, seed=1) == first
    other = translator.translate(text, sample=True, seed=2)
    assert sum(a != b for a, b in zip(first, other, strict=True)) > 30
    assert len(set(first)) > 30  # real, varied samples
    assert first != translator.translate(text, beam_size=1)  # not greedy search


def test_samples_do_not_depend_on_batching_or_on_where_the_input_is_cut(
    translator: Translator,
) -> None:
    text = lines(12, seed=2)
    text[5] = ""

    def sample(part: list[str], options: SearchOptions, **batching: int) -> list[list[list[int]]]:
        return [
            [h.tokens for h in hs] for hs in translator.translate_ids(part, options, **batching)
        ]

    for options in (
        sampling(topk=10, nbest=3),
        sampling(topp=0.9, temperature=0.8, no_repeat_ngram=2, min_len=2),
    ):
        whole = sample(text, options, batch_size=4)
        assert sample(text, options, batch_size=1) == whole
        assert sample(text, options, batch_size=64, max_tokens=40) == whole
        tail = sample(text[6:], options, first_index=6)
        assert tail == whole[6:]  # a file read in chunks samples as if read at once
        assert sample(text[6:], options) != whole[6:]


@pytest.mark.parametrize("no_repeat_ngram", [0, 2])
def test_top_1_a_tiny_temperature_and_a_tiny_nucleus_are_greedy_search(
    model: Transformer, translator: Translator, no_repeat_ngram: int
) -> None:
    src = sources()
    greedy = greedy_search(model, src, BOS, EOS, SearchOptions(beam_size=1, no_repeat_ngram=2))
    assert len({tuple(g) for g in greedy}) == len(greedy)  # varied outputs to compare
    greedy = greedy_search(
        model, src, BOS, EOS, SearchOptions(beam_size=1, no_repeat_ngram=no_repeat_ngram)
    )
    text = lines(12, seed=3)
    greedy_text = translator.translate(text, beam_size=1, no_repeat_ngram=no_repeat_ngram)
    for settings in (dict(topk=1), dict(temperature=1e-6), dict(topp=1e-6)):
        options = sampling(no_repeat_ngram=no_repeat_ngram, seed=7, **settings)
        found = sample_search(model, src, BOS, EOS, options)
        assert [h[0].tokens for h in found] == greedy, settings
        assert translator.translate(text, options) == greedy_text, settings


def first_token_distribution(
    model: Transformer, src: torch.Tensor, temperature: float
) -> torch.Tensor:
    """The model's first-step distribution softmax(logits / T), PAD and BOS removed."""
    memory, mask = model.encode(src)
    logits = model.decode(torch.tensor([[BOS]]), memory, mask)[0, -1]
    logits[[PAD, BOS]] = -math.inf
    return torch.softmax(logits / temperature, dim=0).double()


def chi_square(counts: np.ndarray, expected: np.ndarray) -> float:
    return float(((counts - expected) ** 2 / expected).sum())


@torch.inference_mode()
def test_first_tokens_follow_the_truncated_tempered_distribution(model: Transformer) -> None:
    src = sources()[:1]
    n = 3000
    budget = dict(max_len_a=0.0, max_len_b=2)  # one free token, then EOS
    temperature = 0.5
    probs = first_token_distribution(model, src, temperature)

    top = probs.topk(5).indices  # top-k 5: renormalized over the 5 most probable
    hyps = sample_search(
        model, src, BOS, EOS, sampling(topk=5, temperature=temperature, nbest=n, **budget)
    )
    first = [(h.tokens or [EOS])[0] for h in hyps[0]]
    assert set(first) <= set(top.tolist())
    counts = np.array([first.count(t) for t in top.tolist()])
    expected = (probs[top] / probs[top].sum()).numpy() * n
    assert chi_square(counts, expected) < CHI2_999[4]
    assert chi_square(counts, np.full(5, n / 5)) > 10 * CHI2_999[4]  # the test can tell

    ranked = probs.sort(descending=True)  # top-p 0.5: the smallest head of mass ≥ 0.5
    size = int((ranked.values.cumsum(0) < 0.5).sum()) + 1
    nucleus = ranked.indices[:size]
    hyps = sample_search(
        model, src, BOS, EOS, sampling(topp=0.5, temperature=temperature, nbest=n, **budget)
    )
    first = [(h.tokens or [EOS])[0] for h in hyps[0]]
    assert set(first) == set(nucleus.tolist()) and size >= 3
    counts = np.array([first.count(t) for t in nucleus.tolist()])
    expected = (probs[nucleus] / probs[nucleus].sum()).numpy() * n
    assert chi_square(counts, expected) < CHI2_999[size - 1]


@torch.inference_mode()
def test_scores_are_the_models_log_probabilities(model: Transformer) -> None:
    src = sources()
    hyps = sample_search(model, src, BOS, EOS, sampling(topk=3, temperature=0.7, nbest=3))
    memory, mask = model.encode(src)
    for row, samples in enumerate(hyps):
        assert [h.log_prob for h in samples] == sorted((h.log_prob for h in samples), reverse=True)
        for h in samples:  # teacher forcing, temperature 1, no truncation
            lp = torch.log_softmax(
                model.decode(
                    torch.tensor([[BOS, *h.tokens]]), memory[row : row + 1], mask[row : row + 1]
                ),
                -1,
            )
            gold = torch.tensor([*h.tokens, EOS])
            assert h.log_prob == pytest.approx(
                lp[0, torch.arange(len(gold)), gold].sum().item(), abs=1e-4
            )
            assert h.score == h.log_prob


def test_min_len_and_the_output_budget_hold_for_every_sample() -> None:
    src = torch.tensor([[A, B, A, EOS]])
    loves_eos = FakeDecoder({}, default={EOS: 0.9, A: 0.1})
    free = sample_search(loves_eos, src, BOS, EOS, sampling(nbest=50))[0]  # type: ignore[arg-type]
    assert sum(not h.tokens for h in free) > 30  # most stop at once ...
    held = sample_search(loves_eos, src, BOS, EOS, sampling(nbest=50, min_len=4))[0]  # type: ignore[arg-type]
    assert all(len(h.tokens) >= 3 for h in held)  # ... unless min_len forbids EOS
    never_stops = FakeDecoder({}, default={A: 0.5, B: 0.5 - 1e-9, EOS: 1e-9})
    options = sampling(nbest=20, max_len_a=0.5, max_len_b=3)  # ⌊0.5·4⌋ + 3 = 5 with EOS
    capped = sample_search(never_stops, src, BOS, EOS, options)[0]  # type: ignore[arg-type]
    assert all(len(h.tokens) == 4 and set(h.tokens) <= {A, B} for h in capped)
    assert len({tuple(h.tokens) for h in capped}) > 10


def test_nbest_gives_independent_samples_one_of_which_is_the_1_best_stream(
    translator: Translator,
) -> None:
    text = [*lines(10, seed=4), ""]
    one = translator.translate_ids(text, sampling(topk=20))
    four = translator.translate_ids(text, sampling(topk=20, nbest=4))
    assert [len(h) for h in four] == [4] * 10 + [1]  # an empty line: one empty sample
    for single, samples in zip(one[:10], four[:10], strict=True):
        assert single[0].tokens in [h.tokens for h in samples]  # its 1-sample stream
        assert [h.log_prob for h in samples] == sorted((h.log_prob for h in samples), reverse=True)
    assert sum(len({tuple(h.tokens) for h in s}) > 1 for s in four) >= 8


def test_sampling_options_are_checked() -> None:
    assert sampling(topk=10, seed=3).tag() == "sample-topk10-seed3"
    for bad, message in (
        (dict(temperature=0.0), "temperature"),
        (dict(temperature=math.nan), "temperature"),
        (dict(topp=0.0), "topp"),
        (dict(topp=1.5), "topp"),
        (dict(topk=-1), "topk"),
        (dict(seed=-1), "seed"),
        (dict(nbest=0), "nbest"),
    ):
        with pytest.raises(ValueError, match=message):
            sampling(**bad)
    with pytest.raises(ValueError, match="beam size must be 1"):
        SearchOptions(sample=True)
    with pytest.raises(ValueError, match="topk applies only to sampling"):
        SearchOptions(beam_size=1, topk=10)


@pytest.fixture(scope="module")
def checkpoint(translator: Translator, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sampling") / "model.pt"
    state = {
        "model": translator.model.state_dict(),
        "config": {"model": {**SMALL_MODEL_CONFIG, "max_positions": 20}, "data": {}},
        "spm_model": spm_bytes_to_tensor(translator.tokenizer.model_bytes),
        "step": 7,
        "epoch": 1,
    }
    save_checkpoint(path, state)
    return path


def run_translate(checkpoint: Path, tmp_path: Path, text: list[str], *flags: str) -> list[str]:
    source, out = tmp_path / "in.txt", tmp_path / "out.txt"
    source.write_text("".join(t + "\n" for t in text))
    translate_cli.main([str(checkpoint), "--input", str(source), "--output", str(out), *flags])
    return out.read_text().splitlines()


def test_tmt_translate_samples_reproducibly(
    checkpoint: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsysbinary: pytest.CaptureFixture[bytes],
) -> None:
    text = lines(12, seed=5)
    flags = ("--sample", "--topk", "10", "--device", "cpu")
    out = run_translate(checkpoint, tmp_path, text, *flags, "--seed", "3")
    assert len(out) == len(text) and len(set(out)) > 6
    again = run_translate(checkpoint, tmp_path, text, *flags, "--seed", "3", "--batch-size", "1")
    assert again == out
    assert run_translate(checkpoint, tmp_path, text, *flags) != out  # the default seed, 1
    assert run_translate(checkpoint, tmp_path, text, *flags, "--seed", "4") != out
    stdin = io.TextIOWrapper(io.BytesIO("".join(t + "\n" for t in text).encode()))
    monkeypatch.setattr("sys.stdin", stdin)  # one line at a time: the same samples
    translate_cli.main([str(checkpoint), *flags, "--seed", "3", "--interactive"])
    assert capsysbinary.readouterr().out.decode().splitlines() == out
    nbest = run_translate(checkpoint, tmp_path, text, *flags, "--seed", "3", "--nbest", "3")
    assert len(nbest) == 3 * len(text)
    number, rank, score, log_prob, _ = nbest[0].split("\t")
    assert (number, rank) == ("1", "1") and score == log_prob


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--topk", "10"], "--topk"),
        (["--topp", "0.9"], "--topp"),
        (["--temperature", "0.5"], "--temperature"),
        (["--seed", "2"], "--seed"),
        (["--sample", "--beam", "4"], "--beam"),
        (["--sample", "--greedy"], "--greedy"),
        (["--sample", "--alpha", "1"], "--alpha"),
        (["--sample", "--topp", "0"], "topp"),
        (["--sample", "--temperature", "-1"], "temperature"),
        (["--sample", "--topk", "-3"], "topk"),
    ],
)
def test_bad_sampling_flags_exit_non_zero_naming_the_flag(
    flags: list[str], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        translate_cli.main(["model.pt", *flags])
    assert exit_info.value.code != 0
    assert named in capsys.readouterr().err.strip().splitlines()[-1]


def test_ctranslate2_sampling_is_seeded(checkpoint: Path, tmp_path: Path) -> None:
    from transformer_mt.export.ctranslate2 import export_ctranslate2
    from transformer_mt.export.ctranslate2_engine import CTranslate2Translator

    directory = export_ctranslate2(checkpoint, tmp_path / "ct2")
    text = lines(20, seed=6)

    def load() -> CTranslate2Translator:
        return CTranslate2Translator.from_dir(directory, intra_threads=1)

    first, again, other = load(), load(), load()
    options = sampling(topk=10, seed=5)
    samples = first.translate(text, options)
    assert again.translate(text, options) == samples
    assert len(set(samples)) > 15
    changed = other.translate(text, sampling(topk=10, seed=6))
    assert sum(a != b for a, b in zip(samples, changed, strict=True)) > 10
    with pytest.raises(UserError, match="seed 5"):
        first.translate(text, sampling(topk=10, seed=6))
    greedy = first.translate(text, SearchOptions(beam_size=1))
    assert first.translate(text, sampling(topk=1, seed=5)) == greedy  # top-1 is greedy there too
    nbest = load().translate_nbest(text[:5], sampling(seed=5, nbest=3))
    assert [len(n) for n in nbest] == [3] * 5
    assert all([s for _, s in n] == sorted((s for _, s in n), reverse=True) for n in nbest)
