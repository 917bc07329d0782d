"""Export a checkpoint to a CTranslate2 model directory, and translate with that directory.

The exported directory holds CTranslate2's ``model.bin``, ``config.json`` and
``shared_vocabulary.json`` (the SentencePiece pieces in id order, so ids match), plus
``spm.model`` (the SentencePiece model) and ``transformer_mt.json`` (languages, the source
checkpoint, ``max_positions``, and ``tuned_alpha``: the length penalty the checkpoint's run
chose on val, by beam size, which the export is decoded at unless told otherwise). The
weights map onto a ``TransformerSpec`` one to one: pre/post-norm from ``norm_first``, fused
q/k/v (self-attention) and k/v (cross-attention) projections, embeddings scaled by
√d_model, and the model's own sinusoidal table exported as a learned position table
(CTranslate2's built-in sinusoids use another layout).

The architecture variants map onto CTranslate2's options: ``positions=learned`` is that
position table, ``positions=rope`` is ``rotary_dim=0`` (every dimension) with
``rotary_interleave=False`` (the "rotate half" layout), ``norm=rmsnorm`` is ``rms_norm`` and
``activation=swiglu`` is ``ffn_glu`` with the SWISH (SiLU) activation: CTranslate2's
``linear_0`` is W (activated) and ``linear_0_noact`` is V.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from transformer_mt.data.directions import language_pairs
from transformer_mt.data.tokenizer import Tokenizer
from transformer_mt.decoding.translator import Translator
from transformer_mt.errors import UserError
from transformer_mt.formats.atomic import atomic_directory, directory_lock
from transformer_mt.formats.results import tuned_alphas
from transformer_mt.model import Transformer
from transformer_mt.model.attention import MultiHeadAttention
from transformer_mt.model.embedding import LearnedPositionalEmbedding, PositionalEncoding
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


def import_ctranslate2() -> Any:
    """The ctranslate2 module, or a UserError saying how to install it."""
    try:
        import ctranslate2
    except ImportError as e:
        raise UserError("CTranslate2 is not installed: pip install ctranslate2") from e
    return ctranslate2


# -- the model specification --------------------------------------------------------------------


def _array(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).cpu().numpy()


def _set_layer_norm(spec: Any, norm: nn.LayerNorm | nn.RMSNorm) -> None:
    spec.gamma = _array(norm.weight)
    if isinstance(norm, nn.LayerNorm):  # RMSNorm has no bias
        spec.beta = _array(norm.bias)


def _set_linear(spec: Any, *linears: nn.Linear) -> None:
    """Set ``spec`` to the given linear layers, fused along the output dimension."""
    spec.weight = np.concatenate([_array(lin.weight) for lin in linears])
    if linears[0].bias is not None:
        spec.bias = np.concatenate([_array(lin.bias) for lin in linears])


def _set_attention(spec: Any, attn: MultiHeadAttention, norm: nn.Module, is_self: bool) -> None:
    _set_layer_norm(spec.layer_norm, norm)
    if is_self:
        _set_linear(spec.linear[0], attn.q_proj, attn.k_proj, attn.v_proj)
    else:
        _set_linear(spec.linear[0], attn.q_proj)
        _set_linear(spec.linear[1], attn.k_proj, attn.v_proj)
    _set_linear(spec.linear[-1], attn.out_proj)


def _set_ffn(spec: Any, ffn: FeedForward, norm: nn.Module) -> None:
    _set_layer_norm(spec.layer_norm, norm)
    _set_linear(spec.linear_0, ffn.linear1)
    if ffn.linear_v is not None:  # SwiGLU: (SiLU(x W) ⊙ x V) W2
        _set_linear(spec.linear_0_noact, ffn.linear_v)
    _set_linear(spec.linear_1, ffn.linear2)


def _activation(model: Transformer) -> Any:
    """CTranslate2's activation for ``model.activation``; a UserError naming the key if it
    has none."""
    act = import_ctranslate2().specs.common_spec.Activation
    module = model.encoder.layers[0].feed_forward.activation
    if isinstance(module, nn.ReLU):
        return act.RELU
    if isinstance(module, nn.GELU):
        return act.GELUTanh if module.approximate == "tanh" else act.GELU
    if isinstance(module, nn.SiLU):  # SwiGLU's gate
        return act.SWISH
    raise UserError(
        f"model.activation: cannot export activation {type(module).__name__} to CTranslate2"
    )


def _position_table(model: Transformer) -> np.ndarray | None:
    """The absolute position table (max_positions, d_model) of ``model.positions`` sinusoidal
    or learned; None for rope (its positions are in the self-attention)."""
    positions = model.embedding.positions
    if isinstance(positions, PositionalEncoding):
        return _array(positions.pe)
    if isinstance(positions, LearnedPositionalEmbedding):
        return _array(positions.weight)
    if positions is None and model.encoder.layers[0].self_attn.rotary is not None:
        return None
    raise UserError(
        f"model.positions: cannot export position scheme {type(positions).__name__} to CTranslate2"
    )


def _set_stack_inputs(spec: Any, model: Transformer, positions: np.ndarray | None) -> None:
    embeddings = spec.embeddings[0] if isinstance(spec.embeddings, list) else spec.embeddings
    embeddings.weight = _array(model.embedding.tokens.weight)
    spec.scale_embeddings = True  # × √d_model
    if positions is not None:
        spec.position_encodings.encodings = positions


def _stack_options(model: Transformer, rotary: bool) -> dict[str, Any]:
    """The TransformerEncoderSpec/TransformerDecoderSpec options both stacks share."""
    first: EncoderLayer = model.encoder.layers[0]
    options = dict(
        num_heads=first.self_attn.n_heads,
        pre_norm=first.sublayer1.norm_first,
        activation=_activation(model),
        ffn_glu=first.feed_forward.linear_v is not None,
        rms_norm=isinstance(first.sublayer1.norm, nn.RMSNorm),
    )
    if rotary:  # rotate every dimension of a head, in halves (not interleaved pairs)
        options.update(rotary_dim=0, rotary_interleave=False)
    return options


def build_spec(model: Transformer, tokenizer: Tokenizer) -> Any:
    """A CTranslate2 ``TransformerSpec`` holding ``model``'s weights and vocabulary."""
    ct2 = import_ctranslate2()
    specs = ct2.specs.transformer_spec
    encoder, decoder = model.encoder, model.decoder
    for key, stack in (("n_encoder_layers", encoder), ("n_decoder_layers", decoder)):
        if not len(stack.layers):
            raise UserError(f"model.{key}=0: CTranslate2 needs at least one layer per stack")
    first: EncoderLayer = encoder.layers[0]
    norm_first = first.sublayer1.norm_first
    positions = _position_table(model)  # (max_positions, d_model), or None for rope
    options = _stack_options(model, rotary=positions is None)
    spec = ct2.specs.TransformerSpec(
        specs.TransformerEncoderSpec(len(encoder.layers), **options),
        specs.TransformerDecoderSpec(len(decoder.layers), **options),
    )
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
    if norm_first:  # pre-norm stacks end with a norm
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

    with directory_lock(output_dir):  # one export at a time; a killed one's leftovers removed
        _check_output_dir(output_dir, force)  # again: another export may have just finished
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
    alphas = tuned_alphas(checkpoint, translator.step)  # by beam size; {} if none was tuned
    return {
        "format": "ctranslate2",
        "format_version": 1,
        "checkpoint": str(checkpoint.resolve()),
        "step": translator.step,
        "tuned_alpha": {str(beam): alphas[beam] for beam in sorted(alphas)},  # {"5": 1.4}
        "src_lang": data.get("src_lang"),
        "tgt_lang": data.get("tgt_lang"),
        "pairs": [f"{s}-{t}" for s, t in language_pairs(data)] if data.get("pairs") else [],
        "max_positions": translator.model.max_positions,
        "vocab_size": translator.tokenizer.vocab_size,
        "quantization": quantization,
        "model": translator.config.get("model"),
    }


# -- translation --------------------------------------------------------------------------------
