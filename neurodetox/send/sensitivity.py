"""SeND sensitivity: which neurons swing most between checkpoints.

Implements steps 3–4 of Algorithm 2 of Mohammadzadeh et al., "Hallucination
Detox: Sensitive Neuron Dropout (SeND) for Large Language Model Training",
arXiv 2410.15460, as decided in ``shared/docs/methods.md`` §1: variability is
taken **across checkpoints** (not across tracking items, as the released code
does).
"""

from __future__ import annotations

from typing import Optional

import torch

#: What SeND drops at each window end: the most sensitive neurons, as many random ones, or none.
SEND_MODES = ("send", "random", "off")


def sensitivity_scores(history: torch.Tensor) -> torch.Tensor:
    """Per-neuron sensitivity ``V_i`` from the last ``C`` checkpoints.

    With ``e_ji^t`` the embedding of tracking item ``j`` at checkpoint ``t``:
    ``Δ_ji = Σ_t |e_ji^t − e_ji^(t−1)|``, ``Var_ji = var_t(e_ji^t)``
    (population variance over the ``C`` checkpoints), ``V_ji = Var_ji · Δ_ji``
    and ``V_i = mean_j V_ji``.

    Args:
        history: ``[C, N, n]`` — ``C ≥ 2`` checkpoints (oldest first), ``N``
            tracking items, ``n`` neurons.

    Returns:
        ``[n]`` float64 scores (higher = more sensitive).

    Raises:
        ValueError: fewer than 2 checkpoints, an empty tracking set, or
            non-finite embeddings.
    """
    if history.ndim != 3:
        raise ValueError(f"history must be [C, N, n], got shape {tuple(history.shape)}")
    C, N, _ = history.shape
    if C < 2:
        raise ValueError(f"sensitivity needs at least 2 checkpoints, got {C}")
    if N == 0:
        raise ValueError("sensitivity needs a non-empty tracking set (N = 0)")
    h = history.double()
    if not torch.isfinite(h).all():
        raise ValueError("tracking embeddings contain NaN or inf")
    delta = (h[1:] - h[:-1]).abs().sum(0)
    var = h.var(0, unbiased=False)
    return (var * delta).mean(0)


def num_to_drop(width: int, fraction: float) -> int:
    """``round(fraction · width)``, at least 1 and at most ``width - 1``."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"drop fraction must be in (0, 1), got {fraction}")
    return min(max(int(round(fraction * width)), 1), width - 1)


def top_fraction(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """Indices of the top ``fraction`` of ``scores`` ``[n]``, sorted ascending.

    Ties are broken by the lower index (stable sort), so the selection is a
    deterministic function of the scores.
    """
    k = num_to_drop(scores.numel(), fraction)
    order = torch.argsort(scores.double().cpu(), descending=True, stable=True)
    return order[:k].sort().values


def random_fraction(width: int, fraction: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """SeND's control: ``fraction`` of ``width`` indices drawn uniformly, sorted."""
    k = num_to_drop(width, fraction)
    return torch.randperm(width, generator=generator)[:k].sort().values
