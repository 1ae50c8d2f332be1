"""Per-arm means with t intervals, paired differences by seed, and what the data support.

Intervals are Student-t 95 % intervals over seeds (``scipy.stats.t``): for an
arm, of the per-seed values; for a difference, of the per-seed paired
differences ``arm_a(seed) − arm_b(seed)`` (the same seed gives both arms the
same data order and the same probe samples). With 3 seeds ``t₀.₉₇₅,₂ = 4.30``,
so only large, consistent effects exclude zero; that is the honest width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

__all__ = ["METRICS", "Metric", "interval", "arm_table", "paired_difference", "verdict"]


@dataclass(frozen=True)
class Metric:
    """A study metric: key in a run's ``metrics``, label, unit, which way is better (+1, −1, 0 = neither)."""

    key: str
    label: str
    better: int
    percent: bool = False


#: The metrics reported per arm, in table order.
METRICS: tuple[Metric, ...] = (
    Metric("test_accuracy", "factual accuracy, test split", +1, True),
    Metric("paraphrase_accuracy", "factual accuracy, training-fact paraphrases", +1, True),
    Metric("test_eigenscore", "mean EigenScore, test (nats)", -1),
    Metric("paraphrase_eigenscore", "mean EigenScore, paraphrases (nats)", -1),
    Metric("test_ees", "dataset-level EES, test statements (nats)", 0),
    Metric("paraphrase_ees", "dataset-level EES, paraphrase statements (nats)", 0),
    Metric("test_eigenscore_auroc", "EigenScore detection AUROC, test", +1),
    Metric("paraphrase_eigenscore_auroc", "EigenScore detection AUROC, paraphrases", +1),
    Metric("test_token_entropy", "token entropy of answers, test (nats/token)", -1),
    Metric("paraphrase_token_entropy", "token entropy of answers, paraphrases (nats/token)", -1),
    Metric("reference_perplexity", "perplexity, held-out general text", -1),
    Metric("train_seconds", "training wall time (s)", -1),
)


def interval(values: Sequence[float], level: float = 0.95) -> dict:
    """Mean and Student-t interval of ``values`` (NaNs dropped).

    Returns:
        ``{"mean", "low", "high", "n"}``; ``low``/``high`` are NaN for ``n < 2``
        (and equal the mean when every value is the same).
    """
    from scipy import stats

    v = [float(x) for x in values if x is not None and math.isfinite(float(x))]
    n = len(v)
    if n == 0:
        return {"mean": math.nan, "low": math.nan, "high": math.nan, "n": 0}
    mean = sum(v) / n
    if n < 2:
        return {"mean": mean, "low": math.nan, "high": math.nan, "n": 1}
    sd = math.sqrt(sum((x - mean) ** 2 for x in v) / (n - 1))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": n}


def _by_seed(results: Sequence[dict], arm: str, key: str) -> dict[int, float]:
    return {r["seed"]: r["metrics"].get(key, math.nan) for r in results if r["arm"] == arm}


def arm_table(results: Sequence[dict], arms: Sequence[str], metrics: Sequence[Metric] = METRICS) -> dict:
    """``{arm: {metric_key: interval}}`` over the seeds each arm ran."""
    return {a: {m.key: interval(list(_by_seed(results, a, m.key).values())) for m in metrics} for a in arms}


def paired_difference(results: Sequence[dict], arm_a: str, arm_b: str, key: str) -> dict:
    """Interval of ``arm_a − arm_b`` paired by seed (seeds both arms ran); adds ``"seeds"``."""
    a, b = _by_seed(results, arm_a, key), _by_seed(results, arm_b, key)
    seeds = sorted(set(a) & set(b))
    out = interval([a[s] - b[s] for s in seeds])
    out["seeds"] = seeds
    return out


def verdict(diff: dict, better: int) -> str:
    """``"better"``, ``"worse"``, ``"no clear difference"`` (interval contains 0) or ``"one seed"``."""
    if diff["n"] < 2 or math.isnan(diff["low"]):
        return "one seed: no interval"
    if better == 0:
        return "higher" if diff["low"] > 0 else "lower" if diff["high"] < 0 else "no clear difference"
    if diff["low"] > 0:
        return "better" if better > 0 else "worse"
    if diff["high"] < 0:
        return "worse" if better > 0 else "better"
    return "no clear difference"


def fmt(value: float, percent: bool = False, signed: bool = False) -> str:
    """``12.3%`` / ``+1.2 pp`` for percentages, 3 significant decimals otherwise."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if percent:
        return f"{value * 100:+.1f} pp" if signed else f"{value * 100:.1f}%"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def fmt_interval(iv: dict, percent: bool = False, signed: bool = False) -> str:
    """``mean [low, high]`` (or just the mean for one seed)."""
    if iv["n"] < 2 or math.isnan(iv["low"]):
        return fmt(iv["mean"], percent, signed)
    return f"{fmt(iv['mean'], percent, signed)} [{fmt(iv['low'], percent, signed)}, {fmt(iv['high'], percent, signed)}]"


def headline(
    results: Sequence[dict], arm_a: str = "send", arm_b: str = "off", key: str = "test_accuracy"
) -> Optional[dict]:
    """The main paired difference (default: test accuracy, SeND − off), or None without both arms."""
    if not any(r["arm"] == arm_a for r in results) or not any(r["arm"] == arm_b for r in results):
        return None
    return paired_difference(results, arm_a, arm_b, key)
