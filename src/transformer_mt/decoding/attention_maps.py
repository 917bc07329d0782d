"""Cross-attention maps: what each target subword attended to in the source.

For a source sentence and its translation, the translation is fed back through the
decoder (teacher forcing) and the encoder-decoder attention weights of one layer are
read: a (target subwords + EOS) × (source subwords + EOS) matrix whose rows sum to 1.
Written as ``.npy`` and as a PNG heatmap with the subwords on the axes (matplotlib's
object API, which renders with Agg and needs no display).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from transformer_mt.data.tokenizer import Tokenizer
from transformer_mt.errors import UserError
from transformer_mt.formats.atomic import atomic_write_bytes
from transformer_mt.model import Transformer


def check_selection(model: Transformer, layer: int, head: int | None) -> None:
    """Raise UserError unless ``layer`` (negative counts from the end) and ``head`` exist."""
    layers = model.decoder.layers
    if not -len(layers) <= layer < len(layers):
        raise UserError(f"--attention-layer {layer}: the decoder has {len(layers)} layers")
    n_heads = layers[layer].cross_attn.n_heads
    if head is not None and not 0 <= head < n_heads:
        raise UserError(f"--attention-head {head}: the model has {n_heads} heads")


@torch.inference_mode()
def cross_attention(
    model: Transformer,
    src_ids: list[int],  # source subword ids, EOS included
    tgt_ids: list[int],  # the translation's ids, without BOS/EOS
    bos_id: int,
    layer: int = -1,
    head: int | None = None,
) -> np.ndarray:  # (len(tgt_ids) + 1, len(src_ids))
    """Decoder→encoder attention of ``layer`` (default the last), averaged over heads or of
    one ``head``. Row t is the attention used to predict target token t (the last row: EOS)."""
    check_selection(model, layer, head)
    cross = all_attention(model, src_ids, tgt_ids, bos_id, kinds=("cross",))["cross"]
    weights = torch.from_numpy(cross[layer])
    chosen = weights.mean(dim=0) if head is None else weights[head]  # (T, S)
    return chosen.numpy()


ATTENTION_KINDS = ("encoder", "decoder", "cross")


@torch.inference_mode()
def all_attention(
    model: Transformer,
    src_ids: list[int],  # source subword ids, EOS included
    tgt_ids: list[int],  # the translation's ids, without BOS/EOS
    bos_id: int,
    kinds: tuple[str, ...] = ATTENTION_KINDS,
) -> dict[str, np.ndarray]:
    """The attention weights of ``kinds`` (default all) for one sentence pair, teacher-forced:
    ``encoder`` (L, H, S, S) source self-attention, ``decoder`` (L, H, T, T) masked target
    self-attention (T = target + EOS; row t is the step that predicts token t) and
    ``cross`` (L, H, T, S) target→source attention. Each row sums to 1."""
    device = next(model.parameters()).device
    src = torch.tensor([src_ids], device=device)
    tgt_in = torch.tensor([[bos_id, *tgt_ids]], device=device)
    captured: dict[str, list[torch.Tensor]] = {kind: [] for kind in kinds}

    def capture(kind: str) -> Any:
        def hook(module: Any, args: tuple, kwargs: dict, output: torch.Tensor) -> None:
            query, key_value = args[0], args[1]
            weights = module.attention_weights(
                query, key_value, kwargs.get("mask"), kwargs.get("causal", False)
            )
            captured[kind].append(weights[0].float().cpu())

        return hook

    modules = [(layer.self_attn, "encoder") for layer in model.encoder.layers]
    modules += [(layer.self_attn, "decoder") for layer in model.decoder.layers]
    modules += [(layer.cross_attn, "cross") for layer in model.decoder.layers]
    modules = [(m, kind) for m, kind in modules if kind in kinds]
    handles = [m.register_forward_hook(capture(kind), with_kwargs=True) for m, kind in modules]
    try:
        model.eval()
        memory, memory_mask = model.encode(src)
        model.decode(tgt_in, memory, memory_mask)
    finally:
        for handle in handles:
            handle.remove()
    return {kind: torch.stack(w).numpy() for kind, w in captured.items()}


def attention_item(
    model: Transformer, tokenizer: Tokenizer, src_ids: list[int], tgt_ids: list[int]
) -> dict[str, Any]:
    """What the attention explorer shows for one sentence: its subwords on both sides (EOS
    added), its translation and :func:`all_attention` as nested lists, [layer][head][query][key].
    ``src_ids`` exclude EOS; ``tgt_ids`` exclude BOS/EOS."""
    tok = tokenizer
    weights = all_attention(model, [*src_ids, tok.eos_id], tgt_ids, tok.bos_id)
    return {
        "source_tokens": [*tok.id_to_pieces(src_ids), "</s>"],
        "target_tokens": [*tok.id_to_pieces(tgt_ids), "</s>"],
        "translation": tok.decode([tgt_ids])[0],
        "attention": {kind: w.round(5).tolist() for kind, w in weights.items()},
    }


def plot_attention(
    weights: np.ndarray, src_labels: list[str], tgt_labels: list[str], title: str
) -> bytes:
    """A PNG heatmap: source subwords on the x axis, target subwords on the y axis."""
    height = max(3.0, 0.3 * len(tgt_labels) + 1.5)
    width = max(4.0, 0.3 * len(src_labels) + 2.0)
    fig = Figure(figsize=(width, height))
    ax = fig.subplots()
    image = ax.imshow(weights, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(src_labels)), src_labels, rotation=90, fontsize=8)
    ax.set_yticks(range(len(tgt_labels)), tgt_labels, fontsize=8)
    ax.set_xlabel("source")
    ax.set_ylabel("translation")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.04)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def write_attention_map(
    directory: Path,
    name: str,
    model: Transformer,
    tokenizer: Tokenizer,
    src_ids: list[int],
    tgt_ids: list[int],
    layer: int = -1,
    head: int | None = None,
) -> np.ndarray:
    """Write ``<name>.npy`` (raw weights) and ``<name>.png`` into ``directory``; returns the
    weights. ``src_ids`` exclude EOS (it is added)."""
    src_full = [*src_ids, tokenizer.eos_id]
    weights = cross_attention(model, src_full, tgt_ids, tokenizer.bos_id, layer, head)
    src_labels = [*tokenizer.id_to_pieces(src_ids), "</s>"]
    tgt_labels = [*tokenizer.id_to_pieces(tgt_ids), "</s>"]
    which = "mean of heads" if head is None else f"head {head}"
    png = plot_attention(weights, src_labels, tgt_labels, f"{name}: layer {layer}, {which}")
    buffer = io.BytesIO()
    np.save(buffer, weights)
    atomic_write_bytes(directory / f"{name}.npy", lambda f: f.write(buffer.getvalue()))
    atomic_write_bytes(directory / f"{name}.png", lambda f: f.write(png))
    return weights
