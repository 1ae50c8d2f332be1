"""Hallucination metrics: EigenScore (INSIDE, arXiv 2402.03744) and factual accuracy."""

from .eigenscore import answer_covariance, eigenscore
from .factual import factual_accuracy, is_correct, normalize_answer

__all__ = ["answer_covariance", "eigenscore", "factual_accuracy", "is_correct", "normalize_answer"]
