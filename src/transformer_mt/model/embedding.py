"""Input embeddings (paper §3.4) and the position schemes: sinusoidal encoding (paper §3.5),
learned position embeddings and rotary position embeddings (RoPE)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from transformer_mt.model.dropout import Dropout
from transformer_mt.model.variants import check_variant


def _check_length(length: int, offset: int, max_positions: int) -> None:
    if offset + length > max_positions:
        raise ValueError(
            f"sequence of {offset + length} positions exceeds max_positions={max_positions}"
        )


class PositionalEncoding(nn.Module):
    """Fixed sinusoidal positions: PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(...)."""

    def __init__(self, d_model: int, max_positions: int) -> None:
        super().__init__()
        position = torch.arange(max_positions, dtype=torch.float32).unsqueeze(1)  # (P, 1)
        inv_freq = torch.exp(
            torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model)
        )  # (d/2,)
        pe = torch.zeros(max_positions, d_model)
        pe[:, 0::2] = torch.sin(position * inv_freq)
        pe[:, 1::2] = torch.cos(position * inv_freq[: d_model // 2])
        self.register_buffer("pe", pe, persistent=False)  # (P, d)

    def forward(self, length: int, offset: int = 0) -> torch.Tensor:
        """Return the encodings of positions ``offset .. offset+length-1``: (length, d)."""
        _check_length(length, offset, self.pe.size(0))
        return self.pe[offset : offset + length]


class LearnedPositionalEmbedding(nn.Module):
    """A trained table of one vector per position (Gehring et al. 2017, ConvS2S; BERT and
    fairseq's learned positions), initialised like fairseq's: N(0, d^-0.5)."""

    def __init__(self, d_model: int, max_positions: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(max_positions, d_model))  # (P, d)
        nn.init.normal_(self.weight, mean=0.0, std=d_model**-0.5)

    def forward(self, length: int, offset: int = 0) -> torch.Tensor:
        """Return the embeddings of positions ``offset .. offset+length-1``: (length, d)."""
        _check_length(length, offset, self.weight.size(0))
        return self.weight[offset : offset + length]


class RotaryEmbedding(nn.Module):
    """Rotary position embeddings (Su et al. 2021, RoFormer), applied to queries and keys.

    Each pair of dimensions (j, j + d_k/2) of a query or key at position m is rotated by the
    angle m·θ_j, θ_j = 10000^(-2j/d_k): the "rotate half" layout of GPT-NeoX (CTranslate2's
    ``rotary_interleave=False``). Then q_m · k_n depends on the positions only through m - n.
    """

    def __init__(self, d_k: int, max_positions: int, base: float = 10000.0) -> None:
        super().__init__()
        inv_freq = base ** (-torch.arange(0, d_k, 2, dtype=torch.float32) / d_k)  # (d_k/2,)
        angles = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq
        angles = torch.cat([angles, angles], dim=-1)  # (P, d_k): θ_j at j and j + d_k/2
        self.register_buffer("cos", angles.cos(), persistent=False)  # (P, d_k)
        self.register_buffer("sin", angles.sin(), persistent=False)  # (P, d_k)
        # sin with its first half negated: rotate_ multiplies x with its halves swapped by it
        sin_signed = self.sin.clone()
        sin_signed[:, : d_k // 2].neg_()
        self.register_buffer("sin_signed", sin_signed, persistent=False)  # (P, d_k)

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """x (..., T, d_k) at positions ``offset .. offset+T-1`` -> x rotated, same shape."""
        t = x.size(-2)
        _check_length(t, offset, self.cos.size(0))
        cos = self.cos[offset : offset + t].to(x.dtype)  # (T, d_k)
        sin = self.sin[offset : offset + t].to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)  # (..., T, d_k/2) each
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin

    def rotate_(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """``forward`` in place, for inference (the encoder's and uncached decoding's queries
        and keys, and the one new position of a decoding step): bit for bit its values, in
        fewer operations and allocations, as x·cos + [x2, x1]·[-sin, sin] = x·cos + [-x2, x1]·sin
        with each product rounded alike. x (..., T, d_k) at positions offset .. offset+T-1."""
        t = x.size(-2)
        _check_length(t, offset, self.cos.size(0))
        sin_signed = self.sin_signed[offset : offset + t].to(x.dtype)  # (T, d_k)
        swapped = x.roll(x.size(-1) // 2, dims=-1).mul_(sin_signed)
        return x.mul_(self.cos[offset : offset + t].to(x.dtype)).add_(swapped)


class TransformerEmbedding(nn.Module):
    """Token embedding scaled by √d_model, plus the positions (sinusoidal or learned; none
    for ``rope``, whose positions enter the self-attention), then dropout."""

    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        max_positions: int,
        dropout: float,
        padding_idx: int,
        positions: str = "sinusoidal",
    ) -> None:
        super().__init__()
        check_variant("positions", positions)
        self.d_model = d_model
        self.tokens = nn.Embedding(vocab_size, d_model, padding_idx=padding_idx)
        nn.init.normal_(self.tokens.weight, mean=0.0, std=d_model**-0.5)
        with torch.no_grad():
            self.tokens.weight[padding_idx].zero_()
        self.positions: nn.Module | None = None
        if positions == "sinusoidal":
            self.positions = PositionalEncoding(d_model, max_positions)
        elif positions == "learned":
            self.positions = LearnedPositionalEmbedding(d_model, max_positions)
        self.dropout = Dropout(dropout)

    def forward(self, ids: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """ids: (B, T) -> (B, T, d)."""
        x = self.tokens(ids) * math.sqrt(self.d_model)
        if self.positions is not None:
            x = x + self.positions(ids.size(1), offset).to(x.dtype)
        return self.dropout(x)

    def step(self, ids: torch.Tensor, position: int) -> torch.Tensor:
        """``forward`` in inference for one position of each row: ids (R,) -> (R, d)."""
        x = F.embedding(ids, self.tokens.weight, self.tokens.padding_idx) * math.sqrt(self.d_model)
        if self.positions is not None:
            x = x + self.positions(1, position).to(x.dtype)
        return x
