"""Label-smoothed cross entropy (paper §5.4), fused into one forward and one backward pass.

Two entry points share the arithmetic:

- :func:`label_smoothed_nll_loss` takes logits (any caller, any shape);
- :class:`OutputLayerLoss` takes the decoder's output states and the output projection's
  weight: the projection, the softmax and the loss are one autograd step that writes its
  (N, V) logits, log-probs and gradient into one buffer kept across calls (under autocast a
  second, in the autocast dtype, for the logits and their gradient). On a CPU each fresh
  (N, V) tensor (about 120 MB for 4,000 targets × 8k vocabulary) costs page faults and
  zeroing; the training step needed three per micro-batch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half-precision logits; fp32 and fp64 stay as they are."""
    return torch.promote_types(dtype, torch.float32)


def _smoothed_losses(
    lprobs: torch.Tensor,  # (N, V) log-probabilities
    target: torch.Tensor,  # (N,)
    epsilon: float,
    ignore_index: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed smoothed loss and NLL, plus the gold index (N, 1) and keep weights (N,)."""
    keep = (target != ignore_index).to(lprobs.dtype)  # (N,)
    gold_index = target.clamp(min=0).unsqueeze(1)  # (N, 1); ignored rows are masked
    nll = -lprobs.gather(1, gold_index).squeeze(1) * keep  # -log p_gold
    smooth = -lprobs.mean(dim=-1) * keep  # mean_v(-log p_v)
    loss = (1.0 - epsilon) * nll + epsilon * smooth
    return loss.sum(), nll.sum(), gold_index, keep


def _logit_gradient_(
    lprobs: torch.Tensor,  # (N, V)
    gold_index: torch.Tensor,
    keep: torch.Tensor,
    grad_loss: torch.Tensor,
    grad_nll: torch.Tensor,
    epsilon: float,
    out: torch.Tensor,  # (N, V), may be ``lprobs`` itself
) -> torch.Tensor:
    """d(grad_loss·loss + grad_nll·nll)/d logits, written into ``out`` in three passes.

    d loss_i / d logits_i = softmax_i - (1-ε)·onehot - ε/V and d nll_i / d logits_i =
    softmax_i - onehot. Log-probs below -87.3 would put exp in float32's subnormal range, where
    the CPU's vectorized exp takes a ~20x slower path (without label smoothing, much of a
    trained model's vocabulary lies there); probabilities < 1.7e-38 change nothing.
    """
    vocab = lprobs.size(-1)
    grad = torch.clamp_min(lprobs, -87.0, out=out).exp_()  # (N, V) softmax
    grad.mul_(((grad_loss + grad_nll) * keep).unsqueeze(1))
    grad.sub_((grad_loss * epsilon / vocab * keep).unsqueeze(1))
    gold = -((grad_loss * (1.0 - epsilon) + grad_nll) * keep).unsqueeze(1)  # (N, 1)
    return grad.scatter_add_(1, gold_index, gold)


class _LabelSmoothedCrossEntropy(torch.autograd.Function):
    """Forward: one log-softmax kernel, then the gold and mean log-probability per row.

    Backward from the saved log-probs in three in-place (N, V) passes plus a scatter at the
    gold tokens (``_logit_gradient_``). Autograd through log_softmax + gather + mean would
    instead write and read several more (N, V) tensors, memory-bound on a CPU.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        logits: torch.Tensor,  # (N, V), any float dtype
        target: torch.Tensor,  # (N,)
        epsilon: float,
        ignore_index: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        lprobs = F.log_softmax(logits.to(_compute_dtype(logits.dtype)), dim=-1)  # (N, V)
        loss, nll, gold_index, keep = _smoothed_losses(lprobs, target, epsilon, ignore_index)
        ctx.save_for_backward(lprobs, gold_index, keep)
        ctx.epsilon, ctx.logits_dtype = epsilon, logits.dtype
        return loss, nll

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: Any, grad_loss: torch.Tensor, grad_nll: torch.Tensor
    ) -> tuple[torch.Tensor, None, None, None]:
        lprobs, gold_index, keep = ctx.saved_tensors
        # A new tensor, not the saved log-probs: a retained graph can run backward again.
        grad = _logit_gradient_(
            lprobs, gold_index, keep, grad_loss, grad_nll, ctx.epsilon, torch.empty_like(lprobs)
        )
        return grad.to(ctx.logits_dtype), None, None, None


def label_smoothed_nll_loss(
    logits: torch.Tensor,  # (N, V) or (B, T, V)
    target: torch.Tensor,  # (N,) or (B, T)
    epsilon: float,
    ignore_index: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed label-smoothed loss and summed NLL over the targets that are not ``ignore_index``.

    The smoothed target puts 1-ε on the gold token and spreads ε uniformly over the
    whole vocabulary (as fairseq and ``F.cross_entropy(label_smoothing=ε)`` do):
    loss = (1-ε)·(-log p_gold) + ε·mean_v(-log p_v). Computed in fp32 for half-precision
    logits (fp64 stays fp64); the gradient comes back in the logits' dtype.
    """
    logits = logits.reshape(-1, logits.size(-1))
    loss, nll = _LabelSmoothedCrossEntropy.apply(logits, target.reshape(-1), epsilon, ignore_index)
    return loss, nll


class _ProjectedLabelSmoothedCrossEntropy(torch.autograd.Function):
    """logits = hidden · weightᵀ, then the loss, all in ``buffer``: logits, then log-probs
    (in place), then in backward the logits' gradient (in place), which the two matrix
    products of the projection's backward read. With ``half`` (autocast), the product and the
    gradient those products read are in ``half``, the softmax and loss in ``buffer``."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,  # (N, d)
        weight: torch.Tensor,  # (V, d)
        target: torch.Tensor,  # (N,)
        epsilon: float,
        ignore_index: int,
        buffer: torch.Tensor,  # (N, V), fp32 or fp64
        half: torch.Tensor | None,  # (N, V) in hidden's dtype when that is bf16/fp16, else None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(hidden.device.type, enabled=False):
            if half is None:
                torch.mm(hidden, weight.t(), out=buffer)  # (N, V) logits
            else:  # half-precision matmul, fp32 softmax
                buffer.copy_(torch.mm(hidden, weight.t(), out=half))
            lprobs = torch.log_softmax(buffer, dim=-1, out=buffer)  # in place, row by row
            loss, nll, gold_index, keep = _smoothed_losses(lprobs, target, epsilon, ignore_index)
        ctx.save_for_backward(hidden, weight, lprobs, gold_index, keep)
        ctx.epsilon, ctx.half = epsilon, half  # ``half`` is only written from here on
        return loss, nll

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: Any, grad_loss: torch.Tensor, grad_nll: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None, None, None, None]:
        hidden, weight, lprobs, gold_index, keep = ctx.saved_tensors
        grad = _logit_gradient_(lprobs, gold_index, keep, grad_loss, grad_nll, ctx.epsilon, lprobs)
        if ctx.half is not None:
            grad = ctx.half.copy_(grad)  # (N, V) in hidden's dtype
        # The same products (and operand layouts) as autograd's backward of hidden @ weight.t().
        grad_hidden = grad.mm(weight) if ctx.needs_input_grad[0] else None  # (N, d)
        grad_weight = grad.t().mm(hidden) if ctx.needs_input_grad[1] else None  # (V, d)
        return grad_hidden, grad_weight, None, None, None, None, None


class OutputLayerLoss:
    """The output layer (logits = hidden · Wᵀ) and the label-smoothed loss as one autograd step.

    Equals ``label_smoothed_nll_loss(hidden @ weight.t(), target, ...)`` in value and gradient.
    One (N, V) buffer, grown as needed, is reused by every call (under autocast a second one
    in the autocast dtype for the logits and their gradient): a call's graph must be
    backpropagated before the next call (as a training step does). Backpropagating an older
    call raises autograd's "modified by an inplace operation" error rather than returning
    wrong gradients. Under autocast the projection runs in the autocast dtype and the softmax
    and loss in fp32, as with ``nn.Linear`` followed by ``label_smoothed_nll_loss``.
    """

    def __init__(self, epsilon: float, ignore_index: int) -> None:
        self.epsilon = epsilon
        self.ignore_index = ignore_index
        self._buffers: dict[torch.dtype, torch.Tensor] = {}

    def __call__(
        self,
        hidden: torch.Tensor,  # (N, d) decoder output states at the target positions
        weight: torch.Tensor,  # (V, d) output projection
        target: torch.Tensor,  # (N,)
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed label-smoothed loss and summed NLL (see ``label_smoothed_nll_loss``)."""
        device_type = hidden.device.type
        if torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
            hidden, weight = hidden.to(dtype), weight.to(dtype)
        rows, vocab = hidden.size(0), weight.size(0)
        buffer = self._kept_buffer(rows, vocab, _compute_dtype(hidden.dtype), hidden.device)
        half = None
        if hidden.dtype != buffer.dtype:
            half = self._kept_buffer(rows, vocab, hidden.dtype, hidden.device)
        loss, nll = _ProjectedLabelSmoothedCrossEntropy.apply(
            hidden, weight, target, self.epsilon, self.ignore_index, buffer, half
        )
        return loss, nll

    def _kept_buffer(
        self, rows: int, vocab: int, dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """A (rows, vocab) view of the kept buffer of ``dtype``, reallocated when too small or
        on another device."""
        if torch.is_inference_mode_enabled():  # inference tensors cannot be saved by autograd
            return torch.empty(rows, vocab, dtype=dtype, device=device)
        buf = self._buffers.get(dtype)
        if buf is None or buf.numel() < rows * vocab or buf.device != device:
            self._buffers.pop(dtype, None)
            buf = None  # drop the last reference to the old one before allocating
            capacity = -(-rows // 512) * 512  # headroom: slightly larger batches reuse it
            buf = self._buffers[dtype] = torch.empty(capacity * vocab, dtype=dtype, device=device)
        return buf[: rows * vocab].view(rows, vocab)
