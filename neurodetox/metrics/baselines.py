"""Baseline hallucination scores computed on the same samples as EigenScore.

INSIDE (Chen et al., ICLR 2024, arXiv 2402.03744, §4) compares EigenScore with
perplexity, length-normalised entropy (Malinin & Gales, "Uncertainty
Estimation in Autoregressive Structured Prediction", ICLR 2021) and lexical
similarity (mean pairwise ROUGE-L between the sampled answers; Lin et al.,
"Generating with Confidence", arXiv 2305.19187). "The Illusion of Progress"
(EMNLP 2025) adds that answer length alone is a strong baseline. All take the
per-token log-probabilities / strings that
:func:`neurodetox.metrics.sampling.sample_answers` (``return_logprobs=True``) returns,
so no extra forward pass is needed.

Orientation: :data:`HALLUCINATION_DIRECTION` gives, per score, ``+1`` when a
higher value means "more likely hallucinated" and ``−1`` when lower does
(only lexical similarity); detection AUROCs use this fixed, pre-declared
orientation.
"""

from __future__ import annotations

import math
from itertools import combinations
from typing import Callable, Optional, Sequence

__all__ = [
    "perplexity",
    "length_normalized_entropy",
    "lexical_similarity",
    "rouge_l",
    "HALLUCINATION_DIRECTION",
]

HALLUCINATION_DIRECTION = {
    "eigenscore": +1,
    "eigenscore_ees": +1,
    "eigenscore_clipped": +1,
    "perplexity": +1,
    "ln_entropy": +1,
    "lexical_similarity": -1,
    "length": +1,
    "semantic_entropy": +1,
    "distinct_answers": +1,
    "sequence_nll": +1,
    "hidden_probe": +1,
}


def _check_logprobs(logprobs: Sequence[float], what: str) -> list[float]:
    lp = [float(x) for x in logprobs]
    if not lp:
        raise ValueError(f"{what}: no token log-probabilities (empty answer with no EOS scored)")
    for x in lp:
        if math.isnan(x) or x > 1e-6:
            raise ValueError(f"{what}: log-probabilities must be <= 0 and not NaN, got {x!r}")
    return lp


def perplexity(logprobs: Sequence[float]) -> float:
    """Perplexity of one answer, ``exp(−(1/T) Σ_t ln p(y_t | y_<t, x))``.

    Args:
        logprobs: the natural-log probabilities of the answer's ``T ≥ 1`` scored
            tokens (for :func:`~neurodetox.metrics.sampling.sample_answers`: its real
            tokens and the EOS that ended it, under the raw distribution).

    Returns:
        Perplexity (≥ 1). Higher = the model was less sure of its answer.

    Raises:
        ValueError: no tokens, NaN or a positive log-probability.
    """
    lp = _check_logprobs(logprobs, "perplexity")
    return math.exp(-sum(lp) / len(lp))


def length_normalized_entropy(sample_logprobs: Sequence[Sequence[float]]) -> float:
    """Length-normalised predictive entropy over ``K`` sampled answers (nats).

    ``LN-Entropy = −(1/K) Σ_k (1/T_k) Σ_t ln p(y_{k,t} | y_{k,<t}, x)``, the
    Monte-Carlo estimate of Malinin & Gales (ICLR 2021) that INSIDE reports.

    Args:
        sample_logprobs: ``K ≥ 1`` lists of per-token log-probs.

    Raises:
        ValueError: no samples, or a sample as :func:`perplexity` rejects.
    """
    samples = list(sample_logprobs)
    if not samples:
        raise ValueError("length_normalized_entropy needs at least one sample")
    total = 0.0
    for i, lp in enumerate(samples):
        lp = _check_logprobs(lp, f"length_normalized_entropy (sample {i})")
        total += -sum(lp) / len(lp)
    return total / len(samples)


_SCORER = None


def _scorer():
    global _SCORER
    if _SCORER is None:
        from rouge_score import rouge_scorer

        _SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return _SCORER


def rouge_l(a: str, b: str) -> float:
    """ROUGE-L F-measure of two strings (``rouge-score``'s tokenizer: lowercase,
    alphanumeric tokens). Two strings with no tokens at all count as identical
    (1.0); one empty and one not gives 0."""
    if not isinstance(a, str) or not isinstance(b, str):
        raise TypeError("rouge_l compares two strings")
    tok = _scorer()._tokenizer
    ta, tb = tok.tokenize(a), tok.tokenize(b)
    if not ta and not tb:
        return 1.0
    return float(_scorer().score(a, b)["rougeL"].fmeasure)


def lexical_similarity(samples: Sequence[str], similarity: Optional[Callable[[str, str], float]] = None) -> float:
    """Mean pairwise ROUGE-L F-measure between ``K ≥ 2`` sampled answers.

    Higher = the answers agree = less likely hallucinated (direction ``−1``).
    ROUGE-L comes from the maintained ``rouge-score`` package (Google Research)
    through :func:`rouge_l`.

    Args:
        samples: ``K`` answer strings.
        similarity: pairwise similarity ``f(a, b) -> float``; default :func:`rouge_l`.

    Raises:
        ValueError: fewer than 2 samples.
        TypeError: a sample is not a string.
    """
    samples = list(samples)
    if len(samples) < 2:
        raise ValueError(f"lexical_similarity needs at least 2 samples, got {len(samples)}")
    f = similarity or rouge_l
    pairs = list(combinations(range(len(samples)), 2))
    return sum(f(samples[i], samples[j]) for i, j in pairs) / len(pairs)
