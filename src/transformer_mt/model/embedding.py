"""Input embeddings (paper §3.4) and sinusoidal positional encoding (paper §3.5)."""

from __future__ import annotations

import math

import torch
from torch import nn

from transformer_mt.model.dropout import Dropout


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
        if offset + length > self.pe.size(0):
            raise ValueError(
                f"sequence of {offset + length} positions exceeds max_positions={self.pe.size(0)}"
            )
        return self.pe[offset : offset + length]


class TransformerEmbedding(nn.Module):
    """Token embedding scaled by √d_model, plus positional encoding, then dropout."""

    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        max_positions: int,
        dropout: float,
        padding_idx: int,
    ) -> None:
        super().__init__()
        self.d_model = d_model
        self.tokens = nn.Embedding(vocab_size, d_model, padding_idx=padding_idx)
        nn.init.normal_(self.tokens.weight, mean=0.0, std=d_model**-0.5)
        with torch.no_grad():
            self.tokens.weight[padding_idx].zero_()
        self.positions = PositionalEncoding(d_model, max_positions)
        self.dropout = Dropout(dropout)

    def forward(self, ids: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """ids: (B, T) -> (B, T, d)."""
        x = self.tokens(ids) * math.sqrt(self.d_model)
        x = x + self.positions(ids.size(1), offset).to(x.dtype)
        return self.dropout(x)
