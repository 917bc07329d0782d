"""Export a checkpoint to a CTranslate2 model directory, and translate with that directory.

The exported directory holds CTranslate2's ``model.bin``, ``config.json`` and
``shared_vocabulary.json`` (the SentencePiece pieces in id order, so ids match), plus
``spm.model`` (the SentencePiece model) and ``transformer_mt.json`` (languages, the source
checkpoint, ``max_positions``). The weights map onto a ``TransformerSpec`` one to one:
pre/post-norm from ``norm_first``, fused q/k/v (self-attention) and k/v (cross-attention)
projections, embeddings scaled by √d_model, and the model's own sinusoidal table exported
as a learned position table (CTranslate2's built-in sinusoids use another layout).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from transformer_mt.data.tokenizer import Tokenizer
from transformer_mt.decoding.beam import length_penalty
from transformer_mt.decoding.search import BEAM, SearchOptions, output_budget
from transformer_mt.decoding.translator import Translator, encode_to_fit
from transformer_mt.errors import UserError
from transformer_mt.formats.atomic import atomic_directory
from transformer_mt.model import Transformer
from transformer_mt.model.attention import MultiHeadAttention
from transformer_mt.model.layers import EncoderLayer, FeedForward

METADATA_FILE = "transformer_mt.json"
SPM_FILE = "spm.model"
QUANTIZATIONS = (
    "int8",
    "int8_float32",
    "int8_float16",
    "int8_bfloat16",
    "int16",
    "float16",
    "bfloat16",
    "float32",
)
# With α = 0, CTranslate2's beam search stops as soon as its best beam ends; any nonzero
# length penalty makes it go on until beam_size hypotheses are finished, this project's rule.
# 1e-6 changes CTranslate2's own ranking negligibly (and the hypotheses are rescored anyway).
_NO_EARLY_EXIT = 1e-6


def _import_ctranslate2() -> Any:
    try:
        import ctranslate2
    except ImportError as e:
        raise UserError("CTranslate2 is not installed: pip install ctranslate2") from e
    return ctranslate2


# -- the model specification --------------------------------------------------------------------


def _array(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).cpu().numpy()


def _set_layer_norm(spec: Any, norm: nn.LayerNorm) -> None:
    spec.gamma = _array(norm.weight)
    spec.beta = _array(norm.bias)


def _set_linear(spec: Any, *linears: nn.Linear) -> None:
    """Set ``spec`` to the given linear layers, fused along the output dimension."""
    spec.weight = np.concatenate([_array(lin.weight) for lin in linears])
    if linears[0].bias is not None:
        spec.bias = np.concatenate([_array(lin.bias) for lin in linears])


def _set_attention(spec: Any, attn: MultiHeadAttention, norm: nn.LayerNorm, is_self: bool) -> None:
    _set_layer_norm(spec.layer_norm, norm)
    if is_self:
        _set_linear(spec.linear[0], attn.q_proj, attn.k_proj, attn.v_proj)
    else:
        _set_linear(spec.linear[0], attn.q_proj)
        _set_linear(spec.linear[1], attn.k_proj, attn.v_proj)
    _set_linear(spec.linear[-1], attn.out_proj)


def _set_ffn(spec: Any, ffn: FeedForward, norm: nn.LayerNorm) -> None:
    _set_layer_norm(spec.layer_norm, norm)
    _set_linear(spec.linear_0, ffn.linear1)
    _set_linear(spec.linear_1, ffn.linear2)


def _activation(model: Transformer) -> Any:
    act = _import_ctranslate2().specs.common_spec.Activation
    module = model.encoder.layers[0].feed_forward.activation
    if isinstance(module, nn.ReLU):
        return act.RELU
    if isinstance(module, nn.GELU):
        return act.GELUTanh if module.approximate == "tanh" else act.GELU
    raise UserError(f"cannot export activation {type(module).__name__} to CTranslate2")


def _set_stack_inputs(spec: Any, model: Transformer, positions: np.ndarray) -> None:
    embeddings = spec.embeddings[0] if isinstance(spec.embeddings, list) else spec.embeddings
    embeddings.weight = _array(model.embedding.tokens.weight)
    spec.scale_embeddings = True  # × √d_model
    spec.position_encodings.encodings = positions


def build_spec(model: Transformer, tokenizer: Tokenizer) -> Any:
    """A CTranslate2 ``TransformerSpec`` holding ``model``'s weights and vocabulary."""
    ct2 = _import_ctranslate2()
    encoder, decoder = model.encoder, model.decoder
    first: EncoderLayer = encoder.layers[0]
    norm_first = first.sublayer1.norm_first
    spec = ct2.specs.TransformerSpec.from_config(
        (len(encoder.layers), len(decoder.layers)),
        first.self_attn.n_heads,
        pre_norm=norm_first,
        activation=_activation(model),
    )
    positions = _array(model.embedding.positions.pe)  # (max_positions, d_model)
    _set_stack_inputs(spec.encoder, model, positions)
    _set_stack_inputs(spec.decoder, model, positions)
    _set_linear(spec.decoder.projection, model.output_projection)
    for layer_spec, enc in zip(spec.encoder.layer, encoder.layers, strict=True):
        _set_attention(layer_spec.self_attention, enc.self_attn, enc.sublayer1.norm, True)
        _set_ffn(layer_spec.ffn, enc.feed_forward, enc.sublayer2.norm)
    for layer_spec, dec in zip(spec.decoder.layer, decoder.layers, strict=True):
        _set_attention(layer_spec.self_attention, dec.self_attn, dec.sublayer1.norm, True)
        _set_attention(layer_spec.attention, dec.cross_attn, dec.sublayer2.norm, False)
        _set_ffn(layer_spec.ffn, dec.feed_forward, dec.sublayer3.norm)
    if norm_first:  # pre-norm stacks end with a LayerNorm
        _set_layer_norm(spec.encoder.layer_norm, encoder.final_norm)
        _set_layer_norm(spec.decoder.layer_norm, decoder.final_norm)

    pieces = [tokenizer.sp.id_to_piece(i) for i in range(tokenizer.vocab_size)]
    spec.register_source_vocabulary(pieces)
    spec.register_target_vocabulary(pieces)
    config = spec.config
    config.layer_norm_epsilon = first.sublayer1.norm.eps
    config.unk_token = pieces[tokenizer.unk_id]
    config.bos_token = config.decoder_start_token = pieces[tokenizer.bos_id]
    config.eos_token = pieces[tokenizer.eos_id]
    config.add_source_eos = True  # this project's sources end with EOS
    return spec


# -- export -------------------------------------------------------------------------------------


def export_ctranslate2(
    checkpoint: Path, output_dir: Path, quantization: str | None = None, force: bool = False
) -> Path:
    """Write ``checkpoint`` as a CTranslate2 model directory ``output_dir``; returns it.

    ``quantization`` (int8, int8_float32, float16, ...; None keeps float32) is applied to the
    weights. An existing non-empty ``output_dir`` is replaced only with ``force``. The model
    is written to a temporary sibling directory and renamed into place, so a failed export
    leaves no partial directory behind.
    """
    checkpoint, output_dir = Path(checkpoint), Path(output_dir)
    if quantization is not None and quantization not in QUANTIZATIONS:
        raise UserError(
            f"unknown quantization '{quantization}'; choose from {', '.join(QUANTIZATIONS)}"
        )
    _check_output_dir(output_dir, force)
    translator = Translator.from_checkpoint(checkpoint, device="cpu")
    spec = build_spec(translator.model, translator.tokenizer)
    spec.validate()
    spec.optimize(quantization=quantization)
    metadata = _metadata(translator, checkpoint, quantization)

    with atomic_directory(output_dir) as tmp:
        spec.save(str(tmp))
        (tmp / SPM_FILE).write_bytes(translator.tokenizer.model_bytes)
        (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2, default=str) + "\n")
    return output_dir


def _check_output_dir(output_dir: Path, force: bool) -> None:
    if not output_dir.exists():
        return
    if not output_dir.is_dir():
        raise UserError(f"{output_dir} exists and is not a directory")
    if not any(output_dir.iterdir()):
        return
    if not force:
        raise UserError(f"{output_dir} exists and is not empty; pass --force to overwrite it")
    if not (output_dir / METADATA_FILE).is_file():  # --force replaces only an earlier export
        raise UserError(
            f"{output_dir} is not a tmt-export directory (no {METADATA_FILE}); "
            "--force only replaces an earlier export"
        )


def _metadata(translator: Translator, checkpoint: Path, quantization: str | None) -> dict:
    data = translator.config.get("data") or {}
    return {
        "format": "ctranslate2",
        "format_version": 1,
        "checkpoint": str(checkpoint.resolve()),
        "step": translator.step,
        "src_lang": data.get("src_lang"),
        "tgt_lang": data.get("tgt_lang"),
        "max_positions": translator.model.max_positions,
        "vocab_size": translator.tokenizer.vocab_size,
        "quantization": quantization,
        "model": translator.config.get("model"),
    }


# -- translation --------------------------------------------------------------------------------

Scored = tuple[list[int], float]  # subword ids (no BOS/EOS) and the length-normalized score


class CTranslate2Translator:
    """Translate raw sentences with an exported directory, the way :class:`Translator` does.

    Search options map onto ``translate_batch`` as follows:

    * ``beam_size`` → ``beam_size`` (1 = greedy), with ``patience=1``;
    * ``max_len_a``/``max_len_b`` → ``max_decoding_length = budget − 1`` where
      ``budget = ⌊a·(source subwords + EOS)⌋ + b`` capped to [1, max_positions], exactly
      as here; sentences are grouped by budget, one ``translate_batch`` call per group.
      Here the budget counts EOS and the last step may only emit EOS; CTranslate2 stops
      after ``max_decoding_length`` tokens without one, so the outputs have the same
      tokens; the EOS log-prob of a hypothesis cut by the budget is added back when
      rescoring (below);
    * ``min_len`` (EOS included) → ``min_decoding_length = min_len − 1`` (EOS excluded);
    * ``no_repeat_ngram`` → ``no_repeat_ngram_size``;
    * ``nbest`` → the number of hypotheses kept, ``num_hypotheses = beam_size``;
    * ``alpha`` → ``length_penalty`` (or 1e-6 when α = 0), but only for CTranslate2's own
      ranking: CTranslate2 normalizes by ``length^α`` (length without EOS), this project by
      the GNMT ``((5 + length) / 6)^α`` with EOS counted. So with beam search (and for
      every n-best list) each returned hypothesis is rescored with ``score_batch`` and
      ranked by ``log P(Y + EOS) / ((5 + |Y| + 1) / 6)^α``, the score :func:`beam_search`
      gives. A nonzero penalty also makes CTranslate2 finish ``beam_size`` hypotheses, as
      here, instead of stopping once the best beam ends.

    PAD and BOS are never generated (``suppress_sequences``), as here.

    Remaining differences, all in beam search (greedy search gives the same tokens):
    CTranslate2 removes forbidden tokens (PAD, BOS, EOS before ``min_len``, repeated n-grams)
    before the softmax and this project after it, so the cumulative scores that choose the
    surviving beams differ by that renormalization (returned scores are exact all the same,
    thanks to the rescoring); on the budget's last step CTranslate2 finishes the top
    ``beam_size`` candidates as they are, where this project first refills the beam with
    non-EOS candidates and then forces EOS; and when more than ``beam_size`` hypotheses
    are finished, CTranslate2 keeps the best by its own normalized score, this project the
    first ones finished.
    """

    def __init__(self, translator: Any, tokenizer: Tokenizer, max_positions: int) -> None:
        self.translator = translator
        self.tokenizer = tokenizer
        self.max_positions = max_positions
        self.pieces = [tokenizer.sp.id_to_piece(i) for i in range(tokenizer.vocab_size)]
        self.piece_ids = {p: i for i, p in enumerate(self.pieces)}

    @classmethod
    def from_dir(
        cls,
        path: str | Path,
        device: str = "cpu",
        compute_type: str = "default",
        intra_threads: int = 0,
    ) -> CTranslate2Translator:
        """Load a directory written by :func:`export_ctranslate2`."""
        path = Path(path)
        meta_path = path / METADATA_FILE
        if not meta_path.is_file() or not (path / SPM_FILE).is_file():
            raise UserError(f"{path} is not a transformer_mt CTranslate2 export")
        metadata = json.loads(meta_path.read_text())
        ct2 = _import_ctranslate2()
        try:
            translator = ct2.Translator(
                str(path), device=device, compute_type=compute_type, intra_threads=intra_threads
            )
        except (RuntimeError, ValueError) as e:  # unknown device/compute type, no CUDA ...
            raise UserError(f"CTranslate2 cannot load {path} on {device}: {e}") from e
        tokenizer = Tokenizer((path / SPM_FILE).read_bytes())
        return cls(translator, tokenizer, int(metadata["max_positions"]))

    def translate(
        self, sentences: list[str], options: SearchOptions = BEAM, batch_size: int = 64
    ) -> list[str]:
        """Detokenized best translations, one per input sentence, in input order."""
        best = self._search(sentences, options, batch_size, rescore=options.beam_size > 1)
        return self.tokenizer.decode([hyps[0][0] for hyps in best])

    def translate_nbest(
        self, sentences: list[str], options: SearchOptions = BEAM, batch_size: int = 64
    ) -> list[list[tuple[str, float]]]:
        """Per sentence, up to ``options.nbest`` (translation, score) pairs, best first; the
        score is the log-probability (EOS included) over the GNMT length penalty."""
        results = self._search(sentences, options, batch_size, rescore=True)
        nbest = []
        for hyps in results:
            texts = self.tokenizer.decode([ids for ids, _ in hyps])
            nbest.append([(text, score) for text, (_, score) in zip(texts, hyps, strict=True)])
        return nbest

    def _search(
        self, sentences: list[str], options: SearchOptions, batch_size: int, rescore: bool
    ) -> list[list[Scored]]:
        ids = encode_to_fit(self.tokenizer, sentences, self.max_positions)
        results: list[list[Scored]] = [[([], 0.0)] for _ in sentences]
        groups: dict[int, list[int]] = {}
        for i, s in enumerate(ids):
            if s:  # an empty input gets an empty translation
                groups.setdefault(self.budget(len(s) + 1, options), []).append(i)
        for budget, indices in sorted(groups.items()):
            sources = [[self.pieces[t] for t in ids[i]] for i in indices]
            found = self._decode(sources, budget, options, batch_size)
            if rescore:
                found = self._rescore(sources, found, options, batch_size)
            for i, hyps in zip(indices, found, strict=True):
                results[i] = hyps[: options.nbest]
        return results

    def budget(self, source_length: int, options: SearchOptions) -> int:
        """Output tokens allowed, EOS included, for a source of ``source_length`` tokens
        (EOS included): ``⌊a·length⌋ + b`` in float32 like the PyTorch search, capped."""
        lengths = torch.tensor([source_length])
        return int(output_budget(lengths, options.max_len_a, options.max_len_b, self.max_positions))

    def _decode(
        self, sources: list[list[str]], budget: int, options: SearchOptions, batch_size: int
    ) -> list[list[Scored]]:
        if budget == 1:  # only EOS fits
            return [[([], 0.0)] for _ in sources]
        beam = options.beam_size
        max_length = budget - 1  # CTranslate2 counts tokens without the final EOS
        tok = self.tokenizer
        outputs = self.translator.translate_batch(
            sources,
            max_batch_size=batch_size,
            beam_size=beam,
            patience=1,
            num_hypotheses=beam,
            length_penalty=options.alpha or _NO_EARLY_EXIT,
            no_repeat_ngram_size=options.no_repeat_ngram,
            suppress_sequences=[[self.pieces[tok.pad_id]], [self.pieces[tok.bos_id]]],
            max_input_length=0,
            max_decoding_length=max_length,
            min_decoding_length=min(max(options.min_len - 1, 0), max_length),
            return_scores=True,
        )
        return [
            [
                ([self.piece_ids[p] for p in hyp], score)
                for hyp, score in zip(r.hypotheses, r.scores, strict=True)
            ]
            for r in outputs
        ]

    def _rescore(
        self,
        sources: list[list[str]],
        found: list[list[Scored]],
        options: SearchOptions,
        batch_size: int,
    ) -> list[list[Scored]]:
        """Score every hypothesis as :func:`beam_search` does (log P(Y + EOS) over the GNMT
        penalty of |Y| + 1), with one ``score_batch`` call; each list sorted best first."""
        pairs = [(src, ids) for src, hyps in zip(sources, found, strict=True) for ids, _ in hyps]
        scored = iter(
            self.translator.score_batch(
                [src for src, _ in pairs],
                [[self.pieces[t] for t in ids] for _, ids in pairs],
                max_batch_size=batch_size,
                max_input_length=0,
            )
        )
        rescored = []
        for hyps in found:
            ranked = [
                (ids, sum(next(scored).log_probs) / length_penalty(len(ids) + 1, options.alpha))
                for ids, _ in hyps
            ]
            rescored.append(sorted(ranked, key=lambda h: -h[1]))
        return rescored
