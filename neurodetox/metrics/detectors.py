"""Detectors on the same samples as EigenScore: semantic entropy, distinct answers, sequence probability.

All are oriented so that higher = more likely hallucinated (``docs/methods.md`` §6):

* **Discrete semantic entropy** (Kuhn et al., "Semantic Uncertainty", ICLR 2023,
  arXiv 2302.09664; Farquhar et al., Nature 2024, the discrete variant): the ``K`` sampled
  answers are clustered by meaning and the entropy ``−Σ_c p_c ln p_c`` of the cluster
  frequencies ``p_c = n_c / K`` is the score (nats). For short single-entity answers, meaning
  equivalence is equality after :func:`neurodetox.metrics.factual.normalize_answer`, and
  answers equal to two aliases of the same fact (``"USA"`` and ``"United States"``) are one
  cluster. (The general form needs an NLI model, which is not available offline; LM-Polygraph's
  ``SemanticEntropy`` uses DeBERTa entailment and sums sample probabilities per class.)
* **Number of distinct answers** (Lin et al., "Generating with Confidence", arXiv 2305.19187,
  "NumSemSets" in LM-Polygraph): the number of such clusters, ``1 … K``.
* **Maximum sequence probability** (LM-Polygraph ``MaximumSequenceProbability``): ``−Σ_t ln
  p(y_t | y_<t, x)`` over the greedy answer's scored tokens (nats), i.e. minus the log of the
  probability of the most likely answer.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence

from neurodetox.metrics.factual import normalize_answer

__all__ = ["answer_clusters", "distinct_answers", "semantic_entropy", "sequence_nll"]


def answer_clusters(answers: Sequence[str], aliases: Optional[Iterable[str]] = None) -> list[int]:
    """Cluster id of each answer: equal after normalisation, and every alias of the fact in one cluster.

    Args:
        answers: ``K`` answer strings.
        aliases: accepted names of the fact's answer (optional). An answer whose normalised
            form equals any alias's normalised form joins the one alias cluster.

    Returns:
        ``K`` ints, clusters numbered by first appearance from 0.
    """
    alias_keys = {normalize_answer(a) for a in (aliases or [])} - {""}
    ids: dict[str, int] = {}
    out = []
    for a in answers:
        key = normalize_answer(a)
        if key in alias_keys:
            key = "\x00alias"
        out.append(ids.setdefault(key, len(ids)))
    return out


def semantic_entropy(answers: Sequence[str], aliases: Optional[Iterable[str]] = None) -> float:
    """Discrete semantic entropy (nats) of ``K`` sampled answers.

    ``−Σ_c (n_c/K) ln(n_c/K)`` over the clusters of :func:`answer_clusters`: 0 when all answers
    agree, ``ln K`` when all differ.

    Args:
        answers: the ``K ≥ 1`` sampled answers of one prompt.
        aliases: the fact's accepted answers (optional; merges alias spellings).

    Raises:
        ValueError: no answers.
    """
    if len(answers) == 0:
        raise ValueError("semantic_entropy needs at least one answer")
    clusters = answer_clusters(answers, aliases)
    k = len(clusters)
    counts = [clusters.count(c) for c in set(clusters)]
    return float(-sum((n / k) * math.log(n / k) for n in counts))


def distinct_answers(answers: Sequence[str], aliases: Optional[Iterable[str]] = None) -> int:
    """Number of distinct answers (clusters of :func:`answer_clusters`) among ``K`` samples.

    Raises:
        ValueError: no answers.
    """
    if len(answers) == 0:
        raise ValueError("distinct_answers needs at least one answer")
    return len(set(answer_clusters(answers, aliases)))


def sequence_nll(logprobs: Sequence[float]) -> float:
    """Maximum-sequence-probability score: ``−Σ_t ln p(y_t | y_<t, x)`` (nats) of the greedy answer.

    Args:
        logprobs: the natural-log probabilities of the answer's scored tokens (its real tokens and
            the stop / EOS that ended it), as ``sample_answers(return_logprobs=True)`` returns.

    Raises:
        ValueError: no log-probabilities, or one that is NaN or > 0.
    """
    lp = [float(x) for x in logprobs]
    if not lp:
        raise ValueError("sequence_nll: no token log-probabilities")
    for x in lp:
        if math.isnan(x) or x > 1e-6:
            raise ValueError(f"sequence_nll: log-probabilities must be <= 0 and not NaN, got {x!r}")
    return float(-sum(lp))
