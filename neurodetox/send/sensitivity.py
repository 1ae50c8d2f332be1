"""SeND sensitivity: which neurons swing most between checkpoints, and which may be dropped.

Implements steps 3–4 of Algorithm 2 of Mohammadzadeh et al., "Hallucination
Detox: Sensitive Neuron Dropout (SeND) for Large Language Model Training",
arXiv 2410.15460, as decided in ``docs/methods.md`` §1: variability is taken
**across checkpoints** (:func:`sensitivity_scores`). Also here:

* scale-free variants of ``V_i`` (``score="normalized"`` / ``"standardized"``): the
  paper's ``V_i = mean_j Var_ji · Δ_ji`` grows with the cube of an index's scale, so at
  the residual stream it mostly ranks the massive-activation dimensions first;
* :func:`released_sensitivity`, what the authors' released code computes (variability
  across tracking **items** of the checkpoint-averaged embeddings);
* :func:`massive_indices`, the massive-activation rule used to exclude dimensions from
  selection (Sun et al., "Massive Activations in Large Language Models", arXiv 2402.17762).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from neurodetox.core.errors import UserError

__all__ = [
    "PROCEDURES",
    "SCORES",
    "SEND_MODES",
    "check_candidates",
    "massive_indices",
    "mean_abs_activation",
    "num_to_drop",
    "random_fraction",
    "released_sensitivity",
    "sensitivity_scores",
    "top_fraction",
]

#: What SeND drops at each window end: the most sensitive neurons, as many random ones, or none.
SEND_MODES = ("send", "random", "off")
#: How ``V_i`` is scaled: the paper's raw product, or one of two scale-free versions.
SCORES = ("raw", "normalized", "standardized")
#: Which SeND procedure runs: the paper's Algorithm 2, or what the authors' released code does.
PROCEDURES = ("paper", "released")


def _check_history(history: torch.Tensor) -> torch.Tensor:
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
    return h


def sensitivity_scores(history: torch.Tensor, score: str = "raw") -> torch.Tensor:
    """Per-neuron sensitivity ``V_i`` from the last ``C`` checkpoints.

    With ``e_ji^t`` the embedding of tracking item ``j`` at checkpoint ``t``:
    ``Δ_ji = Σ_t |e_ji^t − e_ji^(t−1)|``, ``Var_ji = var_t(e_ji^t)``
    (population variance over the ``C`` checkpoints), ``V_ji = Var_ji · Δ_ji``
    and ``V_i = mean_j V_ji`` (``score="raw"``, the paper's).

    ``V_i`` is cubic in the scale of index ``i``: multiplying every ``e_ji^t`` by ``c``
    multiplies ``V_i`` by ``|c|³``. The scale-free scores divide that scale out, so that
    the ranking no longer follows magnitude:

    * ``"normalized"``: ``V_i / r_i³`` with ``r_i² = mean_{t,j} (e_ji^t)²``, the index's mean
      squared activation over the ``C`` recordings of the tracking set (the same as
      computing ``V_i`` on ``e / r_i``);
    * ``"standardized"``: ``V_i / σ_i³`` with ``σ_i²`` the population variance of
      ``e_ji^t`` over all ``t`` and ``j`` (``V_i`` of the standardised activations
      ``(e − μ_i) / σ_i``; ``Var`` and ``Δ`` ignore the shift).

    Both are invariant to any per-index rescaling ``e_i → c_i e_i`` (``c_i ≠ 0``). An index
    with ``r_i = 0`` (or ``σ_i = 0``) never changes and scores 0.

    Args:
        history: ``[C, N, n]`` — ``C ≥ 2`` checkpoints (oldest first), ``N``
            tracking items, ``n`` neurons.
        score: one of :data:`SCORES`; default ``"raw"``.

    Returns:
        ``[n]`` float64 scores (higher = more sensitive).

    Raises:
        ValueError: fewer than 2 checkpoints, an empty tracking set,
            non-finite embeddings, or an unknown ``score``.
    """
    if score not in SCORES:
        raise UserError(f"sensitivity score {score!r} is not one of {', '.join(SCORES)}")
    h = _check_history(history)
    delta = (h[1:] - h[:-1]).abs().sum(0)
    var = h.var(0, unbiased=False)
    v = (var * delta).mean(0)
    if score == "raw":
        return v
    if score == "normalized":
        scale = h.pow(2).mean((0, 1)).sqrt()
    else:
        scale = h.reshape(-1, h.shape[-1]).var(0, unbiased=False).sqrt()
    return torch.where(scale > 0, v / scale.clamp_min(1e-300).pow(3), torch.zeros_like(v))


def released_sensitivity(history: torch.Tensor) -> torch.Tensor:
    """What the SeND authors' released code ranks by (``get_sensitive_neurons``).

    The released training script (github EMZEDI/SEND, ``send/send_pythia.py``; see
    ``docs/methods.md`` §1) averages the recorded checkpoints first,
    ``ē_ji = mean_t e_ji^t``, and then takes change and variance across the tracking
    **items** ``j`` (in tracking-set order): ``Δ_i = Σ_j |ē_(j+1)i − ē_ji|``,
    ``Var_i = var_j(ē_ji)`` (population), ``V_i = Var_i · Δ_i``. It therefore ranks indices by
    how much they differ between tracking items at one averaged point of training, not by
    how much they change during training.

    Args:
        history: ``[C, N, n]`` with ``C ≥ 2`` and ``N ≥ 2`` (a difference across items needs two).

    Returns:
        ``[n]`` float64 scores.

    Raises:
        ValueError: bad shape, fewer than 2 checkpoints or items, non-finite values.
    """
    h = _check_history(history)
    if h.shape[1] < 2:
        raise ValueError(f"the released code's sensitivity needs at least 2 tracking items, got {h.shape[1]}")
    avg = h.mean(0)
    return (avg[1:] - avg[:-1]).abs().sum(0) * avg.var(0, unbiased=False)


def mean_abs_activation(embeddings: torch.Tensor) -> torch.Tensor:
    """``[N, n]`` tracking embeddings → ``[n]`` float64 mean ``|e_ji|`` over items."""
    if embeddings.ndim != 2 or embeddings.shape[0] == 0:
        raise ValueError(f"embeddings must be a non-empty [N, n] tensor, got shape {tuple(embeddings.shape)}")
    return embeddings.double().abs().mean(0)


def massive_indices(mean_abs: torch.Tensor, factor: float) -> torch.Tensor:
    """Massive-activation dimensions: ``mean_abs_i > factor × median_i(mean_abs)``.

    The rule follows Sun et al., "Massive Activations in Large Language Models"
    (arXiv 2402.17762), who call an activation massive when it is far above the
    median magnitude of its layer (they use ×1000 on single activations). Here it is
    applied to the mean ``|activation|`` of each index over the tracking set
    (:func:`mean_abs_activation` of the newest recording), with the ``factor`` a setting
    (``send_massive_factor``). The median is the lower median for an even count
    (``torch.median``).

    Args:
        mean_abs: ``[n]`` non-negative values.
        factor: ``> 1``; ``0`` (or less) means no exclusion (returns an empty tensor).

    Returns:
        Sorted int64 indices (may be empty).
    """
    if factor <= 0:
        return torch.empty(0, dtype=torch.long)
    m = mean_abs.double().flatten()
    return torch.nonzero(m > factor * m.median(), as_tuple=False).flatten()


def num_to_drop(width: int, fraction: float) -> int:
    """``round(fraction · width)``, at least 1 and at most ``width - 1``."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"drop fraction must be in (0, 1), got {fraction}")
    return min(max(int(round(fraction * width)), 1), width - 1)


def check_candidates(width: int, fraction: float, excluded: int, where: str = "") -> int:
    """How many indices a selection drops; fail if exclusion leaves too few to choose from.

    Returns:
        :func:`num_to_drop` ``(width, fraction)``.

    Raises:
        UserError: ``width − excluded`` is smaller than that number (the message names the
            counts and what to change).
    """
    k = num_to_drop(width, fraction)
    if width - excluded < k:
        at = f" at {where}" if where else ""
        raise UserError(
            f"massive-dimension exclusion leaves {width - excluded} of {width} indices{at}, fewer than the "
            f"{k} that send_drop_fraction={fraction} drops: raise send_massive_factor or lower send_drop_fraction"
        )
    return k


def _allowed(width: int, exclude: Optional[Sequence[int]]) -> torch.Tensor:
    keep = torch.ones(width, dtype=torch.bool)
    if exclude is not None and len(exclude):
        keep[torch.as_tensor(list(exclude), dtype=torch.long)] = False
    return keep


def top_fraction(scores: torch.Tensor, fraction: float, exclude: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Indices of the top ``fraction`` of ``scores`` ``[n]``, sorted ascending.

    ``fraction`` is of all ``n`` indices (:func:`num_to_drop`); indices in ``exclude`` are
    never chosen. Ties are broken by the lower index (stable sort), so the selection is a
    deterministic function of the scores.

    Raises:
        UserError: ``exclude`` leaves fewer candidates than the number to drop.
    """
    n = scores.numel()
    keep = _allowed(n, exclude)
    k = check_candidates(n, fraction, int((~keep).sum()))
    order = torch.argsort(scores.double().cpu(), descending=True, stable=True)
    order = order[keep[order]]
    return order[:k].sort().values


def random_fraction(
    width: int, fraction: float, generator: Optional[torch.Generator] = None, exclude: Optional[Sequence[int]] = None
) -> torch.Tensor:
    """SeND's control: ``fraction`` of ``width`` indices drawn uniformly (outside ``exclude``), sorted.

    Raises:
        UserError: ``exclude`` leaves fewer candidates than the number to drop.
    """
    keep = _allowed(width, exclude)
    k = check_candidates(width, fraction, int((~keep).sum()))
    if bool(keep.all()):
        return torch.randperm(width, generator=generator)[:k].sort().values
    pool = torch.nonzero(keep).flatten()
    return pool[torch.randperm(len(pool), generator=generator)[:k]].sort().values
