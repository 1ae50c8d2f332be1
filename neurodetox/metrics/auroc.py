"""Detection quality of hallucination scores: AUROC with bootstrap intervals.

The label is whether the greedy answer is wrong (``hallucinated = not correct``,
from :func:`neurodetox.metrics.is_correct`); every score is oriented so that
higher means "more likely hallucinated" using a direction fixed in advance
(:data:`neurodetox.metrics.baselines.HALLUCINATION_DIRECTION`), never flipped
after looking at the data. AUROC comes from scikit-learn
(``sklearn.metrics.roc_auc_score``); the 95 % interval is a percentile
bootstrap over prompts.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

import numpy as np

__all__ = ["auroc", "bootstrap_auroc", "detection_summary", "paired_auroc_difference", "roc_points"]


def _labels_scores(scores, hallucinated) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(hallucinated).reshape(-1)
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in length: {s.shape[0]} vs {y.shape[0]}")
    if s.size == 0:
        raise ValueError("no scores (empty probe set)")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores contain NaN or inf; drop those prompts first")
    y = y.astype(bool)
    if y.all() or not y.any():
        raise ValueError(
            f"AUROC needs both correct and hallucinated answers; got {int(y.sum())} hallucinated of {y.size}"
        )
    return s, y


def auroc(scores: Sequence[float], hallucinated: Sequence[bool], direction: int = 1) -> float:
    """Area under the ROC curve of ``direction · scores`` for detecting ``hallucinated``.

    Args:
        scores: ``N`` finite scores.
        hallucinated: ``N`` booleans (True = the answer is wrong).
        direction: ``+1`` if higher scores mean hallucination, ``−1`` if lower do.

    Returns:
        AUROC in ``[0, 1]`` (0.5 = chance; ties count one half).

    Raises:
        ValueError: lengths differ, no scores, non-finite scores, one class only.
    """
    from sklearn.metrics import roc_auc_score

    s, y = _labels_scores(scores, hallucinated)
    return float(roc_auc_score(y, direction * s))


def bootstrap_auroc(
    scores: Sequence[float],
    hallucinated: Sequence[bool],
    direction: int = 1,
    *,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """AUROC and its percentile-bootstrap interval (prompts resampled with replacement).

    Resamples that contain a single class are drawn again. Each resample's AUROC
    is ``sklearn.metrics.roc_auc_score``.

    Args:
        scores, hallucinated, direction: as :func:`auroc`.
        n_boot: bootstrap resamples (default 1000).
        level: interval level (default 0.95).
        seed: ``numpy.random.default_rng`` seed.

    Returns:
        ``(auroc, low, high)``.

    Raises:
        ValueError: as :func:`auroc`; ``n_boot < 1``; ``level`` not in (0, 1).
    """
    from sklearn.metrics import roc_auc_score

    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise ValueError(f"n_boot must be an integer >= 1, got {n_boot!r}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    s, y = _labels_scores(scores, hallucinated)
    s = direction * s
    point = float(roc_auc_score(y, s))
    rng = np.random.default_rng(seed)
    n = s.size
    stats = np.empty(n_boot)
    i = 0
    while i < n_boot:
        idx = rng.integers(0, n, size=n)
        yy = y[idx]
        if yy.all() or not yy.any():
            continue
        stats[i] = roc_auc_score(yy, s[idx])
        i += 1
    lo, hi = np.quantile(stats, [(1 - level) / 2, 1 - (1 - level) / 2])
    return point, float(lo), float(hi)


def roc_points(scores: Sequence[float], hallucinated: Sequence[bool], direction: int = 1):
    """``(fpr, tpr)`` arrays of the ROC curve (``sklearn.metrics.roc_curve``)."""
    from sklearn.metrics import roc_curve

    s, y = _labels_scores(scores, hallucinated)
    fpr, tpr, _ = roc_curve(y, direction * s)
    return fpr, tpr


def detection_summary(
    scores: Mapping[str, Sequence[float]],
    correct: Sequence[bool],
    directions: Optional[Mapping[str, int]] = None,
    *,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> dict:
    """AUROC with bootstrap interval for every score against correctness.

    Prompts whose score is NaN are left out of that score only (``n`` says how
    many were used).

    Args:
        scores: name -> ``N`` scores (NaN allowed).
        correct: ``N`` booleans (greedy answer correct).
        directions: name -> ±1 (default
            :data:`~neurodetox.metrics.baselines.HALLUCINATION_DIRECTION`, ``+1``
            for unknown names).
        n_boot, level, seed: as :func:`bootstrap_auroc`.

    Returns:
        ``{name: {"auroc", "ci_low", "ci_high", "direction", "n", "n_hallucinated"}}``;
        ``auroc`` is NaN (with a ``"note"``) when a score cannot be evaluated.
    """
    from neurodetox.metrics.baselines import HALLUCINATION_DIRECTION

    dirs = dict(HALLUCINATION_DIRECTION)
    dirs.update(directions or {})
    y_all = ~np.asarray(correct, dtype=bool)
    out = {}
    for name, vals in scores.items():
        v = np.asarray(vals, dtype=np.float64)
        keep = np.isfinite(v)
        entry = {"direction": int(dirs.get(name, 1)), "n": int(keep.sum()), "n_hallucinated": int(y_all[keep].sum())}
        try:
            a, lo, hi = bootstrap_auroc(v[keep], y_all[keep], entry["direction"], n_boot=n_boot, level=level, seed=seed)
            entry.update(auroc=a, ci_low=lo, ci_high=hi)
        except ValueError as e:
            entry.update(auroc=math.nan, ci_low=math.nan, ci_high=math.nan, note=str(e))
        out[name] = entry
    return out


def paired_auroc_difference(
    scores_a: Sequence[float],
    scores_b: Sequence[float],
    hallucinated: Sequence[bool],
    direction_a: int = 1,
    direction_b: int = 1,
    *,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """``AUROC(a) − AUROC(b)`` on the same prompts, with a paired percentile-bootstrap interval.

    Both scores are evaluated on each resample of prompts, so the interval
    accounts for their correlation.

    Returns:
        ``(difference, low, high)``.

    Raises:
        ValueError: as :func:`bootstrap_auroc`.
    """
    from sklearn.metrics import roc_auc_score

    a, y = _labels_scores(scores_a, hallucinated)
    b, _ = _labels_scores(scores_b, hallucinated)
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise ValueError(f"n_boot must be an integer >= 1, got {n_boot!r}")
    a, b = direction_a * a, direction_b * b
    point = float(roc_auc_score(y, a) - roc_auc_score(y, b))
    rng = np.random.default_rng(seed)
    stats = np.empty(n_boot)
    i = 0
    while i < n_boot:
        idx = rng.integers(0, y.size, size=y.size)
        yy = y[idx]
        if yy.all() or not yy.any():
            continue
        stats[i] = roc_auc_score(yy, a[idx]) - roc_auc_score(yy, b[idx])
        i += 1
    lo, hi = np.quantile(stats, [(1 - level) / 2, 1 - (1 - level) / 2])
    return point, float(lo), float(hi)
