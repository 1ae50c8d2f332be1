"""Probe evaluation: sampled answers → embeddings → every hallucination detector and factual accuracy.

* :func:`evaluate_probes` — factual accuracy and mean EigenScore (``neurodetox train``
  before/after).
* :func:`collect_probe_scores` — every unsupervised score per prompt on the same samples
  (EigenScore exact, by EES and feature-clipped; perplexity, LN-entropy, lexical similarity,
  answer length; discrete semantic entropy, distinct answers, maximum sequence probability)
  and, optionally, the hidden-state features of the greedy answer.
* :func:`labelled_features` — greedy answers, their correctness and hidden-state features of
  labelled probes, the hidden-state probe's training set.
* :func:`score_probes` — all of the above plus the hidden-state probe and the AUROC of every
  score against correctness of the greedy answer (``neurodetox eval``, the trainer's
  evaluation).

Every answer ends at the answer boundary and every prompt is shown in the prompt format of
the :class:`EigenScoreSettings` (defaults: INSIDE's boundary, the raw completion prompt).
Sources: INSIDE (Chen et al., ICLR 2024, arXiv 2402.03744) for EigenScore, feature clipping,
the boundary and the baselines; SeND (Mohammadzadeh et al., arXiv 2410.15460) for EES;
``neurodetox.metrics.detectors`` and ``neurodetox.metrics.hidden_probe`` for the others.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch

from neurodetox.core.errors import UserError
from neurodetox.metrics.auroc import detection_summary
from neurodetox.metrics.baselines import (
    HALLUCINATION_DIRECTION,
    length_normalized_entropy,
    lexical_similarity,
    perplexity,
)
from neurodetox.metrics.boundary import format_prompts
from neurodetox.metrics.detectors import distinct_answers, semantic_entropy, sequence_nll
from neurodetox.metrics.ees import efficient_eigenscore
from neurodetox.metrics.eigenscore import eigenscore
from neurodetox.metrics.factual import is_correct
from neurodetox.metrics.hidden_probe import HiddenStateProbe
from neurodetox.metrics.sampling import FeatureClipper, greedy_generate, sample_answers
from neurodetox.metrics.settings import EigenScoreSettings

__all__ = [
    "EigenScoreSettings",
    "ProbeResult",
    "DetectionResult",
    "collect_probe_scores",
    "evaluate_probes",
    "labelled_features",
    "score_probes",
    "summarize_detection",
    "settings_dict",
    "SCORE_NAMES",
    "UNSUPERVISED_SCORES",
]

#: Every score :func:`collect_probe_scores` computes per prompt (the optional ones may be absent).
UNSUPERVISED_SCORES = (
    "eigenscore",
    "eigenscore_ees",
    "eigenscore_clipped",
    "perplexity",
    "ln_entropy",
    "lexical_similarity",
    "length",
    "semantic_entropy",
    "distinct_answers",
    "sequence_nll",
)
#: Every score :func:`score_probes` may report: the unsupervised ones and the hidden-state probe.
SCORE_NAMES = UNSUPERVISED_SCORES + ("hidden_probe",)


@dataclass
class ProbeResult:
    """Outcome of :func:`evaluate_probes` (and of one evaluation of the trainer's callback).

    Attributes:
        factual_accuracy: fraction of greedy answers that contain the gold answer or an alias.
        eigenscore: mean EigenScore over prompts (nats).
        records: per prompt ``{prompt, greedy, correct, eigenscore, samples, ...}``.
        detectors: the callback's other metrics (``<detector>``, ``<detector>_auroc``,
            ``<detector>_auroc_low`` / ``_high``, ``detectors_seconds``); empty from
            :func:`evaluate_probes`.
    """

    factual_accuracy: float
    eigenscore: float
    records: list = field(default_factory=list)
    detectors: dict = field(default_factory=dict)

    def metrics(self) -> dict:
        """``{"factual_accuracy", "eigenscore", **detectors}``."""
        return {"factual_accuracy": self.factual_accuracy, "eigenscore": self.eigenscore, **self.detectors}


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


def _sampling_kwargs(s: EigenScoreSettings, show_progress: bool = False) -> dict:
    """The :func:`sample_answers` keyword arguments of settings ``s``."""
    return dict(
        k=s.k,
        temperature=s.temperature,
        top_p=s.top_p,
        top_k=s.top_k,
        max_new_tokens=s.max_new_tokens,
        layer=s.layer,
        batch_size=s.batch_size,
        seed=s.seed,
        pooling=s.pooling,
        stop=s.stop,
        show_progress=show_progress,
    )


def evaluate_probes(
    model,
    tokenizer,
    prompts: Sequence[str],
    aliases: Sequence[Sequence[str]],
    settings: Optional[EigenScoreSettings] = None,
    show_progress: bool = False,
) -> ProbeResult:
    """Greedy factual accuracy and mean EigenScore on fact probes.

    Answers end at ``settings.stop`` (default INSIDE's boundary); prompts are shown in
    ``settings.prompt_format``.

    Args:
        prompts: ``P`` completion prompts.
        aliases: for each prompt, the accepted answers.
        settings: :class:`EigenScoreSettings` (defaults if ``None``).

    Raises:
        ValueError: no prompts, or ``len(prompts) != len(aliases)``; UserError: ``chat`` format
            without a chat template, a stop string that tokenises to nothing.

    Warns:
        UserWarning: prompts skipped because their embeddings are NaN/inf.
    """
    s = settings or EigenScoreSettings()
    _check_probes(prompts, aliases)
    out = sample_answers(
        model,
        tokenizer,
        format_prompts(tokenizer, prompts, s.prompt_format),
        greedy=True,
        **_sampling_kwargs(s, show_progress),
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
        timings: seconds per stage: ``sampling`` (greedy + sampled generate, with the probe's
            features when it runs), ``clipped_sampling``, one entry per score, and
            ``hidden_probe_features`` / ``hidden_probe_fit`` / ``hidden_probe_score``, ``bootstrap``.
        settings: the :class:`EigenScoreSettings` as a dict.
        info: diagnostics: ``clipping`` (forward calls clamped, tokens pushed to the bank,
            prompts whose clipped samples differ from the unclipped ones — both use the same seed),
            ``hidden_probe`` (training probes, hallucinated among them, chosen C, layer, position),
            ``stop_ids`` (number of stop tokens), ``prompt_format``.
    """

    records: list
    summary: dict
    factual_accuracy: float
    timings: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)


def collect_probe_scores(
    model,
    tokenizer,
    prompts: Sequence[str],
    aliases: Sequence[Sequence[str]],
    settings: Optional[EigenScoreSettings] = None,
    *,
    relations: Optional[Sequence[str]] = None,
    clipped: bool = True,
    ees: bool = True,
    features: bool = False,
    show_progress: bool = False,
) -> dict:
    """Every unsupervised score per prompt, on one greedy and one sampled ``generate`` per batch.

    Scores (:data:`UNSUPERVISED_SCORES`): EigenScore (exact), EigenScore by EES (KPM, ``tol =
    settings.ees_tol``; with ``ees``), the feature-clipped EigenScore (a second sampled
    ``generate`` with INSIDE's feature clipping and a fresh bank; with ``clipped``), perplexity
    of the greedy answer, length-normalised entropy, lexical similarity (mean pairwise ROUGE-L)
    of the ``K`` samples, the greedy answer's length in tokens, discrete semantic entropy and the
    number of distinct answers of the ``K`` samples (aliases of the fact merged), and the
    greedy answer's negative log-probability (maximum sequence probability).

    Args:
        prompts, aliases: the probes (``P ≥ 1``; completion prompts, formatted here).
        settings: :class:`EigenScoreSettings`.
        relations: optional per-prompt relation names stored in the records.
        clipped, ees: also compute those two EigenScore variants. Default True.
        features: also read the hidden-state probe's features of the greedy answers
            (``settings.probe_layer``; one extra forward per batch).
        show_progress: progress bars.

    Returns:
        ``{"records": [...], "features": tensor [P, 2, d] or None, "timings": {...},
        "info": {...}}``; each record is ``{prompt, relation?, greedy, correct, aliases, <every
        score> (None where undefined), samples[, samples_clipped]}``.

    Raises:
        ValueError: empty probe set; mismatched lengths; everything :func:`sample_answers` raises.

    Warns:
        UserWarning: prompts skipped for NaN/inf embeddings (named).
    """
    s = settings or EigenScoreSettings()
    s.validate()
    _check_probes(prompts, aliases)
    prompts = list(prompts)
    if relations is not None and len(relations) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(relations)} relations")
    shown = format_prompts(tokenizer, prompts, s.prompt_format)
    common = _sampling_kwargs(s, show_progress)
    timings = {}
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # reported below, with the prompts named once
        out = sample_answers(
            model,
            tokenizer,
            shown,
            greedy=True,
            return_logprobs=True,
            feature_layer=s.probe_layer if features else None,
            **common,
        )
    timings["sampling"] = time.perf_counter() - t0
    sec = out._extra.get("seconds", {})
    timings.update(
        greedy_generate=sec.get("greedy", 0.0) - sec.get("features", 0.0),
        hidden_probe_forward=sec.get("features", 0.0),
        sampled_generate=sec.get("sampled", 0.0),
    )
    out_c = None
    clipper = None
    if clipped:
        t0 = time.perf_counter()
        clipper = FeatureClipper(bank_size=s.clip_bank_size, percentile=s.clip_percentile, layer=s.clip_layer)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            out_c = sample_answers(model, tokenizer, shown, greedy=False, feature_clip=clipper, **common)
        timings["clipped_sampling"] = time.perf_counter() - t0

    n = len(prompts)
    names = [
        x for x in UNSUPERVISED_SCORES if (ees or x != "eigenscore_ees") and (clipped or x != "eigenscore_clipped")
    ]
    cols = {name: np.full(n, np.nan) for name in names}
    t0 = time.perf_counter()
    finite = _finite_rows(out.embeddings, prompts, "EigenScore")
    if finite.any():
        cols["eigenscore"][finite.numpy()] = eigenscore(out.embeddings[finite], alpha=s.alpha).numpy()
    timings["eigenscore"] = time.perf_counter() - t0
    if ees:
        t0 = time.perf_counter()
        for i in finite.nonzero().flatten().tolist():
            cols["eigenscore_ees"][i] = float(
                efficient_eigenscore(out.embeddings[i], s.alpha, "kpm", tol=s.ees_tol, seed=s.seed).value
            )
        timings["eigenscore_ees"] = time.perf_counter() - t0
    if out_c is not None:
        fc = _finite_rows(out_c.embeddings, prompts, "feature-clipped EigenScore")
        if fc.any():
            cols["eigenscore_clipped"][fc.numpy()] = eigenscore(out_c.embeddings[fc], alpha=s.alpha).numpy()
    per_prompt = {
        "perplexity": lambda i: perplexity(out.greedy_logprobs[i]),
        "ln_entropy": lambda i: length_normalized_entropy(out.sample_logprobs[i]),
        "lexical_similarity": lambda i: lexical_similarity(out.samples[i]),
        "length": lambda i: float(out.greedy_lengths[i]),
        "semantic_entropy": lambda i: semantic_entropy(out.samples[i], aliases[i]),
        "distinct_answers": lambda i: float(distinct_answers(out.samples[i], aliases[i])),
        "sequence_nll": lambda i: sequence_nll(out.greedy_logprobs[i]),
    }
    for name, fn in per_prompt.items():
        t0 = time.perf_counter()
        for i in range(n):
            try:
                cols[name][i] = fn(i)
            except ValueError:  # e.g. an empty answer with nothing scored: undefined, left NaN
                pass
        timings[name] = time.perf_counter() - t0

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
    info = {"stop_ids": len(out.stop_ids), "prompt_format": s.prompt_format}
    if clipper is not None:
        info["clipping"] = {
            "clamped_calls": clipper.clamped_calls,
            "tokens_pushed": clipper.pushed,
            "prompts_with_different_samples": sum(a != b for a, b in zip(out.samples, out_c.samples)),
        }
    return {"records": records, "features": out.greedy_features, "timings": timings, "info": info}


def labelled_features(
    model,
    tokenizer,
    prompts: Sequence[str],
    aliases: Sequence[Sequence[str]],
    settings: Optional[EigenScoreSettings] = None,
    show_progress: bool = False,
) -> tuple[torch.Tensor, list[bool]]:
    """Greedy answers of labelled probes → their hidden-state features and labels.

    One greedy ``generate`` per batch (boundary and prompt format of ``settings``) and one
    forward for the features of block ``settings.probe_layer``.

    Returns:
        ``(features [N, 2, d], hallucinated [N])``: True where the greedy answer is wrong.

    Raises:
        ValueError: empty probe set or mismatched lengths.
    """
    s = settings or EigenScoreSettings()
    _check_probes(prompts, aliases)
    g = greedy_generate(
        model,
        tokenizer,
        format_prompts(tokenizer, prompts, s.prompt_format),
        max_new_tokens=s.max_new_tokens,
        batch_size=s.batch_size * 2,
        stop=s.stop,
        feature_layer=s.probe_layer,
        show_progress=show_progress,
    )
    return g.features, [not is_correct(a, al) for a, al in zip(g.answers, aliases)]


def summarize_detection(
    records: list,
    train_features: Optional[torch.Tensor] = None,
    train_hallucinated: Optional[Sequence[bool]] = None,
    scored_features: Optional[torch.Tensor] = None,
    settings: Optional[EigenScoreSettings] = None,
    *,
    n_boot: int = 1000,
) -> tuple[dict, dict, dict]:
    """Fit the hidden-state probe (when training features are given), score, and summarise.

    Adds ``hidden_probe`` (``P(hallucinated)``) to each record in place when the probe runs.

    Returns:
        ``(summary, timings, info)``: :func:`neurodetox.metrics.detection_summary` of every score
        in the records (AUROC against correctness with a bootstrap interval; NaN with a note for
        a single class), the probe's fit/score seconds, and the probe's training-set facts.

    Raises:
        UserError: too few labelled probes for the hidden-state probe (names how many it has
            and needs).
    """
    s = settings or EigenScoreSettings()
    timings: dict = {}
    info: dict = {}
    if train_features is not None:
        probe = HiddenStateProbe(position=s.probe_position, min_labelled=s.probe_min_labelled)
        t0 = time.perf_counter()
        probe.fit(train_features, train_hallucinated)
        timings["hidden_probe_fit"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        p = probe.score(scored_features)
        timings["hidden_probe_score"] = time.perf_counter() - t0
        for rec, v in zip(records, p.tolist()):
            rec["hidden_probe"] = float(v)
        info["hidden_probe"] = {
            "n_train": probe.n_train,
            "n_train_hallucinated": probe.n_train_hallucinated,
            "C": probe.C,
            "layer": s.probe_layer,
            "position": s.probe_position,
        }
    names = [x for x in SCORE_NAMES if records and x in records[0]]
    cols = {x: np.array([np.nan if r[x] is None else r[x] for r in records], dtype=float) for x in names}
    correct = [r["correct"] for r in records]
    t0 = time.perf_counter()
    summary = detection_summary(cols, correct, HALLUCINATION_DIRECTION, n_boot=n_boot, seed=s.seed)
    timings["bootstrap"] = time.perf_counter() - t0
    return summary, timings, info


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
    probe_train: Optional[tuple[Sequence[str], Sequence[Sequence[str]]]] = None,
    n_boot: int = 1000,
    show_progress: bool = False,
) -> DetectionResult:
    """Every hallucination score per prompt, on the same samples, and its detection AUROC.

    :func:`collect_probe_scores` on the scored probes; with ``probe_train = (prompts,
    aliases)`` — labelled probes disjoint from the scored ones — also the hidden-state probe:
    :func:`labelled_features` on them, a fit, and ``P(hallucinated)`` for each scored probe.

    Args:
        prompts, aliases: the scored probes (``P ≥ 1``).
        settings: :class:`EigenScoreSettings`.
        relations: optional per-prompt relation names stored in the records.
        clipped: also compute the feature-clipped EigenScore. Default True.
        ees: also compute EigenScore by EES. Default True.
        probe_train: labelled probes for the hidden-state probe (``None``: no probe).
        n_boot: bootstrap resamples for the AUROC intervals.
        show_progress: progress bars.

    Returns:
        :class:`DetectionResult`.

    Raises:
        ValueError: empty probe set; mismatched lengths; bad settings; and everything
            :func:`neurodetox.metrics.sampling.sample_answers` raises (prompt longer than the
            context, layer out of range, ...). UserError: too few labelled probes for the
            hidden-state probe (checked before any sampling when they are too few in number).

    Warns:
        UserWarning: prompts skipped for NaN/inf embeddings (named).
    """
    s = settings or EigenScoreSettings()
    s.validate()
    if probe_train is not None:
        n_lab = len(probe_train[0])
        if n_lab < s.probe_min_labelled:
            raise UserError(
                f"the hidden-state probe needs at least {s.probe_min_labelled} labelled probes (probe_min_labelled); "
                f"it has {n_lab}"
            )
    col = collect_probe_scores(
        model,
        tokenizer,
        prompts,
        aliases,
        s,
        relations=relations,
        clipped=clipped,
        ees=ees,
        features=probe_train is not None,
        show_progress=show_progress,
    )
    timings = dict(col["timings"])
    train_x = train_y = None
    if probe_train is not None:
        t0 = time.perf_counter()
        train_x, train_y = labelled_features(model, tokenizer, probe_train[0], probe_train[1], s, show_progress)
        timings["hidden_probe_features"] = time.perf_counter() - t0
    summary, t_sum, info = summarize_detection(col["records"], train_x, train_y, col["features"], s, n_boot=n_boot)
    timings.update(t_sum)
    correct = [r["correct"] for r in col["records"]]
    return DetectionResult(
        records=col["records"],
        summary=summary,
        factual_accuracy=sum(correct) / len(correct),
        timings=timings,
        settings=asdict(s),
        info={**col["info"], **info},
    )


def settings_dict(s: EigenScoreSettings) -> dict:
    return asdict(s)
