"""One encoder layer and one decoder layer (paper Figure 1), and the feed-forward sublayer."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from transformer_mt.model.attention import MultiHeadAttention
from transformer_mt.model.cache import KVCache
from transformer_mt.model.dropout import Dropout


class FeedForward(nn.Module):
    """Position-wise feed-forward network (paper §3.3): FFN(x) = max(0, x W1 + b1) W2 + b2."""

    def __init__(self, d_model: int, d_ff: int, dropout: float, activation: str = "relu") -> None:
        super().__init__()
        self.linear1 = nn.Linear(d_model, d_ff)
        self.linear2 = nn.Linear(d_ff, d_model)
        self.activation = {"relu": nn.ReLU(), "gelu": nn.GELU()}[activation]
        self.dropout = Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, d) -> (B, T, d)
        h = self.linear1(x)  # (B, T, d_ff)
        if isinstance(self.activation, nn.ReLU):
            return self.linear2(self.dropout.after_relu(h))  # ReLU and dropout in one multiply
        return self.linear2(self.dropout(self.activation(h)))


class Residual(nn.Module):
    """Residual connection with LayerNorm around a sublayer.

    Post-norm (the paper): LayerNorm(x + Dropout(Sublayer(x))).
    Pre-norm (``norm_first``): x + Dropout(Sublayer(LayerNorm(x))), more stable for deep stacks.
    """

    def __init__(self, d_model: int, dropout: float, norm_first: bool) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.dropout = Dropout(dropout)
        self.norm_first = norm_first

    def forward(
        self, x: torch.Tensor, sublayer: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        if self.norm_first:
            return x + self.dropout(sublayer(self.norm(x)))
        return self.norm(x + self.dropout(sublayer(x)))


class EncoderLayer(nn.Module):
    """Self-attention over the source, then the feed-forward network."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        d_ff: int,
        dropout: float,
        attention_dropout: float,
        activation: str,
        norm_first: bool,
    ) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttention(d_model, n_heads, attention_dropout)
        self.feed_forward = FeedForward(d_model, d_ff, dropout, activation)
        self.sublayer1 = Residual(d_model, dropout, norm_first)
        self.sublayer2 = Residual(d_model, dropout, norm_first)

    def forward(self, x: torch.Tensor, src_mask: torch.Tensor | None) -> torch.Tensor:
        x = self.sublayer1(x, lambda h: self.self_attn(h, h, mask=src_mask))  # (B, S, d)
        return self.sublayer2(x, self.feed_forward)


class DecoderLayer(nn.Module):
    """Masked self-attention, cross-attention over the encoder output, then feed-forward."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        d_ff: int,
        dropout: float,
        attention_dropout: float,
        activation: str,
        norm_first: bool,
    ) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttention(d_model, n_heads, attention_dropout)
        self.cross_attn = MultiHeadAttention(d_model, n_heads, attention_dropout)
        self.feed_forward = FeedForward(d_model, d_ff, dropout, activation)
        self.sublayer1 = Residual(d_model, dropout, norm_first)
        self.sublayer2 = Residual(d_model, dropout, norm_first)
        self.sublayer3 = Residual(d_model, dropout, norm_first)

    def forward(
        self,
        y: torch.Tensor,  # (B, T, d)
        memory: torch.Tensor,  # (B, S, d) encoder output
        memory_mask: torch.Tensor | None,  # (B, 1, 1, S) bool
    ) -> torch.Tensor:
        y = self.sublayer1(y, lambda h: self.self_attn(h, h, causal=True))
        y = self.sublayer2(y, lambda h: self.cross_attn(h, memory, mask=memory_mask))
        return self.sublayer3(y, self.feed_forward)

    def step(self, y: torch.Tensor, cache: KVCache, layer: int) -> torch.Tensor:
        """The newest position of each decoder row, (R, d) -> (R, d), with this layer's keys
        and values in ``cache`` (it is layer number ``layer``)."""
        t = cache.length
        self_kv, qkv = cache.layer_self(layer), cache.qkv[layer]
        y = self.sublayer1(y, lambda h: self.self_attn.step_self(h, self_kv, t, qkv))
        source = cache.source_kv[layer]
        y = self.sublayer2(y, lambda h: self.cross_attn.step_cross(h, source, cache.source_bias))
        return self.sublayer3(y, self.feed_forward)
