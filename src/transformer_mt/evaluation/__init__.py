"""Scoring translations: sacreBLEU metrics and the final evaluation (α tuned on val)."""

from transformer_mt.evaluation.metrics import METRICS, MetricScore, score

__all__ = ["METRICS", "MetricScore", "score"]
