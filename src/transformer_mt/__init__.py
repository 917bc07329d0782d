"""transformer_mt: a readable encoder-decoder Transformer for machine translation.

``from transformer_mt import Translator`` is the Python API; it is imported on first use, so
that ``transformer_mt.data`` (e.g. in preparation workers) loads without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformer_mt.decoding.translator import Translator

__all__ = ["Translator"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "Translator":
        from transformer_mt.decoding.translator import Translator

        return Translator
    raise AttributeError(f"module 'transformer_mt' has no attribute {name!r}")
