"""Corpus-level scores with sacreBLEU: detokenized, cased BLEU, chrF and TER, with signatures."""

from __future__ import annotations

from dataclasses import dataclass

from sacrebleu.metrics import BLEU, CHRF, TER

METRICS = {"bleu": BLEU, "chrf": CHRF, "ter": TER}


@dataclass
class MetricScore:
    """One corpus score with sacreBLEU's reproducibility signature."""

    name: str
    score: float
    signature: str


def score(
    hypotheses: list[str], references: list[str], metrics: tuple[str, ...] = ("bleu", "chrf")
) -> dict[str, MetricScore]:
    """Score detokenized hypotheses against one reference each (sacreBLEU defaults: 13a,
    cased); ``metrics`` are names from :data:`METRICS`."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    if not references:
        raise ValueError("no sentences to score")
    out = {}
    for name in metrics:
        metric = METRICS[name]()
        result = metric.corpus_score(hypotheses, [references])
        out[name] = MetricScore(name, result.score, str(metric.get_signature()))
    return out
