"""Label-smoothed cross entropy (paper §5.4)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def label_smoothed_nll_loss(
    logits: torch.Tensor,  # (N, V) or (B, T, V)
    target: torch.Tensor,  # (N,) or (B, T)
    epsilon: float,
    ignore_index: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed label-smoothed loss and summed NLL over non-padding targets.

    The smoothed target puts 1-ε on the gold token and spreads ε uniformly over the
    whole vocabulary (as fairseq and ``F.cross_entropy(label_smoothing=ε)`` do):
    loss = (1-ε)·(-log p_gold) + ε·mean_v(-log p_v).
    """
    logits = logits.reshape(-1, logits.size(-1)).float()
    target = target.reshape(-1)
    lprobs = F.log_softmax(logits, dim=-1)  # (N, V)
    keep = target != ignore_index
    nll = -lprobs.gather(1, target.clamp(min=0).unsqueeze(1)).squeeze(1)  # (N,)
    smooth = -lprobs.mean(dim=-1)  # (N,)
    loss = (1.0 - epsilon) * nll + epsilon * smooth
    zero = torch.zeros((), dtype=loss.dtype, device=loss.device)
    return torch.where(keep, loss, zero).sum(), torch.where(keep, nll, zero).sum()
