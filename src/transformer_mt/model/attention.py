"""Scaled dot-product attention (paper §3.2.1) and multi-head attention (paper §3.2.2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from transformer_mt.errors import ConfigError
from transformer_mt.model.dropout import Dropout
from transformer_mt.model.embedding import RotaryEmbedding

WRITTEN_OUT_MAX_KEYS = 128  # fp32 inference on a CPU: longer key sequences take the kernel


def linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` without the module call. A decoding step makes some 25 products of a few
    dozen rows, each about 20 µs on a CPU, and a module call adds about 3 µs of Python to each."""
    return F.linear(x, layer.weight, layer.bias)


def _short_inference(q: torch.Tensor, k: torch.Tensor) -> bool:
    """No gradient wanted, fp32 on a CPU, over at most ``WRITTEN_OUT_MAX_KEYS`` keys. (In bf16
    the written-out scores would be rounded to bf16 before the softmax; the kernel keeps fp32.)"""
    return (
        not torch.is_grad_enabled()
        and q.device.type == "cpu"
        and q.dtype == torch.float32
        and k.size(-2) <= WRITTEN_OUT_MAX_KEYS
    )


class ScaledDotProductAttention(nn.Module):
    """softmax(Q Kᵀ / √d_k) V, with dropout on the attention weights in training.

    ``mask`` is boolean and broadcastable to (B, H, Tq, Tk); True means "may attend".
    ``causal`` applies the decoder's look-ahead mask (query t sees keys ≤ t); one or the other.
    Every query must be allowed at least one key (a row with none has no softmax).

    Mostly this is PyTorch's fused kernel; on a CPU it is written out in two cases. With
    dropout, the weights' dropout mask drawn by ``keep_mask``: the fused kernel cannot drop
    weights on a CPU, and its fallback draws the mask with ``bernoulli_``: 11.0 ms against
    6.2 ms forward and backward for a (204, 4, 20, 20) weight tensor, in each of the default
    model's 12 attention layers. And in fp32 inference over at most ``WRITTEN_OUT_MAX_KEYS``
    keys, where the fused kernel is the slower one (the encoder's attention over a batch of 64
    test sentences: 1.0–2.4 ms against 0.7–0.9 ms); the two agree to about 1e-6, so which one
    a sentence gets (by the longest source of its batch) does not change its translation in
    the test sets measured.
    """

    def __init__(self, dropout: float) -> None:
        super().__init__()
        self.dropout = Dropout(dropout)

    def forward(
        self,
        q: torch.Tensor,  # (B, H, Tq, d_k)
        k: torch.Tensor,  # (B, H, Tk, d_k)
        v: torch.Tensor,  # (B, H, Tk, d_k)
        mask: torch.Tensor | None = None,
        causal: bool = False,
    ) -> torch.Tensor:  # (B, H, Tq, d_k)
        """softmax(q·kᵀ / √d_k + mask) · v: (B, H, Tq, d_k), with dropout on the weights in training."""
        if mask is not None and causal:
            raise ValueError("pass a mask or causal=True, not both")
        p = self.dropout.p if self.training else 0.0
        # written out with dropout on a CPU, or in short fp32 inference on a CPU (see above)
        written_out = Dropout.uses_keep_mask(q) if p > 0.0 else _short_inference(q, k)
        if written_out:
            return self._written_out(q, k, v, mask, causal)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal
        )

    def _written_out(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None,
        causal: bool,
    ) -> torch.Tensor:
        """The fused kernel's attention step by step, with ``Dropout``'s fast mask (none in
        inference)."""
        # In place on the fresh product: neither step's backward needs the scores.
        scores = (q @ k.transpose(-2, -1)).mul_(q.size(-1) ** -0.5)  # (B, H, Tq, Tk)
        if mask is not None:
            scores.masked_fill_(~mask, -torch.inf)
        if causal:
            tq, tk = scores.shape[-2:]
            future = torch.ones(tq, tk, dtype=torch.bool, device=q.device).triu_(1)
            scores.masked_fill_(future, -torch.inf)
        weights = scores.softmax(dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32))
        return self.dropout(weights.to(v.dtype)) @ v  # (B, H, Tq, d_k)


class MultiHeadAttention(nn.Module):
    """MultiHead(Q, K, V) = Concat(head_1..head_h) W^O, head_i = Attention(Q W^Q_i, K W^K_i, V W^V_i).

    Used three ways: encoder self-attention, decoder masked self-attention and
    encoder-decoder (cross) attention. ``forward`` attends whole sequences (training, and
    the encoder); ``step_self`` and ``step_cross`` decode one position at a time with the
    keys and values of a :class:`~transformer_mt.model.cache.KVCache`.

    With ``rotary`` (self-attention of ``model.positions=rope``) the queries and keys are
    rotated by their positions (:class:`~transformer_mt.model.embedding.RotaryEmbedding`)
    before they are compared.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        dropout: float,
        bias: bool = True,
        rotary: RotaryEmbedding | None = None,
    ) -> None:
        super().__init__()
        if d_model % n_heads != 0:
            raise ConfigError(
                f"model.d_model={d_model} is not divisible by model.n_heads={n_heads}"
            )
        self.n_heads = n_heads
        self.d_k = d_model // n_heads
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)
        self.k_proj = nn.Linear(d_model, d_model, bias=bias)
        self.v_proj = nn.Linear(d_model, d_model, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)
        self.attention = ScaledDotProductAttention(dropout)
        self.rotary = rotary  # shared by the model's self-attention layers (it has no weights)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape  # (B, T, d) -> (B, H, T, d_k)
        return x.view(b, t, self.n_heads, self.d_k).transpose(1, 2)

    def stacked_weights(self, *projections: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The weights and biases of several projections stacked for one matrix multiply."""
        biases = [proj.bias for proj in projections]
        bias = None if biases[0] is None else torch.cat(biases)
        return torch.cat([proj.weight for proj in projections]), bias

    def _project(self, x: torch.Tensor, *projections: nn.Linear) -> torch.Tensor:
        """x W^P + b^P for each of k projections of one input, split into heads:
        (B, T, d) -> (k, B, H, T, d_k), a view of one product.

        One matrix multiply with the weights stacked (Q, K and V in self-attention; K and V in
        cross-attention): fewer, larger products, and in backward one product for the input's
        gradient instead of one per projection plus their sum (1-3% of a training step).
        """
        weight, bias = self.stacked_weights(*projections)  # (k·d, d), (k·d,)
        b, t, _ = x.shape
        stacked = F.linear(x, weight, bias).view(b, t, len(projections), self.n_heads, self.d_k)
        return stacked.permute(2, 0, 3, 1, 4)  # (k, B, H, T, d_k)

    @torch.no_grad()
    def attention_weights(
        self,
        query: torch.Tensor,  # (B, Tq, d)
        key_value: torch.Tensor,  # (B, Tk, d)
        mask: torch.Tensor | None = None,  # bool, broadcastable to (B, H, Tq, Tk)
        causal: bool = False,
    ) -> torch.Tensor:  # (B, H, Tq, Tk)
        """softmax(Q Kᵀ / √d_k) per head, written out (the fused kernel does not return it);
        for inspecting what a layer attends to. ``mask`` and ``causal`` as in ``forward``."""
        q = self._split_heads(self.q_proj(query))
        k = self._split_heads(self.k_proj(key_value))
        if self.rotary is not None and query is key_value:
            q, k = self.rotary(q), self.rotary(k)
        scores = q @ k.transpose(-2, -1) / self.d_k**0.5  # (B, H, Tq, Tk)
        if mask is not None:
            scores = scores.masked_fill(~mask, -torch.inf)
        if causal:
            tq, tk = scores.shape[-2:]
            future = torch.ones(tq, tk, dtype=torch.bool, device=scores.device).triu_(1)
            scores = scores.masked_fill(future, -torch.inf)
        return scores.softmax(dim=-1)

    def forward(
        self,
        query: torch.Tensor,  # (B, Tq, d)
        key_value: torch.Tensor,  # (B, Tk, d)
        mask: torch.Tensor | None = None,  # bool, broadcastable to (B, H, Tq, Tk)
        causal: bool = False,
    ) -> torch.Tensor:  # (B, Tq, d)
        """Attention of ``query`` over ``key_value`` in H heads, projected back to d."""
        if query is key_value:  # self-attention
            qkv = self._project(query, self.q_proj, self.k_proj, self.v_proj)  # (3, B, H, T, d_k)
            if self.rotary is None:
                q, k, v = qkv.unbind(0)
            else:  # queries and keys rotated in one pass (half the cost of one pass each)
                rotate = self.rotary if torch.is_grad_enabled() else self.rotary.rotate_
                q, k = rotate(qkv[:2]).unbind(0)  # (B, H, T, d_k), positions 0..T-1
                v = qkv[2]
        else:  # cross-attention
            q = self._split_heads(self.q_proj(query))
            k, v = self._project(key_value, self.k_proj, self.v_proj).unbind(0)
        out = self.attention(q, k, v, mask=mask, causal=causal)
        b, _, tq, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, tq, self.n_heads * self.d_k))

    # -- incremental decoding (inference): one new target position per call ------------------
    def step_self(
        self,
        x: torch.Tensor,  # (R, d) the newest position of each of R hypotheses
        cache: torch.Tensor,  # (2, R, H, T_max, d_k) keys and values of positions < t
        t: int,
        qkv: tuple[torch.Tensor, torch.Tensor | None],  # stacked_weights(q, k, v)
        keys: tuple[int, torch.Tensor | None],  # KVCache.self_keys(): positions read, bias
    ) -> torch.Tensor:  # (R, d)
        """Masked self-attention of position ``t`` over positions 0..t; its key and value are
        written into ``cache`` at ``t``. It reads ``keys[0]`` ≥ t + 1 cached positions, those
        beyond ``t`` (padding) hidden by the bias ``keys[1]``. With ``rotary`` the query and
        key are rotated to position ``t`` first."""
        r = x.size(0)
        qkv_t = F.linear(x, *qkv).view(r, 3, self.n_heads, self.d_k)  # (R, 3, H, d_k)
        if self.rotary is not None:
            self.rotary.rotate_(qkv_t[:, :2, :, None], t)  # the query and the key, in place
        cache.select(3, t).copy_(qkv_t[:, 1:].transpose(0, 1))  # this position's key and value
        span, bias = keys
        k, v = cache.narrow(3, 0, span).unbind(0)  # each (R, H, span, d_k)
        out = attend(qkv_t[:, 0, :, None], k, v, bias)  # (R, H, 1, d_k)
        return linear(self.out_proj, out.view(r, -1))  # (R, d)

    def step_cross(
        self,
        x: torch.Tensor,  # (R, d), R = N·G: G consecutive rows (beam hypotheses) per sentence
        source: torch.Tensor,  # (2, N, H, S, d_k): the source's keys and values, once a batch
        bias: torch.Tensor,  # (N, 1, 1, S) 0 at source tokens, -inf at padding
    ) -> torch.Tensor:  # (R, d)
        """Encoder-decoder attention of the newest position. The G hypotheses of a sentence
        share its keys and values: they are attended as G queries of one sentence, so the
        source is neither repeated per hypothesis nor reordered when the beams are."""
        n, r = source.size(1), x.size(0)
        q = linear(self.q_proj, x).view(n, r // n, self.n_heads, self.d_k).transpose(1, 2)
        out = attend(q, source[0], source[1], bias)  # (N, H, G, d_k)
        return linear(self.out_proj, out.transpose(1, 2).reshape(r, -1))


def attend(
    q: torch.Tensor,  # (..., Tq, d_k)
    k: torch.Tensor,  # (..., Tk, d_k)
    v: torch.Tensor,  # (..., Tk, d_k)
    bias: torch.Tensor | None = None,  # additive, broadcastable to (..., Tq, Tk)
) -> torch.Tensor:  # (..., Tq, d_k)
    """softmax(Q Kᵀ / √d_k + bias) V written out: for the few queries of a decoding step this
    is faster than the fused kernel, which is built for long query blocks. q, k and v have the
    same leading dimensions (at least one; no broadcasting between them): the products are
    ``torch.bmm`` over those flattened (views: ``k`` and ``v`` may be slices of the cache),
    which spares ``@`` its broadcasting reshapes (the same kernel, the same values)."""
    lead, tq, tk = q.shape[:-2], q.size(-2), k.size(-2)
    scores = torch.bmm(q.flatten(0, -3), k.flatten(0, -3).transpose(1, 2))  # (B, Tq, Tk)
    scores = scores.view(*lead, tq, tk).mul_(q.size(-1) ** -0.5)
    if bias is not None:
        scores += bias
    weights = scores.softmax(dim=-1).flatten(0, -3)  # (B, Tq, Tk)
    return torch.bmm(weights, v.flatten(0, -3)).view(*lead, tq, v.size(-1))
