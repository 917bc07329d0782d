"""Decoding: greedy and beam search, and the Translator that wraps a checkpoint."""

from transformer_mt.decoding.beam import Hypothesis, beam_search, length_penalty
from transformer_mt.decoding.greedy import greedy_search
from transformer_mt.decoding.search import SearchOptions
from transformer_mt.decoding.translator import Translator, build_model, resolve_device

__all__ = [
    "Hypothesis",
    "SearchOptions",
    "Translator",
    "beam_search",
    "build_model",
    "greedy_search",
    "length_penalty",
    "resolve_device",
]
