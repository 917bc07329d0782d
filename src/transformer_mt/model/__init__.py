"""The Transformer model: embeddings, attention, layers and the encoder-decoder."""

from transformer_mt.model.attention import MultiHeadAttention, ScaledDotProductAttention
from transformer_mt.model.dropout import Dropout
from transformer_mt.model.embedding import PositionalEncoding, TransformerEmbedding
from transformer_mt.model.layers import DecoderLayer, EncoderLayer, FeedForward
from transformer_mt.model.transformer import (
    Decoder,
    Encoder,
    Transformer,
    build_model,
    padding_mask,
)

__all__ = [
    "Decoder",
    "DecoderLayer",
    "Dropout",
    "Encoder",
    "EncoderLayer",
    "FeedForward",
    "MultiHeadAttention",
    "PositionalEncoding",
    "ScaledDotProductAttention",
    "Transformer",
    "TransformerEmbedding",
    "build_model",
    "padding_mask",
]
