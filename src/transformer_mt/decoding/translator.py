"""Translate raw sentences with a trained checkpoint: the Python API behind the shell tools."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from transformer_mt.data.batching import pad
from transformer_mt.data.tokenizer import Tokenizer
from transformer_mt.decoding.beam import Hypothesis, beam_search
from transformer_mt.decoding.greedy import greedy_search
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
    >>> t.translate(["A man is riding a bike."], beam_size=5)
    """

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        device: torch.device,
        config: dict[str, Any] | None = None,
    ) -> None:
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.device = device
        self.config = config or {}

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
        return cls(model, tokenizer, dev, state["config"])

    def _batches(self, ids: list[list[int]], batch_size: int) -> Iterator[list[int]]:
        """Indices of non-empty inputs, sorted by length, in chunks of ``batch_size``."""
        order = sorted((i for i, s in enumerate(ids) if s), key=lambda i: len(ids[i]))
        for start in range(0, len(order), batch_size):
            yield order[start : start + batch_size]

    def translate_ids(
        self,
        sentences: list[str],
        beam_size: int = 5,
        batch_size: int = 64,
        alpha: float = 0.6,
        max_len_a: float = 1.5,
        max_len_b: int = 10,
        nbest: int = 1,
    ) -> list[list[Hypothesis]]:
        """n-best hypotheses (as ids) for each sentence; an empty sentence gets one empty hypothesis."""
        tok = self.tokenizer
        # Leave room for EOS; longer inputs are truncated to the model's positions.
        limit = self.model.max_positions - 1
        ids = [s[:limit] for s in tok.encode(sentences)]
        results: list[list[Hypothesis]] = [[Hypothesis([], 0.0, 0.0)] for _ in sentences]
        for chunk in self._batches(ids, batch_size):
            src = pad([[*ids[i], tok.eos_id] for i in chunk], tok.pad_id).to(self.device)
            if beam_size == 1 and nbest == 1:
                outs = greedy_search(self.model, src, tok.bos_id, tok.eos_id, max_len_a, max_len_b)
                hyps = [[Hypothesis(o, 0.0, 0.0)] for o in outs]
            else:
                hyps = beam_search(
                    self.model,
                    src,
                    tok.bos_id,
                    tok.eos_id,
                    beam_size,
                    alpha,
                    max_len_a,
                    max_len_b,
                    nbest=nbest,
                )
            for i, h in zip(chunk, hyps, strict=True):
                results[i] = h
        return results

    def translate(
        self, sentences: list[str], beam_size: int = 5, batch_size: int = 64, alpha: float = 0.6
    ) -> list[str]:
        """Detokenized translations, one per input sentence, in input order (greedy if beam_size=1)."""
        best = self.translate_ids(sentences, beam_size, batch_size, alpha)
        return self.tokenizer.decode([h[0].tokens for h in best])
