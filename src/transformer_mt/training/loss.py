"""Label-smoothed cross entropy (paper §5.4), fused into one forward and one backward pass."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


def _compute_dtype(logits: torch.Tensor) -> torch.dtype:
    """fp32 for half-precision logits; fp32 and fp64 stay as they are."""
    return torch.promote_types(logits.dtype, torch.float32)


class _LabelSmoothedCrossEntropy(torch.autograd.Function):
    """Forward: one log-softmax kernel, then the gold and mean log-probability per row.

    Backward from the saved log-probs in three (N, V) passes (exp, then scale and shift in place)
    plus a scatter at the gold tokens: d loss_i / d logits_i = softmax_i - (1-ε)·onehot - ε/V
    and d nll_i / d logits_i = softmax_i - onehot. Autograd through log_softmax + gather +
    mean would instead write and read several more (N, V) tensors, memory-bound on a CPU.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        logits: torch.Tensor,  # (N, V), any float dtype
        target: torch.Tensor,  # (N,)
        epsilon: float,
        ignore_index: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        lprobs = F.log_softmax(logits.to(_compute_dtype(logits)), dim=-1)  # (N, V), one kernel
        keep = (target != ignore_index).to(lprobs.dtype)  # (N,)
        gold_index = target.clamp(min=0).unsqueeze(1)  # (N, 1); ignored rows are masked
        nll = -lprobs.gather(1, gold_index).squeeze(1) * keep  # -log p_gold
        smooth = -lprobs.mean(dim=-1) * keep  # mean_v(-log p_v)
        loss = (1.0 - epsilon) * nll + epsilon * smooth
        ctx.save_for_backward(lprobs, gold_index, keep)
        ctx.epsilon, ctx.logits_dtype = epsilon, logits.dtype
        return loss.sum(), nll.sum()

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: Any, grad_loss: torch.Tensor, grad_nll: torch.Tensor
    ) -> tuple[torch.Tensor, None, None, None]:
        lprobs, gold_index, keep = ctx.saved_tensors
        eps, vocab = ctx.epsilon, lprobs.size(-1)
        # (N, V) softmax. Log-probs below -87.3 would put exp in float32's subnormal range,
        # where the CPU's vectorized exp takes a ~20x slower path (without label smoothing,
        # much of a trained model's vocabulary lies there); probabilities < 1.7e-38 change
        # nothing.
        grad = lprobs.clamp_min(-87.0).exp_()
        grad.mul_(((grad_loss + grad_nll) * keep).unsqueeze(1))
        grad.sub_((grad_loss * eps / vocab * keep).unsqueeze(1))
        gold = -((grad_loss * (1.0 - eps) + grad_nll) * keep).unsqueeze(1)  # (N, 1)
        grad.scatter_add_(1, gold_index, gold)
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
