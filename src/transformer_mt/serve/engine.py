"""What the server decodes with: this project's search on a checkpoint, or CTranslate2 on a
``tmt-export`` directory, behind one small interface."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformer_mt.data.directions import language_pairs
from transformer_mt.decoding.attention_maps import attention_item
from transformer_mt.decoding.search import SearchOptions
from transformer_mt.decoding.translator import Translator, encode_to_fit
from transformer_mt.export.ctranslate2_engine import CTranslate2Translator

NBest = list[tuple[str, float | None]]  # (translation, score), best first


@dataclass
class Engine:
    """A loaded model: how to decode, count tokens and (torch only) read attention."""

    name: str  # torch | ctranslate2
    model_path: str
    pairs: list[tuple[str, str]]  # the directions it was trained on
    multilingual: bool  # sources carry a target-language tag: every request names a target
    options: SearchOptions  # the server's default search
    decode: Callable[[list[str], SearchOptions, str | None], list[NBest]]
    count_tokens: Callable[[str], int]  # source tokens of one sentence: subwords and EOS
    max_positions: int  # the model's positions: the longest source, EOS (and tag) included
    attention: Callable[[str, SearchOptions, str | None], dict[str, Any]] | None = None
    close: Callable[[], None] = lambda: None  # at shutdown: stop its worker processes, if any

    @property
    def max_subwords(self) -> int:
        """The most subwords of one sentence the model reads: its positions less EOS and,
        for a multilingual model, the target-language tag. Longer ones are refused."""
        return self.max_positions - 1 - int(self.multilingual)

    @property
    def sources(self) -> list[str]:
        """The languages it translates from."""
        return list(dict.fromkeys(src for src, _ in self.pairs))

    @property
    def targets(self) -> list[str]:
        """The languages it translates into."""
        return list(dict.fromkeys(tgt for _, tgt in self.pairs))

    def check_direction(self, source: str, target: str | None) -> str | None:
        """The target language to ask the model for; ValueError saying which directions it
        has. A multilingual model translates from any of its languages into any of its
        target languages (zero-shot directions included); ``source`` may be "auto"."""
        languages = set(self.sources) | set(self.targets)
        if self.multilingual:
            if target in self.targets and (source == "auto" or source in languages):
                return target
        elif (source, target) in [*self.pairs, ("auto", self.pairs[0][1])]:
            return None
        directions = ", ".join(f"{s}→{t}" for s, t in self.pairs)
        raise ValueError(f"this model translates {directions}, not {source} to {target}")


def _quiet(index: int, length: int) -> None:
    """No truncation warning: the app refuses over-long inputs (:attr:`Engine.max_subwords`)
    before they reach the engine."""


def torch_engine(
    translator: Translator,
    options: SearchOptions,
    batch_size: int = 64,
    max_tokens: int | None = None,
) -> Engine:
    """This project's search on a checkpoint (attention available), decoding in batches of at
    most ``batch_size`` sentences and ``max_tokens`` padded source tokens."""
    tok = translator.tokenizer
    data = translator.config.get("data") or {}

    def decode(texts: list[str], search: SearchOptions, tgt_lang: str | None) -> list[NBest]:
        hyps = translator.translate_ids(
            texts,
            search,
            batch_size=batch_size,
            max_tokens=max_tokens,
            on_truncate=_quiet,
            tgt_lang=tgt_lang,
        )
        out: list[NBest] = []
        for nbest in hyps:
            decoded = tok.decode([h.tokens for h in nbest])
            scores = [h.score if search.beam_size > 1 else None for h in nbest]
            out.append(list(zip(decoded, scores, strict=True)))
        return out

    def attention(text: str, search: SearchOptions, tgt_lang: str | None) -> dict[str, Any]:
        prefix = translator.source_prefix(tgt_lang)
        src = encode_to_fit(tok, [text], translator.model.max_positions, _quiet, prefix)[0]
        best = translator.translate_ids([text], search, on_truncate=_quiet, tgt_lang=tgt_lang)
        return attention_item(translator.model, tok, src, best[0][0].tokens)

    return Engine(
        name="torch",
        model_path=str(translator.checkpoint),
        pairs=language_pairs(data),
        multilingual=bool(data.get("pairs")),
        options=options,
        decode=decode,
        count_tokens=lambda text: len(tok.encode([text])[0]) + 1,
        max_positions=translator.model.max_positions,
        attention=attention,
        close=translator.close,
    )


def ctranslate2_engine(
    path: Path, translator: CTranslate2Translator, options: SearchOptions, batch_size: int = 64
) -> Engine:
    """CTranslate2 on a tmt-export directory (no attention), decoding in batches of at most
    ``batch_size`` sentences."""
    metadata = translator.data  # its transformer_mt.json, checked by from_dir
    tok = translator.tokenizer

    def decode(texts: list[str], search: SearchOptions, tgt_lang: str | None) -> list[NBest]:
        if search.beam_size == 1:  # greedy: no scores, as with the torch engine
            greedy = translator.translate(
                texts, search, batch_size=batch_size, tgt_lang=tgt_lang, on_truncate=_quiet
            )
            return [[(text, None)] for text in greedy]
        nbest = translator.translate_nbest(
            texts, search, batch_size=batch_size, tgt_lang=tgt_lang, on_truncate=_quiet
        )
        return [[(t, s) for t, s in n] for n in nbest]

    return Engine(
        name="ctranslate2",
        model_path=str(path),
        pairs=language_pairs(metadata),
        multilingual=bool(metadata.get("pairs")),
        options=options,
        decode=decode,
        count_tokens=lambda text: len(tok.encode([text])[0]) + 1,
        max_positions=translator.max_positions,
    )
