"""The encoder-decoder Transformer (paper Figure 1)."""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from transformer_mt.model.cache import MIN_KEYS, KVCache, pad_source, self_attention_buffer
from transformer_mt.model.embedding import RotaryEmbedding, TransformerEmbedding
from transformer_mt.model.layers import DecoderLayer, EncoderLayer, make_norm, normalize
from transformer_mt.model.packed import PackedLinear
from transformer_mt.model.variants import check_rope_head_size, check_variant


def padding_mask(ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """(B, S) token ids -> (B, 1, 1, S) bool mask, True at real tokens (keys that may be attended)."""
    return (ids != pad_id)[:, None, None, :]


class Encoder(nn.Module):
    """A stack of N identical encoder layers."""

    def __init__(
        self,
        n_layers: int,
        norm_first: bool,
        d_model: int,
        norm: str = "layernorm",
        **layer_args: Any,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            EncoderLayer(d_model=d_model, norm_first=norm_first, norm=norm, **layer_args)
            for _ in range(n_layers)
        )
        # Pre-norm stacks end with a norm; post-norm layers already end with one.
        self.final_norm = make_norm(norm, d_model) if norm_first else nn.Identity()

    def forward(self, x: torch.Tensor, src_mask: torch.Tensor | None) -> torch.Tensor:
        """The encoder output (B, S, d) of the embedded source ``x``."""
        for layer in self.layers:
            x = layer(x, src_mask)
        return self.final_norm(x)  # (B, S, d)


class Decoder(nn.Module):
    """A stack of N identical decoder layers."""

    def __init__(
        self,
        n_layers: int,
        norm_first: bool,
        d_model: int,
        norm: str = "layernorm",
        **layer_args: Any,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            DecoderLayer(d_model=d_model, norm_first=norm_first, norm=norm, **layer_args)
            for _ in range(n_layers)
        )
        self.final_norm = make_norm(norm, d_model) if norm_first else nn.Identity()

    def forward(
        self,
        y: torch.Tensor,
        memory: torch.Tensor,
        memory_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """The decoder's last hidden states (B, T, d) of the embedded target prefix ``y``."""
        for layer in self.layers:
            y = layer(y, memory, memory_mask)
        return self.final_norm(y)  # (B, T, d)

    def step(self, y: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """The newest position through every layer: (R, d) -> (R, d)."""
        keys = cache.self_keys()  # which cached positions the self-attention reads, every layer
        for i, layer in enumerate(self.layers):
            y = layer.step(y, cache, i, keys)
        return normalize(self.final_norm, y)


class Transformer(nn.Module):
    """Encoder-decoder Transformer over one joint (shared source/target) vocabulary.

    ``forward`` is the training path (teacher forcing, whole target at once);
    ``encode``, ``start_decoding`` and ``decode_step`` are the inference path, one target
    position at a time with a key/value cache.

    The defaults are the paper's model. Architecture variants (``variants.VARIANTS``):
    ``positions`` sinusoidal | learned | rope (rotary, in the encoder's and the decoder's
    self-attention only), ``norm`` layernorm | rmsnorm (every norm of the model) and
    ``activation`` relu | gelu | swiglu (see ``FeedForward``). The source and target share one
    embedding table; ``tie_embeddings`` makes it the output layer too (the paper's §3.4).
    """

    def __init__(
        self,
        vocab_size: int,
        d_model: int = 512,
        n_heads: int = 8,
        n_encoder_layers: int = 6,
        n_decoder_layers: int = 6,
        d_ff: int = 2048,
        dropout: float = 0.1,
        attention_dropout: float = 0.0,
        activation: str = "relu",
        norm_first: bool = False,
        tie_embeddings: bool = True,
        max_positions: int = 256,
        pad_id: int = 0,
        positions: str = "sinusoidal",
        norm: str = "layernorm",
    ) -> None:
        super().__init__()
        check_variant("positions", positions)
        check_variant("norm", norm)
        check_variant("activation", activation)
        rotary = None
        if positions == "rope":
            check_rope_head_size(d_model, n_heads)
            rotary = RotaryEmbedding(d_model // n_heads, max_positions)  # one for every layer
        self.pad_id = pad_id
        self.max_positions = max_positions
        self.embedding = TransformerEmbedding(
            vocab_size, d_model, max_positions, dropout, pad_id, positions
        )
        layer_args = dict(
            d_model=d_model,
            n_heads=n_heads,
            d_ff=d_ff,
            dropout=dropout,
            attention_dropout=attention_dropout,
            activation=activation,
            norm_first=norm_first,
            norm=norm,
            rotary=rotary,
        )
        self.encoder = Encoder(n_encoder_layers, **layer_args)
        self.decoder = Decoder(n_decoder_layers, **layer_args)
        self.output_projection = nn.Linear(d_model, vocab_size, bias=False)
        # paper §3.4 (Press & Wolf 2017): the pre-softmax linear layer is the embedding table
        if tie_embeddings:
            self.output_projection.weight = self.embedding.tokens.weight
        else:
            nn.init.normal_(self.output_projection.weight, mean=0.0, std=d_model**-0.5)
        self._init_linear_layers()

    def _init_linear_layers(self) -> None:
        for name, p in self.named_parameters():
            if p.dim() == 2 and "embedding" not in name and "output_projection" not in name:
                nn.init.xavier_uniform_(p)

    def encode(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """src: (B, S) ids -> memory (B, S, d) and its key mask (B, 1, 1, S)."""
        src_mask = padding_mask(src, self.pad_id)
        return self.encoder(self.embedding(src), src_mask), src_mask

    def decode(
        self,
        tgt_in: torch.Tensor,
        memory: torch.Tensor,
        memory_mask: torch.Tensor,
        positions: torch.Tensor | None = None,
        project: bool = True,
    ) -> torch.Tensor:
        """tgt_in: (B, T) ids (BOS-prefixed) -> logits (B, T, V).

        With ``positions`` (flat indices into B·T), only those positions are projected onto
        the vocabulary: logits (len(positions), V). Training passes the real (non-pad) target
        positions, so no output-layer or softmax work is spent on padding. With
        ``project=False`` the decoder's output states (B, T, d) or (N, d) come back instead,
        for a loss that applies ``output_projection`` itself (``training.loss.OutputLayerLoss``).
        """
        y = self.decoder(self.embedding(tgt_in), memory, memory_mask)  # (B, T, d)
        if positions is not None:
            y = y.reshape(-1, y.size(-1)).index_select(0, positions)  # (N, d)
        return self.output_projection(y) if project else y

    def forward(
        self,
        src: torch.Tensor,
        tgt_in: torch.Tensor,
        positions: torch.Tensor | None = None,
        project: bool = True,
    ) -> torch.Tensor:
        """Teacher forcing: src (B, S), tgt_in (B, T) -> logits (B, T, V), or (N, V) at
        ``positions``, or the states before the output projection (see ``decode``)."""
        memory, src_mask = self.encode(src)
        return self.decode(tgt_in, memory, src_mask, positions=positions, project=project)

    def start_decoding(
        self,
        memory: torch.Tensor,  # (N, S, d) encoder output
        memory_mask: torch.Tensor,  # (N, 1, 1, S) bool, True at source tokens
        group: int = 1,
        max_steps: int | None = None,
    ) -> KVCache:
        """An empty cache for decoding ``group`` rows per sentence (the beam size) for at
        most ``max_steps`` positions (default: the model's positions); it holds the source's
        cross-attention keys and values, computed here once (the source padded to
        ``model.cache.padded_keys`` positions), and the output projection, packed for the
        batch (``model.packed``)."""
        layers = self.decoder.layers
        memory, memory_mask = pad_source(memory, memory_mask)  # see model.cache
        n, s, _ = memory.shape
        attn = layers[0].self_attn
        steps = self.max_positions if max_steps is None else min(max_steps, self.max_positions)
        shape = (len(layers), 2, n * group, attn.n_heads, max(steps, MIN_KEYS), attn.d_k)
        # Every layer's cross-attention keys and values in one product, (N, S, d) ->
        # (N, S, L·2·d) -> (L, 2, N, H, S, d_k)
        cross = layers[0].cross_attn
        kv_weights = cross.stacked_weights(
            *(
                proj
                for layer in layers
                for proj in (layer.cross_attn.k_proj, layer.cross_attn.v_proj)
            )
        )
        kv = F.linear(memory, *kv_weights).view(n, s, len(layers), 2, cross.n_heads, cross.d_k)
        source_kv = kv.permute(2, 3, 0, 4, 1, 5).contiguous()
        self_kv = self_attention_buffer(shape, source_kv)  # in the products' type, as source_kv
        bias = torch.zeros(n, 1, 1, s, dtype=memory.dtype, device=memory.device)
        bias.masked_fill_(~memory_mask, -torch.inf)
        qkv = [
            layer.self_attn.stacked_weights(
                layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj
            )
            for layer in layers
        ]
        project = PackedLinear(self.output_projection.weight, n * group)
        return KVCache(self_kv, source_kv, bias, qkv, project, steps, rows=n * group, sentences=n)

    def decode_step(self, last_tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One incremental decoding step: the tokens produced at the previous step (R,) ->
        next-token logits (R, V) in fp32. Advances ``cache`` by one position."""
        if cache.length >= cache.steps:
            raise ValueError(f"the cache holds {cache.length} positions; no room for another")
        y = self.embedding.step(last_tokens, cache.length)  # (R, d)
        y = self.decoder.step(y, cache)
        cache.length += 1
        return cache.project(y).float()

    def num_parameters(self) -> tuple[int, int]:
        """(total, trainable) parameter counts; tied weights are counted once."""
        params = list(self.parameters())
        return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def with_defaults(model_cfg: dict[str, Any]) -> dict[str, Any]:
    """A ``model`` config section with every constructor argument it lacks at its default
    (a checkpoint written before a key existed describes the same model as one with it)."""
    defaults = {
        name: p.default
        for name, p in inspect.signature(Transformer).parameters.items()
        if p.default is not inspect.Parameter.empty and name not in ("pad_id", "vocab_size")
    }
    return defaults | dict(model_cfg)


def build_model(model_cfg: dict[str, Any], vocab_size: int, pad_id: int) -> Transformer:
    """A Transformer from the ``model`` config section (each key is a constructor argument)."""
    return Transformer(vocab_size=vocab_size, pad_id=pad_id, **model_cfg)
