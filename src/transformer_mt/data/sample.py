"""The SentencePiece sample: a seeded uniform sample of sentence pairs drawn in one pass over
the training corpora, without loading them, and the tokenizer trained on it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from omegaconf import DictConfig
from tqdm import tqdm

from transformer_mt.data.corpus import ParallelCorpus, decode_lines, stream_chunks
from transformer_mt.data.directions import is_multilingual, target_tags
from transformer_mt.data.tokenizer import Tokenizer, train_sentencepiece
from transformer_mt.errors import CorpusError


def sample_pairs(
    train: list[ParallelCorpus], n_pairs: int, seed: int, max_pairs: int | None = None
) -> tuple[list[str], list[str]]:
    """A uniform random sample of at most ``n_pairs`` sentence pairs of the training corpora
    (concatenated, the first ``max_pairs`` only), in corpus order, drawn in one pass: each
    pair gets a random key from a generator seeded with ``seed``, the smallest keys win."""
    rng = np.random.default_rng(seed)
    keys = np.empty(0)
    kept: list[tuple[int, bytes, bytes, ParallelCorpus, int]] = []  # (order, src, tgt, where)
    seen = 0
    with progress("sampling for SentencePiece") as bar:
        for corpus, first, src, tgt in stream_chunks(train, max_pairs):
            src_lines, tgt_lines = src.split(b"\n")[:-1], tgt.split(b"\n")[:-1]
            chunk_keys = rng.random(len(src_lines))
            candidates = np.arange(len(src_lines))
            if len(keys) >= n_pairs:  # only keys below the largest kept one can enter
                candidates = np.flatnonzero(chunk_keys < keys.max())
            keys = np.concatenate([keys, chunk_keys[candidates]])
            for i in candidates.tolist():
                kept.append((seen + i, src_lines[i], tgt_lines[i], corpus, first + i))
            if len(keys) > n_pairs:
                winners = np.sort(np.argpartition(keys, n_pairs)[:n_pairs])
                keys, kept = keys[winners], [kept[i] for i in winners.tolist()]
            seen += len(src_lines)
            bar.update(len(src_lines))
    kept.sort(key=lambda k: k[0])  # corpus order
    src_out = [decode_lines(s + b"\n", c.src_path, line)[0] for _, s, _, c, line in kept]
    tgt_out = [decode_lines(t + b"\n", c.tgt_path, line)[0] for _, _, t, c, line in kept]
    return src_out, tgt_out


def train_tokenizer(data_cfg: DictConfig, train: list[ParallelCorpus]) -> Tokenizer:
    """SentencePiece trained on the sampled training sentences (all source ones, then all
    target ones). For multilingual data each distinct file is sampled once (a language on
    the source side of three pairs is not counted three times), an equal share per file,
    and the target-language tags become pieces of their own."""
    tok = data_cfg.tokenizer
    if is_multilingual(data_cfg):
        sentences = sample_files(train, tok.sample_sentences, tok.seed, data_cfg.max_train_pairs)
        src, tgt = sentences, []
    else:
        src, tgt = sample_pairs(
            train, tok.sample_sentences // 2, tok.seed, data_cfg.max_train_pairs
        )
    if not any(src) and not any(tgt):
        files = ", ".join(f"{c.src_path} / {c.tgt_path}" for c in train)
        raise CorpusError(f"no text to train SentencePiece on: {files} hold no sentence")
    print(
        f"training SentencePiece ({tok.model_type}, vocab {tok.vocab_size}) on "
        f"{len(src) + len(tgt):,} sentences",
        flush=True,
    )
    model = train_sentencepiece(
        src + tgt, tok.vocab_size, tok.model_type, tok.character_coverage, target_tags(data_cfg)
    )
    return Tokenizer(model)


def sample_files(
    train: list[ParallelCorpus], n_sentences: int, seed: int, max_pairs: int | None = None
) -> list[str]:
    """A uniform sample of ``n_sentences`` sentences over the distinct files of the corpora
    (each side of each corpus, a file used by several pairs once), an equal share per file,
    drawn as :func:`sample_pairs` draws (the first ``max_pairs`` lines of each file)."""
    files: dict[Path, ParallelCorpus] = {}
    for corpus in train:
        for lang, path in ((corpus.src_lang, corpus.src_path), (corpus.tgt_lang, corpus.tgt_path)):
            files.setdefault(path.resolve(), ParallelCorpus(corpus.prefix, lang, lang))
    share = max(n_sentences // max(len(files), 1), 1)
    out: list[str] = []
    for i, one_file in enumerate(files.values()):
        out += sample_pairs([one_file], share, seed + i, max_pairs)[0]  # both sides are one file
    return out


@contextmanager
def progress(desc: str) -> Iterator[tqdm]:
    """A tqdm bar counting sentence pairs (and their rate)."""
    bar = tqdm(desc=desc, unit=" pairs", unit_scale=True, dynamic_ncols=True, mininterval=1.0)
    try:
        yield bar
    finally:
        bar.close()
