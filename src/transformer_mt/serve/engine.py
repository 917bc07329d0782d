"""What the server decodes with: this project's search on a checkpoint, or CTranslate2 on a
``tmt-export`` directory, behind one small interface."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformer_mt.decoding.attention_maps import attention_item
from transformer_mt.decoding.search import SearchOptions
from transformer_mt.decoding.translator import Translator, encode_to_fit
from transformer_mt.export.ctranslate2 import METADATA_FILE
from transformer_mt.export.ctranslate2_engine import CTranslate2Translator

NBest = list[tuple[str, float | None]]  # (translation, score), best first


@dataclass
class Engine:
    """A loaded model: how to decode, count tokens and (torch only) read attention."""

    name: str  # torch | ctranslate2
    model_path: str
    src_lang: str
    tgt_lang: str
    options: SearchOptions  # the server's default search
    decode: Callable[[list[str], SearchOptions], list[NBest]]
    count_tokens: Callable[[str], int]
    attention: Callable[[str, SearchOptions], dict[str, Any]] | None = None


def _quiet(index: int, length: int) -> None:
    """Over-long inputs are truncated, as by tmt-translate, without a warning per request."""


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

    def decode(texts: list[str], search: SearchOptions) -> list[NBest]:
        hyps = translator.translate_ids(
            texts, search, batch_size=batch_size, max_tokens=max_tokens, on_truncate=_quiet
        )
        out: list[NBest] = []
        for nbest in hyps:
            decoded = tok.decode([h.tokens for h in nbest])
            scores = [h.score if search.beam_size > 1 else None for h in nbest]
            out.append(list(zip(decoded, scores, strict=True)))
        return out

    def attention(text: str, search: SearchOptions) -> dict[str, Any]:
        src = encode_to_fit(tok, [text], translator.model.max_positions, _quiet)[0]
        best = translator.translate_ids([text], search, on_truncate=_quiet)[0][0].tokens
        return attention_item(translator.model, tok, src, best)

    return Engine(
        name="torch",
        model_path=str(translator.checkpoint),
        src_lang=str(data.get("src_lang")),
        tgt_lang=str(data.get("tgt_lang")),
        options=options,
        decode=decode,
        count_tokens=lambda text: len(tok.encode([text])[0]) + 1,
        attention=attention,
    )


def ctranslate2_engine(
    path: Path, translator: CTranslate2Translator, options: SearchOptions
) -> Engine:
    """CTranslate2 on a tmt-export directory (no attention)."""
    metadata = json.loads((path / METADATA_FILE).read_text())
    tok = translator.tokenizer

    def decode(texts: list[str], search: SearchOptions) -> list[NBest]:
        if search.beam_size == 1:  # greedy: no scores, as with the torch engine
            return [[(text, None)] for text in translator.translate(texts, search)]
        return [[(t, s) for t, s in n] for n in translator.translate_nbest(texts, search)]

    return Engine(
        name="ctranslate2",
        model_path=str(path),
        src_lang=str(metadata.get("src_lang")),
        tgt_lang=str(metadata.get("tgt_lang")),
        options=options,
        decode=decode,
        count_tokens=lambda text: len(tok.encode([text])[0]) + 1,
    )
