"""One encoder layer and one decoder layer (paper Figure 1), the feed-forward sublayer and
the normalisation of each sublayer."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from transformer_mt.model.attention import MultiHeadAttention, linear
from transformer_mt.model.cache import KVCache
from transformer_mt.model.dropout import Dropout
from transformer_mt.model.embedding import RotaryEmbedding
from transformer_mt.model.variants import check_variant

NORM_EPS = 1e-5  # LayerNorm's default; RMSNorm uses the same (CTranslate2 has one epsilon)


def make_norm(norm: str, d_model: int) -> nn.Module:
    """LayerNorm (Ba et al. 2016) or RMSNorm (Zhang & Sennrich 2019):
    x / √(mean(x²) + ε) · g, without LayerNorm's centring and bias."""
    check_variant("norm", norm)
    if norm == "rmsnorm":
        return nn.RMSNorm(d_model, eps=NORM_EPS)
    return nn.LayerNorm(d_model, eps=NORM_EPS)


def normalize(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``norm(x)`` for a ``make_norm`` norm (or ``nn.Identity``) without the module call, which
    saves about a sixth of the time of a decoding step's small layer norms (13 of them a step)."""
    if isinstance(norm, nn.LayerNorm):
        return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
    if isinstance(norm, nn.RMSNorm):
        return F.rms_norm(x, norm.normalized_shape, norm.weight, norm.eps)
    return norm(x)


def swiglu_hidden_size(d_ff: int) -> int:
    """The SwiGLU hidden size for ``model.d_ff``: ⌊2·d_ff/3⌋, so its three matrices hold
    about as many weights as a ReLU FFN's two of d_ff (within 1% from d_model 128 up). Not
    rounded to a multiple of 8: for the Multi30k model's d_ff 256 that (168) would cost 2%."""
    return 2 * d_ff // 3


class FeedForward(nn.Module):
    """Position-wise feed-forward network (paper §3.3): FFN(x) = max(0, x W1 + b1) W2 + b2,
    or GELU (Hendrycks & Gimpel 2016) in place of max(0, ·).

    ``swiglu`` is the gated variant of Shazeer 2020 ("GLU Variants Improve Transformer"):
    FFN(x) = (SiLU(x W) ⊙ x V) W2, without biases as in the paper; W is ``linear1``, V
    ``linear_v`` and W2 ``linear2``. Its hidden size is ``swiglu_hidden_size(d_ff)``,
    ⌊2·d_ff/3⌋, which keeps the weight count of a ReLU FFN of d_ff: 3·d·(2·d_ff/3) = 2·d·d_ff.
    """

    def __init__(self, d_model: int, d_ff: int, dropout: float, activation: str = "relu") -> None:
        super().__init__()
        check_variant("activation", activation)
        self.linear_v: nn.Linear | None = None
        if activation == "swiglu":
            hidden = swiglu_hidden_size(d_ff)
            self.linear1 = nn.Linear(d_model, hidden, bias=False)
            self.linear_v = nn.Linear(d_model, hidden, bias=False)
            self.linear2 = nn.Linear(hidden, d_model, bias=False)
            self.activation: nn.Module = nn.SiLU()
        else:
            self.linear1 = nn.Linear(d_model, d_ff)
            self.linear2 = nn.Linear(d_ff, d_model)
            self.activation = {"relu": nn.ReLU(), "gelu": nn.GELU()}[activation]
        self.dropout = Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, d) -> (B, T, d)
        """linear2(dropout(activation(linear1(x)))), or SwiGLU's gated form."""
        h = self.linear1(x)  # (B, T, d_ff)
        if isinstance(self.activation, nn.ReLU):
            return self.linear2(self.dropout.after_relu(h))  # ReLU and dropout in one multiply
        if self.linear_v is not None:  # SwiGLU
            return self.linear2(self.dropout(F.silu(h) * self.linear_v(x)))
        return self.linear2(self.dropout(self.activation(h)))

    def step(self, x: torch.Tensor) -> torch.Tensor:  # (R, d) -> (R, d)
        """``forward`` in inference (no dropout) as plain function calls, for decoding steps
        (the activation's ``forward``: its function, without the module call)."""
        h = self.activation.forward(linear(self.linear1, x))  # (R, d_ff)
        if self.linear_v is not None:  # SwiGLU
            h = h * linear(self.linear_v, x)
        return linear(self.linear2, h)


class Residual(nn.Module):
    """Residual connection with a norm (LayerNorm, or RMSNorm: ``make_norm``) around a sublayer.

    Post-norm (the paper): LayerNorm(x + Dropout(Sublayer(x))).
    Pre-norm (``norm_first``): x + Dropout(Sublayer(LayerNorm(x))), more stable for deep stacks.
    """

    def __init__(
        self, d_model: int, dropout: float, norm_first: bool, norm: str = "layernorm"
    ) -> None:
        super().__init__()
        self.norm = make_norm(norm, d_model)
        self.dropout = Dropout(dropout)
        self.norm_first = norm_first

    def forward(
        self, x: torch.Tensor, sublayer: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        """x + dropout(sublayer(...)), normalised before (pre-norm) or after (post-norm)."""
        return self.add(x, sublayer(self.sublayer_input(x)))

    def sublayer_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the sublayer reads: LayerNorm(x) before it (pre-norm), else x."""
        return normalize(self.norm, x) if self.norm_first else x

    def add(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The residual sum with the sublayer's output ``out`` (dropped out in training),
        normalised after it (post-norm)."""
        if self.training:
            out = self.dropout(out)
        return x + out if self.norm_first else normalize(self.norm, x + out)


class EncoderLayer(nn.Module):
    """Self-attention over the source, then the feed-forward network (``rotary``: RoPE in the
    self-attention)."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        d_ff: int,
        dropout: float,
        attention_dropout: float,
        activation: str,
        norm_first: bool,
        norm: str = "layernorm",
        rotary: RotaryEmbedding | None = None,
    ) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttention(d_model, n_heads, attention_dropout, rotary=rotary)
        self.feed_forward = FeedForward(d_model, d_ff, dropout, activation)
        self.sublayer1 = Residual(d_model, dropout, norm_first, norm)
        self.sublayer2 = Residual(d_model, dropout, norm_first, norm)

    def forward(self, x: torch.Tensor, src_mask: torch.Tensor | None) -> torch.Tensor:
        """Self-attention over the source, then the feed-forward network."""
        x = self.sublayer1(x, lambda h: self.self_attn(h, h, mask=src_mask))  # (B, S, d)
        return self.sublayer2(x, self.feed_forward)


class DecoderLayer(nn.Module):
    """Masked self-attention, cross-attention over the encoder output, then feed-forward
    (``rotary``: RoPE in the self-attention only; the cross-attention has no positions)."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        d_ff: int,
        dropout: float,
        attention_dropout: float,
        activation: str,
        norm_first: bool,
        norm: str = "layernorm",
        rotary: RotaryEmbedding | None = None,
    ) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttention(d_model, n_heads, attention_dropout, rotary=rotary)
        self.cross_attn = MultiHeadAttention(d_model, n_heads, attention_dropout)
        self.feed_forward = FeedForward(d_model, d_ff, dropout, activation)
        self.sublayer1 = Residual(d_model, dropout, norm_first, norm)
        self.sublayer2 = Residual(d_model, dropout, norm_first, norm)
        self.sublayer3 = Residual(d_model, dropout, norm_first, norm)

    def forward(
        self,
        y: torch.Tensor,  # (B, T, d)
        memory: torch.Tensor,  # (B, S, d) encoder output
        memory_mask: torch.Tensor | None,  # (B, 1, 1, S) bool
    ) -> torch.Tensor:
        """Causal self-attention, cross-attention over ``memory``, then the feed-forward network."""
        y = self.sublayer1(y, lambda h: self.self_attn(h, h, causal=True))
        y = self.sublayer2(y, lambda h: self.cross_attn(h, memory, mask=memory_mask))
        return self.sublayer3(y, self.feed_forward)

    def step(
        self,
        y: torch.Tensor,
        cache: KVCache,
        layer: int,
        keys: tuple[int, torch.Tensor | None],  # cache.self_keys(), the same for every layer
    ) -> torch.Tensor:
        """The newest position of each decoder row, (R, d) -> (R, d), with this layer's keys
        and values in ``cache`` (it is layer number ``layer``)."""
        # The sublayers one after the other, without the closures of forward: a decoding
        # step is many small operations, and on a CPU Python's share of its time is large.
        s1, s2, s3 = self.sublayer1, self.sublayer2, self.sublayer3
        self_kv, qkv = cache.layer_self(layer), cache.qkv[layer]
        h = self.self_attn.step_self(s1.sublayer_input(y), self_kv, cache.length, qkv, keys)
        y = s1.add(y, h)
        source, bias = cache.layer_source(layer)
        y = s2.add(y, self.cross_attn.step_cross(s2.sublayer_input(y), source, bias))
        return s3.add(y, self.feed_forward.step(s3.sublayer_input(y)))
