"""EigenScore as a Hugging Face ``evaluate`` metric module.

    import evaluate
    metric = evaluate.load("path/to/neurodetox/metrics/eigenscore_metric")
    metric.compute(embeddings=[emb_prompt_1, emb_prompt_2, ...], alpha=1e-3)

Each prediction is one prompt's ``[K, d]`` matrix of answer embeddings (e.g.
``SampledAnswers.embeddings[p]`` from :func:`neurodetox.metrics.sampling.sample_answers`).
The score is INSIDE's EigenScore (Chen et al., "INSIDE: LLMs' Internal States
Retain the Power of Hallucination Detection", ICLR 2024, arXiv 2402.03744):
``(1/K) Σ_k ln(λ_k(Σ) + α)`` with ``Σ = torch.cov(Z)`` (``K × K``). It is
computed by :func:`neurodetox.metrics.ees.efficient_eigenscore` (``method``
``"exact"`` by default; ``"kpm"`` is EES from the SeND paper, arXiv 2410.15460).
Works offline: nothing is downloaded.
"""

import datasets
import evaluate
import numpy as np

from neurodetox.metrics.ees import efficient_eigenscore

_CITATION = """\
@inproceedings{chen2024inside,
  title={INSIDE: LLMs' Internal States Retain the Power of Hallucination Detection},
  author={Chen, Chao and Liu, Kai and Chen, Ze and Gu, Yi and Wu, Yue and Tao, Mingyuan and Fu, Zhihang and Ye, Jieping},
  booktitle={ICLR}, year={2024}}
"""

_DESCRIPTION = """\
EigenScore: mean log-eigenvalue of the covariance of K sampled answers' embeddings
(higher = the answers diverge = more likely a hallucination).
"""

_KWARGS_DESCRIPTION = """
Args:
    embeddings: list of P prompts, each a [K, d] nested list / array of floats (K >= 2, d >= 2).
    alpha: regulariser > 0 added to every eigenvalue (default 1e-3).
    method: "exact" (default), "exact-direct", "exact-gram", "kpm" or "auto".
Returns:
    eigenscore: mean over prompts (nats).
    eigenscores: per-prompt scores.
    errors: per-prompt 95% error estimates (0 for exact methods).
Examples:
    >>> metric = evaluate.load("neurodetox/metrics/eigenscore_metric")
    >>> metric.compute(embeddings=[[[1.0, 2.0, 3.0], [1.0, 2.5, 2.0]]])["eigenscores"]
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class EigenscoreMetric(evaluate.Metric):
    """INSIDE's EigenScore over precomputed answer embeddings."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"embeddings": datasets.Sequence(datasets.Sequence(datasets.Value("float64")))}),
            reference_urls=["https://arxiv.org/abs/2402.03744", "https://arxiv.org/abs/2410.15460"],
        )

    def _compute(self, embeddings, alpha=1e-3, method="exact"):
        scores, errors = [], []
        for i, emb in enumerate(embeddings):
            z = np.asarray(emb, dtype=np.float64)
            if z.ndim != 2:
                raise ValueError(f"prediction {i}: expected a [K, d] matrix, got shape {z.shape}")
            res = efficient_eigenscore(z, alpha=alpha, method=method)
            scores.append(float(res.value))
            errors.append(float(res.error))
        if not scores:
            raise ValueError("no embeddings given (empty probe set)")
        return {"eigenscore": float(np.mean(scores)), "eigenscores": scores, "errors": errors}
