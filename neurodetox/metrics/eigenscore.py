"""EigenScore: hallucination score from the spread of sampled answers' embeddings.

Source: Chen et al., "INSIDE: LLMs' Internal States Retain the Power of
Hallucination Detection", ICLR 2024, arXiv 2402.03744 (see
``docs/methods.md`` §2).

For one prompt, ``K`` answers are sampled and each is embedded by the hidden
state of the model's middle layer at its last generated token (see
:func:`neurodetox.metrics.sampling.sample_answers`). With ``Z`` the ``[K, d]`` matrix of
those embeddings,

* ``Σ = torch.cov(Z)``: a ``K × K`` matrix; each embedding is centred over its
  ``d`` features and the product is divided by ``d − 1`` (as the authors' code
  does; the paper's ``Zᵀ J_d Z`` without the ``1/(d−1)``);
* ``EigenScore = (1/K) Σ_k ln(λ_k(Σ) + α)``, ``α = 1e-3``.

Higher means the answers diverge, i.e. a hallucination is more likely. The
score is computed exactly from the ``K × K`` matrix; the ``d × d`` covariance is
never formed.
"""

from __future__ import annotations

import math
from typing import Union

import numpy as np
import torch

__all__ = ["eigenscore", "answer_covariance", "check_embeddings"]

ArrayLike = Union[torch.Tensor, np.ndarray]


def _as_tensor(embeddings: ArrayLike) -> torch.Tensor:
    if isinstance(embeddings, torch.Tensor):
        return embeddings
    try:
        return torch.as_tensor(np.asarray(embeddings))
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"embeddings must be a tensor or array of numbers, got {type(embeddings).__name__}: {e}"
        ) from None


def check_embeddings(embeddings: ArrayLike, alpha: float | None) -> torch.Tensor:
    """Embeddings ``[K, d]`` or ``[P, K, d]`` as a float64 tensor, checked (and ``alpha > 0`` unless ``None``).

    Raises:
        ValueError: another shape, fewer than two samples, non-finite values, or a bad ``alpha``.
    """
    z = _as_tensor(embeddings)
    if z.ndim not in (2, 3):
        raise ValueError(
            f"embeddings must have shape [K, d] (one prompt) or [P, K, d] (batched), "
            f"got {z.ndim} dimension(s) with shape {tuple(z.shape)}"
        )
    if z.is_complex() or z.dtype == torch.bool:
        raise ValueError(f"embeddings must be real numbers, got dtype {z.dtype}")
    k, d = int(z.shape[-2]), int(z.shape[-1])
    if z.ndim == 3 and z.shape[0] == 0:
        raise ValueError(f"embeddings has no prompts (shape {tuple(z.shape)})")
    if k < 2:
        raise ValueError(f"EigenScore needs at least K=2 answers per prompt, got K={k} (shape {tuple(z.shape)})")
    if d < 2:
        raise ValueError(
            f"EigenScore needs embeddings with at least d=2 features (the covariance divides by d-1), "
            f"got d={d} (shape {tuple(z.shape)})"
        )
    if alpha is not None:
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
            raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
    z = z.to(torch.float64)
    finite = torch.isfinite(z)
    if not bool(finite.all()):
        if z.ndim == 2:
            bad = (~finite).any(dim=-1).nonzero().flatten().tolist()
            raise ValueError(f"embeddings contain NaN or inf (answer rows {bad})")
        bad_p = (~finite).flatten(1).any(dim=1).nonzero().flatten().tolist()
        raise ValueError(f"embeddings contain NaN or inf at prompt index(es) {bad_p}")
    return z


def answer_covariance(embeddings: ArrayLike) -> torch.Tensor:
    """The ``K × K`` answer covariance ``Σ`` used by :func:`eigenscore`.

    Identical to ``torch.cov(Z)`` for ``Z`` of shape ``[K, d]`` (rows = answers):
    each embedding is centred over its ``d`` features and the Gram matrix is
    divided by ``d − 1``. Computed in float64.

    Args:
        embeddings: ``[K, d]`` or ``[P, K, d]`` (tensor or numpy array).

    Returns:
        ``[K, K]`` or ``[P, K, K]`` float64 tensor on the input's device.

    Raises:
        ValueError: wrong number of dimensions, ``K < 2``, ``d < 2``, or
            non-finite values.
    """
    z = check_embeddings(embeddings, None)
    d = z.shape[-1]
    zc = z - z.mean(dim=-1, keepdim=True)
    return zc @ zc.transpose(-1, -2) / (d - 1)


def eigenscore(embeddings: ArrayLike, alpha: float = 1e-3) -> torch.Tensor:
    """EigenScore of the sampled answers of one prompt, or of a batch of prompts.

    ``EigenScore = (1/K) Σ_k ln(λ_k(Σ) + α)`` with ``Σ = torch.cov(Z)`` the
    ``K × K`` covariance of the ``K`` answer embeddings (each centred over its
    ``d`` features, divided by ``d − 1``). The eigenvalues come from
    ``torch.linalg.eigvalsh`` of the ``K × K`` matrix in float64; the ``d × d``
    covariance is never formed. ``Σ`` is positive semi-definite, so round-off
    eigenvalues below zero are clamped to 0. Higher = the answers disagree =
    likely hallucination. The score is in nats; with ``Σ = 0`` (e.g. every
    embedding constant over its features) it equals ``ln α``.

    Source: Chen et al., "INSIDE: LLMs' Internal States Retain the Power of
    Hallucination Detection", ICLR 2024, arXiv 2402.03744 (``α = 1e-3``,
    ``K = 10`` in the paper).

    Args:
        embeddings: ``[K, d]`` (one prompt: ``K`` answers, ``d`` features) or
            ``[P, K, d]`` (``P`` prompts), a tensor or numpy array; any real
            dtype (computed in float64).
        alpha: regulariser added to every eigenvalue, > 0. Default ``1e-3``.

    Returns:
        float64 tensor on the input's device: a scalar (0-d) for ``[K, d]``
        input, ``[P]`` for ``[P, K, d]`` input.

    Raises:
        ValueError: ``embeddings`` is not 2-D or 3-D; ``K < 2``; ``d < 2``; no
            prompts; ``alpha`` is not a finite number > 0; NaN or inf in the
            embeddings (the message names the prompt indices when batched).
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
    cov = answer_covariance(embeddings)
    cov = 0.5 * (cov + cov.transpose(-1, -2))
    lam = torch.linalg.eigvalsh(cov).clamp_min(0.0)
    return torch.log(lam + float(alpha)).mean(dim=-1)
