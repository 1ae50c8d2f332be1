"""Probe evaluation: sampled answers → embeddings → EigenScore, baselines and factual accuracy.

* :func:`evaluate_probes` — factual accuracy and mean EigenScore (used by the
  trainer's ``EigenScoreCallback`` and by ``neurodetox train`` before/after).
* :func:`score_probes` — every hallucination score per prompt on the same
  samples (EigenScore exact and by EES, feature-clipped EigenScore,
  perplexity, length-normalised entropy, lexical similarity, answer length)
  and the AUROC of each against correctness of the greedy answer (used by
  ``neurodetox eval``).

Sources: INSIDE (Chen et al., ICLR 2024, arXiv 2402.03744) for EigenScore,
feature clipping and the baselines; SeND (Mohammadzadeh et al., arXiv
2410.15460) for EES.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch

from neurodetox.metrics.auroc import detection_summary
from neurodetox.metrics.baselines import (
    HALLUCINATION_DIRECTION,
    length_normalized_entropy,
    lexical_similarity,
    perplexity,
)
from neurodetox.metrics.ees import efficient_eigenscore
from neurodetox.metrics.eigenscore import eigenscore
from neurodetox.metrics.factual import is_correct
from neurodetox.metrics.sampling import POOLINGS, FeatureClipper, sample_answers

__all__ = [
    "EigenScoreSettings",
    "ProbeResult",
    "DetectionResult",
    "evaluate_probes",
    "score_probes",
    "settings_dict",
    "SCORE_NAMES",
]

SCORE_NAMES = (
    "eigenscore",
    "eigenscore_ees",
    "eigenscore_clipped",
    "perplexity",
    "ln_entropy",
    "lexical_similarity",
    "length",
)


@dataclass
class EigenScoreSettings:
    """Sampling and scoring settings (INSIDE defaults, arXiv 2402.03744).

    Attributes:
        k: sampled answers per prompt (paper 10), ≥ 2.
        temperature, top_p, top_k: sampling (paper 0.5, 0.99, 10 as in its code).
        max_new_tokens: answer length cap in tokens.
        layer: block whose output is embedded (``"middle"`` = INSIDE's middle layer).
        alpha: regulariser added to the eigenvalues (1e-3), > 0.
        batch_size: prompts per ``generate`` call (each expands to ``k`` rows).
        seed: sampling seed.
        pooling: ``"last"`` (paper: last generated token) or ``"mean"``.
        clip_percentile: feature-clipping percentile in percent (paper 0.2).
        clip_bank_size: feature-clipping memory bank size (paper 3000).
        clip_layer: the clipped block (paper: penultimate).
        ees_tol: target 95 % error of the EES (KPM) per-prompt estimate.
    """

    k: int = 10
    temperature: float = 0.5
    top_p: float = 0.99
    top_k: int = 10
    max_new_tokens: int = 10
    layer: str = "middle"
    alpha: float = 1e-3
    batch_size: int = 8
    seed: int = 0
    pooling: str = "last"
    clip_percentile: float = 0.2
    clip_bank_size: int = 3000
    clip_layer: str = "penultimate"
    ees_tol: float = 5e-3

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field."""
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 2:
            raise ValueError(f"k must be an integer >= 2 (EigenScore needs at least two samples), got {self.k!r}")
        a = self.alpha
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a) or a <= 0:
            raise ValueError(f"alpha must be a finite number > 0, got {a!r}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {self.pooling!r}")


@dataclass
class ProbeResult:
    """Outcome of :func:`evaluate_probes`.

    Attributes:
        factual_accuracy: fraction of greedy answers that contain the gold answer or an alias.
        eigenscore: mean EigenScore over prompts (nats).
        records: per prompt ``{prompt, greedy, correct, eigenscore, samples}``.
    """

    factual_accuracy: float
    eigenscore: float
    records: list = field(default_factory=list)

    def metrics(self) -> dict:
        return {"factual_accuracy": self.factual_accuracy, "eigenscore": self.eigenscore}


def _check_probes(prompts, aliases) -> None:
    if len(prompts) == 0:
        raise ValueError("no probe prompts to evaluate (empty probe set)")
    if len(prompts) != len(aliases):
        raise ValueError(f"{len(prompts)} prompts but {len(aliases)} alias lists")


def _finite_rows(emb: torch.Tensor, prompts: Sequence[str], what: str) -> torch.Tensor:
    finite = torch.isfinite(emb).flatten(1).all(1)
    if not bool(finite.all()):
        bad = (~finite).nonzero().flatten().tolist()
        names = ", ".join(f"{i} ({prompts[i][:40]!r})" for i in bad[:10])
        warnings.warn(
            f"{what}: skipped {len(bad)} prompt(s) with NaN/inf embeddings: {names}"
            + (" ..." if len(bad) > 10 else ""),
            stacklevel=3,
        )
    return finite


def evaluate_probes(
    model,
    tokenizer,
    prompts: Sequence[str],
    aliases: Sequence[Sequence[str]],
    settings: Optional[EigenScoreSettings] = None,
    show_progress: bool = False,
) -> ProbeResult:
    """Greedy factual accuracy and mean EigenScore on fact probes.

    Args:
        prompts: ``P`` completion prompts.
        aliases: for each prompt, the accepted answers.
        settings: :class:`EigenScoreSettings` (defaults if ``None``).

    Raises:
        ValueError: no prompts, or ``len(prompts) != len(aliases)``.

    Warns:
        UserWarning: prompts skipped because their embeddings are NaN/inf.
    """
    s = settings or EigenScoreSettings()
    _check_probes(prompts, aliases)
    out = sample_answers(
        model,
        tokenizer,
        list(prompts),
        k=s.k,
        temperature=s.temperature,
        top_p=s.top_p,
        top_k=s.top_k,
        max_new_tokens=s.max_new_tokens,
        layer=s.layer,
        batch_size=s.batch_size,
        seed=s.seed,
        greedy=True,
        show_progress=show_progress,
        pooling=getattr(s, "pooling", "last"),
    )
    finite = torch.isfinite(out.embeddings).flatten(1).all(1)  # sample_answers warned, naming the prompts
    scores = torch.full((len(prompts),), float("nan"), dtype=torch.float64)
    if finite.any():
        scores[finite] = eigenscore(out.embeddings[finite], alpha=s.alpha).double().cpu()
    correct = [is_correct(a, al) for a, al in zip(out.greedy, aliases)]
    records = [
        {"prompt": p, "greedy": g, "correct": c, "eigenscore": float(e), "samples": smp}
        for p, g, c, e, smp in zip(prompts, out.greedy, correct, scores.tolist(), out.samples)
    ]
    valid = [e for e in scores.tolist() if not math.isnan(e)]
    return ProbeResult(
        factual_accuracy=sum(correct) / len(correct),
        eigenscore=sum(valid) / len(valid) if valid else float("nan"),
        records=records,
    )


@dataclass
class DetectionResult:
    """Outcome of :func:`score_probes`.

    Attributes:
        records: per prompt ``{prompt, relation, greedy, correct, samples, <every score>}``
            (a score is ``None`` where it could not be computed).
        summary: :func:`neurodetox.metrics.detection_summary` of every score
            against correctness (AUROC, 95 % bootstrap interval, direction, n).
        factual_accuracy: fraction of correct greedy answers.
        timings: seconds per stage (``sampling``, ``clipped_sampling``, ``scores``, ``bootstrap``).
        settings: the :class:`EigenScoreSettings` as a dict.
        info: diagnostics: ``clipping`` (forward calls clamped, tokens pushed to the bank,
            prompts whose clipped samples differ from the unclipped ones — both use the same seed).
    """

    records: list
    summary: dict
    factual_accuracy: float
    timings: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)


def score_probes(
    model,
    tokenizer,
    prompts: Sequence[str],
    aliases: Sequence[Sequence[str]],
    settings: Optional[EigenScoreSettings] = None,
    *,
    relations: Optional[Sequence[str]] = None,
    clipped: bool = True,
    ees: bool = True,
    n_boot: int = 1000,
    show_progress: bool = False,
) -> DetectionResult:
    """Every hallucination score per prompt, on the same samples, and its detection AUROC.

    One greedy and one sampled ``generate`` per batch (with per-token log-probs
    from the same calls) give EigenScore (exact), EigenScore by EES (KPM,
    ``method="kpm"``, ``tol = settings.ees_tol``), perplexity of the greedy
    answer, length-normalised entropy and lexical similarity (mean pairwise
    ROUGE-L) of the ``K`` samples, and the greedy answer's length in tokens.
    With ``clipped=True`` a second sampled ``generate`` runs with INSIDE's
    feature clipping (:class:`neurodetox.metrics.sampling.FeatureClipper`, a fresh bank)
    for the feature-clipped EigenScore; its greedy answers are not recomputed
    (labels come from the unclipped model).

    Args:
        prompts, aliases: the probes (``P ≥ 1``).
        settings: :class:`EigenScoreSettings`.
        relations: optional per-prompt relation names stored in the records.
        clipped: also compute the feature-clipped EigenScore. Default True.
        ees: also compute EigenScore by EES. Default True.
        n_boot: bootstrap resamples for the AUROC intervals.
        show_progress: progress bars.

    Returns:
        :class:`DetectionResult`.

    Raises:
        ValueError: empty probe set; mismatched lengths; bad settings; and
            everything :func:`neurodetox.metrics.sampling.sample_answers` raises (prompt
            longer than the context, layer out of range, ...).

    Warns:
        UserWarning: prompts skipped for NaN/inf embeddings (named).
    """
    s = settings or EigenScoreSettings()
    s.validate()
    _check_probes(prompts, aliases)
    prompts = list(prompts)
    if relations is not None and len(relations) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(relations)} relations")
    common = dict(
        k=s.k,
        temperature=s.temperature,
        top_p=s.top_p,
        top_k=s.top_k,
        max_new_tokens=s.max_new_tokens,
        layer=s.layer,
        batch_size=s.batch_size,
        seed=s.seed,
        pooling=s.pooling,
        show_progress=show_progress,
    )
    timings = {}
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # reported below, with the prompts named once
        out = sample_answers(model, tokenizer, prompts, greedy=True, return_logprobs=True, **common)
    timings["sampling"] = time.perf_counter() - t0
    out_c = None
    if clipped:
        t0 = time.perf_counter()
        clipper = FeatureClipper(bank_size=s.clip_bank_size, percentile=s.clip_percentile, layer=s.clip_layer)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            out_c = sample_answers(model, tokenizer, prompts, greedy=False, feature_clip=clipper, **common)
        timings["clipped_sampling"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    n = len(prompts)
    cols = {name: np.full(n, np.nan) for name in SCORE_NAMES}
    finite = _finite_rows(out.embeddings, prompts, "EigenScore")
    if finite.any():
        cols["eigenscore"][finite.numpy()] = eigenscore(out.embeddings[finite], alpha=s.alpha).numpy()
        if ees:
            idx = finite.nonzero().flatten().tolist()
            for i in idx:
                cols["eigenscore_ees"][i] = float(
                    efficient_eigenscore(out.embeddings[i], s.alpha, "kpm", tol=s.ees_tol, seed=s.seed).value
                )
    if out_c is not None:
        fc = _finite_rows(out_c.embeddings, prompts, "feature-clipped EigenScore")
        if fc.any():
            cols["eigenscore_clipped"][fc.numpy()] = eigenscore(out_c.embeddings[fc], alpha=s.alpha).numpy()
    for i in range(n):
        cols["perplexity"][i] = perplexity(out.greedy_logprobs[i])
        cols["ln_entropy"][i] = length_normalized_entropy(out.sample_logprobs[i])
        cols["lexical_similarity"][i] = lexical_similarity(out.samples[i])
        cols["length"][i] = float(out.greedy_lengths[i])
    if not ees:
        del cols["eigenscore_ees"]
    if out_c is None:
        del cols["eigenscore_clipped"]
    timings["scores"] = time.perf_counter() - t0

    correct = [is_correct(a, al) for a, al in zip(out.greedy, aliases)]
    records = []
    for i in range(n):
        rec = {"prompt": prompts[i]}
        if relations is not None:
            rec["relation"] = relations[i]
        rec.update(greedy=out.greedy[i], correct=bool(correct[i]), aliases=list(aliases[i]))
        for name, v in cols.items():
            rec[name] = None if not math.isfinite(v[i]) else float(v[i])
        rec["samples"] = out.samples[i]
        if out_c is not None:
            rec["samples_clipped"] = out_c.samples[i]
        records.append(rec)
    t0 = time.perf_counter()
    summary = detection_summary(cols, correct, HALLUCINATION_DIRECTION, n_boot=n_boot, seed=s.seed)
    timings["bootstrap"] = time.perf_counter() - t0
    info = {}
    if out_c is not None:
        info["clipping"] = {
            "clamped_calls": clipper.clamped_calls,
            "tokens_pushed": clipper.pushed,
            "prompts_with_different_samples": sum(a != b for a, b in zip(out.samples, out_c.samples)),
        }
    return DetectionResult(
        records=records,
        summary=summary,
        factual_accuracy=sum(correct) / n,
        timings=timings,
        settings=asdict(s),
        info=info,
    )


def settings_dict(s: EigenScoreSettings) -> dict:
    return asdict(s)
