"""The output projection of a decoding step through oneDNN's inner product on CPU.

The (V, d) output matrix makes the largest product of a decoding step: a few hundred rows
times the matrix. With the matrix reordered into oneDNN's blocked layout once per batch
decoded, oneDNN's inner-product kernel runs it faster than ``F.linear`` (Intel MKL) on the
CPUs measured here (docs/benchmarks.md), and each row's result is the same whatever the
number of rows beside it. Elsewhere (CUDA, other dtypes, autocast, a torch without oneDNN) it
is ``F.linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _onednn_usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """fp32 on CPU, outside autocast, with oneDNN's inner product built in."""
    ops = torch.ops.mkldnn
    return (
        x.device.type == weight.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and torch.backends.mkldnn.is_available()
        and hasattr(ops, "_reorder_linear_weight")
        and hasattr(ops, "_linear_pointwise")
    )


class PackedLinear:
    """``x · weightᵀ`` (no bias, no autograd) against a copy of ``weight`` packed now.

    The copy is a snapshot: made for one batch's decoding, it does not follow later changes
    of the weight (which an optimizer step may make without a trace on the tensor).
    """

    def __init__(self, weight: torch.Tensor, rows: int) -> None:
        """``rows``: about how many rows each product will have (oneDNN's layout hint)."""
        self.weight = weight.detach()
        self.packed = (
            torch.ops.mkldnn._reorder_linear_weight(self.weight, batch_size=max(rows, 1))
            if _onednn_usable(self.weight, self.weight)
            else None
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(R, d) -> (R, V)."""
        if self.packed is None or not _onednn_usable(x, self.weight):
            return F.linear(x, self.weight)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")
