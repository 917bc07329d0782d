"""Translate raw sentences with a trained checkpoint: the Python API behind the shell tools."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from transformer_mt.data.batching import pad
from transformer_mt.data.tokenizer import Tokenizer
from transformer_mt.decoding.beam import Hypothesis, beam_search
from transformer_mt.decoding.greedy import greedy_search
from transformer_mt.decoding.search import BEAM, SearchOptions, UncachedDecoder
from transformer_mt.errors import CheckpointError, ConfigError
from transformer_mt.model import Transformer
from transformer_mt.training.checkpoint import load_checkpoint, spm_tensor_to_bytes


def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; otherwise the named device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device '{device}' requested but CUDA is not available")
    return torch.device(device)


def build_model(model_cfg: dict[str, Any], vocab_size: int, pad_id: int) -> Transformer:
    """A Transformer from the ``model`` config section (each key is a constructor argument)."""
    return Transformer(vocab_size=vocab_size, pad_id=pad_id, **model_cfg)


class Translator:
    """A model and its tokenizer, ready to translate lists of raw sentences.

    >>> t = Translator.from_checkpoint("runs/.../checkpoints/best.pt")
    >>> t.translate(["A man is riding a bike."], SearchOptions(beam_size=5))
    """

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        device: torch.device,
        config: dict[str, Any] | None = None,
        step: int | None = None,
        use_cache: bool = True,
    ) -> None:
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.device = device
        self.config = config or {}
        self.step = step  # the training update the weights come from, when known
        self.use_cache = use_cache  # False: re-decode the whole prefix each step (benchmarks)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "cpu") -> Translator:
        """Load everything needed (weights, model config, SentencePiece model) from one file."""
        dev = resolve_device(device)
        state = load_checkpoint(path, map_location="cpu")
        try:
            tokenizer = Tokenizer(spm_tensor_to_bytes(state["spm_model"]))
            model = build_model(state["config"]["model"], tokenizer.vocab_size, tokenizer.pad_id)
            model.load_state_dict(state["model"])
        except (KeyError, TypeError, RuntimeError) as e:
            raise CheckpointError(f"{path}: inconsistent checkpoint: {e}") from e
        return cls(model, tokenizer, dev, state["config"], int(state["step"]))

    def translate_ids(
        self,
        sentences: list[str],
        options: SearchOptions = BEAM,
        batch_size: int = 64,
        max_tokens: int | None = None,
        on_truncate: Callable[[int, int], None] | None = None,
    ) -> list[list[Hypothesis]]:
        """n-best hypotheses (as ids) for each sentence, in input order.

        Inputs are sorted by length into batches of at most ``batch_size`` sentences and
        ``max_tokens`` source tokens (padding included); results do not depend on either.
        An empty sentence gets one empty hypothesis. A sentence longer than the model's
        positions is truncated to fit, and ``on_truncate(index, n_subwords)`` is called
        (by default a warning on stderr).
        """
        tok = self.tokenizer
        ids = encode_to_fit(tok, sentences, self.model.max_positions, on_truncate)
        results: list[list[Hypothesis]] = [[Hypothesis([], 0.0, 0.0)] for _ in sentences]
        decoder = self.model if self.use_cache else UncachedDecoder(self.model)
        for chunk in length_batches([len(s) + 1 for s in ids], batch_size, max_tokens):
            src = pad([[*ids[i], tok.eos_id] for i in chunk], tok.pad_id).to(self.device)
            if options.beam_size == 1 and options.nbest == 1:
                outs = greedy_search(decoder, src, tok.bos_id, tok.eos_id, options)
                hyps = [[Hypothesis(o, 0.0, 0.0)] for o in outs]
            else:
                hyps = beam_search(decoder, src, tok.bos_id, tok.eos_id, options)
            for i, h in zip(chunk, hyps, strict=True):
                results[i] = h
        return results

    def translate(
        self,
        sentences: list[str],
        options: SearchOptions = BEAM,
        batch_size: int = 64,
        max_tokens: int | None = None,
    ) -> list[str]:
        """Detokenized best translations, one per input sentence, in input order."""
        best = self.translate_ids(sentences, options, batch_size, max_tokens)
        return self.tokenizer.decode([h[0].tokens for h in best])


def length_batches(
    lengths: list[int], batch_size: int, max_tokens: int | None = None
) -> Iterator[list[int]]:
    """Indices of the non-empty (length > 1: more than EOS) inputs, sorted by length, in
    batches of at most ``batch_size`` sentences and ``max_tokens`` padded tokens."""
    order = sorted((i for i, n in enumerate(lengths) if n > 1), key=lambda i: lengths[i])
    batch: list[int] = []
    for i in order:
        too_many = max_tokens is not None and (len(batch) + 1) * lengths[i] > max_tokens
        if batch and (len(batch) >= batch_size or too_many):
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


def encode_to_fit(
    tokenizer: Tokenizer,
    sentences: list[str],
    max_positions: int,
    on_truncate: Callable[[int, int], None] | None = None,
) -> list[list[int]]:
    """Subword ids of ``sentences``, each cut to ``max_positions - 1`` (room for EOS); a cut
    calls ``on_truncate(index, n_subwords)``, by default a warning on stderr."""
    limit = max_positions - 1
    ids = tokenizer.encode(sentences)
    for i, s in enumerate(ids):
        if len(s) > limit:
            (on_truncate or _warn_truncated)(i, len(s))
            ids[i] = s[:limit]
    return ids


def _warn_truncated(index: int, length: int) -> None:
    print(
        f"warning: sentence {index + 1} has {length} subwords, more than the model's "
        "positions; truncated",
        file=sys.stderr,
    )
