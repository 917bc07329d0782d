"""Translate raw sentences with a trained checkpoint: the Python API behind the shell tools.

>>> from transformer_mt import Translator
>>> t = Translator.from_checkpoint("runs/multi30k_en-de/default/checkpoints/final.pt")
>>> t.translate(["A man is riding a bike."])                # beam 5, the α its run chose
>>> t.translate(["A dog runs."], beam_size=5, alpha=1.0, nbest=3)   # 3 strings per input
>>> t.translate(["A dog runs."], sample=True, topk=10, seed=1)     # a top-10 sample
>>> Translator.from_checkpoint(path, precision="bf16")    # matmuls in bf16
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from transformer_mt.data.batching import pad
from transformer_mt.data.directions import is_multilingual, language_pairs, target_tag
from transformer_mt.data.tokenizer import Tokenizer
from transformer_mt.decoding.beam import Hypothesis, beam_search
from transformer_mt.decoding.greedy import greedy_search
from transformer_mt.decoding.sampling import sample_search
from transformer_mt.decoding.search import SearchOptions, UncachedDecoder
from transformer_mt.device import HALF_TYPES, autocast, resolve_device
from transformer_mt.errors import CheckpointError, UserError
from transformer_mt.formats.checkpoint import load_checkpoint, spm_tensor_to_bytes
from transformer_mt.formats.results import tuned_alpha
from transformer_mt.model import Transformer, build_model

# What the search may run in: fp32, or bf16 or fp16 (matmuls against weights cast to that type
# once, under autocast; softmax, norms and the search's log-probabilities in fp32). fp16 needs
# CUDA, as in training.
PRECISIONS = ("fp32", "bf16", "fp16")


def check_precision(precision: str, device: torch.device) -> None:
    """UserError for a precision the search cannot run in on ``device``."""
    if precision not in PRECISIONS:
        raise UserError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        raise UserError(
            f"precision fp16 needs a CUDA device (the device is {device.type}); use bf16 on CPU"
        )


def half_precision_copy(model: Transformer, dtype: torch.dtype) -> Transformer:
    """A copy of ``model`` for decoding whose linear layers hold their weights in ``dtype``:
    under autocast its matrix multiplies then need no cast of the weights, which autocast
    would otherwise redo at every call of a search step (it keeps no cast cache under
    ``torch.inference_mode``). Embeddings, norms and position tables stay fp32, and with them
    the residual stream; an output projection tied to the embeddings gets a copy of its own."""
    half = copy.deepcopy(model)
    for module in half.modules():
        if isinstance(module, nn.Linear):
            for name, p in list(module.named_parameters(recurse=False)):
                setattr(module, name, nn.Parameter(p.detach().to(dtype), requires_grad=False))
    return half


@dataclasses.dataclass(frozen=True)
class Batch:
    """One batch of a search: its sources (subword ids, without EOS), the search settings,
    and each source's index in the whole input (its random stream when sampling)."""

    sources: list[list[int]]
    options: SearchOptions
    streams: list[int]


class Translator:
    """A model and its tokenizer, ready to translate lists of raw sentences.

    Search settings are keyword arguments of :meth:`translate` (or one ``SearchOptions``
    given as ``options``). Without ``alpha``, a checkpoint loaded from a run directory is
    decoded at the length penalty its run chose on val for it (as ``tmt-translate`` does),
    else at ``SearchOptions.alpha``. ``precision`` is one of :data:`PRECISIONS`; bf16 and fp16
    search a copy of the model with its matrix weights cast to that type when the Translator
    is made (:func:`half_precision_copy`; later changes of ``model``'s weights do not reach
    it), and their outputs differ from fp32 ones in a few sentences and may depend on the
    batch (docs/decoding.md). ``model`` itself serves the attention maps, in fp32.
    """

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        device: torch.device,
        config: dict[str, Any] | None = None,
        step: int | None = None,
        use_cache: bool = True,
        checkpoint: Path | None = None,
        precision: str = "fp32",
    ) -> None:
        check_precision(precision, device)
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.device = device
        self.config = config or {}
        self.step = step  # the training update the weights come from, when known
        self.use_cache = use_cache  # False: re-decode the whole prefix each step (benchmarks)
        self.checkpoint = checkpoint  # the file it was loaded from, for the tuned α
        self.precision = precision
        half = HALF_TYPES.get(precision)
        # what the searches run: the model, or its copy in half precision
        self.search_model = self.model if half is None else half_precision_copy(self.model, half)

    def settings(self) -> dict[str, Any]:
        """The arguments that make a Translator like this one: ``Translator(**t.settings())``
        decodes as ``t`` does, with the same model and tokenizer (a half-precision copy of
        the weights is made anew)."""
        return {
            "model": self.model,
            "tokenizer": self.tokenizer,
            "device": self.device,
            "config": self.config,
            "step": self.step,
            "use_cache": self.use_cache,
            "checkpoint": self.checkpoint,
            "precision": self.precision,
        }

    def _init_like(self, other: Translator) -> None:
        """Make this Translator (a subclass's, in its ``__init__``) decode as ``other`` does,
        with its model, tokenizer and half-precision copy (not a second copy of the weights)."""
        Translator.__init__(self, **(other.settings() | {"precision": "fp32"}))
        self.precision, self.search_model = other.precision, other.search_model

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, device: str = "cpu", precision: str = "fp32"
    ) -> Translator:
        """Load everything needed (weights, model config, SentencePiece model) from one file;
        decode on ``device`` in ``precision``."""
        dev = resolve_device(device)
        check_precision(precision, dev)
        state = load_checkpoint(path, map_location="cpu")
        try:
            tokenizer = Tokenizer(spm_tensor_to_bytes(state["spm_model"]))
            model = build_model(state["config"]["model"], tokenizer.vocab_size, tokenizer.pad_id)
            model.load_state_dict(state["model"])
            step = int(state["step"])
        except (KeyError, TypeError, AttributeError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{path}: inconsistent checkpoint: {e}") from e
        return cls(
            model, tokenizer, dev, state["config"], step, checkpoint=Path(path), precision=precision
        )

    def search_options(
        self,
        beam_size: int | None = None,
        alpha: float | None = None,
        nbest: int | None = None,
        max_len_a: float | None = None,
        max_len_b: int | None = None,
        min_len: int | None = None,
        no_repeat_ngram: int | None = None,
        sample: bool | None = None,
        topk: int | None = None,
        topp: float | None = None,
        temperature: float | None = None,
        seed: int | None = None,
    ) -> SearchOptions:
        """A SearchOptions from keyword arguments (None: SearchOptions' default; with
        ``sample``, beam size 1); without ``alpha``, the α this checkpoint's run chose on val
        at this beam size, if any (not for sampling, which has no length penalty)."""
        if sample and beam_size is None:
            beam_size = 1
        given = {
            "beam_size": beam_size,
            "nbest": nbest,
            "max_len_a": max_len_a,
            "max_len_b": max_len_b,
            "min_len": min_len,
            "no_repeat_ngram": no_repeat_ngram,
            "sample": sample,
            "topk": topk,
            "topp": topp,
            "temperature": temperature,
            "seed": seed,
        }
        options = SearchOptions(**{k: v for k, v in given.items() if v is not None})
        if alpha is None and self.checkpoint is not None and not options.sample:
            alpha = tuned_alpha(self.checkpoint, self.step, options.beam_size)
        return options if alpha is None else dataclasses.replace(options, alpha=alpha)

    def translate_ids(
        self,
        sentences: list[str],
        options: SearchOptions | None = None,
        *,
        batch_size: int = 64,
        max_tokens: int | None = None,
        on_truncate: Callable[[int, int], None] | None = None,
        first_index: int = 0,
        tgt_lang: str | None = None,
        **search: Any,
    ) -> list[list[Hypothesis]]:
        """n-best hypotheses (as ids) for each sentence, in input order.

        The search is ``options``, or the keyword arguments of :meth:`search_options`
        (``beam_size``, ``alpha``, ``nbest``, ``max_len_a``, ...); not both.

        Inputs are sorted by length into batches of at most ``batch_size`` sentences and
        ``max_tokens`` source tokens (padding included); results do not depend on either.
        An empty sentence gets one empty hypothesis. A sentence longer than the model's
        positions is truncated to fit, and ``on_truncate(index, n_subwords)`` is called
        (by default a warning on stderr).

        With ``sample``, sentence ``i`` draws from the random streams of index
        ``first_index + i`` (:func:`sample_search`): pass the index of ``sentences[0]`` in
        the whole input to sample a long input piece by piece as in one call.

        A multilingual model (trained with ``data.pairs``) translates into ``tgt_lang``: its
        tag leads every source (:meth:`source_prefix`).
        """
        options = self._options(options, search)
        tok = self.tokenizer
        prefix = self.source_prefix(tgt_lang)
        ids = encode_to_fit(tok, sentences, self.model.max_positions, on_truncate, prefix)
        results: list[list[Hypothesis]] = [[Hypothesis([], 0.0, 0.0)] for _ in sentences]
        chunks = list(length_batches([len(s) + 1 for s in ids], batch_size, max_tokens))
        batches = [
            Batch([ids[i] for i in chunk], options, [first_index + i for i in chunk])
            for chunk in chunks
        ]
        for chunk, hyps in zip(chunks, self.search_batches(batches), strict=True):
            for i, h in zip(chunk, hyps, strict=True):
                results[i] = h
        return results

    def close(self) -> None:
        """Release what this translator holds besides its model: nothing here; a
        :class:`~transformer_mt.decoding.workers.PooledTranslator` stops its processes."""

    def __enter__(self) -> Translator:
        """``with translator:`` closes it at the end of the block."""
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def search_batches(self, batches: list[Batch]) -> Iterator[list[list[Hypothesis]]]:
        """Each batch's hypotheses, in order (:meth:`search_batch`); a subclass may share
        the batches out (:class:`~transformer_mt.decoding.workers.PooledTranslator`)."""
        return (self.search_batch(batch) for batch in batches)

    def search_batch(self, batch: Batch) -> list[list[Hypothesis]]:
        """The n-best hypotheses of each source of one batch (subword ids without EOS)."""
        tok, options = self.tokenizer, batch.options
        src = pad([[*s, tok.eos_id] for s in batch.sources], tok.pad_id).to(self.device)
        decoder = self.search_model if self.use_cache else UncachedDecoder(self.search_model)
        with autocast(self.device, self.precision):
            if options.sample:
                return sample_search(decoder, src, tok.bos_id, tok.eos_id, options, batch.streams)
            if options.beam_size == 1 and options.nbest == 1:
                outs = greedy_search(decoder, src, tok.bos_id, tok.eos_id, options)
                return [[Hypothesis(o, 0.0, 0.0)] for o in outs]
            return beam_search(decoder, src, tok.bos_id, tok.eos_id, options)

    def translate(
        self,
        sentences: list[str],
        options: SearchOptions | None = None,
        *,
        batch_size: int = 64,
        max_tokens: int | None = None,
        tgt_lang: str | None = None,
        **search: Any,
    ) -> list[str] | list[list[str]]:
        """Detokenized translations in input order: one string per sentence, or with
        ``nbest`` > 1 a list of that many, best first. Search settings and ``tgt_lang`` as
        in :meth:`translate_ids`."""
        options = self._options(options, search)
        hyps = self.translate_ids(
            sentences, options, batch_size=batch_size, max_tokens=max_tokens, tgt_lang=tgt_lang
        )
        if options.nbest == 1:
            return self.tokenizer.decode([h[0].tokens for h in hyps])
        flat = self.tokenizer.decode([h.tokens for n_best in hyps for h in n_best])
        out, start = [], 0
        for n_best in hyps:
            out.append(flat[start : start + len(n_best)])
            start += len(n_best)
        return out

    def source_prefix(self, tgt_lang: str | None) -> list[int]:
        """The ids that lead every source: a multilingual model's tag for ``tgt_lang``
        (see :func:`source_prefix`)."""
        return source_prefix(self.tokenizer, self.config.get("data") or {}, tgt_lang)

    def _options(self, options: SearchOptions | None, search: dict[str, Any]) -> SearchOptions:
        if options is not None and search:
            raise TypeError(f"pass either options= or search keywords, not both ({list(search)})")
        return options if options is not None else self.search_options(**search)


def freeze_loaded() -> None:
    """Put every object alive now (the libraries, the loaded model) out of the garbage
    collector's reach. Decoding allocates many small objects, and each of the collector's
    full passes that they trigger would walk all of these again: about 90 ms with torch
    loaded, 4% of a greedy pass over the 1,000 test sentences. Call it once loading is done
    (the console scripts and each decoding worker process do)."""
    gc.collect()
    gc.freeze()


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


def source_prefix(
    tokenizer: Tokenizer,
    data: dict[str, Any],
    tgt_lang: str | None,
    how: str = "e.g. tmt-translate --tgt-lang",
) -> list[int]:
    """The ids that lead every source of a model trained on ``data`` (its config section):
    ``[id of <2de>]`` for a multilingual model asked for ``tgt_lang`` de, nothing for a
    bilingual one (whose own target language may be named). Without ``data`` (a model built
    in memory, as during training) the tokenizer decides: a language whose tag it has gets
    it. UserError for a language the model does not translate into, or a multilingual model
    asked for none (saying ``how`` to name one)."""
    pairs = language_pairs(data) if is_multilingual(data) else []
    targets = list(dict.fromkeys(tgt for _, tgt in pairs))
    if data and not targets:  # a bilingual model
        if tgt_lang is not None and tgt_lang != data.get("tgt_lang", tgt_lang):
            raise UserError(f"this model translates into {data.get('tgt_lang')}, not {tgt_lang}")
        return []
    if tgt_lang is None and not targets:
        return []
    tag = tokenizer.piece_id(target_tag(tgt_lang)) if tgt_lang is not None else None
    if tag is None or (targets and tgt_lang not in targets):
        asked = "no target language" if tgt_lang is None else f"target language {tgt_lang!r}"
        known = ", ".join(targets) if targets else "the languages its tokenizer has tags for"
        raise UserError(
            f"{asked}: this multilingual model translates into {known} (name one, {how})"
        )
    return [tag]


def encode_to_fit(
    tokenizer: Tokenizer,
    sentences: list[str],
    max_positions: int,
    on_truncate: Callable[[int, int], None] | None = None,
    prefix: list[int] | None = None,
) -> list[list[int]]:
    """Subword ids of ``sentences``, each led by ``prefix`` (a language tag; not an empty
    sentence, which stays empty) and cut to ``max_positions - 1`` (room for EOS); a cut
    calls ``on_truncate(index, n_subwords)``, by default a warning on stderr."""
    prefix = prefix or []
    limit = max_positions - 1 - len(prefix)
    ids = tokenizer.encode(sentences)
    for i, s in enumerate(ids):
        if len(s) > limit:
            (on_truncate or _warn_truncated)(i, len(s))
            s = s[:limit]
        ids[i] = [*prefix, *s] if s else s
    return ids


def _warn_truncated(index: int, length: int) -> None:
    print(
        f"warning: sentence {index + 1} has {length} subwords, more than the model's "
        "positions; truncated",
        file=sys.stderr,
    )
