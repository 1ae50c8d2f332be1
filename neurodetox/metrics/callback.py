"""Every hallucination detector and factual accuracy at every Trainer evaluation."""

from __future__ import annotations

import math
import time
import warnings
from typing import Optional, Sequence

import numpy as np
import torch
from transformers import TrainerCallback

from neurodetox.core.distributed import all_gather_objects, is_distributed, rank, shard, unshard
from neurodetox.core.errors import UserError
from neurodetox.metrics.hidden_probe import HiddenStateProbe
from neurodetox.metrics.probes import (
    EigenScoreSettings,
    ProbeResult,
    collect_probe_scores,
    evaluate_probes,
    labelled_features,
    summarize_detection,
)

__all__ = ["EigenScoreCallback", "evaluate_probes_all_ranks", "collect_probe_scores_all_ranks"]


def evaluate_probes_all_ranks(
    model, tokenizer, prompts, aliases, settings: Optional[EigenScoreSettings] = None, show_progress: bool = False
) -> ProbeResult:
    """:func:`neurodetox.metrics.probes.evaluate_probes` that also works on several processes.

    Single process: a plain call. Distributed: prompts are dealt to ranks
    (padded so every rank makes the same number of ``generate`` calls, which
    ZeRO-3 needs) and the per-prompt records gathered back in order; every
    rank returns the same result, so call it on every rank.
    """
    if not is_distributed():
        return evaluate_probes(model, tokenizer, prompts, aliases, settings, show_progress=show_progress)
    if len(prompts) == 0:
        raise ValueError("no probe prompts to evaluate (empty probe set)")
    idx, n_real = shard(len(prompts))
    part = evaluate_probes(
        model,
        tokenizer,
        [prompts[i] for i in idx],
        [aliases[i] for i in idx],
        settings,
        show_progress=show_progress and rank() == 0,
    )
    records = unshard(all_gather_objects(part.records[:n_real]), len(prompts))
    scores = [r["eigenscore"] for r in records if not math.isnan(r["eigenscore"])]
    return ProbeResult(
        factual_accuracy=sum(r["correct"] for r in records) / len(records),
        eigenscore=sum(scores) / len(scores) if scores else float("nan"),
        records=records,
    )


def _gather_rows(rows: list, n_real: int, n: int) -> list:
    return unshard(all_gather_objects(rows[:n_real]), n) if is_distributed() else rows


def collect_probe_scores_all_ranks(
    model, tokenizer, prompts, aliases, settings: EigenScoreSettings, *, features: bool = False
) -> tuple[list, Optional[torch.Tensor]]:
    """:func:`~neurodetox.metrics.probes.collect_probe_scores` (no EES, no clipping) on every rank.

    Returns ``(records, features [P, 2, d] or None)``, identical on every rank.
    """
    idx, n_real = shard(len(prompts)) if is_distributed() else (list(range(len(prompts))), len(prompts))
    col = collect_probe_scores(
        model,
        tokenizer,
        [prompts[i] for i in idx],
        [aliases[i] for i in idx],
        settings,
        clipped=False,
        ees=False,
        features=features,
    )
    records = _gather_rows(col["records"], n_real, len(prompts))
    feats = None
    if features:
        rows = [f.numpy() for f in col["features"]]
        feats = torch.from_numpy(np.stack(_gather_rows(rows, n_real, len(prompts))))
    return records, feats


def _labelled_features_all_ranks(model, tokenizer, prompts, aliases, settings) -> tuple[torch.Tensor, list]:
    idx, n_real = shard(len(prompts)) if is_distributed() else (list(range(len(prompts))), len(prompts))
    x, y = labelled_features(model, tokenizer, [prompts[i] for i in idx], [aliases[i] for i in idx], settings)
    rows = _gather_rows([(f.numpy(), h) for f, h in zip(x, y)], n_real, len(prompts))
    return torch.from_numpy(np.stack([r[0] for r in rows])), [r[1] for r in rows]


class EigenScoreCallback(TrainerCallback):
    """Every hallucination detector on fact probes at each evaluation, logged as ``eval_*`` metrics.

    At each evaluation, on the evaluation probes: ``K`` sampled answers per prompt in one
    batched ``generate`` and the greedy answer, every one ending at the answer boundary of
    ``settings`` (INSIDE's by default). From those samples: factual accuracy of the greedy
    answers, EigenScore (Chen et al., "INSIDE", arXiv 2402.03744), perplexity, LN-entropy,
    lexical similarity, answer length, discrete semantic entropy, distinct answers and the
    greedy answer's negative log-probability (maximum sequence probability). With labelled
    tracking probes (``train_prompts``) the hidden-state probe (SAPLMA, arXiv 2304.13734) is
    refit on them at each evaluation and scores the evaluation probes.

    :class:`neurodetox.send.SeNDTrainer` merges :meth:`compute_metrics` into the evaluation
    metrics, which the Trainer passes to its ``log``, so every reporter receives, per
    detector ``D``: ``eval_D`` (mean score over the probes), ``eval_D_auroc`` and
    ``eval_D_auroc_low`` / ``eval_D_auroc_high`` (bootstrap 95 % interval) for detecting a
    wrong greedy answer; plus ``eval_factual_accuracy``, ``eval_eigenscore`` and
    ``eval_detectors_seconds`` (the cost of this evaluation).

    Args:
        tokenizer: the model's tokenizer.
        prompts: evaluation probe prompts ``P``.
        aliases: accepted answers per prompt.
        settings: :class:`neurodetox.metrics.probes.EigenScoreSettings`.
        train_prompts, train_aliases: labelled probes for the hidden-state probe, disjoint from
            ``prompts`` (the tracking probes); ``None``: no hidden-state probe.
        n_boot: bootstrap resamples of each AUROC interval. Default 200.

    Raises:
        ValueError: no evaluation prompts; UserError: fewer labelled probes than
            ``settings.probe_min_labelled`` (names how many it has and needs).

    Warns:
        UserWarning: at an evaluation where the probes are all correct or all wrong (AUROC
            undefined, logged as NaN), or where the tracking probes have too few of one outcome
            to fit the hidden-state probe (skipped at that evaluation).

    Only a trainer's evaluation loop runs it (:class:`neurodetox.send.SeNDTrainer`, or any
    Trainer through :func:`neurodetox.send.integration.add_send` / ``SeNDMixin``), which sets
    :attr:`evaluated_by`; in any other trainer it raises ``UserError`` at ``on_train_begin``
    rather than silently logging nothing.

    Attributes:
        history: list of ``(global_step, ProbeResult)``.
        evaluated_by: name of the trainer class that calls :meth:`compute_metrics` at each
            evaluation; ``None`` until such a trainer starts training.
    """

    evaluated_by: Optional[str] = None

    def on_train_begin(self, args, state, control, **kwargs):
        if self.evaluated_by is None:
            raise UserError(
                "EigenScoreCallback computes nothing in this trainer (only an evaluation loop that calls it does): "
                "use neurodetox.send.SeNDTrainer, or add_send(trainer, SeNDArguments(), probe_prompts=..., "
                "probe_aliases=...) from neurodetox.send.integration, or class MyTrainer(SeNDMixin, YourTrainer)"
            )

    def __init__(
        self,
        tokenizer,
        prompts: Sequence[str],
        aliases: Sequence[Sequence[str]],
        settings: Optional[EigenScoreSettings] = None,
        *,
        train_prompts: Optional[Sequence[str]] = None,
        train_aliases: Optional[Sequence[Sequence[str]]] = None,
        n_boot: int = 200,
    ):
        if len(prompts) == 0:
            raise ValueError("EigenScoreCallback needs at least one probe prompt (empty probe set)")
        self.tokenizer = tokenizer
        self.prompts, self.aliases = list(prompts), [list(a) for a in aliases]
        self.settings = settings or EigenScoreSettings()
        self.n_boot = int(n_boot)
        self.train_prompts = list(train_prompts) if train_prompts else []
        self.train_aliases = [list(a) for a in train_aliases] if train_aliases else []
        if self.train_prompts and len(self.train_prompts) < self.settings.probe_min_labelled:
            raise UserError(
                f"the hidden-state probe needs at least {self.settings.probe_min_labelled} labelled tracking probes "
                f"(probe_min_labelled); it has {len(self.train_prompts)}"
            )
        if len(self.train_prompts) != len(self.train_aliases):
            raise ValueError(f"{len(self.train_prompts)} tracking probe prompts but {len(self.train_aliases)} aliases")
        self.history: list[tuple[int, ProbeResult]] = []

    def compute_metrics(self, model, step: int = 0) -> dict:
        """Run every detector now; returns the metrics (keys without the ``eval_`` prefix).

        With several processes, prompts are dealt to ranks (padded so every rank makes the same
        number of ``generate`` calls, which ZeRO-3 needs) and the per-prompt records gathered
        back in order: call it on every rank.
        """
        t0 = time.perf_counter()
        s = self.settings
        use_probe = bool(self.train_prompts)
        records, feats = collect_probe_scores_all_ranks(
            model, self.tokenizer, self.prompts, self.aliases, s, features=use_probe
        )
        train_x = train_y = None
        if use_probe:
            train_x, train_y = _labelled_features_all_ranks(
                model, self.tokenizer, self.train_prompts, self.train_aliases, s
            )
            try:
                HiddenStateProbe(s.probe_position, s.probe_min_labelled).check_labels(train_y)
            except UserError as e:
                warnings.warn(f"step {step}: hidden-state probe skipped: {e}", stacklevel=2)
                train_x = train_y = None
        summary, _, _ = summarize_detection(records, train_x, train_y, feats, s, n_boot=self.n_boot)
        n = len(records)
        n_wrong = sum(not r["correct"] for r in records)
        if n_wrong in (0, n):
            warnings.warn(
                f"step {step}: all {n} evaluation probes are {'wrong' if n_wrong else 'correct'}: detection AUROC is "
                "undefined and logged as NaN",
                stacklevel=2,
            )
        metrics: dict = {"factual_accuracy": (n - n_wrong) / n}
        for name, entry in summary.items():
            vals = [r[name] for r in records if r.get(name) is not None]
            metrics[name] = float(np.mean(vals)) if vals else float("nan")
            metrics[f"{name}_auroc"] = entry["auroc"]
            metrics[f"{name}_auroc_low"] = entry["ci_low"]
            metrics[f"{name}_auroc_high"] = entry["ci_high"]
        metrics["detectors_seconds"] = time.perf_counter() - t0
        result = ProbeResult(
            factual_accuracy=metrics["factual_accuracy"],
            eigenscore=metrics.get("eigenscore", float("nan")),
            records=records,
            detectors={k: v for k, v in metrics.items() if k not in ("factual_accuracy", "eigenscore")},
        )
        self.history.append((step, result))
        return result.metrics()
