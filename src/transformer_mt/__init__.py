"""transformer_mt: a readable encoder-decoder Transformer for machine translation."""

from transformer_mt.decoding.translator import Translator

__all__ = ["Translator"]
__version__ = "0.1.0"
