"""Decoding: greedy search, beam search and sampling, and the Translator that wraps a
checkpoint."""

from transformer_mt.decoding.beam import Hypothesis, beam_search, length_penalty
from transformer_mt.decoding.greedy import greedy_search
from transformer_mt.decoding.sampling import sample_search
from transformer_mt.decoding.search import SearchOptions
from transformer_mt.decoding.translator import Translator

__all__ = [
    "Hypothesis",
    "SearchOptions",
    "Translator",
    "beam_search",
    "greedy_search",
    "length_penalty",
    "sample_search",
]
