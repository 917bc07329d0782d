"""The Transformer model: embeddings, attention, layers and the encoder-decoder."""

from transformer_mt.model.attention import MultiHeadAttention, ScaledDotProductAttention
from transformer_mt.model.dropout import Dropout
from transformer_mt.model.embedding import (
    LearnedPositionalEmbedding,
    PositionalEncoding,
    RotaryEmbedding,
    TransformerEmbedding,
)
from transformer_mt.model.layers import DecoderLayer, EncoderLayer, FeedForward
from transformer_mt.model.transformer import (
    Decoder,
    Encoder,
    Transformer,
    build_model,
    padding_mask,
    with_defaults,
)
from transformer_mt.model.variants import VARIANTS, check_variant

__all__ = [
    "VARIANTS",
    "Decoder",
    "DecoderLayer",
    "Dropout",
    "Encoder",
    "EncoderLayer",
    "FeedForward",
    "LearnedPositionalEmbedding",
    "MultiHeadAttention",
    "PositionalEncoding",
    "RotaryEmbedding",
    "ScaledDotProductAttention",
    "Transformer",
    "TransformerEmbedding",
    "build_model",
    "check_variant",
    "padding_mask",
    "with_defaults",
]
