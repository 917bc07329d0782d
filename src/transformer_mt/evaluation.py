"""Corpus-level scores with sacreBLEU: detokenized, cased BLEU and chrF, with signatures."""

from __future__ import annotations

from dataclasses import dataclass

from sacrebleu.metrics import BLEU, CHRF


@dataclass
class Scores:
    """BLEU and chrF of a set of hypotheses, with sacreBLEU's reproducibility signatures."""

    bleu: float
    chrf: float
    bleu_signature: str
    chrf_signature: str
    bleu_detail: str


def score(hypotheses: list[str], references: list[str]) -> Scores:
    """Score detokenized hypotheses against one reference each (sacreBLEU defaults: 13a, cased)."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    bleu, chrf = BLEU(), CHRF()
    b = bleu.corpus_score(hypotheses, [references])
    c = chrf.corpus_score(hypotheses, [references])
    return Scores(b.score, c.score, str(bleu.get_signature()), str(chrf.get_signature()), str(b))
