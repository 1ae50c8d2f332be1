"""Hallucination metrics.

* EigenScore (INSIDE, arXiv 2402.03744): :func:`eigenscore` (exact, batched).
* EES (SeND, arXiv 2410.15460): :func:`efficient_eigenscore`, :func:`dataset_ees`,
  :func:`log_det_mean` — a correct KPM estimator with error bars, plus the
  exact routes.
* Baselines on the same samples: :func:`perplexity`,
  :func:`length_normalized_entropy`, :func:`lexical_similarity`.
* More detectors on the same samples: :func:`semantic_entropy`, :func:`distinct_answers`,
  :func:`sequence_nll` (maximum sequence probability), :class:`HiddenStateProbe`.
* Settings and the answer boundary: :class:`EigenScoreSettings`, :func:`stop_token_ids`,
  :func:`format_prompts`.
* Detection: :func:`auroc`, :func:`bootstrap_auroc`, :func:`detection_summary`.
* Factual accuracy: :func:`is_correct`, :func:`factual_accuracy`.
"""

from neurodetox.metrics.auroc import auroc, bootstrap_auroc, detection_summary, paired_auroc_difference, roc_points
from neurodetox.metrics.baselines import (
    HALLUCINATION_DIRECTION,
    length_normalized_entropy,
    lexical_similarity,
    perplexity,
    rouge_l,
)
from neurodetox.metrics.boundary import format_prompts, stop_token_ids
from neurodetox.metrics.detectors import distinct_answers, semantic_entropy, sequence_nll
from neurodetox.metrics.ees import EESResult, dataset_ees, efficient_eigenscore, exact_log_det_mean, log_det_mean
from neurodetox.metrics.eigenscore import answer_covariance, eigenscore
from neurodetox.metrics.factual import factual_accuracy, is_correct, normalize_answer
from neurodetox.metrics.hidden_probe import HiddenStateProbe
from neurodetox.metrics.settings import EigenScoreSettings

__all__ = [
    "EESResult",
    "EigenScoreSettings",
    "HiddenStateProbe",
    "HALLUCINATION_DIRECTION",
    "answer_covariance",
    "auroc",
    "bootstrap_auroc",
    "dataset_ees",
    "distinct_answers",
    "detection_summary",
    "efficient_eigenscore",
    "eigenscore",
    "exact_log_det_mean",
    "factual_accuracy",
    "format_prompts",
    "is_correct",
    "length_normalized_entropy",
    "lexical_similarity",
    "log_det_mean",
    "normalize_answer",
    "paired_auroc_difference",
    "perplexity",
    "roc_points",
    "rouge_l",
    "semantic_entropy",
    "sequence_nll",
    "stop_token_ids",
]
